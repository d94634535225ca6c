"""A/B page: two compositions (a base plus adapters with weights, optionally a ControlNet with a control image) at
the same prompts, seeds and settings, side by side; blind mode with vote buttons and a running tally with its 95%
interval; the history of comparisons (stored in the registry workspace); and a run's checkpoint comparison, which
names the best checkpoint."""

from __future__ import annotations

import streamlit as st

from sdtune.studio import api, jobs
from sdtune.studio.views.common import flash, show_flash, shown_errors

PAIR_WIDTH = 320  # pixels on screen: the toy base's 64 px images scaled up, SD's 512 px scaled down
VOTES = (("Left is better", "left"), ("Tie", "tie"), ("Right is better", "right"))


def render():
    st.title("A/B")
    show_flash()
    compare, history, checkpoints = st.tabs(["Compare", "History", "Checkpoints"], key="ab-tab", on_change="rerun")
    with compare:
        _compare_form()
        if st.session_state.get("ab-current"):
            _comparison(st.session_state["ab-current"])
    with history:
        _history()
    with checkpoints:
        _checkpoints()


def _side(label: str, adapters: list[str], default: list[str], controlnets: list[str], embeddings=()) -> str:
    """A SPEC (`base+name:weight+...+controlnet=name:scale@image`) from a base field, an adapter multiselect with one
    weight per adapter, and optionally a registered ControlNet with its scale and control image."""
    st.markdown(f"**{label}**")
    base = st.text_input("Base", "toy", key=f"ab-{label}-base")
    chosen = st.multiselect("Adapters", adapters, default=default, key=f"ab-{label}-adapters")
    parts = [base.strip() or "toy"]
    for name in chosen:
        weight = st.slider(f"{name} weight", 0.0, 2.0, 1.0, 0.05, key=f"ab-{label}-w-{name}")
        parts.append(f"{name}:{weight:g}")
    if embeddings:  # textual inversions: no weight; a prompt calls each by its token
        help_text = "Registered textual-inversion embeddings; write their token in the prompts, e.g. a <zq>."
        picked = st.multiselect("Embeddings", list(embeddings), key=f"ab-{label}-emb", help=help_text)
        parts += [f"emb={name}" for name in picked]
    parts += _control(label, controlnets)
    spec = "+".join(parts)
    st.code(spec, language=None)
    return spec


def _control(label: str, controlnets: list[str]) -> list[str]:
    """The side's ControlNet part, `controlnet=NAME:SCALE@IMAGE`, or nothing."""
    help_text = "Registered ControlNets; train one (method controlnet) or import one on the Registry page."
    name = st.selectbox("ControlNet", ["(none)", *controlnets], key=f"ab-{label}-cn", help=help_text)
    if name == "(none)":
        return []
    scale = st.slider("ControlNet scale", 0.0, 2.0, 1.0, 0.05, key=f"ab-{label}-cn-scale")
    upload = st.file_uploader(
        "Upload a control image",
        type=["png", "jpg", "jpeg", "webp", "bmp"],
        key=f"ab-{label}-cn-upload",
        max_upload_size=api.CONTROL_IMAGE_MAX_MB,
    )
    if upload is not None:
        with shown_errors():
            st.session_state[f"ab-{label}-cn-uploaded"] = api.save_control_image(upload.name, upload.getvalue())
    choices = {c["name"]: c["path"] for c in api.control_images()}
    uploaded = st.session_state.get(f"ab-{label}-cn-uploaded")
    names = list(choices)
    index = next((i for i, n in enumerate(names) if choices[n] == uploaded), 0)
    picked = st.selectbox("Control image", names, index=index, key=f"ab-{label}-cn-image")
    if picked is None:
        return []
    st.image(choices[picked], caption=f"control image: {picked}", width=128)
    return [f"controlnet={name}:{scale:g}@{choices[picked]}"]


