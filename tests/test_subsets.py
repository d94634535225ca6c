"""Datasets of several concepts (`data.subsets`, sd-scripts' dataset-config model): each folder with its repeats and
caption settings, regularization subsets (`is_reg`) paired with the training images and weighed at
`prior_loss_weight`, and the preflight's line per subset. Measured over whole epochs of real batches."""

from __future__ import annotations

import dataclasses
import json
import types
from collections import Counter

import pytest
import torch
import yaml
from conftest import QUICKSTART, run_trainer
from diffusers import DDPMScheduler
from pydantic import ValidationError
from test_masked_loss import PoolingVae

from sdtune.adapters import toyworld
from sdtune.trainers.core.batches import Batch, PriorPairedBatches, make_batches
from sdtune.trainers.core.data import DataError, format_preflight, scan_dataset
from sdtune.trainers.core.diffusion import batch_loss
from sdtune.trainers.core.recipe import DataConfig, Recipe, TrainConfig

GRID = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=64, bucket_reso_steps=8, cache_latents=False)


def three_subsets(tmp_path, **reg_keys) -> DataConfig:
    """circles (4 images x 3, captioned), squares (2 x 2, no caption files: class_tokens), reg (3 x 1, plus reg2
    1 x 3 when asked)."""
    toyworld.write_dataset(tmp_path / "circles", 4, seed=1, colors=["purple"], shapes=["circle"])
    toyworld.write_dataset(tmp_path / "squares", 2, seed=2, colors=["orange"], shapes=["square"])
    for caption in (tmp_path / "squares").glob("*.txt"):
        caption.unlink()
    toyworld.write_dataset(tmp_path / "reg", 3, seed=3, colors=["red", "blue"])
    subsets = [
        {"image_dir": str(tmp_path / "circles"), "num_repeats": 3},
        {"image_dir": str(tmp_path / "squares"), "num_repeats": 2, "class_tokens": "sks square"},
        {"image_dir": str(tmp_path / "reg"), "is_reg": True},
    ]
    if reg_keys.get("second_reg"):
        toyworld.write_dataset(tmp_path / "reg2", 1, seed=4, colors=["green"])
        subsets.append({"image_dir": str(tmp_path / "reg2"), "is_reg": True, "num_repeats": 3})
    return DataConfig(subsets=subsets, **GRID)


def batches_of(cfg: DataConfig, batch_size=2):
    """The run's batches (`make_batches`), latents from `PoolingVae`."""
    accelerator = types.SimpleNamespace(print=lambda *a: None, process_index=0, num_processes=1, device="cpu")
    train = TrainConfig(train_batch_size=batch_size, seed=0)
    return make_batches(scan_dataset(cfg), cfg, train, accelerator, PoolingVae(), None, None, cache_text=False)[0]


def epoch_of(batches, epoch=0) -> list[Batch]:
    return [batches.build(p, epoch, i) for i, p in enumerate(batches.epoch_batches(epoch))]


# -- the recipe ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"data": {"train_data_dir": "a", "subsets": [{"image_dir": "b"}]}}, "subsets replace train_data_dir"),
        ({"data": {"subsets": [{"image_dir": "b", "is_reg": True}]}}, "every subset is is_reg"),
        ({"data": {"subsets": [{"image_dir": "b", "num_repeats": 0}]}}, "num_repeats"),
        ({"data": {"subsets": [{"image_dir": "b", "repeats": 2}]}}, "repeats"),
        ({"data": {"subsets": [{"image_dir": "b"}]}, "method": {"type": "controlnet"}}, "ControlNet reads"),
        (
            {
                "data": {"subsets": [{"image_dir": "b"}, {"image_dir": "c", "is_reg": True}]},
                "method": {
                    "type": "dreambooth",
                    "instance_prompt": "a sks dog",
                    "class_prompt": "a dog",
                    "with_prior_preservation": True,
                },
            },
            "two sources of class images",
        ),
    ],
)
def test_subsets_that_cannot_work_are_refused(recipe, message):
    with pytest.raises(ValidationError, match=message):
        Recipe.model_validate(recipe)


