"""A/B comparisons on the toy base: the tally and its interval on known inputs, blind order and votes that survive a
restart (a new store, a new process), toy scores beside the votes, and picking a run's best checkpoint."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.adapters import ab

# -- the tally ------------------------------------------------------------------------------------------------------


def _wilson_by_bisection(k: int, n: int, z: float = ab.Z_95) -> tuple[float, float]:
    """The interval's definition, solved numerically: the p at which |k/n - p| = z sqrt(p(1-p)/n)."""

    def outside(p):
        return abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)

    def root(lo, hi):  # outside(lo) and outside(hi) differ in sign
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (outside(mid) > 0) == (outside(lo) > 0) else (lo, mid)
        return (lo + hi) / 2

    p = k / n
    low = 0.0 if k == 0 else root(0.0, p)
    high = 1.0 if k == n else root(p, 1.0)
    return low, high


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (8, 10, (0.4902, 0.9433)),  # textbook values of the 95% Wilson interval
        (5, 10, (0.2366, 0.7634)),
        (0, 10, (0.0, 0.2775)),  # upper = z^2 / (n + z^2)
        (10, 10, (0.7225, 1.0)),
        (1, 1, (0.2065, 1.0)),
        (37, 50, (0.6045, 0.8413)),
    ],
)
def test_wilson_interval_known_inputs(k, n, expected):
    low, high = ab.wilson_interval(k, n)
    assert (round(low, 4), round(high, 4)) == expected
    assert (low, high) == pytest.approx(_wilson_by_bisection(k, n), abs=1e-9)


def test_wilson_interval_without_votes_is_everything():
    assert ab.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    "a, b, tie, share, ci, verdict",
    [
        # ties are counted, not split: 6 of 8 decisive votes; the interval straddles 1/2
        (6, 2, 3, 0.75, (0.4093, 0.9285), "no clear preference"),
        (15, 2, 1, 15 / 17, (0.6566, 0.9671), "A preferred"),
        (1, 12, 9, 1 / 13, (0.0137, 0.3331), "B preferred"),
        (0, 0, 4, None, (0.0, 1.0), "no clear preference"),
    ],
)
def test_tally_counts_ties_apart(a, b, tie, share, ci, verdict):
    """`ci`: 95% Wilson intervals of a of a + b, as published tables give them (4 places; computed by the closed
    formula with z = 1.959963984540054 outside this code)."""
    t = ab.tally_votes(a, b, tie)
    assert (t["a"], t["b"], t["tie"], t["n"], t["decisive"]) == (a, b, tie, a + b + tie, a + b)
    assert t["share_a"] == pytest.approx(share) if share is not None else t["share_a"] is None
    assert (round(t["ci_low"], 4), round(t["ci_high"], 4)) == ci
    assert t["verdict"] == verdict


@pytest.mark.parametrize(
    "text, error",
    [
        ("toy+", "empty part"),
        ("+toy-purple", "empty part"),
        ("toy++x", "empty part"),
        ("toy+controlnet=toy-masks:0.9", "write controlnet=NAME_OR_PATH"),
        ("toy+controlnet=@mask.png", "write controlnet=NAME_OR_PATH"),
        ("toy+controlnet=toy-masks@", "write controlnet=NAME_OR_PATH"),
        ("toy+controlnet=toy-masks@nowhere.png", "control image nowhere.png not found"),
        ("controlnet=toy-masks@x.png", "starts with its base"),
    ],
)
def test_bad_specs_are_refused_by_name(text, error):
    with pytest.raises(ab.ABError, match=error):
        ab.parse_spec(text, "--b")


