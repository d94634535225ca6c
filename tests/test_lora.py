"""The LoRA trainer, run for real (`accelerate launch` / `python`) on the toy base.

Proof it learned: the quickstart teaches the toy base a colour it never saw (purple); the toy-world scorer must find
"purple + the asked shape" in <= 20% of the base's samples and >= 80% of the adapter's. Also: both export formats
give the same images, a run killed with SIGKILL and resumed ends bit-identical, Ctrl-C saves and resumes, every
preset/optimizer path trains and exports, and bad input ends in one clear line.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICKSTART, ROOT, kill_after_checkpoint, run_trainer, start_trainer, trainer_env
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.adapters import scoring
from sdtune.adapters.base import load_pipeline
from sdtune.adapters.manifest import read_manifest
from sdtune.adapters.registry import Registry
from sdtune.adapters.sampling import AdapterSpec, SampleSettings, generate, load_adapters

PURPLE = [scoring.Target(f"a purple {s}", "purple", s) for s in ("circle", "square", "triangle")]


def fresh_toy_pipe():
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- proof it learned ---------------------------------------------------------------------------------------------


def test_quickstart_learns_purple_and_records_it(quickstart_run):
    out, _ = quickstart_run
    manifest = json.loads((out / "adapter.json").read_text())
    scores = manifest["scores"]
    assert scores["base"]["n"] == scores["adapter"]["n"] == 12
    assert scores["base"]["both"] <= 0.2, scores
    assert scores["adapter"]["both"] >= 0.8, scores


def test_adapter_learned_purple_measured_independently(quickstart_run):
    """Re-measures from the saved file, the way `sdtune sample --adapter` applies it."""
    out, _ = quickstart_run
    pipe = fresh_toy_pipe()
    base = scoring.score_targets(pipe, PURPLE, guidance=3.0)
    load_adapters(pipe, [AdapterSpec.parse(str(out))])
    adapted = scoring.score_targets(pipe, PURPLE, guidance=3.0)
    assert base.score.both <= 0.2 and base.score.color <= 0.2, base.as_dict()
    assert adapted.score.both >= 0.8, adapted.as_dict()
    # the old colours still work with the LoRA applied
    red = scoring.score_targets(pipe, [scoring.Target("a red circle", "red", "circle")], guidance=3.0)
    assert red.score.color >= 0.75, red.as_dict()


# -- outputs --------------------------------------------------------------------------------------------------------


def test_quickstart_outputs_manifest_and_logs(quickstart_run):
    from sdtune.adapters.atomic import UMASK

    out, log = quickstart_run
    for path in [*out.glob("*.safetensors"), *out.glob("*.png"), out / "adapter.json"]:  # readable by other accounts
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path
    for name in (
        "pytorch_lora_weights.safetensors",
        "toy-purple.safetensors",
        "adapter.json",
        "ab_grid.png",
        "export_check.png",
        "samples/step-000100.png",
        "samples/step-000200.png",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-100", "checkpoint-200"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert "data: 16 images (16 per epoch with repeats), layout folder" in log
    assert "64x64 (aspect 1.00): 16" in log and "estimated:" in log
    m = json.loads((out / "adapter.json").read_text())
    assert m["method"] == "lora" and m["name"] == "toy-purple" and m["trigger_words"] == ["purple"]
    assert m["base"]["kind"] == "toy" and len(m["base"]["hash"]) == 64
    assert len(m["dataset"]["fingerprint"]) == 64 and m["dataset"]["images"] == 16
    assert m["training"]["steps"] == 300 and 0 < m["training"]["final_loss"] < 1
    assert m["recipe"]["train"]["max_train_steps"] == 300 and m["recipe"]["method"]["rank"] == 8
    assert read_manifest(out).to_dict() == m  # the registry's reader accepts what the trainer wrote
    assert m["files"] == {"peft": "pytorch_lora_weights.safetensors", "kohya": "toy-purple.safetensors"}
    assert m["samples"]["ab_grid"] == "ab_grid.png"
    assert m["export_check"]["ok"] is True and m["export_check"]["max_pixel_diff"]["peft-vs-kohya"] <= 2
    grid = Image.open(out / "ab_grid.png")
    assert grid.width >= 200 + 4 * 150 and grid.height >= 4 * 150  # 4 prompts x (2 seeds x base/adapter)


def test_kohya_file_keys_alpha_and_metadata(quickstart_run):
    out, _ = quickstart_run
    path = out / "toy-purple.safetensors"
    tensors = load_file(str(path))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    assert not any(k.startswith(("lora_te1_", "unet.", "text_encoder.")) for k in tensors)
    alphas = {k: v.item() for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {8.0}
    assert tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"].shape[0] == 8
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_max_train_steps"] == "300"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    # kohya counts comma-separated tags per dataset folder; these captions are one tag each
    tags = json.loads(meta["ss_tag_frequency"])
    assert list(tags.values()) == [{"a purple circle": 4, "a purple square": 4, "a purple triangle": 8}], tags
    assert meta["modelspec.trigger_phrase"] == "purple" and meta["sshs_model_hash"]
    # the base by name (a published file must not leak a local path), its hashes, the buckets, the current spec
    assert meta["ss_sd_model_name"] == "sdtune-toy-base" and "/" not in meta["ss_sd_model_name"]
    manifest = json.loads((out / "adapter.json").read_text())
    assert (
        meta["ss_new_sd_model_hash"] == manifest["base"]["hash"]
        and meta["ss_sd_model_hash"] == meta["ss_new_sd_model_hash"][:8]
    )
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [64, 64], "count": 16}}}
    assert meta["modelspec.sai_model_spec"] == "1.0.1"


def test_peft_file_carries_adapter_metadata(quickstart_run):
    out, _ = quickstart_run
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    config = json.loads(meta["lora_adapter_metadata"])  # diffusers' layout: "<component>.<LoraConfig field>"
    assert config["unet.r"] == 8 and config["unet.lora_alpha"] == 8
    assert all(k.startswith("unet.") for k in keys) and any(k.endswith("to_q.lora_A.weight") for k in keys)


def test_peft_and_kohya_files_give_the_same_images(quickstart_run):
    out, _ = quickstart_run
    settings = [SampleSettings("a purple square", seed=s, steps=15, guidance=3.0) for s in (0, 5)]
    images = {}
    for fmt, path in (("peft", out), ("kohya", out / "toy-purple.safetensors"), ("base", None)):
        pipe = fresh_toy_pipe()
        if path is not None:
            load_adapters(pipe, [AdapterSpec.parse(str(path))])
        images[fmt] = [np.asarray(s.image, dtype=np.int16) for s in generate(pipe, settings)]
    for peft, kohya, base in zip(images["peft"], images["kohya"], images["base"]):
        assert np.abs(peft - kohya).max() <= 2
        assert np.abs(peft - base).mean() > 5  # and the LoRA does change the picture


# -- resume, Ctrl-C -----------------------------------------------------------------------------------------------

RESUME_RECIPE = """
base: toy
data:
  train_data_dir: {data}
  resolution: 64
  min_bucket_reso: 64
  max_bucket_reso: 64
  bucket_reso_steps: 8
  random_flip: true
  caption_dropout_rate: 0.3
