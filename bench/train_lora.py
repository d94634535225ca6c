"""Benchmark: sdtune's LoRA trainer vs diffusers' examples/text_to_image/train_text_to_image_lora.py.

Usage:
    # (a) the toy base on this machine's CPU
    python bench/train_lora.py --model toy --example path/to/train_text_to_image_lora.py
    # (b) the full SD v1-5 architecture with random weights, 512 px, batch 1 and 4, on a GPU
    python bench/train_lora.py --model sd15-random --batch 1 4 --example path/to/train_text_to_image_lora.py

    # (c) sdtune alone: the step with each loss/noise/optimizer/EMA option against the default step (toy, CPU)
    python bench/train_lora.py --model toy --options all --repeats 3
    python bench/train_lora.py --options huber multires_noise "train.loss_type=smooth_l1 train.huber_c=0.2"
    # (d) the same, interleaved step by step in one go (resolves ~1% on a shared machine); --baseline COMMIT adds
    #     the default step of the repository at COMMIT (a regression check)
    python bench/train_lora.py --options masked_loss huber --interleave --steps 200 --repeats 2 --baseline 975534b

Both trainers get the same local model folder, the same images and captions (an imagefolder with metadata.jsonl),
resolution, batch size, rank, learning rate, optimizer (torch AdamW), mixed precision, no validation and no
gradient checkpointing, and run under bench/measure.py, which times every optimizer step with the same hook and
reads the same peak-memory counters (CUDA peak allocated on a GPU, peak RSS on the CPU). The example script is not
part of sdtune: fetch it from the diffusers repository (git clone https://github.com/huggingface/diffusers) and
pass its path. Without --example only sdtune is measured. Results are printed and written to bench/RESULTS.md
under a heading that names the machine.

With --options (c), the example is not run: each named option of OPTIONS (or a free list of recipe overrides, in
quotes) trains the same data with the same settings as the `default` step, and the table gives its s/step as a
ratio of the default's. --repeats N runs every variant N times, taking turns, and keeps the median, so that a
machine's drift during the run falls on all of them alike.

With --interleave (d), the variants of a repeat run at once, one optimizer step at a time in turns, the others
paused (benchlib.measured_in_turns): step k of every variant is taken within the same second or so, and "vs default"
is the median over steps of (the variant's step k / the default's step k), with the middle half of those ratios
beside it. A separate run per variant sees the machine's load of its own minute; a step-by-step pair sees the same.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import torch
from benchlib import (
    ROOT,
    Run,
    add_common_arguments,
    append_results,
    build_data,
    build_sd15_random,
    device_name,
    example_arguments,
    gib,
    measured,
    measured_in_turns,
    measured_run,
    recipe_overrides,
    results_header,
)

# The recipe keys of the loss, noise, mask, optimizer and EMA options (issue 22), as the overrides that turn each on. `default` is the step
# they are measured against: plain noise, uniform timesteps, the MSE, no min-SNR (sdtune_run sets snr_gamma null).
# zero_terminal_snr is not here: it needs a v-prediction base (the toy is epsilon) and costs nothing per step (the
# rescaled schedule is built once).
OPTIONS = {
    "default": [],
    "huber": ["train.loss_type=huber"],  # huber_schedule: snr, sd-scripts' default
    "huber_constant": ["train.loss_type=huber", "train.huber_schedule=constant"],
    "smooth_l1": ["train.loss_type=smooth_l1"],
    "min_snr": ["train.snr_gamma=5"],
    "debiased": ["train.debiased_estimation_loss=true"],
    "multires_noise": ["train.multires_noise_iterations=6", "train.multires_noise_discount=0.3"],
    "ip_noise": ["train.ip_noise_gamma=0.1"],
    "timestep_range": ["train.min_timestep=200", "train.max_timestep=800"],
    # Optimizers and EMA (issue 22 items 3-4): the step with another optimizer's update, or the EMA's after it.
    "prodigy": ["train.optimizer_type=prodigy", "train.lr=1.0"],
    "schedulefree_adamw": ["train.optimizer_type=schedulefree_adamw", "train.lr_scheduler=constant"],
    "lion": ["train.optimizer_type=lion", "train.lr=3e-5"],
    "adamw8bit": ["train.optimizer_type=adamw8bit"],
    "ema": ["method.use_ema=true"],
    # {masks}: a mask per image, made as `sdtune annotate --kind mask` makes them (bench_masks)
    "masked_loss": ["data.masked_loss=true", "data.mask_dir={masks}"],
    # LyCORIS forms of the same adapter (issue 23): the update built as a Hadamard or a Kronecker product each step
    "loha": ["method.algo=loha"],
    "lokr": ["method.algo=lokr"],
}


def bench_masks(data: Path, folder: Path) -> Path:
    """A mask for every image of the bench data, same name, by `sdtune annotate --kind mask`'s function."""
    from PIL import Image

    from sdtune.adapters import annotate

    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(data.glob("*.png")):
        if not (folder / image.name).is_file():
            with Image.open(image) as opened:
                annotate.mask(opened.convert("RGB")).save(folder / image.name)
    return folder


