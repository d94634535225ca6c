"""Preference tuning from votes (trainers/preference.py): the DPO loss against a hand computation, stored votes as
triples, the bad inputs one line each, a short run's manifest, lineage and bit-identical resume, the CLI and the
A/B page's "Train on these votes". The proof on the toy base (votes cast by a rule move the property) is in
tests/test_preference_proof.py (slow)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ROOT, kill_after_checkpoint, run_trainer, start_trainer
from PIL import Image
from test_registry import fake_run

from sdtune.adapters import toyworld
from sdtune.adapters.ab import ABError, ABStore, NewComparison, PairRow
from sdtune.adapters.ab.votes import check_same_base, collect_votes, write_pairs
from sdtune.adapters.registry import Registry
from sdtune.adapters.sampling import save_png_atomic

RECIPE = ROOT / "recipes" / "preference.yaml"
SCRIPT = "trainers/preference.py"


def larger_wins(left: Image.Image, right: Image.Image) -> str:
    """The rule votes are cast by here: the larger shape (pixels the toy scorer finds) wins; equal sizes tie."""
    a, b = (toyworld.score_image(im).area for im in (left, right))
    return "tie" if a == b else "left" if a > b else "right"


def stored_comparison(store: ABStore, n: int, *, ties: int = 0, skips: int = 0, base: str = "toy", seed: int = 0):
    """A blind comparison of `n` pairs drawn by hand (a small and a large copy of one toy scene, on random sides),
    voted by `larger_wins`; the last `skips` pairs unvoted, the `ties` before them voted tie. Returns its id."""
    rng = random.Random(seed)

    def fill(folder):
        pairs = []
        for i in range(n):
            s = toyworld.sample_scene(rng)
            small, large = (toyworld.render(toyworld.Scene(s.color, s.shape, r, 32, 32)) for r in (10, 17))
            a, b = (large, small) if rng.random() < 0.5 else (small, large)
            left = rng.choice("ab")
            names = (f"{i:03d}-left.png", f"{i:03d}-right.png")
            for image, name in zip((a, b) if left == "a" else (b, a), names):
                save_png_atomic(image, folder / name)
            pairs.append(PairRow(i, s.caption(), i, left, *names))
        return NewComparison("ab", {"a": base, "b": f"{base}+x"}, {"prompts": [], "seeds": []}, True, None, {}, pairs)

    cid = store.add(fill)
    for k, pair in enumerate(store.get(cid)["pairs"][: n - skips]):
        choice = "tie" if k >= n - skips - ties else larger_wins(Image.open(pair["left"]), Image.open(pair["right"]))
        store.vote(cid, pair["pair"], choice)
    return cid


# -- the loss -------------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computation():
    """Two pairs: -log sigmoid(-beta/2 ((m_w - m_l) - (r_w - r_l))), averaged, worked out by hand."""
    from sdtune.trainers.core.dpo import dpo_loss

    model = torch.tensor([0.10, 0.30, 0.20, 0.25])  # winners 0.10, 0.30; losers 0.20, 0.25
    ref = torch.tensor([0.12, 0.28, 0.18, 0.27])
    loss, inside = dpo_loss(model, ref, beta=50.0)
    # pair 0: (0.10 - 0.20) - (0.12 - 0.18) = -0.04 -> inside = 1.0;  pair 1: (0.05) - (0.01) = 0.04 -> -1.0
    assert inside.tolist() == pytest.approx([1.0, -1.0])
    want = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert float(loss) == pytest.approx(want)
    same, margin = dpo_loss(model, model, beta=5000.0)  # the model is the reference: log 2, no margin
    assert float(same) == pytest.approx(math.log(2)) and margin.tolist() == [0.0, 0.0]


def test_dpo_gradient_lowers_the_winners_error_and_raises_the_losers():
    from sdtune.trainers.core.dpo import dpo_loss

    model = torch.tensor([0.2, 0.2], requires_grad=True)
    dpo_loss(model, torch.tensor([0.2, 0.2]), beta=10.0)[0].backward()
    assert model.grad[0] > 0 > model.grad[1]  # gradient descent: winner's error down, loser's up


# -- votes as triples -----------------------------------------------------------------------------------------------


def test_votes_become_triples_with_ties_and_skips_left_out_and_counted(tmp_path):
    store = ABStore(tmp_path / "home")
    first = stored_comparison(store, 10, ties=2, skips=1)
    second = stored_comparison(store, 4, seed=1)
    votes = collect_votes([first, second, first], store, min_pairs=1)  # an id given twice counts once
    summary = votes.summary()
    assert summary["comparisons"][first] == {
        "pairs": 10,
        "decisive": 7,
        "a": summary["comparisons"][first]["a"],
        "b": 7 - summary["comparisons"][first]["a"],
        "ties": 2,
        "skipped": 1,
    }
    assert (summary["decisive"], summary["ties"], summary["skipped"], summary["pairs"]) == (11, 2, 1, 14)
    assert summary["winner_share_a"] == pytest.approx(summary["a"] / 11)
    for triple in votes.triples:  # the winner is the side the vote chose: here always the larger shape
        winner, loser = (toyworld.score_image(Image.open(p)).area for p in (triple.winner, triple.loser))
        assert winner > loser and triple.prompt.startswith("a ")
    winners, losers = write_pairs(votes, tmp_path / "pairs")
    names = sorted(p.name for p in winners.iterdir())
    assert names == sorted(p.name for p in losers.iterdir()) and len(names) == 22  # 11 images + 11 captions
    assert (winners / "0003.txt").read_text() == votes.triples[3].prompt


@pytest.mark.parametrize(
    "case, message",
    [
        ("too few", "5 decisive vote(s) (0 ties or unvoted pairs left out); preference tuning needs at least 8: "
                    "vote 3 more pair(s), or pool more comparisons"),
        ("images gone", "the images of voted pair 2 are gone"),
        ("another base", "--from other+x: its base 'other' is not the base comparison"),
        ("unknown id", "no comparison 'nope'"),
        ("adapter of another base", "--from toy+sd-lora: adapter 'sd-lora' was trained on 'runwayml/stable-diffusion-"
                                    "v1-5', not on the base 'toy'"),
    ],
)  # fmt: skip
def test_bad_votes_are_one_line_each(tmp_path, case, message):
    store = ABStore(tmp_path / "home")
    cid = stored_comparison(store, 5 if case == "too few" else 9)
    if case == "images gone":
        (store.root / cid / "002-left.png").unlink()
    registry = Registry(tmp_path / "home")
    registry.register_run(fake_run(tmp_path / "sd", name="sd-lora", base="runwayml/stable-diffusion-v1-5"))
    spec = {"another base": "other+x", "adapter of another base": "toy+sd-lora"}.get(case, "toy")
    with pytest.raises(ABError) as raised:
        votes = collect_votes(["nope" if case == "unknown id" else cid], store)
        check_same_base(votes, spec, registry)
    assert message in str(raised.value) and "\n" not in str(raised.value)


# -- a short run: manifest, lineage, registry, bit-identical resume -------------------------------------------------

SHORT = ["train.max_train_steps=8", "train.train_batch_size=4", "train.checkpointing_steps=4",
         "train.lr_warmup_steps=0", "train.learning_rate=5e-4", "validation.prompts=[]",
         "output.report_to=none"]  # fmt: skip


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """12 voted pairs (2 ties, 1 skipped), 8 steps with the export check and registration, run the way
    `sdtune tune-from-votes ID --from toy -o OUT` runs it: the run that the resume test compares with."""
    from sdtune.studio import api

    tmp = tmp_path_factory.mktemp("preference")
    cid = stored_comparison(ABStore(), 15, ties=2, skips=1)
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDTUNE_CACHE", str(tmp / "cache"))
        code = api.tune_from_votes([cid], "toy", out, name="liked-short", overrides=SHORT)
    assert code == 0
    return cid, out, tmp / "cache"


def test_a_run_writes_its_preference_section_and_lineage(short_run):
    from sdtune.adapters.manifest import read_manifest
    from sdtune.adapters.registry import Registry

    cid, out, _ = short_run
    manifest = read_manifest(out)
    section = manifest.preference
    assert (section["pairs_used"], section["ties"], section["skipped"]) == (12, 2, 1)
    assert section["beta"] == 5000.0 and section["reference"] == "toy"
    before, after = section["reward_accuracy"]["before"], section["reward_accuracy"]["after"]
    assert before["accuracy"] == 0.5 and before["mean_margin"] == 0.0  # the LoRA starts at zero: the reference
    assert after["accuracy"] > 0.5 and after["mean_margin"] > 0  # 8 steps already rank the pairs as voted
    assert after["reference_agreement"] == before["reference_agreement"]  # the reference itself did not move
    assert manifest.export_check["ok"] and {"peft", "kohya"} <= set(manifest.files)
    entry = Registry().find_run(out)
    origin = read_manifest(entry.folder).origin
    assert entry.kind == "lora" and entry.origin == "preference"
    assert origin["comparisons"] == [cid] and origin["parents"] == [] and origin["beta"] == 5000.0
    assert origin["votes"] == {"pairs": 15, "decisive": 12, "a": origin["votes"]["a"], "b": 12 - origin["votes"]["a"],
                               "ties": 2, "skipped": 1}  # fmt: skip


def test_sigkill_then_resume_is_bit_identical(short_run, tmp_path):
    """A preference run killed after its first checkpoint and resumed ends with the unbroken run's LoRA, bit for bit
    (the pairs' flips, noise and timesteps all come back)."""
    cid, reference, cache = short_run
    out = tmp_path / "run"
    quiet = [f"method.comparisons=[{cid}]", *SHORT, "output.export_check=false", "output.register=false"]
    kill_after_checkpoint(start_trainer([str(RECIPE), f"output.dir={out}", *quiet], cache, script=SCRIPT), out, 4)
    resumed = run_trainer([str(RECIPE), f"output.dir={out}", "train.resume=latest", *quiet], cache, script=SCRIPT)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    got, want = (safetensors.torch.load_file(p / "pytorch_lora_weights.safetensors") for p in (out, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# -- the command and the page ---------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    return tmp_path / "home"


def test_tune_from_votes_queues_a_job_or_refuses_in_one_line(home, capsys):
    from sdtune.studio import cli, jobs

    cid = stored_comparison(ABStore(), 10, ties=1)
    with pytest.raises(SystemExit) as refused:
        cli.main(["tune-from-votes", cid, "--from", "toy", "--queue", "--set", "method.min_pairs=12"])
    assert str(refused.value) == (
        f"sdtune tune-from-votes: {cid}: 9 decisive vote(s) (1 ties or unvoted pairs left out); preference tuning "
        "needs at least 12: vote 3 more pair(s), or pool more comparisons"
    )
    assert cli.main(["tune-from-votes", cid, "--from", "toy", "--queue", "--name", "liked"]) == 0
    assert "votes: 9 pairs used" in capsys.readouterr().out
    [job] = jobs.list_jobs()
    assert (job.method, job.name) == ("preference", "liked")
    queued = (Path(job.job_dir) / "recipe.yaml").read_text()
    assert f"- {cid}" in queued and "reference: toy" in queued


def test_ab_page_trains_on_these_votes_as_a_job(home):
    from streamlit.testing.v1 import AppTest

    from sdtune.studio import jobs

    cid = stored_comparison(ABStore(), 9)
    Registry().register_run(fake_run(home.parent / "tuned", name="liked-before", method="preference"))
    at = AppTest.from_string("from sdtune.studio.views import ab\nab.render()\n", default_timeout=120)
    at.session_state["ab-current"] = cid
    at = at.run()
    assert "liked-before" in at.multiselect(key="ab-B-adapters").options  # a tuned LoRA is a side's adapter
    assert "9 voted pairs train" in " ".join(c.value for c in at.caption)
    at.radio(key=f"ab-dpo-side-{cid}").set_value("B")
    at = at.button(key=f"ab-dpo-{cid}").click().run()
    assert not at.exception and not [e.value for e in at.error], [e.value for e in at.error]
    [job] = jobs.list_jobs()
    assert (job.method, job.name) == ("preference", "liked")
    assert "reference: toy+x" in (Path(job.job_dir) / "recipe.yaml").read_text()  # side B, as picked


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.loss_type=huber",
            "train.loss_type/snr_gamma/debiased_estimation_loss: the DPO loss compares plain MSEs",
        ),
        ("train.snr_gamma=5", "the DPO loss compares plain MSEs; leave them at l2 / null / false"),
        ("data.caption_dropout_rate=0.1", "data.caption_dropout_rate/masked_loss: each pair trains on its own prompt"),
        ("method.reference=other+x", "method.reference: other+x is on another base than base 'toy'"),
        (
            "method.train_text_encoder=true",
            "method.train_text_encoder: preference tuning trains the UNet's LoRA only; set it",
        ),
    ],
)
def test_recipe_keys_dpo_cannot_take_are_refused_by_name(override, message):
    from sdtune.trainers.core.recipe import RecipeError, load_recipe
    from sdtune.trainers.preference import check_recipe

    with pytest.raises(RecipeError) as refused:
        check_recipe(load_recipe(RECIPE, [override]))
    assert message in str(refused.value) and "\n" not in str(refused.value)
