"""The ControlNet trainer, its data, annotators and sampling, on the toy base.

The proof task: the condition is a binary mask of a shape at a given position and size; the toy base alone draws
the prompt's shape wherever it likes. The metric is the IoU between the shape the toy-world scorer segments in a
generated image and the region the condition asks for (`toyworld.condition_region`), over fixed prompts and seeds.
Training must take it from the base's chance level to >= 0.6 while colour and shape stay right (>= 0.8).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONTROLNET_SHORT
from conftest import run_controlnet_trainer as run_trainer
from PIL import Image
from safetensors.torch import load_file

from sdtune.adapters import annotate, scoring, toyworld
from sdtune.adapters.base import load_pipeline
from sdtune.adapters.export_check import ExportCheckError
from sdtune.adapters.manifest import pair_prompts
from sdtune.adapters.sampling import AdapterSpec, ControlSpec, load_adapters, load_controlnets
from sdtune.studio import cli
from sdtune.trainers import controlnet as controlnet_trainer
from sdtune.trainers.core.cache import CachedLatent
from sdtune.trainers.core.controlnet_writer import ControlNetWriter
from sdtune.trainers.core.data import DataError, condition_tensor, scan_pairs
from sdtune.trainers.core.recipe import DataConfig, RecipeError, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOY_RECIPE = ROOT / "recipes" / "controlnet-toy.yaml"
VALIDATION = ROOT / "datasets" / "toy-masks" / "validation"
PAIRS = [
    (scoring.Target("a red circle", "red", "circle"), str(VALIDATION / "circle-mask.png")),
    (scoring.Target("a blue square", "blue", "square"), str(VALIDATION / "square-mask.png")),
    (scoring.Target("a green triangle", "green", "triangle"), str(VALIDATION / "triangle-mask.png")),
]


def toy_data(**overrides) -> DataConfig:
    fields = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=64, bucket_reso_steps=8)
    return DataConfig(**{**fields, **overrides})


# -- data: pairs, checked per file ----------------------------------------------------------------------------------


def test_folder_pairs_scan_and_fingerprint(tmp_path):
    toyworld.write_control_dataset(tmp_path, 4, seed=1)
    scan = scan_pairs(toy_data(train_data_dir=str(tmp_path)))
    assert len(scan.records) == len(scan.conditions) == 4
    assert [Path(c.path).name for c in scan.conditions] == [Path(r.path).name for r in scan.records]
    assert scan.records[0].caption.startswith("a ")
    before = scan.fingerprint()
    toyworld.scene_mask(toyworld.Scene("red", "square", 10, 20, 20)).save(tmp_path / "conditioning" / "0000.png")
    assert scan_pairs(toy_data(train_data_dir=str(tmp_path))).fingerprint() != before  # a new condition is new data


def _break_missing(root):
    (root / "conditioning" / "0001.png").unlink()


def _break_orphan(root):
    shutil.copy(root / "conditioning" / "0000.png", root / "conditioning" / "extra.png")


def _break_aspect(root):
    Image.new("RGB", (64, 32)).save(root / "conditioning" / "0002.png")


def _break_small(root):
    Image.new("RGB", (32, 32)).save(root / "conditioning" / "0002.png")


def _break_corrupt(root):
    (root / "conditioning" / "0003.png").write_bytes(b"not a png")


@pytest.mark.parametrize(
    "breaker, names, reason",
    [
        (_break_missing, ["images/0001.png"], "no conditioning image"),
        (_break_orphan, ["conditioning/extra.png"], "no image with this name"),
        (_break_aspect, ["conditioning/0002.png"], "aspect 2.00"),
        (_break_small, ["conditioning/0002.png"], "smaller than its image's training size 64x64"),
        (_break_corrupt, ["conditioning/0003.png"], "not an image"),
    ],
)
def test_bad_pairs_are_named_per_file(tmp_path, breaker, names, reason):
    toyworld.write_control_dataset(tmp_path, 4, seed=2)
    breaker(tmp_path)
    with pytest.raises(DataError) as info:
        scan_pairs(toy_data(train_data_dir=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.train_data_dir: 1 image/condition pairs do not match")
    assert reason in message
    assert all(str(tmp_path / name) in message for name in names)


def test_every_problem_is_listed_at_once(tmp_path):
    toyworld.write_control_dataset(tmp_path, 4, seed=3)
    _break_missing(tmp_path)
    _break_small(tmp_path)
    _break_orphan(tmp_path)
    with pytest.raises(DataError, match="3 image/condition pairs do not match"):
        scan_pairs(toy_data(train_data_dir=str(tmp_path)))


def test_folder_without_conditions_says_where_they_go(tmp_path):
    toyworld.write_dataset(tmp_path, 2, seed=0, colors=["red"])
    with pytest.raises(DataError, match="conditioning/ beside an images/ folder"):
        scan_pairs(toy_data(train_data_dir=str(tmp_path)))
    assert len(scan_pairs(toy_data(train_data_dir=str(tmp_path)), computed=True).records) == 2  # canny: no partner


def test_imagefolder_metadata_pairs(tmp_path):
    """diffusers' imagefolder layout: metadata.jsonl names each image and its `conditioning_image_file_name`."""
    for i, (image, _, scene) in enumerate(toyworld.generate(3, seed=4)):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        image.save(tmp_path / "train" / f"{i}.png")
        toyworld.scene_mask(scene).save(tmp_path / "masks" / f"{i}.png")
    rows = [
        {"file_name": f"train/{i}.png", "text": f"shape {i}", "conditioning_image_file_name": f"masks/{i}.png"}
        for i in range(3)
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scan = scan_pairs(toy_data(train_data_dir=str(tmp_path)))
    assert [Path(c.path).name for c in scan.conditions] == ["0.png", "1.png", "2.png"]
    assert [r.caption for r in scan.records] == ["shape 0", "shape 1", "shape 2"]
    assert scan.skipped == []  # the masks are a column of the metadata, not unlisted training images
    rows[1]["conditioning_image_file_name"] = "masks/missing.png"
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"1\.png: conditioning_image_file_name 'masks/missing.png' not found"):
        scan_pairs(toy_data(train_data_dir=str(tmp_path)))