def test_spec_syntax(tmp_path):
    side = ab.parse_spec("toy+toy-purple:0.8+runs/x:0.5+cyan")
    assert side.pipeline.base == "toy" and side.controls == []
    assert [(u.ref, u.weight) for u in side.pipeline.adapters] == [("toy-purple", 0.8), ("runs/x", 0.5), ("cyan", 1.0)]
    mask = tmp_path / "m@ask.png"  # the image is everything after the first @
    mask.write_bytes(b"")
    side = ab.parse_spec(f"toy+controlnet=toy-masks:0.9@{mask}+toy-purple+controlnet=runs/edges@{mask}")
    assert [(u.ref, u.weight) for u in side.pipeline.adapters] == [("toy-purple", 1.0)]
    assert side.controls == [ab.ControlUse("toy-masks", 0.9, str(mask)), ab.ControlUse("runs/edges", 1.0, str(mask))]


def test_short_spec_names_control_images_by_file():
    text = "toy+a:0.5+controlnet=runs/cn:0.9@/data/masks/circle.png+controlnet=b@x@y/m.png"
    assert ab.short_spec(text) == "toy+a:0.5+controlnet=runs/cn:0.9@circle.png+controlnet=b@m.png"


@pytest.mark.parametrize(
    "text, prompt, target",
    [
        ("toy", "a purple circle", ("purple", "circle")),
        ("toy:cyan", "a purple circle", ("cyan", "circle")),
        ("toy:cyan:star", "a purple circle", ("cyan", "star")),
        ("toy", "a sks square", (None, "square")),
    ],
)
def test_scorer_targets(text, prompt, target):
    assert ab.Scorer.parse(text).target(prompt) == target


@pytest.mark.parametrize("text", ["clip", "toy:mauve", "toy:red:blob", "toy:red:circle:x"])
def test_bad_scorers_are_refused(text):
    with pytest.raises(ab.ABError, match="--score"):
        ab.Scorer.parse(text)


def test_specs_votes_and_tallies_import_without_torch():
    """A studio page casts votes and reads tallies one click at a time: the spec parser, the store and its
    statistics load no torch (rendering imports it only when it renders)."""
    code = "import sys; import sdtune.adapters.ab.spec, sdtune.adapters.ab.store; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- comparisons on the toy base ------------------------------------------------------------------------------------

