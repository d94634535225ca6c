"""Held-out validation loss (validation.loss_split / loss_dir): which images are held back, that measuring it leaves
training bit-identical, that it is exact (fixed timesteps and noise), that it falls as the quickstart learns, and
that `ab --checkpoints --rank-by val_loss` ranks checkpoints by it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICKSTART, ROOT, run_trainer
from safetensors.torch import load_file

from sdtune.adapters.manifest import read_manifest
from sdtune.trainers.core.data import ImageRecord, scan_dataset
from sdtune.trainers.core.recipe import RecipeError, load_recipe
from sdtune.trainers.core.val_loss import held_out_rank, split_held_out

PURPLE = ROOT / "datasets" / "quickstart-purple"

SHORT_RECIPE = """
base: toy
data:
  train_data_dir: {data}
  trigger_word: purple
  resolution: 64
  min_bucket_reso: 64
  max_bucket_reso: 64
  bucket_reso_steps: 8
  random_flip: true
  caption_dropout_rate: 0.05
method:
  rank: 4
  lora_alpha: 4
  lora_dropout: 0.1
train:
  max_train_steps: 6
  train_batch_size: 4
  learning_rate: 1.0e-3
  checkpointing_steps: 3
validation:
  validation_steps: 2
output:
  report_to: none
  save_precision: fp32
  export_check: false
  register: false
"""


# -- which images are held back -------------------------------------------------------------------------------------


def _records(names: list[str]) -> list[ImageRecord]:
    return [ImageRecord(f"/data/{n}", None, "a cap", 1, 64, 64, (64, 64), f"hash-{n}", "/data") for n in names]


def _scan(records):
    from sdtune.trainers.core.data import DatasetScan

    return DatasetScan(records=records, skipped=[], kind="folder")


def test_split_is_seeded_stable_and_disjoint():
    names = [f"{i:04d}.png" for i in range(20)]
    train, held = split_held_out(_scan(_records(names)), 0.25, seed=0)
    assert len(held.records) == 5 and len(train.records) == 15
    assert {r.path for r in train.records}.isdisjoint({r.path for r in held.records})
    # the same images whatever order the dataset is scanned in, and the training order kept as scanned
    _, again = split_held_out(_scan(_records(names[::-1])), 0.25, seed=0)
    assert sorted(r.path for r in again.records) == sorted(r.path for r in held.records)
    assert [r.path for r in train.records] == [f"/data/{n}" for n in names if f"/data/{n}" not in
                                               {r.path for r in held.records}]  # fmt: skip
    # the lowest ranks of (seed, image): another seed holds back others
    ranked = sorted(_records(names), key=lambda r: held_out_rank(0, r))
    assert [r.path for r in held.records] == sorted(r.path for r in ranked[:5])
    _, other = split_held_out(_scan(_records(names)), 0.25, seed=1)
    assert {r.path for r in other.records} != {r.path for r in held.records}


# -- bad input: one line each ---------------------------------------------------------------------------------------

BAD = [
    (["validation.loss_split=0"], "validation.loss_split: Input should be greater than 0"),
    (["validation.loss_split=0.6"], "validation.loss_split: Input should be less than or equal to 0.5"),
    (["validation.loss_split=0.01"], "validation.loss_split: 0.01 of 16 images holds back 0"),
    (["validation.loss_dir={tmp}/missing"], "validation.loss_dir: folder not found"),
    (["validation.loss_dir={tmp}/empty"], "validation.loss_dir: no usable images"),
    (["validation.loss_split=0.25", "validation.loss_dir={tmp}"], "loss_split and loss_dir both set"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_held_out_input_is_one_line(overrides, message, tmp_path, capsys):
    from sdtune.trainers import lora

    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    filled = [o.format(tmp=tmp_path) for o in overrides]
    assert lora.cli([str(QUICKSTART), f"output.dir={out}", *filled]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_one_image_cannot_be_split():
    with pytest.raises(RecipeError, match="at least 1 must be held back and 1 trained on"):
        split_held_out(_scan(_records(["a.png"])), 0.5, seed=0)


# -- real toy runs: training untouched, the split exact, the number exact -------------------------------------------


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Three 6-step toy runs: without a held-out loss, with `loss_dir` (4 purple images copied aside), and with
    `loss_split: 0.25`."""
    root = tmp_path_factory.mktemp("valloss")
    recipe = root / "recipe.yaml"
    recipe.write_text(SHORT_RECIPE.format(data=PURPLE))
    held_dir = root / "held"
    held_dir.mkdir()
    for name in ("0001", "0006", "0011", "0013"):
        for suffix in (".png", ".txt"):
            shutil.copy(PURPLE / f"{name}{suffix}", held_dir / f"{name}{suffix}")
    cache, runs = root / "cache", {}
    for label, extra in (("plain", []), ("dir", [f"validation.loss_dir={held_dir}"]),
                         ("split", ["validation.loss_split=0.25"])):  # fmt: skip
        runs[label] = root / label
        proc = run_trainer([str(recipe), f"output.dir={runs[label]}", *extra], cache)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs[f"{label}-log"] = proc.stdout + proc.stderr
    return recipe, runs