method:
  rank: 4
  lora_alpha: 8
  lora_dropout: 0.1
  train_text_encoder: true
  text_encoder_lr: 5.0e-4
train:
  max_train_steps: 12
  train_batch_size: 3
  gradient_accumulation_steps: 2
  learning_rate: 1.0e-3
  lr_scheduler: cosine
  lr_warmup_steps: 2
  checkpointing_steps: 3
  checkpoints_total_limit: 2
output:
  report_to: none
  save_precision: fp32
  export_check: false
"""


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """A recipe with every source of randomness on (flips, caption dropout, LoRA dropout, text-encoder LoRA,
    accumulation, a cosine schedule), and the weights of its uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    recipe = root / "recipe.yaml"
    recipe.write_text(RESUME_RECIPE.format(data=ROOT / "datasets" / "quickstart-purple"))
    cache = root / "cache"
    proc = run_trainer([str(recipe), f"output.dir={root / 'reference'}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, cache, load_file(str(root / "reference" / "pytorch_lora_weights.safetensors"))


def assert_same_weights(path: Path, reference: dict):
    got = load_file(str(path))
    assert got.keys() == reference.keys()
    assert any(k.startswith("text_encoder.") for k in got)
    for key in reference:
        assert np.array_equal(got[key].numpy(), reference[key].numpy()), key


def test_sigkill_then_resume_is_bit_identical(resume_setup, tmp_path):
    recipe, cache, reference = resume_setup
    out = tmp_path / "run"
    proc = start_trainer([str(recipe), f"output.dir={out}"], cache)
    kill_after_checkpoint(proc, out, 6, then=0.3)  # somewhere after step 6: mid-step, not on a checkpoint boundary
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    resumed = run_trainer([str(recipe), f"output.dir={out}", "train.resume=latest"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_weights(out / "pytorch_lora_weights.safetensors", reference)


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(resume_setup, tmp_path):
    recipe, cache, reference = resume_setup
    out = tmp_path / "run"
    proc = start_trainer(
        [str(recipe), f"output.dir={out}", "train.checkpointing_steps=100"], cache, stdout=subprocess.PIPE
    )
    lines = []
    for line in proc.stdout:  # tqdm writes "\r"-separated updates; wait for the first finished step
        lines.append(line)
        if "steps:" in line and "1/12" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 130, log[-2000:]
    assert "Traceback" not in log and "resume with: train.resume=latest" in log
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("checkpoint-")
    resumed = run_trainer(
        [str(recipe), f"output.dir={out}", "train.checkpointing_steps=100", "train.resume=latest"], cache
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(out / "pytorch_lora_weights.safetensors", reference)


# -- every method path trains and exports --------------------------------------------------------------------------

FEATURES = {
    "locon+8bit+snr+offset+checkpointing": (
        [
            "method.preset=locon",
            "method.rank=4",
            "method.lora_alpha=16",
            "train.optimizer=adamw8bit",
            "train.snr_gamma=5",
            "train.noise_offset=0.05",
            "train.gradient_checkpointing=true",
        ],
        ["unet.down_blocks.0.resnets.0.conv1.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"],
        ["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"],
    ),
    "attn+ff+text-encoder+adafactor+no-latent-cache+shuffle": (
        [
            "method.preset=attn+ff",
            "method.train_text_encoder=true",
            "method.text_encoder_lr=1e-4",
            "train.optimizer=adafactor",
            "data.cache_latents=false",
            "data.shuffle_caption=true",
        ],
        [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.lora_A.weight",
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",  # transformers 5 names: no text_model.
        ],
        [
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight",
        ],
    ),
    "dora": (
        ["method.use_dora=true", "output.register=false"],
        ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"],
        None,  # DoRA has no faithful kohya form: no kohya file
    ),
    # bf16 on a CPU without bf16 units runs 5-15x slower than fp32 (the VAE's encodings, the renders): the same path
    # on half the encodings (no flips) and no final grid; the export check still renders and compares in bf16
    "bf16+text-encoder": (
        [
            "train.mixed_precision=bf16",
            "method.train_text_encoder=true",
            "data.random_flip=false",
            "validation.prompts=[]",
        ],  # fmt: skip
        [
            "text_encoder.encoder.layers.1.self_attn.out_proj.lora_B.weight",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight",
        ],
        ["lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"],
    ),
}


def run_dir_of(entry) -> Path:
    return Path(read_manifest(entry.folder).origin["run_dir"])


@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_paths_train_and_export(name, tmp_path):
    overrides, peft_keys, kohya_keys = FEATURES[name]
    data = tmp_path / "data"
    shutil.copytree(ROOT / "datasets" / "quickstart-purple", data)
    (data / "broken.png").write_text("not an image")  # skipped with its reason, training goes on
    out = tmp_path / "run"
    args = [
        str(QUICKSTART),
        f"output.dir={out}",
        f"data.train_data_dir={data}",
        "train.max_train_steps=3",
        "train.train_batch_size=4",
        "validation.prompts=[a purple circle]",
        "validation.toy_score=[]",
        "validation.num_inference_steps=6",
        *overrides,
    ]
    proc = run_trainer(args, tmp_path / "cache")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "broken.png" in log and "skipped 1 files" in log
    keys = set(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert set(peft_keys) <= keys, sorted(keys)[:20]
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["export_check"]["ok"] is True
    # registered at the end of the run (under a free name), unless output.register=false
    registered = [e for e in Registry().list() if e.origin == "trained" and run_dir_of(e) == out.resolve()]
    if "output.register=false" in overrides:
        assert registered == [] and "registered as" not in log
    else:
        [entry] = registered
        assert f"registered as {entry.name!r}" in log and entry.name.startswith("toy-purple")
        entry_files = read_manifest(entry.folder).files  # a copy registered as toy-purple-2 names its kohya file so
        assert sorted(entry_files) == sorted(manifest["files"])
        assert all((entry.folder / f).is_file() for f in entry_files.values())
    kohya_path = out / "toy-purple.safetensors"
    if kohya_keys is None:
        assert not kohya_path.exists() and "no kohya file" in manifest["export_check"]["skipped"]
    else:
        kohya = load_file(str(kohya_path))
        assert all(k in kohya for k in kohya_keys), sorted(kohya)[:20]
        assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {
            float(manifest["recipe"]["method"]["lora_alpha"])
        }


# -- caches: no VAE or text-encoder work per step --------------------------------------------------------------------


def test_cached_batches_need_no_vae_and_second_run_encodes_nothing(tmp_path, monkeypatch):
    from sdtune.trainers.core.batches import BatchBuilder, prepare_latents
    from sdtune.trainers.core.cache import TextEmbeddingCache
    from sdtune.trainers.core.data import scan_dataset
    from sdtune.trainers.core.recipe import load_recipe

    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path))
    recipe = load_recipe(QUICKSTART)
    scan = scan_dataset(recipe.data)
    pipe = fresh_toy_pipe()
    logs = []
    latents = prepare_latents(scan, recipe.data, pipe.vae, log=logs.append)
    assert recipe.data.random_flip and len(scan.records) == 16
    assert "0 images from cache, 32 encodings computed" in logs[0]  # flips on: each image and its mirror, once
    again = prepare_latents(scan, recipe.data, pipe.vae, log=logs.append)
    assert "0 encodings computed" in logs[1]
    assert all(np.array_equal(a.mean.numpy(), b.mean.numpy()) for a, b in zip(latents, again))

    def forbidden(*args, **kwargs):
        raise AssertionError("VAE or text encoder called during a training step")

    builder = BatchBuilder(scan, recipe.data, latents, vae=None, batch_size=4, seed=0)
    texts = TextEmbeddingCache(pipe.tokenizer, pipe.text_encoder, builder.possible_captions(), "cpu")
    monkeypatch.setattr(pipe.vae, "encode", forbidden)
    monkeypatch.setattr(pipe.text_encoder, "forward", forbidden)
    for index, positions in enumerate(builder.epoch_batches(0)):
        batch = builder.build(positions, epoch=0, batch_index=index)
        states = texts(batch.captions)
        assert batch.latents.shape == (len(positions), 4, 8, 8) and states.shape[:2] == (len(positions), 77)


# -- bad input: one line, exit code 2, nothing written ---------------------------------------------------------------


def _bad_data(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_text("hello")
    return folder


BAD_INPUTS = [
    (["train.lerning_rate=1e-4"], "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    (["data.train_data_dir={tmp}/missing"], "data.train_data_dir"),
    (["data.train_data_dir={bad}"], "no usable images"),
    (["method.type=dreambooth", "method.instance_prompt=a sks dog"], "'dreambooth': run trainers/dreambooth.py"),
    (["train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    (["train.resume={tmp}"], "is not a checkpoint folder"),
    (["base=missing.safetensors"], "base: file missing.safetensors not found"),
    (["data.train_data_dir="], "data.train_data_dir: empty: give a path or id"),  # not the current folder
    (["train.learning_rate=inf"], "train.learning_rate: Input should be a finite number"),
    (["validation.prompts=["], "override 'validation.prompts=[': the value is not valid YAML"),
    (["output.dir={bad}/a.png"], "a.png is a file, not a folder; choose another output.dir"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[m[:30] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(overrides, message, tmp_path, capsys):
    import torch

    from sdtune.trainers import lora

    if "fp16" in message and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    bad = _bad_data(tmp_path)
    out = tmp_path / "out"
    filled = [o.format(tmp=tmp_path, bad=bad) for o in overrides]
    assert lora.cli([str(QUICKSTART), f"output.dir={out}", *filled]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_an_earlier_run_in_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    from sdtune.trainers import lora
    from sdtune.trainers.core import run_files
    from sdtune.trainers.core.checkpointing import clear_previous_run

    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "adapter.json").write_text("{}")
    (out / "toy-purple.safetensors").write_bytes(b"weights")
    assert lora.cli([str(QUICKSTART), f"output.dir={out}"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err == (
        f"error: output.dir: {out} already holds a run (adapter.json, checkpoints); continue it with "
        "train.resume=latest, choose another output.dir, or set output.overwrite=true to replace it"
    )
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and (out / "adapter.json").is_file()  # nothing touched
    assert clear_previous_run(out, None, overwrite=True) == ["adapter.json", "checkpoints"]
    assert [p.name for p in out.iterdir()] == ["toy-purple.safetensors"]  # the new run replaces the weights
    (out / "metrics.jsonl").write_text("{}\n")  # an attempt that died before its first checkpoint...
    assert clear_previous_run(out, "latest", overwrite=False) == ["metrics.jsonl"]  # ...restarts clean
    (out / "adapter.json").write_text("{}")  # but a finished run that kept no checkpoint is not "continued" anew
    assert lora.cli([str(QUICKSTART), f"output.dir={out}", "train.resume=latest"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: train.resume=latest: {out} holds a finished run with no checkpoint to continue")
    assert (out / "adapter.json").is_file() and (out / "toy-purple.safetensors").is_file()  # nothing touched
    (out / "adapter.json").unlink()
    run_files.write_request(tmp_path / "fresh", "save")  # asked before the first step: no earlier run, kept
    assert clear_previous_run(tmp_path / "fresh", None, overwrite=False) == []
    assert (tmp_path / "fresh" / "requests").is_dir()


def test_a_damaged_checkpoint_is_named_and_an_emptied_one_skipped(tmp_path, capsys):
    from sdtune.trainers import lora
    from sdtune.trainers.core.checkpointing import list_checkpoints

    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainable_0.safetensors").write_bytes(b"torn")
    (out / "checkpoints" / "checkpoint-4").mkdir()  # emptied, as a crash of another tool might leave it
    assert list_checkpoints(out) == [out / "checkpoints" / "checkpoint-2"]
    small = ["train.train_batch_size=2", "validation.validation_steps=0", "output.report_to=none"]
    assert lora.cli([str(QUICKSTART), f"output.dir={out}", "train.resume=latest", *small]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    [line] = [e for e in err if e.startswith("error: ")]
    assert line.startswith(f"error: train.resume: {out}/checkpoints/checkpoint-2 cannot be loaded (")
    assert line.endswith("resume from an earlier checkpoint-N, or start afresh with output.overwrite=true")


def test_a_diverged_run_stops_in_one_line_and_saves_no_nan(tmp_path, capsys):
    from sdtune.trainers import lora

    out = tmp_path / "out"
    overrides = ["train.learning_rate=1e30", "train.max_train_steps=40", "train.checkpointing_steps=20"]
    small = ["train.train_batch_size=2", "validation.validation_steps=0", "output.report_to=none"]
    assert lora.cli([str(QUICKSTART), f"output.dir={out}", *overrides, *small]) == 2
    err = capsys.readouterr().err  # after the progress bar's last redraw, on its line
    assert "\nerror: training diverged: the loss is NaN/inf since step " in err.replace("\r", "\n"), err[-500:]
    assert not (out / "checkpoints").exists() and not list(out.glob("*.safetensors"))  # no NaN checkpoint or adapter
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)


# -- several processes (Accelerate DDP over gloo on the CPU) and torch.compile -------------------------------------


def test_channels_last_and_fused_adamw_train_what_the_defaults_train(resume_setup, tmp_path):
    """The GPU speed settings change how tensors are laid out and how AdamW is launched, not the math: the same
    run with both ends within float rounding of the default run (not bit-identical: the kernels sum differently)."""
    recipe, cache, reference = resume_setup
    out = tmp_path / "run"
    proc = run_trainer(
        [str(recipe), f"output.dir={out}", "train.channels_last=true", "train.fused_optimizer=true"], cache
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert got.keys() == reference.keys()
    # the comparison means something: lora_B starts at zero, and training moved it
    assert min(float(reference[k].norm()) for k in reference if ".lora_B." in k) > 1e-3
    for key in reference:
        drift = float((got[key] - reference[key]).norm() / reference[key].norm().clamp_min(1e-12))
        assert drift <= 1e-3, (key, drift)


def test_two_process_ddp_trains_and_writes_once(resume_setup, tmp_path):
    """Two processes (torchrun + Accelerate, gloo on the CPU): batches are sharded, gradients all-reduced, and the
    main process alone writes the outputs; the same code runs DDP on several GPUs."""
    recipe, cache, _ = resume_setup
    out = tmp_path / "ddp"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "trainers/lora.py",
        str(recipe),
        f"output.dir={out}",
        "train.max_train_steps=4",
        "train.checkpointing_steps=2",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**trainer_env(cache), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("plan: 4 steps x 12 images/step") == 1  # 3 per batch x 2 accumulation x 2 processes
    # each process trained on its own shard with its own noise, yet both end with the same weights: the gradients
    # were all-reduced every step (the trainer compares them across processes and fails the run otherwise)
    assert "ddp: all 2 processes hold identical weights" in log
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((out / "adapter.json").read_text())["training"]["steps"] == 4


@pytest.mark.slow
def test_torch_compile_trains(tmp_path):
    """Opt-in torch.compile (inductor needs a C++ compiler; minutes on a CPU, hence slow)."""
    out = tmp_path / "run"
    proc = run_trainer(
        [
            str(QUICKSTART),
            f"output.dir={out}",
            "train.torch_compile=true",
            "train.max_train_steps=3",
            "validation.prompts=[]",
            "validation.toy_score=[]",
        ],
        tmp_path / "cache",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "adapter.json").read_text())["export_check"]["ok"] is True
