"""Benchmark: sdtune's DreamBooth trainer (full and LoRA) vs diffusers' examples/dreambooth/train_dreambooth.py and
train_dreambooth_lora.py.

Usage:
    # (a) the toy base on this machine's CPU
    python bench/train_dreambooth.py --model toy --example-dir path/to/diffusers/examples/dreambooth
    # (b) the full SD v1-5 architecture with random weights, 512 px, on a GPU (8-bit AdamW + checkpointing for full)
    python bench/train_dreambooth.py --model sd15-random --example-dir path/to/diffusers/examples/dreambooth

Both trainers get the same local model folder, the same instance images and prompt, the same class folder with
prior preservation on (its images already present, so neither generates any), resolution, batch size, learning
rate, optimizer, mixed precision and gradient checkpointing, no validation, and run under bench/measure.py (the
same step hook and memory counters as bench/train_lora.py). Full mode on a GPU uses 8-bit AdamW and gradient
checkpointing (the `low-vram` preset's memory settings); on the CPU plain AdamW. The examples are not part of
sdtune: fetch them from the diffusers repository and pass their folder; without --example-dir only sdtune runs.
Results are printed and appended to bench/RESULTS.md under a heading that names the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import MEASURE_ONLY, absolute  # noqa: E402
from train_lora import ROOT, build_sd15_random, device_name, gib, measured  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a sks circle", "a circle"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--batch", type=int, default=None, help="Instance images per step (default: 4 toy, 1 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 40 toy, 30 sd15).")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank in lora mode.")
    p.add_argument("--example-dir", type=absolute, default=None, help="diffusers' examples/dreambooth folder.")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="Scratch folder (models, data).")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    return p.parse_args(argv)


def build_folder(folder: Path, n: int, size: int, color: str, seed: int) -> Path:
    """n toy-world circles of one colour as plain PNGs (both trainers read a folder of images)."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    from sdtune.adapters import toyworld

    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, _, scene) in enumerate(toyworld.generate(n, seed=seed, colors=[color], shapes=["circle"])):
        toyworld.render(scene, size).save(folder / f"{i:04d}.png")
    return folder


def settings(model: str, mode: str) -> dict:
    gpu = torch.cuda.is_available()
    return {
        "precision": "fp16" if gpu else "no",
        "lr": 1e-4 if mode == "lora" else (2e-6 if model == "sd15-random" else 2e-4),
        "adam8bit": gpu and mode == "full",
        "checkpointing": gpu and mode == "full",
    }


def sdtune_run(model, instance, klass, res, batch, steps, rank, mode, s, out: Path):
    # every image at exactly res x res, no flips: the examples centre-crop at --resolution
    data = {"train_data_dir": instance, "resolution": res, "min_bucket_reso": res, "max_bucket_reso": res}
    args = [
        str(ROOT / "recipes" / "toy-dreambooth.yaml"),
        f"base={model}",
        *(f"data.{key}={value}" for key, value in data.items()),
        "data.enable_bucket=false",
        "data.random_flip=false",
        f"method.class_data_dir={klass}",
        f"method.num_class_images={len(list(klass.glob('*.png')))}",
        f"method.lora={'true' if mode == 'lora' else 'false'}",
        f"method.rank={rank}",
        f"method.lora_alpha={rank}",
        "method.extract_lora_rank=null",
        "method.save_single_file=false",
        f"train.max_train_steps={steps}",
        f"train.train_batch_size={batch}",
        f"train.learning_rate={s['lr']}",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        f"train.optimizer={'adamw8bit' if s['adam8bit'] else 'adamw'}",
        f"train.gradient_checkpointing={'true' if s['checkpointing'] else 'false'}",
        f"train.mixed_precision={s['precision']}",
        "train.checkpointing_steps=100000",
        "output.export_check=false",
        *MEASURE_ONLY,
        f"output.dir={out}",
    ]
    return measured(str(ROOT / "trainers" / "dreambooth.py"), args, out / "measure.json", ROOT)