def _val_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "val_loss" in line]


def test_held_out_loss_leaves_training_bit_identical(short_runs):
    _, runs = short_runs
    plain = load_file(str(runs["plain"] / "pytorch_lora_weights.safetensors"))
    measured = load_file(str(runs["dir"] / "pytorch_lora_weights.safetensors"))
    assert plain.keys() == measured.keys()
    for key in plain:
        assert np.array_equal(plain[key].numpy(), measured[key].numpy()), key
    assert read_manifest(runs["plain"]).training["final_loss"] == read_manifest(runs["dir"]).training["final_loss"]
    # ...while it was measured: at the start, every validation_steps and checkpoint, and at the end
    assert [line["step"] for line in _val_lines(runs["dir"])] == [0, 2, 3, 4, 6]
    assert not _val_lines(runs["plain"]) and "val_loss" not in read_manifest(runs["plain"]).training


def test_loss_split_removes_exactly_the_listed_images(short_runs, tmp_path):
    recipe, runs = short_runs
    entry = read_manifest(runs["split"]).training["val_loss"]
    held = entry["images"]
    assert len(held) == 4 and entry["loss_split"] == 0.25
    assert f"held-out validation loss: 4 images: {', '.join(held)}" in runs["split-log"]
    # what trained is exactly the other 12: the manifest's data fingerprint is that of a folder holding only them
    rest = tmp_path / "rest"
    rest.mkdir()
    for image in sorted(PURPLE.glob("*.png")):
        if image.name not in held:
            shutil.copy(image, rest / image.name)
            shutil.copy(image.with_suffix(".txt"), rest / f"{image.stem}.txt")
    data = load_recipe(recipe, [f"data.train_data_dir={rest}"]).data
    dataset = read_manifest(runs["split"]).dataset
    assert dataset["images"] == 12 and dataset["fingerprint"] == scan_dataset(data).fingerprint()


def test_manifest_records_the_loss_of_every_checkpoint(short_runs):
    _, runs = short_runs
    entry = read_manifest(runs["dir"]).training["val_loss"]
    assert entry["images"] == ["0001.png", "0006.png", "0011.png", "0013.png"]
    assert entry["timesteps"] == [125, 375, 625, 875]
    logged = {str(line["step"]): line["val_loss"] for line in _val_lines(runs["dir"])}
    assert entry["by_step"] == logged  # checkpoint-3, checkpoint-6 (the end) and every validation step
    assert all(0 < value < 1 for value in logged.values())