def _compare_form():
    registered = api.list_adapters()
    adapters = [a["name"] for a in registered if a["method"] in ("lora", "preference")]
    controlnets = [a["name"] for a in registered if a["method"] == "controlnet"]
    embeddings = [a["name"] for a in registered if a["method"] == "textual_inversion"]
    left, right = st.columns(2)
    with left:
        spec_a = _side("A", adapters, [], controlnets, embeddings)
    with right:
        spec_b = _side("B", adapters, adapters[:1], controlnets, embeddings)
    with st.form("ab-settings"):
        prompts = st.text_area("Prompts (one per line)", "a purple circle\na purple square", key="ab-prompts")
        c1, c2, c3, c4 = st.columns(4)
        seeds = c1.text_input("Seeds", "0 1", key="ab-seeds")
        steps = c2.number_input("Steps", 1, 200, 25, key="ab-steps")
        guidance = c3.number_input("Guidance (0: the base's)", 0.0, 30.0, 0.0, key="ab-guidance")
        scheduler = c4.selectbox("Sampler", api.scheduler_names(), key="ab-scheduler")
        c5, c6, c7 = st.columns(3)
        size = c5.number_input("Size (0: native)", 0, 2048, 0, step=8, key="ab-size")
        score = c6.selectbox("Score", ["(none)", "toy"], key="ab-score", help="toy: the toy-world colour/shape scorer")
        blind = c7.checkbox("Blind (shuffle sides, vote)", True, key="ab-blind")
        submitted = st.form_submit_button("Render A and B", type="primary")
    if submitted:
        with shown_errors(), st.spinner("rendering both sides ..."):
            try:
                seed_list = [int(s) for s in seeds.replace(",", " ").split()]
            except ValueError:
                raise api.StudioError(f"seeds: whole numbers separated by spaces, got {seeds!r}") from None
            result = api.ab_compare(
                spec_a, spec_b, [p.strip() for p in prompts.splitlines() if p.strip()], seed_list, blind=blind,
                steps=steps, guidance=guidance or None, scheduler=scheduler, size=size or None,
                score=None if score == "(none)" else score,
            )  # fmt: skip
            st.session_state["ab-current"] = result["id"]


def _comparison(comparison_id: str):
    with shown_errors():
        data = api.ab_get(comparison_id)
        st.subheader(f"Comparison {data['id']}")
        st.caption(f"A = {data['a']}   |   B = {data['b']}")
        if data["blind"]:  # votes are for blind comparisons; an open one shows its scores instead
            _tally(api.ab_tally(comparison_id))
            _train_on_votes(data)
            if data["revealed"]:
                st.caption("Every pair is voted: the sides are revealed and the votes are final.")
        else:
            _mean_scores(data["pairs"])
        _control_images(data.get("control_images"))
        if not data["blind"] and data.get("grid"):
            st.image(data["grid"], caption="A | B", width="stretch")
        for pair in data["pairs"]:
            _pair(comparison_id, pair, data["blind"], data["revealed"])


def _control_images(controls: dict | None):
    """What steered each side (blind: shown only when both sides share it, which tells nothing about the sides)."""
    if not controls:
        return
    if controls["a"] == controls["b"]:
        st.image(controls["a"], caption=["control image (both sides)"] * len(controls["a"]), width=128)
        return
    for column, side in zip(st.columns(2), "ab"):
        if controls[side]:
            column.image(controls[side], caption=[f"control image of {side.upper()}"] * len(controls[side]), width=128)
        else:
            column.caption(f"{side.upper()}: no ControlNet")


def _tally(tally: dict):
    if tally["sealed"]:  # a running A/B split would tell which side each vote went to
        c1, c2 = st.columns(2)
        c1.metric("Pairs voted", f"{tally['n']} / {tally['pairs']}")
        c2.metric("Pairs left", tally["remaining"])
        st.caption(
            "The sides and the tally show once every pair is voted (a tie counts); until then a vote can change."
        )
        return
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Votes A / B / tie", f"{tally['a']} / {tally['b']} / {tally['tie']}")
    share = "-" if tally.get("share_a") is None else f"{tally['share_a']:.0%}"
    c2.metric("A preferred", share)
    c3.metric("95% interval", f"{tally['ci_low']:.0%} - {tally['ci_high']:.0%}")
    c4.metric("Pairs left", tally["remaining"])
    if tally.get("verdict"):
        st.info(tally["verdict"])


def _mean_scores(pairs: list[dict]):
    """The toy-world scorer's mean per side, when the comparison was scored."""
    for column, side, name in zip(st.columns(2), ("left", "right"), ("A", "B")):
        scores = [p[f"score_{side}"] for p in pairs if p.get(f"score_{side}") is not None]
        if scores:
            column.metric(f"{name}: mean score", f"{sum(scores) / len(scores):.2f}", help=f"over {len(scores)} images")


def _pair(comparison_id: str, pair: dict, blind: bool, final: bool):
    number = pair["pair"] + 1  # pairs are numbered from 0 in the store, from 1 on screen
    st.markdown(f"**{number}. {pair['prompt']}** (seed {pair['seed']})")
    left, right = st.columns(2)
    names = ("left", "right") if blind else ("A", "B")
    for column, side, name in zip((left, right), ("left", "right"), names):
        revealed = pair.get(f"{side}_is")
        caption = name + (f" = {revealed.upper()}" if revealed and blind else "")
        score = pair.get(f"score_{side}")
        caption += f" | score {score:.2f}" if score is not None else ""
        column.image(pair[side], caption=caption, width=PAIR_WIDTH)
    if not blind:
        return
    voted = pair.get("vote")
    if final:  # the comparison is revealed: no buttons, a vote changed after seeing the sides would not be blind
        earlier = f" (changed from {', '.join(pair['votes'][:-1])})" if len(pair["votes"]) > 1 else ""
        st.caption(f"voted {voted}{earlier}")
        return
    for column, (label, choice) in zip(st.columns(len(VOTES)), VOTES):
        kind = "primary" if voted == choice else "secondary"
        if column.button(label, key=f"vote-{comparison_id}-{pair['pair']}-{choice}", type=kind):
            with shown_errors():
                api.ab_vote(comparison_id, pair["pair"], choice)
                flash(f"pair {number}: voted {choice}")
                st.rerun()