def test_hf_dataset_columns(tmp_path):
    """An HF dataset with image, caption and conditioning columns of configurable names (diffusers' example)."""
    import datasets

    rows = {"picture": [], "prompt": [], "control": []}
    for image, caption, scene in toyworld.generate(3, seed=5):
        rows["picture"].append(image)
        rows["prompt"].append(caption)
        rows["control"].append(toyworld.scene_mask(scene))
    features = datasets.Features(
        {"picture": datasets.Image(), "prompt": datasets.Value("string"), "control": datasets.Image()}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    cfg = toy_data(dataset_name=str(tmp_path / "ds"), image_column="picture", caption_column="prompt")
    scan = scan_pairs(cfg, conditioning_column="control")
    assert [c.index for c in scan.conditions] == [0, 1, 2]
    with pytest.raises(DataError, match="method.conditioning_image_column: column 'conditioning_image' is not in"):
        scan_pairs(cfg)


def test_condition_follows_the_image_flip():
    """With random_flip, the condition is mirrored exactly when the image is: cached latents tell which (the
    mirrored entry is all ones here) and the condition must match."""
    from sdtune.trainers.core.batches import BatchBuilder
    from sdtune.trainers.core.data import DatasetScan, ImageRecord

    record = ImageRecord(None, 0, "a", 1, 64, 64, (64, 64), "h", "s")
    scan = DatasetScan([record], [], "hf_saved")
    latent = CachedLatent(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), torch.ones(4, 8, 8), torch.zeros(4, 8, 8))
    condition = torch.zeros(3, 64, 64)
    condition[:, :, :8] = 1.0  # a bar on the left edge
    batches = BatchBuilder(scan, toy_data(random_flip=True), [latent], None, 1, 0, conditions=lambda i: condition)
    seen = set()
    for index in range(40):
        batch = batches.build([0], epoch=index, batch_index=0)
        flipped = bool(batch.latents.max() == 1)
        assert torch.equal(batch.conditions[0], torch.flip(condition, dims=[-1]) if flipped else condition)
        seen.add(flipped)
    assert seen == {True, False}


