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
import time
from pathlib import Path

import torch
from benchlib import (
    ROOT,
    add_common_arguments,
    append_results,
    build_data,
    build_sd15_random,
    device_name,
    example_arguments,
    gib,
    measured,
    recipe_overrides,
    results_header,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Batch sizes (default: 8 toy, 1 4 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 60 toy, 30 sd15).")
    p.add_argument("--rank", type=int, default=16)
    add_common_arguments(p, "examples/text_to_image/train_text_to_image_lora.py")
    return p.parse_args(argv)


def sdtune_run(model: Path, data: Path, res: int, batch: int, steps: int, rank: int, precision: str, out: Path):
    args = [
        str(ROOT / "recipes" / "quickstart.yaml"),
        *recipe_overrides(model, data, res, batch, steps, precision, 1e-4, out),
        "data.caption_dropout_rate=0",
        f"method.rank={rank}",
        f"method.lora_alpha={rank}",
        "train.optimizer=adamw",
        "train.snr_gamma=null",
        "output.export_check=false",
    ]
    return measured(str(ROOT / "trainers" / "lora.py"), args, out / "measure.json", ROOT)


def example_run(
    script: Path, model: Path, data: Path, res: int, batch: int, steps: int, rank: int, precision: str, out: Path
):
    args = [
        *example_arguments(model, data, res, batch, steps, precision, 1e-4, out),
        "--center_crop",
        f"--rank={rank}",
    ]
    return measured(str(script), args, out / "measure.json", out.parent)


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
    title = f"{args.model}, {res} px, rank {args.rank}, {steps} steps, mixed precision {precision}"
    lines = results_header(title, f"python bench/train_lora.py --model {args.model}", device, stamp)
    lines += [
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
    append_results(args.results, lines)


if __name__ == "__main__":
    main()