def test_the_same_checkpoint_gives_the_same_val_loss_exactly(short_runs):
    """Fixed timesteps and noise: evaluating checkpoint-3's LoRA twice gives the same number to the bit, and the
    one the run recorded."""
    from accelerate import Accelerator
    from peft import LoraConfig

    from sdtune.trainers.core import runtime
    from sdtune.trainers.core.val_loss import held_out_images, held_out_loss

    recipe_file, runs = short_runs
    recipe = load_recipe(recipe_file, [f"validation.loss_dir={runs['dir'].parent / 'held'}"])
    accelerator = Accelerator(cpu=True)
    frozen = runtime.load_frozen_base(recipe, accelerator)
    frozen.pipe.load_lora_weights(str(runs["dir"] / "checkpoints" / "checkpoint-3"))
    assert isinstance(frozen.unet.peft_config["default_0"], LoraConfig)
    _, held = held_out_images(recipe, scan_dataset(recipe.data))
    loss = held_out_loss(recipe, held, frozen, accelerator)
    first, second = loss(3), loss(3)
    assert first == second
    recorded = read_manifest(runs["dir"]).training["val_loss"]["by_step"]["3"]
    assert first == pytest.approx(recorded, rel=1e-5)


# -- ranking checkpoints by it ---------------------------------------------------------------------------------------


def test_ab_checkpoints_rank_by_val_loss(short_runs, tmp_path, capsys, monkeypatch):
    """`sdtune ab --checkpoints RUN --rank-by val_loss`: each checkpoint carries the val_loss the run recorded for
    its step, beside its toy score, and the lowest is the best; a run without a held-out loss is one line."""
    from sdtune.studio import cli

    _, runs = short_runs
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    args = ["ab", "--checkpoints", str(runs["dir"]), "--prompt", "a purple circle", "--seed", "0", "--steps", "4"]
    assert cli.main([*args, "--rank-by", "val_loss"]) == 0
    out = capsys.readouterr().out
    recorded = read_manifest(runs["dir"]).training["val_loss"]["by_step"]
    lowest = min(("checkpoint-3", recorded["3"]), ("final", recorded["6"]), key=lambda c: c[1])
    assert "best by val_loss" in out
    assert f"val_loss {recorded['3']:.5f}" in out and f"val_loss {recorded['6']:.5f}" in out
    [best_line] = [line for line in out.splitlines() if line.endswith("<- best")]
    assert best_line.split()[0] == lowest[0], out

    with pytest.raises(SystemExit) as refused:
        cli.main([*args[:1], "--checkpoints", str(runs["plain"]), *args[3:], "--rank-by", "val_loss"])
    message = str(refused.value.code)
    assert "\n" not in message and "recorded no held-out validation loss" in message, message