def _history():
    rows = api.ab_history(50)
    if not rows:
        st.info("No comparisons yet.")
        return
    st.dataframe(
        [
            {
                "id": r["id"],
                "kind": r["kind"],
                "created": r["created_at"],
                "blind": bool(r.get("blind")),
                "votes A/B/tie": _votes(r.get("tally")),
                "sides": str(r.get("sides", ""))[:80],
            }
            for r in rows
        ],  # fmt: skip
        hide_index=True,
    )
    chosen = st.selectbox("Open", [r["id"] for r in rows if r["kind"] == "ab"], key="ab-history-open")
    if chosen and st.button("Open comparison", key="ab-history-go"):
        st.session_state["ab-current"] = chosen
        flash(f"opened {chosen} in the Compare tab")
        st.rerun()


def _votes(tally: dict | None) -> str:
    if not tally:
        return ""
    return f"{tally['n']} voted, sealed" if tally["sealed"] else f"{tally['a']}/{tally['b']}/{tally['tie']}"


def _checkpoints():
    st.write("Scores every saved checkpoint of a LoRA run (and its final LoRA) on the same prompts and seeds.")
    runs = [j.to_dict()["run_dir"] for j in jobs.list_jobs(["done"]) if j.method == "lora"]
    with st.form("ab-checkpoints"):
        chosen = st.selectbox("Run of a finished job", runs, key="ckpt-run", index=None, placeholder="(none)")
        typed = st.text_input("...or a run folder", key="ckpt-run-dir", placeholder="runs/quickstart")
        prompts = st.text_area("Prompts (empty: the run's validation.toy_score prompts)", key="ckpt-prompts")
        left, right = st.columns(2)
        register = left.text_input("Register the best as (optional)", key="ckpt-register")
        steps = right.number_input("Sampler steps", 1, 200, 25, key="ckpt-steps")
        rank_by = left.selectbox(
            "Best by", ["score", "val_loss"], key="ckpt-rank-by",
            help="score: the highest toy score; val_loss: the lowest held-out validation loss the run recorded "
            "(validation.loss_split or loss_dir).",
        )  # fmt: skip
        submitted = st.form_submit_button("Compare checkpoints")
    run_dir = typed.strip() or chosen
    if submitted and not run_dir:
        st.error("run: choose a finished job's run or type a run folder")
    elif submitted:
        with shown_errors(), st.spinner("rendering and scoring each checkpoint ..."):
            result = api.ab_checkpoints(
                run_dir, [p.strip() for p in prompts.splitlines() if p.strip()] or None, score="toy",
                register=register.strip() or None, steps=steps, rank_by=rank_by,
            )  # fmt: skip
            st.table([{k: c.get(k) for k in ("label", "step", "score", "val_loss")} for c in result["candidates"]])
            st.success(f"best: {result['best']}")
            if result.get("registered"):
                st.info(f"registered as {result['registered']}")
            if result.get("grid"):
                st.image(result["grid"], width="stretch")


def _train_on_votes(data: dict):
    """ "Train on these votes": a preference run (Diffusion-DPO, trainers/preference.py) over one side, frozen, as
    the reference, queued as a job; what the votes give (pairs used, ties and unvoted left out) is shown first."""
    cid = data["id"]
    with st.expander("Train on these votes"):
        summary = api.votes_summary([cid])
        split = f" (A {summary['a']}, B {summary['b']})" if data["revealed"] else ""  # sealed while voting
        st.caption(
            f"{summary['decisive']} voted pairs train{split}; {summary['ties']} ties and {summary['skipped']} "
            f"unvoted are left out; a run needs at least {summary['needed']}."
        )
        left, right = st.columns(2)
        side = left.radio("Reference (frozen; the new LoRA goes on top)", ["A", "B"], key=f"ab-dpo-side-{cid}",
                          horizontal=True, help="Its base and adapters, merged: use the result as SPEC+name.")  # fmt: skip
        name = right.text_input("Name of the new LoRA", "liked", key=f"ab-dpo-name-{cid}")
        if st.button("Train on these votes", key=f"ab-dpo-{cid}"):
            with shown_errors():
                spec = data[side.lower()]
                job = api.queue_tune_from_votes([cid], spec, name=name.strip() or None,
                                                submission_key=f"votes-{cid}-{side}-{name.strip()}")  # fmt: skip
                flash(f"job {job['id']} queued: {job['name']}, tuned from these votes over {spec} (see Jobs)")
                st.rerun()
