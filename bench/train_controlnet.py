"""Benchmark: sdtune's ControlNet trainer vs diffusers' examples/controlnet/train_controlnet.py.

Usage:
    # (a) the toy base on this machine's CPU
    python bench/train_controlnet.py --model toy --example path/to/train_controlnet.py
    # (b) the full SD v1-5 architecture with random weights, 512 px, on a GPU: default settings at batch 1 and 4,
    #     and the low-vram preset's memory options (fp16 base, gradient checkpointing, 8-bit AdamW) at batch 1
    python bench/train_controlnet.py --model sd15-random --batch 1 4 --low-vram --example path/to/train_controlnet.py

Both trainers get the same local model folder, the same images, masks and captions (an imagefolder whose
metadata.jsonl names each `conditioning_image_file_name`), resolution, batch size, learning rate, optimizer,
mixed precision and gradient checkpointing, no validation, and run under bench/measure.py, which times every
optimizer step with the same hook and reads the same peak-memory counters (CUDA peak allocated on a GPU, peak RSS
on the CPU). The example script is not part of sdtune: fetch it from the diffusers repository and pass its path.
Without --example only sdtune is measured. Results are printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib
import torch

LOW_VRAM = {"optimizer": "adamw8bit", "gradient_checkpointing": True}  # recipes/sd15-controlnet-low-vram.yaml


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Batch sizes (default: 8 toy, 1 4 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 40 toy, 20 sd15).")
    p.add_argument("--low-vram", action="store_true", help="Also measure the low-vram preset's options at batch 1.")
    benchlib.add_common_arguments(p, "examples/controlnet/train_controlnet.py")
    return p.parse_args(argv)


def sdtune_run(model: Path, data: Path, res: int, batch: int, steps: int, precision: str, options: dict, out: Path):
    args = [
        str(benchlib.ROOT / "recipes" / "controlnet-toy.yaml"),
        *benchlib.recipe_overrides(model, data, res, batch, steps, precision, 1e-5, out),
        "data.latent_sampling=sample",
        "method.proportion_empty_prompts=0",
        "method.validation_image=[]",
        "train.timestep_sampling=uniform",
        f"train.optimizer={options.get('optimizer', 'adamw')}",
        f"train.gradient_checkpointing={str(options.get('gradient_checkpointing', False)).lower()}",
    ]
    return benchlib.measured(
        str(benchlib.ROOT / "trainers" / "controlnet.py"), args, out / "measure.json", benchlib.ROOT
    )


def example_run(script: Path, model: Path, data: Path, res: int, batch: int, steps: int, precision, options, out):
    args = benchlib.example_arguments(model, data, res, batch, steps, precision, 1e-5, out)
    if options.get("optimizer") == "adamw8bit":
        args.append("--use_8bit_adam")
    if options.get("gradient_checkpointing"):
        args.append("--gradient_checkpointing")
    return benchlib.measured(str(script), args, out / "measure.json", out.parent)


def main(argv=None):
    args = parse_args(argv)
    toy = args.model == "toy"
    steps = args.steps or (40 if toy else 20)
    res = 64 if toy else 512
    precision = "fp16" if torch.cuda.is_available() else "no"
    work = args.work / args.model
    model = benchlib.ROOT / "adapters" / "toy_base" if toy else benchlib.build_sd15_random(work / "model")
    data = benchlib.build_data(work / f"data-{res}-controlnet", args.images, res, conditioning=True)
    runs = [(batch, "default", {}) for batch in args.batch or ([8] if toy else [1, 4])]
    if args.low_vram:
        runs.append((1, "low-vram", LOW_VRAM))
    rows, stamp = [], time.strftime("%Y-%m-%d %H:%M")
    memory_key = "cuda_peak_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    for batch, preset, options in runs:
        run = work / f"cn-{preset}-b{batch}-{int(time.time())}"
        ours = sdtune_run(model, data, res, batch, steps, precision, options, run / "sdtune")
        row = {"batch": batch, "preset": preset, "sdtune_s": ours["seconds_per_step"], "sdtune_mem": ours[memory_key]}
        if args.example:
            theirs = example_run(args.example, model, data, res, batch, steps, precision, options, run / "example")
            row |= {"example_s": theirs["seconds_per_step"], "example_mem": theirs[memory_key]}
        rows.append(row)
        print(json.dumps(row))
    write_results(args, rows, benchlib.device_name(), stamp, res, steps, precision)


def write_results(args, rows, device, stamp, res, steps, precision):
    title = f"ControlNet, {args.model}, {res} px, {steps} steps, mixed precision {precision}"
    command = f"python bench/train_controlnet.py --model {args.model}" + (" --low-vram" if args.low_vram else "")
    lines = benchlib.results_header(title, command, device, stamp)
    lines += [
        "| batch | options | sdtune s/step | example s/step | time ratio | sdtune memory | example memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        theirs = ("not run", "", "")
        if "example_s" in r:
            theirs = (
                f"{r['example_s']:.4f}",
                f"{r['sdtune_s'] / r['example_s']:.2f}x",
                benchlib.gib(r["example_mem"]),
            )
        lines.append(
            f"| {r['batch']} | {r['preset']} | {r['sdtune_s']:.4f} | {theirs[0]} | {theirs[1]} | "
            f"{benchlib.gib(r['sdtune_mem'])} | {theirs[2]} |"
        )
    benchlib.append_results(args.results, lines)


if __name__ == "__main__":
    main()