def test_ab_page_checkpoints_panel_shows_val_loss(short_runs, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _, runs = short_runs
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_string("from sdtune.studio.views import ab\nab.render()\n", default_timeout=600).run()
    at.text_input(key="ckpt-run-dir").set_value(str(runs["dir"]))
    at.text_area(key="ckpt-prompts").set_value("a purple circle")
    at.number_input(key="ckpt-steps").set_value(4)
    at.selectbox(key="ckpt-rank-by").set_value("val_loss")
    at = at.button(key="FormSubmitter:ab-checkpoints-Compare checkpoints").click().run()
    assert not at.error, [e.value for e in at.error]
    [table] = at.table
    shown = table.value
    recorded = read_manifest(runs["dir"]).training["val_loss"]["by_step"]
    assert list(shown["label"]) == ["checkpoint-3", "final"]
    assert list(shown["val_loss"]) == [recorded["3"], recorded["6"]]


# -- the outcome on the toy base -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_val_loss_falls_over_the_quickstart(tmp_path):
    """The quickstart recipe with a quarter of its purple images held out (12 trained, 4 held): their loss at fixed
    timesteps and noise falls well below the base's (measured: 0.067 at step 0, 0.044 at step 50, 0.048 at 300)."""
    out = tmp_path / "run"
    args = [str(QUICKSTART), f"output.dir={out}", "validation.loss_split=0.25", "validation.validation_steps=50",
            "output.register=false", "output.report_to=none"]  # fmt: skip
    proc = run_trainer(args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    by_step = {int(k): v for k, v in read_manifest(out).training["val_loss"]["by_step"].items()}
    assert sorted(by_step) == [0, 50, 100, 150, 200, 250, 300]
    assert by_step[300] < 0.85 * by_step[0] and min(by_step.values()) < 0.75 * by_step[0], by_step


def test_a_resumed_run_keeps_the_losses_measured_before(tmp_path):
    """metrics.jsonl holds the losses logged before a resume (and, after a kill, some past the checkpoint, which the
    resumed run measures again): the resumed run's manifest takes those up to its checkpoint, the last of each."""
    from sdtune.trainers.core.val_loss import recorded_history

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_loss": 0.07}, {"step": 2, "loss": 0.3}, {"step": 3, "val_loss": 0.06},
             {"step": 3, "val_loss": 0.05}, {"step": 4, "val_loss": 0.04}]  # fmt: skip
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 5, "val_l')
    assert recorded_history(metrics, 3) == {0: 0.07, 3: 0.05}
    assert recorded_history(tmp_path / "missing.jsonl", 3) == {}


def test_dreambooth_measures_it_through_the_same_loop(tmp_path):
    """DreamBooth (LoRA mode) takes the keys as the LoRA trainer does: its instance images split, the loss recorded
    per step in its manifest."""
    out = tmp_path / "run"
    args = [str(ROOT / "recipes" / "toy-dreambooth.yaml"), f"output.dir={out}", "method.lora=true",
            "method.with_prior_preservation=false", "train.max_train_steps=4", "train.checkpointing_steps=2",
            "validation.validation_steps=0", "validation.loss_split=0.25", "validation.prompts=[]",
            "validation.toy_score=[]", "output.export_check=false", "output.register=false",
            "output.report_to=none"]  # fmt: skip
    proc = run_trainer(args, tmp_path / "cache", script="trainers/dreambooth.py")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = read_manifest(out)
    entry = manifest.training["val_loss"]
    assert len(entry["images"]) == 2 and manifest.dataset["images"] == 6
    assert sorted(entry["by_step"], key=int) == ["0", "2", "4"]


def test_controlnet_measures_it_with_each_image_condition(tmp_path):
    """A ControlNet run with `loss_dir` (3 more mask pairs) records the loss of each held-out image under its own
    condition, from the start to the end; `loss_split` keeps every held-out image with its condition."""
    from conftest import CONTROLNET_SHORT, run_controlnet_trainer

    from sdtune.adapters import toyworld
    from sdtune.trainers.core.data import scan_pairs

    toyworld.write_control_dataset(tmp_path / "data", 6, seed=9)
    toyworld.write_control_dataset(tmp_path / "held", 3, seed=10)
    args = [str(ROOT / "recipes" / "controlnet-toy.yaml"), f"data.train_data_dir={tmp_path / 'data'}",
            *CONTROLNET_SHORT, "output.register=false", "output.export_check=false", f"output.dir={tmp_path / 'run'}",
            f"validation.loss_dir={tmp_path / 'held'}"]  # fmt: skip
    proc = run_controlnet_trainer(args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    entry = read_manifest(tmp_path / "run").training["val_loss"]
    assert entry["images"] == ["0000.png", "0001.png", "0002.png"] and sorted(entry["by_step"]) == ["0", "2", "4"]
    # the ControlNet starts as a no-op (zero convolutions), so step 0 is the base's loss; by step 4 it steers
    assert entry["by_step"]["0"] != entry["by_step"]["4"]

    recipe = load_recipe(ROOT / "recipes" / "controlnet-toy.yaml", [f"data.train_data_dir={tmp_path / 'data'}"])
    scan = scan_pairs(recipe.data)
    train, held = split_held_out(scan, 0.5, seed=0)
    truth = {r.content_hash: c.content_hash for r, c in zip(scan.records, scan.conditions)}
    for part in (train, held):
        assert all(truth[r.content_hash] == c.content_hash for r, c in zip(part.records, part.conditions))
    assert len(held.records) == len(held.conditions) == 3 and len(train.conditions) == 3