# -- recipe ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, data, message",
    [
        ({"proportion_empty_prompts": 0.1}, {"caption_dropout_rate": 0.1}, "set it or data.caption_dropout_rate"),
        ({"canny_low_threshold": 200, "canny_high_threshold": 100}, {}, "must not exceed canny_high_threshold"),
        ({"conditioning": "depth"}, {}, "method.conditioning: Input should be 'image' or 'canny'"),
        ({"conditioning_scael": 1.0}, {}, "did you mean 'conditioning_scale'"),
    ],
)
def test_recipe_errors(method, data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        recipe_from_dict({"method": {"type": "controlnet", **method}, "data": data}, "r.yaml")


def test_validation_prompts_pair_with_images_as_in_diffusers():
    assert pair_prompts(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    assert pair_prompts(["a", "b"], ["x"]) == [("a", "x"), ("b", "x")]
    assert pair_prompts(["a"], ["x", "y"]) == [("a", "x"), ("a", "y")]
    with pytest.raises(ValueError, match="3 images for 2 validation.prompts"):
        pair_prompts(["a", "b"], ["x", "y", "z"])


# -- annotate -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, bar", [("mask", 0.9), ("canny", 0.85), ("scribble", 0.6), ("softedge", 0.6)])
def test_annotators_outline_the_shape(kind, bar):
    """Each weight-free kind, read back as a region (bright pixels, enclosed holes filled), covers the shape."""
    ious = []
    for image, _, scene in toyworld.generate(6, seed=7):
        condition = annotate.annotate_image(image, kind)
        assert condition.size == image.size and condition.mode == "RGB"
        region = toyworld.condition_region(condition) if kind != "softedge" else _soft_region(condition)
        ious.append(toyworld.iou(region, toyworld.condition_region(toyworld.scene_mask(scene))))
    assert min(ious) >= bar, (kind, ious)


def _soft_region(condition):
    """Soft edges are grey ramps: threshold them at a quarter of the peak, then fill."""
    import numpy as np

    grey = np.asarray(condition.convert("L"), dtype=float)
    return toyworld.condition_region(Image.fromarray(((grey > grey.max() / 4) * 255).astype("uint8")))


def test_canny_thresholds_are_options():
    image = toyworld.render(toyworld.Scene("yellow", "square", 14))  # yellow on light grey: a weak edge
    strict = annotate.annotate_image(image, "canny", annotate.AnnotateOptions(low_threshold=250, high_threshold=255))
    loose = annotate.annotate_image(image, "canny", annotate.AnnotateOptions(low_threshold=10, high_threshold=30))
    count = lambda im: sum(1 for v in im.convert("L").getdata() if v > 127)  # noqa: E731
    assert count(loose) > count(strict)


def test_annotate_cli_writes_same_names(tmp_path, capsys):
    toyworld.write_dataset(tmp_path / "in" / "sub", 2, seed=0, colors=["red"])
    assert cli.main(["annotate", "--kind", "canny", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "sub/0000.png",
        "sub/0001.png",
    ]
    assert "2 canny images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--kind", "depthmap"],
            "--kind 'depthmap': unknown kind; choose from canny, softedge, scribble, mask, midas, hed",
        ),
        (
            ["--kind", "hed"],
            "--kind hed needs detector weights, which sdtune never downloads: pass a local model file",
        ),
        (["--kind", "midas"], "--kind midas needs detector weights"),
        (["--kind", "openpose"], "--kind openpose: openpose needs keypoint grouping"),
        (["--kind", "midas", "--weights", "WEIGHTS"], "is not a midas network OpenCV can read"),
        (["--kind", "canny", "--low-threshold", "250"], "thresholds: need 0 <= low (250) <= high (200) <= 255"),
    ],
)
def test_annotate_refusals_are_one_line(tmp_path, args, message):
    toyworld.write_dataset(tmp_path / "in", 1, seed=0, colors=["red"])
    (tmp_path / "weights.onnx").write_bytes(b"not a network")
    args = [a.replace("WEIGHTS", str(tmp_path / "weights.onnx")) for a in args]
    with pytest.raises(SystemExit) as info:
        cli.main(["annotate", *args, str(tmp_path / "in"), str(tmp_path / "out")])
    text = str(info.value)
    assert text.startswith("sdtune annotate: ") and "\n" not in text and message in text
    assert not (tmp_path / "out").exists()