# -- scan and preflight -------------------------------------------------------------------------------------------


def test_each_subset_has_its_repeats_and_captions_and_the_preflight_lists_them(tmp_path):
    cfg = three_subsets(tmp_path)
    scan = scan_dataset(cfg)
    assert Counter((r.subset, r.repeats) for r in scan.records) == {(0, 3): 4, (1, 2): 2}
    assert {r.caption for r in scan.records if r.subset == 1} == {"sks square"}
    assert {r.caption for r in scan.records if r.subset == 0} == {"a purple circle"}
    assert [r.subset for r in scan.regularization.records] == [2, 2, 2]
    text = format_preflight(scan, 64)
    assert "data: 6 images (16 per epoch with repeats), layout subsets" in text
    assert f"[0] {tmp_path / 'circles'}: 4 images x 3 repeats = 12 (75%)" in text
    assert f"[1] {tmp_path / 'squares'}: 2 images x 2 repeats = 4 (25%)" in text
    assert f"[2] {tmp_path / 'reg'} (is_reg): 3 images x 1 repeats, ~16 drawn per epoch" in text


def test_an_empty_or_missing_subset_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = DataConfig(subsets=[{"image_dir": str(tmp_path / "empty")}], **GRID)
    with pytest.raises(DataError, match=r"data.subsets\[0\].image_dir: no usable images"):
        scan_dataset(cfg)
    cfg = DataConfig(subsets=[{"image_dir": str(tmp_path / "nowhere")}], **GRID)
    with pytest.raises(DataError, match=r"data.subsets\[0\].image_dir: folder not found"):
        scan_dataset(cfg)


# -- an epoch, measured -------------------------------------------------------------------------------------------


def test_an_epoch_trains_each_subset_by_its_repeats_and_pairs_as_many_regularization_images(tmp_path):
    batches = batches_of(three_subsets(tmp_path, second_reg=True))
    assert isinstance(batches, PriorPairedBatches)
    for epoch in (0, 1):
        built = epoch_of(batches, epoch)
        scan = batches.instance.scan
        seen = Counter()
        for batch, positions in zip(built, batches.epoch_batches(epoch)):
            seen.update(scan.records[batches.instance.expanded[p]].subset for p in positions)
            assert batch.num_prior == len(positions) and len(batch.captions) == 2 * len(positions)
        assert seen == {0: 12, 1: 4}  # images x repeats
    # regularization: one per training image, drawn among the reg subsets in proportion to images x repeats
    drawn = Counter()
    for epoch in range(20):
        for batch in epoch_of(batches, epoch):
            drawn.update(batch.captions[len(batch.captions) - batch.num_prior :])
    green = sum(n for caption, n in drawn.items() if "green" in caption)
    assert sum(drawn.values()) == 20 * 16
    assert green / sum(drawn.values()) == pytest.approx(3 / 6, abs=0.08)  # reg2: 1 image x 3 of 6 reg draws


def test_caption_settings_are_each_subsets_own(tmp_path):
    cfg = three_subsets(tmp_path)
    subsets = [s.model_dump() for s in cfg.subsets]
    subsets[0] |= {"caption_dropout_rate": 1.0}
    subsets[1] |= {"shuffle_caption": True, "class_tokens": "sks, square, orange, flat, shape", "keep_tokens": 1}
    cfg = cfg.model_copy(update={"subsets": [type(cfg.subsets[0])(**s) for s in subsets]})
    built = epoch_of(batches_of(cfg, batch_size=1))
    captions = Counter()
    for batch in built:
        captions.update(batch.captions[: len(batch.captions) - batch.num_prior])
    assert captions[""] == 12  # subset 0: always dropped
    squares = [c for c in captions.elements() if c]
    assert len(squares) == 4 and all(c.startswith("sks, ") for c in squares)
    assert len(set(squares)) > 1  # shuffled, the first tag kept
    assert all(c.startswith("a ") for b in built for c in b.captions[len(b.captions) - b.num_prior :])


