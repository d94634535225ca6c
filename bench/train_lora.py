"""Benchmark: sdtune's LoRA trainer vs diffusers' examples/text_to_image/train_text_to_image_lora.py.

Usage:
    # (a) the toy base on this machine's CPU
    python bench/train_lora.py --model toy --example path/to/train_text_to_image_lora.py
    # (b) the full SD v1-5 architecture with random weights, 512 px, batch 1 and 4, on a GPU
    python bench/train_lora.py --model sd15-random --batch 1 4 --example path/to/train_text_to_image_lora.py

Both trainers get the same local model folder, the same images and captions (an imagefolder with metadata.jsonl),
resolution, batch size, rank, learning rate, optimizer (torch AdamW), mixed precision, no validation and no
gradient checkpointing, and run under bench/measure.py, which times every optimizer step with the same hook and
reads the same peak-memory counters (CUDA peak allocated on a GPU, peak RSS on the CPU). The example script is not
part of sdtune: fetch it from the diffusers repository (git clone https://github.com/huggingface/diffusers) and
pass its path. Without --example only sdtune is measured. Results are printed and written to bench/RESULTS.md
under a heading that names the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_CONFIG = ROOT / "adapters" / "sd15_config"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Batch sizes (default: 8 toy, 1 4 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 60 toy, 30 sd15).")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="Training images to generate.")
    p.add_argument("--example", type=Path, default=None, help="diffusers' train_text_to_image_lora.py.")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="Scratch folder (models, data).")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    return p.parse_args(argv)


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


def build_data(folder: Path, n: int, size: int) -> Path:
    """n toy-world images at `size` px with an imagefolder metadata.jsonl (both trainers read this layout)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    from sdtune.adapters import toyworld

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (_, caption, scene) in enumerate(toyworld.generate(n, seed=123)):
        toyworld.render(scene, size).save(folder / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def measured(cmd_script: str, args: list[str], result: Path, cwd: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "measure.py"), str(result), "--", cmd_script, *args]
    env = {**os.environ, "SDTUNE_CACHE": str(result.parent / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd_script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def sdtune_run(model: Path, data: Path, res: int, batch: int, steps: int, rank: int, precision: str, out: Path):
    args = [
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"base={model}",
        f"data.train_data_dir={data}",
        f"data.resolution={res}",
        f"data.min_bucket_reso={res}",
        f"data.max_bucket_reso={res}",
        "data.bucket_reso_steps=8",
        "data.enable_bucket=false",
        "data.random_flip=false",
        "data.caption_dropout_rate=0",
        f"method.rank={rank}",
        f"method.lora_alpha={rank}",
        f"train.max_train_steps={steps}",
        f"train.train_batch_size={batch}",
        "train.learning_rate=1e-4",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        "train.optimizer=adamw",
        "train.snr_gamma=null",
        f"train.mixed_precision={precision}",
        "train.checkpointing_steps=100000",
        "validation.prompts=[]",
        "validation.toy_score=[]",
        f"output.dir={out}",
        "output.report_to=none",
        "output.export_check=false",
    ]
    return measured(str(ROOT / "trainers" / "lora.py"), args, out / "measure.json", ROOT)


def example_run(
    script: Path, model: Path, data: Path, res: int, batch: int, steps: int, rank: int, precision: str, out: Path
):
    args = [
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--resolution={res}",
        "--center_crop",
        f"--train_batch_size={batch}",
        f"--max_train_steps={steps}",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--rank={rank}",
        "--seed=0",
        f"--mixed_precision={precision}",
        "--checkpointing_steps=100000",
        f"--output_dir={out}",
        "--dataloader_num_workers=0",
    ]
    return measured(str(script), args, out / "measure.json", out.parent)


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None):
    args = parse_args(argv)
    toy = args.model == "toy"
    batches = args.batch or ([8] if toy else [1, 4])
    steps = args.steps or (60 if toy else 30)
    res = 64 if toy else 512
    precision = "fp16" if torch.cuda.is_available() else "no"
    work = args.work / args.model
    model = ROOT / "adapters" / "toy_base" if toy else build_sd15_random(work / "model")
    data = build_data(work / f"data-{res}", args.images, res)
    rows, stamp = [], time.strftime("%Y-%m-%d %H:%M")
    for batch in batches:
        run = work / f"b{batch}-{int(time.time())}"
        ours = sdtune_run(model, data, res, batch, steps, args.rank, precision, run / "sdtune")
        theirs = None
        if args.example:
            theirs = example_run(args.example, model, data, res, batch, steps, args.rank, precision, run / "example")
        memory_key = "cuda_peak_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
        row = {
            "batch": batch,
            "sdtune_s": ours["seconds_per_step"],
            "sdtune_mem": ours[memory_key],
            "sdtune_wall": ours["wall_seconds"],
        }
        if theirs:
            row |= {
                "example_s": theirs["seconds_per_step"],
                "example_mem": theirs[memory_key],
                "example_wall": theirs["wall_seconds"],
                "shim": theirs["torchvision_shim"],
            }
        rows.append(row)
        print(json.dumps(row))
    write_results(args, rows, device_name(), stamp, res, steps, precision)


def write_results(args, rows, device, stamp, res, steps, precision):
    memory = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS"
    lines = [
        f"\n## {args.model}, {res} px, rank {args.rank}, {steps} steps, mixed precision {precision}",
        f"Machine: {device}. Measured {stamp} by `python bench/train_lora.py --model {args.model}`.",
        f"Memory is {memory}; s/step is the median interval between optimizer steps after 3 warm-up steps.",
        "",
        "| batch | sdtune s/step | example s/step | time ratio | sdtune memory | example memory | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "example_s" in r:
            lines.append(
                f"| {r['batch']} | {r['sdtune_s']:.4f} | {r['example_s']:.4f} | "
                f"{r['sdtune_s'] / r['example_s']:.2f}x | {gib(r['sdtune_mem'])} | {gib(r['example_mem'])} | "
                f"{r['sdtune_mem'] / r['example_mem']:.2f}x |"
            )
        else:
            lines.append(f"| {r['batch']} | {r['sdtune_s']:.4f} | not run | | {gib(r['sdtune_mem'])} | | |")
    if any(r.get("shim") for r in rows):
        lines.append(
            "\nThe example ran with bench/torchvision_shim.py standing in for torchvision.transforms "
            "(no CPU torchvision wheel loads beside this torch); preprocessing only."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
