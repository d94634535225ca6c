"""On a CUDA GPU (marked `gpu`; skipped without one): mixed precision trains the toy base to the scores fp32 reaches
on the CPU, the export check passes under it, and a run killed mid-way and resumed ends close to an unbroken one.

Run them on a GPU machine with `pytest -m gpu tests/test_gpu.py` (about 5 minutes on one GPU).

Resume on the GPU is not bit-identical, unlike on the CPU (tests/test_lora.py): cuDNN's convolution backward and
cuBLAS's split-K matrix products may sum in a different order from run to run (atomic adds), so two runs from the
same checkpoint drift apart by float rounding. The bar is the size of that drift: each LoRA tensor of the resumed
run within 2% (relative L2) of the unbroken run's, while training moves them by far more than that.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICKSTART, ROOT, kill_after_checkpoint, run_trainer, start_trainer
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: -m gpu)"),
]

RESUME_DRIFT = 0.02  # relative L2 distance per tensor, resumed vs unbroken


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def precision_run(request, tmp_path_factory):
    """The quickstart recipe (purple) on the GPU in fp16 (with loss scaling) or bf16, export check on."""
    out = tmp_path_factory.mktemp(f"gpu-{request.param}") / "run"
    args = [str(QUICKSTART), f"output.dir={out}", f"train.mixed_precision={request.param}", "output.register=false"]
    proc = run_trainer(args, tmp_path_factory.mktemp("cache"), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return request.param, out, proc.stdout + proc.stderr


def test_mixed_precision_learns_purple_as_fp32_does_on_the_cpu(precision_run):
    """The bars of tests/test_lora.py's CPU run: the base draws no purple, the LoRA does."""
    _, out, _ = precision_run
    scores = json.loads((out / "adapter.json").read_text())["scores"]
    assert scores["base"]["both"] <= 0.2, scores
    assert scores["adapter"]["both"] >= 0.8, scores


def test_export_check_passes_under_mixed_precision(precision_run):
    """Both saved LoRA files, reloaded through diffusers, draw what the trained model drew (within 2/255)."""
    _, out, log = precision_run
    check = json.loads((out / "adapter.json").read_text())["export_check"]
    assert check["ok"], check
    assert "export check passed" in log


def test_fp16_scales_the_loss_and_bf16_does_not(precision_run):
    """fp16 gradients underflow without loss scaling: Accelerate's GradScaler is on for fp16 (its state is saved
    with each checkpoint, so a resume continues the same scale) and off for bf16, whose range needs none."""
    precision, out, _ = precision_run
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    assert (checkpoint / "scaler.pt").is_file() == (precision == "fp16"), sorted(p.name for p in checkpoint.iterdir())


def test_killed_and_resumed_ends_within_the_drift_of_an_unbroken_run(tmp_path):
    """bf16, every source of randomness on (tests/test_lora.py's resume recipe): SIGKILL after the second checkpoint,
    resume from it, compare with the unbroken run tensor by tensor."""
    from test_lora import RESUME_RECIPE

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RESUME_RECIPE.format(data=ROOT / "datasets" / "quickstart-purple"))
    cache, extra = tmp_path / "cache", ["train.mixed_precision=bf16"]
    reference = tmp_path / "reference"
    proc = run_trainer([str(recipe), f"output.dir={reference}", *extra], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "run"
    kill_after_checkpoint(start_trainer([str(recipe), f"output.dir={out}", *extra], cache), out, 6)
    resumed = run_trainer([str(recipe), f"output.dir={out}", "train.resume=latest", *extra], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    want = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    assert got.keys() == want.keys()
    drift = {
        k: ((got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp_min(1e-12)).item() for k in want
    }
    worst = max(drift, key=drift.get)
    assert drift[worst] <= RESUME_DRIFT, (worst, drift[worst])