def example_run(example_dir, model, instance, klass, res, batch, steps, rank, mode, s, out: Path):
    script = example_dir / ("train_dreambooth_lora.py" if mode == "lora" else "train_dreambooth.py")
    args = [
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={instance}",
        f"--instance_prompt={INSTANCE_PROMPT}",
        "--with_prior_preservation",
        f"--class_data_dir={klass}",
        f"--class_prompt={CLASS_PROMPT}",
        f"--num_class_images={len(list(klass.glob('*.png')))}",
        f"--resolution={res}",
        f"--train_batch_size={batch}",
        f"--max_train_steps={steps}",
        f"--learning_rate={s['lr']}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--seed=0",
        f"--mixed_precision={s['precision']}",
        "--checkpointing_steps=100000",
        f"--output_dir={out}",
        "--dataloader_num_workers=0",
    ]
    args += [f"--rank={rank}"] if mode == "lora" else []
    args += ["--use_8bit_adam"] if s["adam8bit"] else []
    args += ["--gradient_checkpointing"] if s["checkpointing"] else []
    return measured(str(script), args, out / "measure.json", out.parent)


def main(argv=None):
    args = parse_args(argv)
    toy = args.model == "toy"
    batch = args.batch or (4 if toy else 1)
    steps = args.steps or (40 if toy else 30)
    res = 64 if toy else 512
    work = args.work / f"dreambooth-{args.model}"
    model = ROOT / "adapters" / "toy_base" if toy else build_sd15_random(args.work / args.model / "model")
    instance = build_folder(work / f"instance-{res}", 8, res, "purple", seed=5)
    klass = build_folder(work / f"class-{res}", 16, res, "green", seed=6)
    memory_key = "cuda_peak_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    rows, stamp = [], time.strftime("%Y-%m-%d %H:%M")
    for mode in args.modes:
        s = settings(args.model, mode)
        run = work / f"{mode}-{int(time.time())}"
        common = (model, instance, klass, res, batch, steps, args.rank, mode, s)
        ours = sdtune_run(*common, run / "sdtune")
        row = {"mode": mode, **s, "sdtune_s": ours["seconds_per_step"], "sdtune_mem": ours[memory_key]}
        if args.example_dir:
            theirs = example_run(args.example_dir, *common, run / "example")
            row |= {"example_s": theirs["seconds_per_step"], "example_mem": theirs[memory_key]}
        rows.append(row)
        print(json.dumps(row))
    write_results(args, rows, device_name(), stamp, res, steps, batch)


def table_row(r: dict) -> str:
    how = f"{r['precision']}, {'adamw8bit' if r['adam8bit'] else 'adamw'}, {'on' if r['checkpointing'] else 'off'}"
    theirs = ["not run", "", ""]
    if "example_s" in r:
        theirs = [f"{r['example_s']:.4f}", f"{r['sdtune_s'] / r['example_s']:.2f}x", gib(r["example_mem"])]
    cells = [r["mode"], how, f"{r['sdtune_s']:.4f}", theirs[0], theirs[1], gib(r["sdtune_mem"]), theirs[2]]
    return "| " + " | ".join(cells) + " |"


def write_results(args, rows, device, stamp, res, steps, batch):
    counter = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS"
    header = (
        f"\n## DreamBooth: {args.model}, {res} px, {batch} instance + {batch} class images per step, {steps} steps\n"
        f"Machine: {device}. Measured {stamp} by `python bench/train_dreambooth.py --model {args.model}`.\n"
        f"Memory is {counter}; s/step is the median interval between optimizer steps after 3 warm-up steps.\n\n"
        "| mode | precision, optimizer, checkpointing | sdtune s/step | example s/step | time ratio "
        "| sdtune memory | example memory |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    table = header + "\n".join(table_row(r) for r in rows) + "\n"
    print(table)
    args.results.open("a").write(table)


if __name__ == "__main__":
    main()