def option_overrides(option: str) -> list[str]:
    """A named option's overrides, or the overrides a free-form option spells out ("train.a=1 train.b=2")."""
    if option.startswith("default@"):  # --baseline: the default step of another commit
        return []
    if option in OPTIONS:
        return OPTIONS[option]
    overrides = option.split()
    if not overrides or not all("=" in o for o in overrides):
        raise SystemExit(f"--options: {option!r} is neither one of {', '.join(OPTIONS)} nor 'section.key=value ...'")
    return overrides


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Batch sizes (default: 8 toy, 1 4 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 60 toy, 30 sd15).")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--options",
        nargs="+",
        default=None,
        help="Measure these loss/noise options against the default step: names from OPTIONS, 'all', or quoted "
        "recipe overrides ('train.loss_type=huber train.huber_c=0.2').",
    )
    p.add_argument("--repeats", type=int, default=1, help="With --options: runs per variant, in turns (median).")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="With --options: run the variants at once, one step each in turns (ratios step by step).",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="COMMIT",
        help="With --options: also measure the default step of the repository at COMMIT (git archive).",
    )
    add_common_arguments(p, "examples/text_to_image/train_text_to_image_lora.py")
    return p.parse_args(argv)


def sdtune_run(
    model: Path, data: Path, res: int, batch: int, steps: int, rank: int, precision: str, out: Path, extra=()
):
    return measured_run(sdtune_planned(model, data, res, batch, steps, rank, precision, out, extra))


def sdtune_planned(
    model: Path,
    data: Path,
    res: int,
    batch: int,
    steps: int,
    rank: int,
    precision: str,
    out: Path,
    extra=(),
    tree=None,
) -> Run:
    """sdtune's LoRA trainer on the bench settings, from this repository or from `tree` (`tree_at`)."""
    root = tree or ROOT
    args = [
        str(root / "recipes" / "quickstart.yaml"),
        *recipe_overrides(model, data, res, batch, steps, precision, 1e-4, out),
        "data.caption_dropout_rate=0",
        f"method.rank={rank}",
        f"method.lora_alpha={rank}",
        "train.optimizer_type=adamw",
        "train.snr_gamma=null",
        "output.export_check=false",
        *extra,
    ]
    env = {} if tree is None else {"PYTHONPATH": str(tree / ".import")}
    return Run(str(root / "trainers" / "lora.py"), args, out / "measure.json", root, env)


def tree_at(commit: str, work: Path) -> Path:
    """This repository at `commit` (git archive) under `work`, with `.import/sdtune/` beside it: a package whose
    trainers/adapters/studio are that tree's, which PYTHONPATH puts ahead of the installed (editable) sdtune."""
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run([*git, "rev-parse", "--short", commit], capture_output=True, text=True, check=True).stdout
    tree = work / f"tree-{sha.strip()}"
    if not (tree / ".import" / "sdtune" / "__init__.py").is_file():
        archive = subprocess.run([*git, "archive", sha.strip()], capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree, filter="data")
        package = tree / ".import" / "sdtune"
        package.mkdir(parents=True, exist_ok=True)
        for part in ("trainers", "adapters", "studio"):
            (package / part).symlink_to(tree / part)
        (package / "__init__.py").write_text("")  # a regular package: no namespace merge with the installed one
    return tree


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
    if args.options:
        return compare_options(args, model, data, res, batches, steps, precision, work)
    rows, stamp = [], time.strftime("%Y-%m-%d %H:%M")
    for batch in batches:
        run = work / f"b{batch}-{int(time.time())}"
        ours = sdtune_run(model, data, res, batch, steps, args.rank, precision, run / "sdtune")
        theirs = None
        if args.example:
            theirs = example_run(args.example, model, data, res, batch, steps, args.rank, precision, run / "example")
        memory_key = measure_memory_key()
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