PROMPTS = ["a purple circle", "a purple square"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def purple_lora(quickstart_run):
    return str(quickstart_run[0])


@pytest.fixture(scope="module")
def renderer():
    return ab.Renderer()  # one toy base for the whole module: sides switch adapters, no reload


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_open_comparison_scores_the_sides(tmp_path, purple_lora, renderer):
    """Same seeds and settings on both sides; the purple LoRA's side scores as the toy scorer says it draws."""
    from sdtune.adapters import toyworld

    store = ab.ABStore(tmp_path)
    settings = ab.Settings(PROMPTS, SEEDS, steps=25)
    cid = ab.compare("toy", f"toy+{purple_lora}", settings, score="toy", store=store, renderer=renderer)
    c = store.get(cid)
    assert [(p["prompt"], p["seed"]) for p in c["pairs"]] == [(p, s) for p in PROMPTS for s in SEEDS]
    assert all(p["left_is"] == "a" for p in c["pairs"])
    for p in c["pairs"]:  # each stored score is the scorer's reading of the stored image
        for side in ("left", "right"):
            found = toyworld.score_image(Image.open(p[side]))
            expected = float(found.color == "purple" and found.shape == p["prompt"].split()[-1])
            assert p[f"score_{side}"] == expected
    assert c["scores"]["a"] <= 0.25 and c["scores"]["b"] >= 0.75, c["scores"]
    assert Image.open(tmp_path / "ab" / cid / "grid.png").size[0] > 4 * 64
    assert "Lora: run:1" in Image.open(c["pairs"][0]["right"]).text["parameters"]


CONTROL_MASKS = Path(__file__).resolve().parents[1] / "datasets" / "toy-masks" / "validation"


def _registered_name(log: str) -> str:
    return re.search(r"registered as '([^']+)'", log)[1]


def test_controlnet_side_renders_as_sample_does_and_keeps_its_control_image(
    tmp_path, purple_lora, renderer, controlnet_short_run, monkeypatch, capsys
):
    """A side with a LoRA and a registered ControlNet steering by a mask: its image is, pixel for pixel, what
    `sdtune sample` draws with the same LoRA, ControlNet, scale and image; the comparison keeps a copy of the mask
    and shows it on top of the grid."""
    from sdtune.studio import api

    _, run, _, log = controlnet_short_run
    mask = CONTROL_MASKS / "square-mask.png"
    side_b = f"toy+{purple_lora}+controlnet={_registered_name(log)}:0.8@{mask}"
    store = ab.ABStore(tmp_path)
    settings = ab.Settings(["a purple square"], [0, 1], steps=4)
    c = store.get(ab.compare(f"toy+{purple_lora}", side_b, settings, store=store, renderer=renderer))
    sampled = api.sample_images(
        ["a purple square"], tmp_path / "s", seeds=[0, 1], steps=4, adapters=[purple_lora],
        controlnets=[f"{run}:0.8"], control_images=[str(mask)],
    )  # fmt: skip
    for pair, reference in zip(c["pairs"], sampled):
        assert np.array_equal(_pixels(pair["right"]), _pixels(reference))
    assert not np.array_equal(_pixels(c["pairs"][0]["left"]), _pixels(c["pairs"][0]["right"]))  # it steers
    text = Image.open(c["pairs"][0]["right"]).text["parameters"]
    assert 'ControlNet 0: "Image: square-mask.png, Weight: 0.8' in text and "Lora: run:1" in text

    (kept,) = c["control_images"]["b"]
    assert c["control_images"]["a"] == [] and Path(kept).read_bytes() == mask.read_bytes()
    assert Path(kept).parent == tmp_path / "ab" / c["id"]
    rows = (Image.open(Path(c["folder"]) / "grid.png").height - 36 - 24) // 160
    assert rows == 2  # the control image row, then the prompt

    from sdtune.studio import cli

    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path))
    capsys.readouterr()
    assert cli.main(["ab", "show", c["id"]]) == 0
    assert f"control images of B: {kept}" in capsys.readouterr().out


def test_blind_shows_control_images_only_when_both_sides_share_them(tmp_path, renderer, controlnet_short_run):
    _, run, _, _ = controlnet_short_run
    circle, square = CONTROL_MASKS / "circle-mask.png", CONTROL_MASKS / "square-mask.png"
    store = ab.ABStore(tmp_path)
    settings = ab.Settings(["a red circle"], [0], steps=2)
    same = ab.compare(f"toy+controlnet={run}:0.5@{circle}", f"toy+controlnet={run}@{circle}", settings,
                      blind=True, store=store, renderer=renderer)  # fmt: skip
    shown = store.get(same)["control_images"]
    assert shown["a"] == shown["b"] and len(shown["a"]) == 1  # one copy of one image
    differ = ab.compare(f"toy+controlnet={run}@{circle}", f"toy+controlnet={run}@{square}", settings,
                        blind=True, store=store, renderer=renderer)  # fmt: skip
    assert "control_images" not in store.get(differ)  # which side steered by which mask would name the sides
    store.vote(differ, 0, "tie")
    revealed = store.get(differ)["control_images"]
    assert Path(revealed["a"][0]).read_bytes() == circle.read_bytes()
    assert Path(revealed["b"][0]).read_bytes() == square.read_bytes()


def test_unknown_controlnet_is_named_before_rendering(tmp_path, renderer):
    mask = CONTROL_MASKS / "circle-mask.png"
    with pytest.raises(ValueError, match="--controlnet: no-such-cn not found"):
        ab.compare("toy", f"toy+controlnet=no-such-cn@{mask}", ab.Settings(["a red circle"], [0], steps=1),
                   store=ab.ABStore(tmp_path), renderer=renderer)  # fmt: skip
    assert not (tmp_path / "ab.sqlite").exists() or ab.ABStore(tmp_path).history() == []