# -- the weight of the regularization images ----------------------------------------------------------------------


class ConstantUnet:
    """Predicts zeros: each sample's loss is its noise's mean square, whatever the weights."""

    def __call__(self, latents, timesteps, states, return_dict=False):
        return (torch.zeros_like(latents),)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_regularization_images_count_at_prior_loss_weight(weight):
    latents = torch.zeros(4, 4, 8, 8)
    batch = Batch(latents, ["a"] * 4, torch.Generator().manual_seed(0), num_prior=2)
    states = torch.zeros(4, 77, 64)
    args = (ConstantUnet(), DDPMScheduler(), batch, states, TrainConfig(), torch.float32)
    per_sample = batch_loss(*args, per_sample=True)
    batch.generator.manual_seed(0)
    loss = batch_loss(*args, prior_loss_weight=weight)
    assert loss.item() == pytest.approx(per_sample[:2].mean().item() + weight * per_sample[2:].mean().item())
    plain = Batch(latents, ["a"] * 4, torch.Generator().manual_seed(0))
    assert batch_loss(*args[:2], plain, *args[3:]).item() == pytest.approx(per_sample.mean().item())


DREAMBOOTH_LORA = ["method.type=dreambooth", "method.instance_prompt=a sks circle", "method.lora=true"]


@pytest.mark.parametrize("script, method", [("trainers/lora.py", []), ("trainers/dreambooth.py", DREAMBOOTH_LORA)])
def test_the_trainers_run_subsets_with_regularization_and_masks(script, method, tmp_path):
    """Two steps of a trainer on two subsets, one is_reg, with masked loss: the preflight lists them, and the run's
    data fingerprint holds the regularization images and the masks."""
    toyworld.write_masked_dataset(tmp_path / "circles", 4, seed=1)
    toyworld.write_dataset(tmp_path / "reg", 2, seed=2, colors=["red"])
    circles, reg = tmp_path / "circles" / "images", tmp_path / "reg"
    subsets = f"[{{image_dir: {circles}, num_repeats: 2}}, {{image_dir: {reg}, is_reg: true}}]"
    args = [
        str(QUICKSTART),
        f"output.dir={tmp_path / 'run'}",
        "data.train_data_dir=null",
        f"data.subsets={subsets}",
        "data.masked_loss=true",
        f"data.mask_dir={tmp_path / 'circles' / 'masks'}",
        *method,
        "method.prior_loss_weight=0.5",
        "train.max_train_steps=2",
        "train.train_batch_size=2",
        "train.checkpointing_steps=1000",
        "validation.validation_steps=0",
        "validation.prompts=[a purple circle]",
        "validation.seeds=[0]",
        "validation.num_inference_steps=2",
        "validation.toy_score=[]",
        "output.report_to=none",
        "output.register=false",
        "output.export_check=false",
    ]
    proc = run_trainer(args, tmp_path / "cache", script=script)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"[0] {tmp_path / 'circles' / 'images'}: 4 images x 2 repeats = 8 (100%)" in log
    assert f"[1] {tmp_path / 'reg'} (is_reg): 2 images x 1 repeats, ~8 drawn per epoch" in log
    assert "masked loss: 4 of 4 images learn only inside their mask" in log
    manifest = json.loads((tmp_path / "run" / "adapter.json").read_text())
    masks = str(tmp_path / "circles" / "masks")
    data = DataConfig(subsets=yaml.safe_load(subsets), masked_loss=True, mask_dir=masks, **GRID)
    expected = scan_dataset(data)
    if method:  # DreamBooth trains its instance images on the instance prompt
        expected.records = [dataclasses.replace(r, caption="a sks circle") for r in expected.records]
    assert manifest["dataset"]["fingerprint"] == expected.fingerprint()