# -- the trainer, run for real --------------------------------------------------------------------------------------


def test_trainer_refuses_a_recipe_of_another_method(tmp_path, capsys):
    assert controlnet_trainer.cli([str(ROOT / "recipes" / "quickstart.yaml"), f"output.dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {ROOT / 'recipes' / 'quickstart.yaml'}: method.type is 'lora': run trainers/lora.py"
    ]


def test_trainer_stops_on_bad_pairs_before_loading_a_model(tmp_path, capsys):
    toyworld.write_control_dataset(tmp_path / "data", 4, seed=8)
    _break_small(tmp_path / "data")
    args = [str(TOY_RECIPE), f"data.train_data_dir={tmp_path / 'data'}", f"output.dir={tmp_path / 'o'}"]
    assert controlnet_trainer.cli(args) == 2
    out, err = capsys.readouterr()
    [line] = err.strip().splitlines()
    assert line.startswith("error: data.train_data_dir: 1 image/condition pairs do not match")
    assert str(tmp_path / "data" / "conditioning" / "0002.png") in line
    assert "latents:" not in out  # stopped before the VAE ran


def _diverge(monkeypatch):
    real = controlnet_trainer.batch_loss
    monkeypatch.setattr(controlnet_trainer, "batch_loss", lambda *args, **kwargs: real(*args, **kwargs) * math.nan)


def _fail_export_check(monkeypatch):
    def save(self, out_dir, step):
        raise ExportCheckError(f"{out_dir}: export check FAILED: trained-vs-original 9/255")

    monkeypatch.setattr(ControlNetWriter, "save", save)


@pytest.mark.parametrize(
    "failure,message",
    [
        (_diverge, "error: training diverged: the loss is NaN/inf since step 1 (step 2 now), nothing saved"),
        (_fail_export_check, "error: {out}/checkpoints/checkpoint-2: export check FAILED: trained-vs-original 9/255"),
    ],
    ids=["diverged", "export-check"],
)
def test_a_failed_run_ends_in_one_error_line(failure, message, tmp_path, monkeypatch, capsys):
    """As with the other trainers (`runtime.run_cli`): a run whose loss turns NaN, or whose save fails its export
    check, ends in one `error:` line and exit status 2, not a traceback."""
    toyworld.write_control_dataset(tmp_path / "data", 4, seed=12)
    failure(monkeypatch)
    out = tmp_path / "run"
    args = [str(TOY_RECIPE), f"data.train_data_dir={tmp_path / 'data'}", f"output.dir={out}", *CONTROLNET_SHORT]
    assert controlnet_trainer.cli(args) == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # the error comes after the progress bar's last redraw
    [line] = [line for line in err.splitlines() if line.startswith("error: ")] or [err[-1000:]]
    assert line.startswith(message.format(out=out)) and "Traceback" not in err, err[-1000:]
    assert not list(out.glob("*.safetensors")) and not (out / "adapter.json").exists()


@pytest.fixture(scope="module")
def short_run(controlnet_short_run):
    """4 steps on 6 pairs, a checkpoint every 2 steps (tests/conftest.py): the outputs, and the run to resume."""
    return controlnet_short_run


def test_a_controlnet_pipeline_leaves_the_base_in_its_dtype(short_run):
    """A ControlNet pipeline shares the base's components. diffusers' `from_pipe` casts them all to float32 in place
    (its default dtype), which on a GPU turned a run's frozen half-precision UNet, and `sdtune sample --controlnet`,
    into fp32 without a word. The ControlNet pipeline is built over the components as they are."""
    _, out, _, _ = short_run
    pipe = load_pipeline("toy", torch_dtype=torch.bfloat16)
    controlled = load_controlnets(pipe, [ControlSpec(str(out / "controlnet"))])
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, controlled.controlnet.dtype} == {torch.bfloat16}
    assert controlled.unet is pipe.unet and controlled.vae is pipe.vae

    from sdtune.adapters.sampling import controlnet_pipeline
    from sdtune.trainers.controlnet import init_controlnet
    from sdtune.trainers.core.recipe import ControlNetMethod

    trained = init_controlnet(ControlNetMethod(), pipe.unet)  # as in a run: fp32 ControlNet over a bf16 base
    assert controlnet_pipeline(pipe, trained).controlnet.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16


