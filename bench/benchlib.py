"""What the benchmarks share: the machine's name, the SD v1-5 architecture with random weights, toy-world data,
and running a training script under bench/measure.py.

The bench scripts run as `python bench/<name>.py`, so this folder is on sys.path and they `import benchlib`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_CONFIG = ROOT / "adapters" / "sd15_config"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"CPU: {model}, {os.cpu_count()} cores (torch {torch.__version__})"


def build_sd15_random(folder: Path) -> Path:
    """The full SD v1-5 UNet/VAE/text encoder with seeded random weights, saved once as a diffusers folder."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_data(folder: Path, n: int, size: int, conditioning: bool = False) -> Path:
    """n toy-world images at `size` px with an imagefolder metadata.jsonl (both trainers read this layout); with
    `conditioning`, each image's shape mask too, as `conditioning_image_file_name` (the ControlNet example's column).
    """
    if (folder / "metadata.jsonl").is_file():
        return folder
    from sdtune.adapters import toyworld

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (_, caption, scene) in enumerate(toyworld.generate(n, seed=123)):
        toyworld.render(scene, size).save(folder / f"{i:04d}.png")
        row = {"file_name": f"{i:04d}.png", "text": caption}
        if conditioning:
            toyworld.scene_mask(scene, size).save(folder / f"{i:04d}-mask.png")
            row["conditioning_image_file_name"] = f"{i:04d}-mask.png"
        rows.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def measured(cmd_script: str, args: list[str], result: Path, cwd: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "measure.py"), str(result), "--", cmd_script, *args]
    env = {**os.environ, "SDTUNE_CACHE": str(result.parent / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd_script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"