def test_blind_order_votes_and_restart(tmp_path, purple_lora, renderer):
    """Blind: the shuffle is recorded per pair, hidden until voted, and the votes outlive the store object and the
    process; an open comparison at the same settings shows which image each side drew."""
    store = ab.ABStore(tmp_path)
    settings = ab.Settings(PROMPTS, SEEDS, steps=6)
    blind = ab.compare("toy", f"toy+{purple_lora}", settings, blind=True, store=store, renderer=renderer,
                       rng=random.Random(3))  # fmt: skip
    open_ = ab.compare("toy", f"toy+{purple_lora}", settings, store=store, renderer=renderer)
    shown = store.get(blind)
    assert all(p["left_is"] is None and p["score_left"] is None for p in shown["pairs"])
    assert all("left.png" in p["left"] and "right.png" in p["right"] for p in shown["pairs"])

    # vote left on every pair, through two different store objects: A wins exactly where A was shown left
    for p in shown["pairs"]:
        (store if p["pair"] % 2 else ab.ABStore(tmp_path)).vote(blind, p["pair"], "left")
    revealed = ab.ABStore(tmp_path).get(blind)
    lefts = [p["left_is"] for p in revealed["pairs"]]
    assert set(lefts) == {"a", "b"}, "the shuffle put A on the left every time"
    assert revealed["tally"]["a"] == lefts.count("a") and revealed["tally"]["b"] == lefts.count("b")
    reference = store.get(open_)["pairs"]
    for p, ref in zip(revealed["pairs"], reference):
        assert np.array_equal(_pixels(p["left"]), _pixels(ref["left" if p["left_is"] == "a" else "right"]))
        assert "parameters" not in Image.open(p["left"]).info  # the PNG text would name the LoRA

    # a new process sees the votes; every pair is voted, so the comparison is revealed and its votes are final
    code = (
        "import json, sys; from sdtune.adapters import ab; s = ab.ABStore(sys.argv[1]); "
        "print(json.dumps(s.tally(sys.argv[2]))); s.vote(sys.argv[2], 0, 'tie')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), blind], capture_output=True, text=True)
    assert proc.returncode != 0 and "its votes are final" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout) == revealed["tally"] == ab.ABStore(tmp_path).tally(blind)

    # the commands a user types: a vote refused in one line, then the listing with every side revealed
    env = {**os.environ, "SDTUNE_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "sdtune.studio.cli", "ab"]
    proc = subprocess.run([*cli, "vote", blind, "0", "right"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip() == (
        f"sdtune ab: comparison {blind} is revealed (every pair voted, the sides shown): its votes are final"
    )
    assert ab.ABStore(tmp_path).tally(blind) == revealed["tally"]
    proc = subprocess.run([*cli, "show", blind], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "? | ?" not in proc.stdout and "vote: left" in proc.stdout, proc.stderr


def _blind_comparison(store: ab.ABStore, pairs: int) -> str:
    """A blind comparison in the store without rendering: votes and reveals need only the rows."""

    def fill(folder):
        rows = [ab.PairRow(i, "a purple circle", i, "ab"[i % 2], f"{i:03d}-left.png", f"{i:03d}-right.png")
                for i in range(pairs)]  # fmt: skip
        return ab.NewComparison("ab", {"a": "toy", "b": "toy+x"}, {}, True, None, pairs=rows)

    return store.add(fill)


def test_a_vote_changes_until_the_reveal_then_is_final_and_every_vote_is_kept(tmp_path):
    store = ab.ABStore(tmp_path)
    cid = _blind_comparison(store, 2)  # pair 0 shows A left, pair 1 shows B left
    store.vote(cid, 0, "left")
    store.vote(cid, 0, "right")  # changed before the reveal: the new vote counts
    assert store.tally(cid, unseal=True)["b"] == 1
    assert not store.get(cid)["revealed"]
    tally = store.vote(cid, 1, "tie")  # the last pair: the comparison is revealed
    assert (tally["a"], tally["b"], tally["tie"]) == (0, 1, 1)
    with pytest.raises(ab.ABError, match=f"^comparison {cid} is revealed .*: its votes are final$"):
        store.vote(cid, 0, "left")
    with pytest.raises(ab.ABError, match="its votes are final"):
        ab.ABStore(tmp_path).vote(cid, 1, "left")  # another store (another studio tab) too
    shown = store.get(cid)
    assert shown["revealed"] and shown["tally"] == tally
    assert [(p["vote"], p["votes"]) for p in shown["pairs"]] == [("right", ["left", "right"]), ("tie", ["tie"])]


def test_a_blind_comparison_shows_no_side_and_no_split_until_every_pair_is_voted(tmp_path):
    """Shown pair by pair, a reveal (or a running A/B split) would tell the voter which side each vote went to, and
    the next votes would not be blind: until the last vote, only how many pairs are voted shows."""
    store = ab.ABStore(tmp_path)
    cid = _blind_comparison(store, 3)
    for pair, choice in ((0, "left"), (1, "right")):
        tally = store.vote(cid, pair, choice)
        assert tally == {"id": cid, "sealed": True, "n": pair + 1, "pairs": 3, "remaining": 2 - pair}
        shown = store.get(cid)
        assert shown["tally"] == tally and not shown["revealed"]
        assert all(p["left_is"] is p["right_is"] is p["score_left"] is None for p in shown["pairs"])
    assert [p["left_is"] for p in store.get(cid, unseal=True)["pairs"]] == ["a", "b", "a"]  # for training on votes
    assert store.history()[0]["tally"]["sealed"]
    tally = store.vote(cid, 2, "tie")
    assert not tally["sealed"] and (tally["a"], tally["b"], tally["tie"]) == (2, 0, 1)
    assert [p["left_is"] for p in store.get(cid)["pairs"]] == ["a", "b", "a"]


def test_interactive_vote_asks_pair_by_pair_and_reveals_at_the_end(tmp_path, purple_lora, renderer):
    """`sdtune ab vote ID` as a user answers it: a key that means nothing asks again, l votes left, s skips, q quits;
    what was answered is stored, the rest stays open for later, and no side is named before the last vote."""
    store = ab.ABStore(tmp_path)
    cid = ab.compare("toy", f"toy+{purple_lora}", ab.Settings(["a purple circle"], [0, 1, 2], steps=2), blind=True,
                     store=store, renderer=renderer)  # fmt: skip
    env = {**os.environ, "SDTUNE_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "sdtune.studio.cli", "ab", "vote", cid]
    proc = subprocess.run(cli, env=env, input="maybe\nl\ns\nq\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("[l]eft, [r]ight, [t]ie, [s]kip, [q]uit") == 4  # pair 0 twice, pair 1, pair 2
    assert [p["vote"] for p in store.get(cid)["pairs"]] == ["left", None, None]
    assert "1 of 3 pairs voted: the sides and the tally show once every pair is voted" in proc.stdout
    assert " A " not in proc.stdout and " B " not in proc.stdout and store.tally(cid)["remaining"] == 2
    proc = subprocess.run(cli, env=env, input="r\nt\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    revealed = store.get(cid)
    sides = [f"left|right = {p['left_is'].upper()} | {p['right_is'].upper()}" for p in revealed["pairs"]]
    tally = revealed["tally"]
    assert all(s in proc.stdout for s in sides) and f"A {tally['a']}, B {tally['b']}, tie 1" in proc.stdout


@pytest.mark.parametrize(
    "pair, choice, error",
    [(9, "left", "no pair 9"), (0, "a", "choose left, right, tie"), (0, "maybe", "choose left, right, tie")],
)
def test_bad_votes_are_refused(tmp_path, renderer, pair, choice, error):
    store = ab.ABStore(tmp_path)
    cid = ab.compare("toy", "toy", ab.Settings(["a red circle"], [0], steps=2), blind=True, store=store,
                     renderer=renderer)  # fmt: skip
    with pytest.raises(ab.ABError, match=error):
        store.vote(cid, pair, choice)
    with pytest.raises(ab.ABError, match="no comparison 'nope'"):
        store.vote("nope", 0, "left")


def test_checkpoints_picks_and_registers_the_best(tmp_path, quickstart_run, cyan_run, monkeypatch, renderer):
    """A run whose middle checkpoint holds the purple LoRA and whose others hold the cyan one: on purple prompts the
    middle one must win (not the last), and registering it records which checkpoint of which run it was."""
    from sdtune.adapters.registry import Registry

    purple, cyan = quickstart_run[0], cyan_run
    run = tmp_path / "run"
    for label, source in {"checkpoint-100": cyan, "checkpoint-200": purple, "final": cyan}.items():
        folder = run if label == "final" else run / "checkpoints" / label
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "pytorch_lora_weights.safetensors", folder / "pytorch_lora_weights.safetensors")
        kohya = source / json.loads((source / "adapter.json").read_text())["files"]["kohya"]
        shutil.copy(kohya, folder / "toy-cyan.safetensors")  # named as in the run's (cyan) manifest
    shutil.copy(cyan / "adapter.json", run / "adapter.json")
    store, registry = ab.ABStore(tmp_path / "home"), Registry(tmp_path / "home")
    settings = ab.Settings(["a purple circle", "a purple triangle"], [0, 1], steps=25)
    cid = ab.compare_checkpoints(run, settings, score="toy", store=store, renderer=renderer)
    c = store.get(cid)
    scores = {x["label"]: x["score"] for x in c["candidates"]}
    assert list(scores) == ["checkpoint-100", "checkpoint-200", "final"]
    assert c["best"] == "checkpoint-200" and scores["checkpoint-200"] >= 0.75 > scores["final"], scores

    entry = ab.register_best(c, "purple-best", registry)
    manifest = registry.manifest("purple-best")
    assert manifest.origin["checkpoint"] == "checkpoint-200" and manifest.origin["run_dir"] == str(run.resolve())
    assert manifest.training["steps"] == 200 and manifest.export_check is None
    assert manifest.scores["ab_checkpoints"]["comparison"] == cid
    registered = entry.folder / "pytorch_lora_weights.safetensors"
    assert registered.read_bytes() == (purple / "pytorch_lora_weights.safetensors").read_bytes()
    assert store.get(cid)["registered"] == "purple-best"


@pytest.mark.slow
def test_checkpoints_of_a_real_run(tmp_path, renderer):
    """A short purple run (100 steps) saving a checkpoint every 25 steps: the early checkpoint has not learned purple yet, the
    picked one has, and each candidate's score is what the project's scorer measures on that checkpoint's file."""
    from conftest import QUICKSTART, run_trainer

    from sdtune.adapters import compose, scoring
    from sdtune.adapters.registry import Registry

    run = tmp_path / "run"
    args = [str(QUICKSTART), f"output.dir={run}", "train.max_train_steps=100", "train.checkpointing_steps=25",
            "train.checkpoints_total_limit=null", "validation.validation_steps=0", "output.register=false"]  # fmt: skip
    proc = run_trainer(args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    store, registry = ab.ABStore(tmp_path / "home"), Registry(tmp_path / "home")
    prompts = ["a purple circle", "a purple square", "a purple triangle"]  # the recipe's validation.toy_score
    cid = ab.compare_checkpoints(run, ab.Settings(prompts, [0, 1, 2, 3]), score="toy", store=store, renderer=renderer)
    c = store.get(cid)
    scores = {x["label"]: x["score"] for x in c["candidates"]}
    assert list(scores) == [f"checkpoint-{n}" for n in (25, 50, 75)] + ["final"]  # 100 is the final save
    best = next(x for x in c["candidates"] if x["label"] == c["best"])
    # measured on a partial run (6 images): 0.33 at step 25, 0.83 at 50, 1.0 at 75 and 100 (75 picked: a tie)
    assert scores["checkpoint-25"] <= 0.5 and best["score"] >= 0.75, scores
    assert best["score"] == max(scores.values()) and best["score"] > scores["checkpoint-25"]

    targets = [scoring.Target(p, "purple", p.split()[-1]) for p in prompts]
    composer = compose.build(compose.PipelineSpec("toy", [compose.AdapterUse(best["path"])]))
    measured = scoring.score_targets(composer.pipe, targets, guidance=3.0)
    assert measured.score.both == best["score"]

    entry = ab.register_best(c, "purple-picked", registry)
    assert registry.manifest("purple-picked").origin["checkpoint"] == c["best"]
    assert (
        entry.folder.joinpath("pytorch_lora_weights.safetensors").read_bytes()
        == (Path(best["path"]) / "pytorch_lora_weights.safetensors").read_bytes()
    )


def test_wrong_sides_fail_before_rendering(tmp_path, quickstart_run):
    from sdtune.adapters.compose import ComposeError
    from sdtune.adapters.registry import Registry

    registry = Registry(tmp_path / "home")
    registry.register_run(quickstart_run[0], name="tp")
    renderer = ab.Renderer(registry=registry)
    settings = ab.Settings(["a red circle"], [0], steps=2)
    with pytest.raises(ComposeError, match="--adapter: nope not found"):
        ab.compare("toy", "toy+tp+nope", settings, store=ab.ABStore(tmp_path), renderer=renderer)
    with pytest.raises(ab.ABError, match="a LoRA is no base; write BASE\\+tp, e.g. toy\\+tp"):
        ab.compare("tp", "toy", settings, store=ab.ABStore(tmp_path), renderer=renderer)
    assert renderer._composers == {}  # nothing was loaded


def test_the_tally_line_names_the_side_ahead():
    from sdtune.studio.cli_ab import _tally_line

    tally = {"sealed": False, "a": 0, "b": 1, "tie": 0, "decisive": 1, "share_a": 0.0, "ci_low": 0.0, "ci_high": 0.79}
    tally |= {"verdict": "no clear preference yet", "remaining": 3, "pairs": 4}
    assert _tally_line(tally) == (
        "A 0, B 1, tie 0: B preferred in 100% of 1 decisive votes (95% Wilson interval 0.21-1.00): "
        "no clear preference yet; 3 of 4 pairs left to vote"
    )


def test_checkpoints_are_compared_at_the_seeds_the_runs_own_score_used(tmp_path):
    """A run whose recipe scores at `validation.toy_seeds: [0..7]` (recipes/toy-lora-star.yaml) has its checkpoints
    compared at those 8 seeds, not at 0-3; a recipe without the key keeps 0-3."""
    from test_registry import fake_run

    from sdtune.adapters.manifest import read_manifest, write_manifest
    from sdtune.studio import api
    from sdtune.studio.api.comparisons import toy_score_defaults

    run = fake_run(tmp_path / "star")
    manifest = read_manifest(run)
    manifest.recipe = {"validation": {"toy_score": [{"prompt": "a purple star"}], "toy_seeds": list(range(8))}}
    write_manifest(run, manifest)
    assert toy_score_defaults(run) == (["a purple star"], [0, 1, 2, 3, 4, 5, 6, 7])
    assert toy_score_defaults(fake_run(tmp_path / "plain")) == ([], [0, 1, 2, 3])
    with pytest.raises(api.StudioError, match="plain: its recipe has no validation.toy_score prompts; give --prompt"):
        api.ab_checkpoints(tmp_path / "plain")