def compare_options(args, model, data, res, batches, steps, precision, work):
    """(c) and (d): every option's step against the default step, `args.repeats` runs each, taking turns (run by
    run, or with --interleave step by step)."""
    names = list(OPTIONS) if args.options == ["all"] else ["default", *(o for o in args.options if o != "default")]
    overrides = {name: option_overrides(name) for name in names}  # a misspelt option stops before any run
    if any("{masks}" in o for values in overrides.values() for o in values):
        masks = bench_masks(data, work / f"masks-{res}")
        overrides = {name: [o.replace("{masks}", str(masks)) for o in values] for name, values in overrides.items()}
    trees = {}
    if args.baseline:
        names.append(f"default@{args.baseline}")
        trees[names[-1]], overrides[names[-1]] = tree_at(args.baseline, work), []
    stamp, memory_key = time.strftime("%Y-%m-%d %H:%M"), measure_memory_key()
    rows = []
    for batch in batches:
        runs = {name: [] for name in names}
        for repeat in range(args.repeats):
            planned = {
                name: sdtune_planned(
                    *(model, data, res, batch, steps, args.rank, precision),
                    work / f"options-b{batch}" / f"{i}-r{repeat}",
                    overrides[name],
                    trees.get(name),
                )
                for i, name in enumerate(names)
            }
            measured = measured_in_turns(planned, steps) if args.interleave else None
            for name, run in planned.items():
                runs[name].append(measured[name] if measured else measured_run(run))
        for name in names:
            row = option_row(runs, name, memory_key) | {"batch": batch}
            rows.append(row)
            print(json.dumps(row))
    write_option_results(args, rows, device_name(), stamp, res, steps, precision)


def option_row(runs: dict[str, list[dict]], name: str, memory_key: str) -> dict:
    """An option's s/step (median of its runs' medians) and its ratio to the default's, of the medians, or with
    interleaved runs the median of the step-by-step ratios (and their quartiles); on the CPU the same of the
    process's CPU time per step (`cpu_s`, `cpu_ratio`)."""
    seconds = statistics.median(r["seconds_per_step"] for r in runs[name])
    default = statistics.median(r["seconds_per_step"] for r in runs["default"])
    row = {
        "option": name,
        "s": seconds,
        "ratio": seconds / default,
        "mem": max(r[memory_key] or 0 for r in runs[name]),
    }
    interleaved = all(r.get("in_turns") for r in runs[name] + runs["default"])
    if runs[name][0].get("step_cpu_intervals"):
        cpu = {
            n: statistics.median(median_after_warmup(r, "step_cpu_intervals") for r in runs[n])
            for n in (name, "default")
        }
        row |= {"cpu_s": cpu[name], "cpu_ratio": cpu[name] / cpu["default"]}
        if interleaved:
            row["cpu_ratio"] = statistics.median(step_ratios(runs[name], runs["default"], "step_cpu_intervals"))
    if interleaved:
        ratios = step_ratios(runs[name], runs["default"], "step_intervals")
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        row |= {"ratio": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]], "pairs": len(ratios)}
    return row


def median_after_warmup(run: dict, key: str) -> float:
    return statistics.median(run[key][run["warmup_steps"] :])


def step_ratios(runs: list[dict], defaults: list[dict], key: str) -> list[float]:
    """Step k of each run over step k of the default run it took turns with, warm-up steps left out."""
    return [
        mine / theirs
        for run, default in zip(runs, defaults)
        for mine, theirs in list(zip(run[key], default[key]))[run["warmup_steps"] :]
    ]


def measure_memory_key() -> str:
    return "cuda_peak_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"


def write_option_results(args, rows, device, stamp, res, steps, precision):
    how = "interleaved step by step, " if args.interleave else ""
    title = (
        f"Loss and noise options vs the default step: {args.model}, {res} px, rank {args.rank}, {steps} steps, "
        f"mixed precision {precision}, {how}median of {args.repeats}"
    )
    command = f"python bench/train_lora.py --model {args.model} --options {shlex.join(args.options)}"
    command += f" --steps {steps}" * (args.steps is not None) + " --interleave" * args.interleave
    command += f" --baseline {args.baseline}" * bool(args.baseline) + f" --repeats {args.repeats}"
    lines = results_header(title, command, device, stamp)
    spread = ["middle half of the step ratios"] if args.interleave else []
    cpu = ["CPU s/step", "CPU vs default"] if "cpu_s" in rows[0] else []
    header = ["batch", "option", "overrides", "s/step", "vs default", *spread, *cpu, "memory"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        overrides = " ".join(f"`{o}`" for o in option_overrides(r["option"])) or "(none)"
        if r["option"].startswith("default@"):
            overrides = f"(none; the trainer of commit {r['option'].split('@', 1)[1]})"
        cells = [r["batch"], r["option"], overrides, f"{r['s']:.4f}", f"{r['ratio']:.3f}x"]
        cells += [f"{r['quartiles'][0]:.3f}-{r['quartiles'][1]:.3f}x"] if spread else []
        cells += [f"{r['cpu_s']:.4f}", f"{r['cpu_ratio']:.3f}x"] if cpu else []
        lines.append("| " + " | ".join(map(str, [*cells, gib(r["mem"])])) + " |")
    if cpu:
        lines.append(
            "\nCPU s/step: the trainer process's CPU time per step (time.process_time), which other work on a shared "
            "machine delays but does not add to."
        )
    append_results(args.results, lines)


if __name__ == "__main__":
    main()