def test_short_run_writes_both_layouts_grid_and_manifest(short_run):
    _, out, _, log = short_run
    for name in (
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
        "toy-masks.safetensors",
        "ab_grid.png",
        "adapter.json",
        "samples/conditions/condition-0.png",
    ):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["method"] == "controlnet" and manifest["training"]["steps"] == 4
    config = json.loads((out / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and "_use_default_values" not in config  # as diffusers saves
    assert manifest["files"] == {"diffusers": "controlnet", "original": "toy-masks.safetensors"}
    conditions = {f"condition-{i}": f"samples/conditions/condition-{i}.png" for i in range(2)}
    assert manifest["samples"] == {"ab_grid": "ab_grid.png", **conditions}  # the grid's conditions, kept with it
    assert manifest["dataset"]["kind"] == "folder" and manifest["dataset"]["images"] == 6
    assert all(k.startswith("control_model.") for k in load_file(str(out / "toy-masks.safetensors")))
    assert "data: 6 images (6 per epoch with repeats), layout folder" in log
    # the ab grid: a condition column, then base and ControlNet per seed
    assert Image.open(out / "ab_grid.png").width == 200 + 3 * 160


def test_resume_is_bit_identical_on_cpu(short_run, tmp_path):
    """A run resumed from its step-2 checkpoint ends with exactly the weights of the unbroken 4-step run."""
    root, out, args, _ = short_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    args = [a if not a.startswith("output.dir=") else f"output.dir={resumed}" for a in args]
    proc = run_trainer([*args, "train.resume=latest"], root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    again = load_file(str(resumed / "controlnet" / "diffusion_pytorch_model.safetensors"))
    first = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert next(iter(first.values())).dtype == torch.float32  # saved at full precision: the comparison is exact
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_the_same_recipe_and_seed_train_the_same_controlnet(short_run, tmp_path):
    """`from_unet` draws the conditioning embedding at random: unseeded, two identical runs differed by up to 0.37 in
    a weight (and so in every figure measured on them)."""
    root, out, args, _ = short_run
    again = tmp_path / "again"
    args = [a if not a.startswith("output.dir=") else f"output.dir={again}" for a in args]
    proc = run_trainer([*args, "output.register=false"], root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(again / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(second[k], first[k]) for k in first)


def test_a_run_without_validation_in_bf16_with_the_gpu_speed_settings(short_run, tmp_path):
    """No validation prompts (how the benches run) is no validation, not a prompt/image mismatch; and bf16 with
    channels_last and fused AdamW (the settings a GPU run tries) trains the ControlNet end to end."""
    root, _, args, _ = short_run
    out = tmp_path / "run"
    args = [a if not a.startswith("output.dir=") else f"output.dir={out}" for a in args]
    extra = ["validation.prompts=[]", "train.mixed_precision=bf16", "train.channels_last=true"]
    proc = run_trainer([*args, *extra, "train.fused_optimizer=true", "train.max_train_steps=2"], root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["training"]["steps"] == 2 and manifest["recipe"]["train"]["fused_optimizer"] is True
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


# -- sampling with ControlNets ------------------------------------------------------------------------------------


def test_sample_cli_multicontrolnet_with_parameters(short_run, tmp_path):
    """Two ControlNets (the run folder and its A1111 file) with two images: MultiControlNet, recorded in the PNG."""
    _, out, _, _ = short_run
    mask_a, mask_b = str(VALIDATION / "circle-mask.png"), str(VALIDATION / "square-mask.png")
    args = ["sample", "--prompt", "a red circle", "--steps", "3", "--out", str(tmp_path / "s")]
    args += ["--controlnet", f"{out}:0.7", "--control-image", mask_a]
    args += ["--controlnet", str(out / "toy-masks.safetensors"), "--control-image", mask_b]
    args += ["--control-guidance-start", "0.1", "--control-guidance-end", "0.9"]
    assert cli.main(args) == 0
    text = Image.open(tmp_path / "s" / "0000-seed0.png").text["parameters"]
    assert 'ControlNet 0: "Image: circle-mask.png, Weight: 0.7, Guidance Start: 0.1, Guidance End: 0.9"' in text
    assert 'ControlNet 1: "Image: square-mask.png, Weight: 1, Guidance Start: 0.1, Guidance End: 0.9"' in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--control-image", "MASK"], "--control-image: 2 given for 1 --controlnet; give one image per ControlNet"),
        (["--control-guidance-start", "0.9", "--control-guidance-end", "0.5"], "need 0 <= start (0.9) < end (0.5)"),
    ],
)
def test_sample_cli_control_errors(short_run, tmp_path, extra, message):
    _, out, _, _ = short_run
    mask = str(VALIDATION / "circle-mask.png")
    args = ["sample", "--prompt", "a", "--controlnet", str(out), "--control-image", mask]
    args += [a.replace("MASK", mask) for a in extra] + ["--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.main(args)


def test_sample_cli_takes_a_registered_controlnet_by_name(short_run, tmp_path):
    """The trainer registered the run; its name draws what its folder draws, and an unknown name is one line."""
    _, out, _, log = short_run
    name = log.split("registered as '")[1].split("'")[0]
    mask = str(VALIDATION / "circle-mask.png")
    common = ["sample", "--prompt", "a red circle", "--steps", "2", "--control-image", mask]
    assert cli.main([*common, "--controlnet", f"{name}:0.7", "--out", str(tmp_path / "by-name")]) == 0
    assert cli.main([*common, "--controlnet", f"{out}:0.7", "--out", str(tmp_path / "by-path")]) == 0
    by_name, by_path = (Image.open(tmp_path / d / "0000-seed0.png") for d in ("by-name", "by-path"))
    assert by_name.tobytes() == by_path.tobytes()
    with pytest.raises(
        SystemExit, match="--controlnet: no-such-cn not found .*sdtune adapters list --method controlnet"
    ):
        cli.main([*common, "--controlnet", "no-such-cn", "--out", str(tmp_path / "x")])


# -- proof on the toy base: the shape goes where the mask says ----------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`recipes/controlnet-toy.yaml` as a user runs it (its validation grids every 100 steps left out); ~5 minutes on
    2 CPU cores, so the tests that use it are `slow`."""
    root = tmp_path_factory.mktemp("cn-toy")
    proc = run_trainer([str(TOY_RECIPE), f"output.dir={root / 'run'}", "validation.validation_steps=0"], root / "c")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_training_moves_layout_iou_from_chance_to_the_mask(toy_run):
    scores = json.loads((toy_run / "adapter.json").read_text())["scores"]
    assert scores["base"]["n"] == scores["adapter"]["n"] == 12
    assert scores["base"]["iou"] <= 0.3, scores  # the base draws where it likes
    assert scores["adapter"]["iou"] >= 0.6, scores
    assert scores["adapter"]["both"] >= 0.8, scores  # colour and shape still follow the prompt


@pytest.mark.slow
def test_layout_remeasured_from_the_a1111_file(toy_run):
    """The same measurement from the saved original-layout file, loaded the way `sdtune sample` loads it."""
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    base = scoring.score_layout(pipe, PAIRS, controlled=False, guidance=3.0)
    controlled_pipe = load_controlnets(pipe, [ControlSpec(str(toy_run / "toy-masks.safetensors"))])
    controlled = scoring.score_layout(controlled_pipe, PAIRS, controlled=True, guidance=3.0)
    assert base.iou <= 0.3 and controlled.iou >= 0.6, (base.as_dict(), controlled.as_dict())
    assert controlled.score.both >= 0.8, controlled.as_dict()


@pytest.mark.slow
def test_lora_stacked_with_controlnet_keeps_both(toy_run, tmp_path):
    """The quickstart's purple LoRA and the mask ControlNet together: the scorer finds purple (the LoRA's concept)
    and the shape stays where the mask says (the ControlNet's)."""
    lora_run = tmp_path / "lora"
    cmd = [sys.executable, "trainers/lora.py", str(ROOT / "recipes" / "quickstart.yaml"), f"output.dir={lora_run}"]
    cmd += ["validation.validation_steps=0", "output.export_check=false"]
    env = {**os.environ, "SDTUNE_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    load_adapters(pipe, [AdapterSpec.parse(str(lora_run))])
    controlled = load_controlnets(pipe, [ControlSpec(str(toy_run))])
    purple = [(scoring.Target(t.prompt.replace(t.color, "purple"), "purple", t.shape), c) for t, c in PAIRS]
    both = scoring.score_layout(controlled, purple, controlled=True, guidance=3.0)
    assert both.score.color >= 0.8, both.as_dict()  # the LoRA's concept: purple
    assert both.iou >= 0.5, both.as_dict()  # the ControlNet's: where the mask says


def test_trainer_refuses_validation_prompt_image_mismatch_before_loading(tmp_path, capsys):
    toyworld.write_control_dataset(tmp_path / "data", 2, seed=10)
    extra = [
        "validation.prompts=[a, b]",
        f"method.validation_image=[{VALIDATION / 'circle-mask.png'}, "
        f"{VALIDATION / 'square-mask.png'}, {VALIDATION / 'triangle-mask.png'}]",
    ]
    args = [str(TOY_RECIPE), f"data.train_data_dir={tmp_path / 'data'}", f"output.dir={tmp_path / 'o'}", *extra]
    assert controlnet_trainer.cli(args) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "error: method.validation_image: 3 images for 2 validation.prompts; give one image per prompt, one image, "
        "or one prompt"
    ]
    assert "latents:" not in out


def test_memory_options_train_and_save(tmp_path):
    """The low-vram preset's options on this machine: 8-bit AdamW, gradient checkpointing, bf16 autocast."""
    toyworld.write_control_dataset(tmp_path / "data", 4, seed=11)
    args = [
        str(TOY_RECIPE),
        f"data.train_data_dir={tmp_path / 'data'}",
        f"output.dir={tmp_path / 'run'}",
        *CONTROLNET_SHORT,
    ]
    args += ["train.optimizer=adamw8bit", "train.gradient_checkpointing=true", "train.mixed_precision=bf16"]
    proc = run_trainer(args, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(tmp_path / "run" / "toy-masks.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in saved.values())
    assert (
        json.loads((tmp_path / "run" / "adapter.json").read_text())["recipe"]["train"]["optimizer_type"] == "adamw8bit"
    )


def test_continue_from_a_saved_controlnet_and_canny_conditions(short_run, toy_pipe, tmp_path):
    """`controlnet_model_name_or_path` starts from a run's file (either layout) or folder, exactly; canny
    conditions are the annotator's edges of each fitted image."""
    from sdtune.trainers.controlnet import Conditions, init_controlnet
    from sdtune.trainers.core.recipe import ControlNetMethod

    _, out, _, _ = short_run
    expected = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    for source in (out / "toy-masks.safetensors", out):
        state = init_controlnet(
            ControlNetMethod(controlnet_model_name_or_path=str(source)), toy_pipe.unet
        ).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    with pytest.raises(RecipeError, match="method.controlnet_model_name_or_path: .*no such ControlNet"):
        init_controlnet(ControlNetMethod(controlnet_model_name_or_path=str(tmp_path / "x.safetensors")), toy_pipe.unet)
    toyworld.write_dataset(tmp_path / "plain", 2, seed=0, colors=["red"])
    cfg = toy_data(train_data_dir=str(tmp_path / "plain"))
    conditions = Conditions(scan_pairs(cfg, computed=True), cfg, ControlNetMethod(conditioning="canny"))
    edges = annotate.annotate_image(Image.open(tmp_path / "plain" / "0000.png"), "canny")
    assert torch.equal(conditions(0), condition_tensor(edges))
