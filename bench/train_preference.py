"""Benchmark: sdtune's preference trainer (Diffusion-DPO from votes) vs diffusers'
examples/research_projects/diffusion_dpo/train_diffusion_dpo.py.

Usage:
    # (a) the toy base on this machine's CPU
    python bench/train_preference.py --model toy --example path/to/train_diffusion_dpo.py
    # (b) the same, the two runs taking turns step by step (resolves a few percent on a shared machine)
    python bench/train_preference.py --model toy --example path/to/train_diffusion_dpo.py --interleave
    # (c) the full SD v1-5 architecture with random weights, 512 px, on a GPU
    python bench/train_preference.py --model sd15-random --example path/to/train_diffusion_dpo.py

Both trainers get the same voted pairs: `--images` toy-world scenes, each drawn small and large, the larger voted
the winner. sdtune reads them as a blind A/B comparison in a workspace of its own (bench/.work/preference-*/home),
as `sdtune tune-from-votes` does; the example as a parquet dataset of the Pick-a-Pic layout it expects (jpg_0,
jpg_1, label_0, caption). The same model folder, resolution, pairs per step, LoRA rank on the attention
projections, learning rate, AdamW, gradient clipping at 1.0, no flips, no checkpoints, no validation, and the same
loss: sdtune's `method.beta` 5000 is the example's `--beta_dpo` 2500 (sdtune writes the authors' beta/2 form). Both run
under bench/measure.py (the step hook and memory counters of bench/train_lora.py).

What differs is how each step gets its latents: the example encodes both images of every pair with the VAE at
every step; sdtune encodes each image once and reads its latents from the cache after. That is the figure this
measures. With --interleave both run at once, one optimizer step at a time in turns (benchlib.measured_in_turns),
and the time ratio is the median of step k's ratio over the steps. The example is not part of sdtune: bench/device/examples.sh copies it at the pinned commit. Without
--example only sdtune is measured. Results are printed and appended to bench/RESULTS.md under a heading that names
the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
from pathlib import Path

import torch
from benchlib import (
    MEASURE_ONLY,
    ROOT,
    Run,
    absolute,
    append_results,
    build_sd15_random,
    device_name,
    gib,
    measured_in_turns,
    measured_run,
    results_header,
)
from train_lora import step_ratios

SMALL_RADIUS, LARGE_RADIUS = 10, 17  # in the toy world's 64 px units: the toy scorer tells them apart


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "sd15-random"], default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="Pairs per step (default: 1 8 toy, 1 sd15).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: 40 toy, 30 sd15).")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (the preference recipe's).")
    p.add_argument("--images", type=int, default=32, help="Voted pairs to generate.")
    p.add_argument("--example", type=absolute, default=None, help="diffusers' train_diffusion_dpo.py.")
    p.add_argument("--interleave", action="store_true", help="With --example: the two take turns step by step.")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="Scratch folder (models, data).")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    return p.parse_args(argv)


def voted_pairs(n: int, size: int) -> list[tuple[str, bytes, bytes]]:
    """(prompt, winner PNG, loser PNG) for n toy scenes: the same scene large (the winner) and small."""
    from sdtune.adapters import toyworld

    rng, pairs = random.Random(0), []
    for _ in range(n):
        s = toyworld.sample_scene(rng)
        images = []
        for radius in (LARGE_RADIUS, SMALL_RADIUS):
            png = io.BytesIO()
            toyworld.render(toyworld.Scene(s.color, s.shape, radius, 32, 32), size).save(png, format="PNG")
            images.append(png.getvalue())
        pairs.append((s.caption(), *images))
    return pairs


def stored_comparison(home: Path, pairs, reference: str) -> str:
    """The pairs as one blind A/B comparison in the workspace `home`, every pair voted for its winner (shown on a
    random side, as the A/B page shows them). Returns its id; made once per workspace."""
    from sdtune.adapters.ab import ABStore, NewComparison, PairRow

    made = home / "comparison-id"
    if made.is_file():
        return made.read_text()
    store, rng = ABStore(home), random.Random(1)
    winner_left = [rng.random() < 0.5 for _ in pairs]  # the votes follow these; the comparison is sealed (blind)

    def fill(folder: Path) -> NewComparison:
        rows = []
        for i, (prompt, winner, loser) in enumerate(pairs):
            names = (f"{i:03d}-left.png", f"{i:03d}-right.png")
            for png, name in zip((winner, loser) if winner_left[i] else (loser, winner), names):
                (folder / name).write_bytes(png)
            rows.append(PairRow(i, prompt, i, "a" if winner_left[i] else "b", *names))
        sides = {"a": reference, "b": f"{reference}+bench"}
        return NewComparison("ab", sides, {"prompts": [], "seeds": []}, True, None, {}, rows)

    cid = store.add(fill)
    for i in range(len(pairs)):
        store.vote(cid, i, "left" if winner_left[i] else "right")
    made.write_text(cid)
    return cid


def pick_a_pic_folder(folder: Path, pairs) -> Path:
    """The pairs as the example reads them: one parquet file of jpg_0/jpg_1 (image bytes), label_0 (1: jpg_0 won),
    caption; `load_dataset(folder, split="train")`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (folder / "train.parquet").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        columns = {"jpg_0": [p[1] for p in pairs], "jpg_1": [p[2] for p in pairs],
                   "label_0": [1] * len(pairs), "caption": [p[0] for p in pairs]}  # fmt: skip
        pq.write_table(pa.table(columns), folder / "train.parquet")
    return folder


def sdtune_planned(home, reference, cid, res, batch, steps, rank, precision, out: Path) -> Run:
    args = [
        str(ROOT / "recipes" / "preference.yaml"),
        f"base={reference}",
        f"method.reference={reference}",
        f"method.comparisons=[{cid}]",
        "method.beta=5000",
        "method.min_pairs=1",
        f"method.rank={rank}",
        f"method.lora_alpha={rank}",
        f"data.resolution={res}",
        f"data.min_bucket_reso={res}",
        f"data.max_bucket_reso={res}",
        "data.random_flip=false",
        f"train.max_train_steps={steps}",
        f"train.train_batch_size={batch}",
        "train.learning_rate=5e-5",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        "train.max_grad_norm=1.0",
        f"train.mixed_precision={precision}",
        "train.checkpointing_steps=100000",
        "output.export_check=false",
        *MEASURE_ONLY,
        f"output.dir={out}",
    ]
    return Run(str(ROOT / "trainers" / "preference.py"), args, out / "measure.json", ROOT, {"SDTUNE_HOME": str(home)})


def example_planned(example: Path, model, data: Path, res, batch, steps, rank, precision, out: Path) -> Run:
    args = [
        f"--pretrained_model_name_or_path={model}",
        f"--dataset_name={data}",
        "--dataset_split_name=train",
        f"--resolution={res}",
        "--no_hflip",
        f"--train_batch_size={batch}",
        f"--max_train_steps={steps}",
        "--learning_rate=5e-5",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--beta_dpo=2500",
        f"--rank={rank}",
        "--seed=0",
        f"--mixed_precision={precision}",
        "--checkpointing_steps=100000",
        f"--output_dir={out}",
        "--dataloader_num_workers=0",
    ]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "datasets")}
    return Run(str(example), args, out / "measure.json", out.parent, offline)


def main(argv=None):
    args = parse_args(argv)
    toy = args.model == "toy"
    batches = args.batch or ([1, 8] if toy else [1])
    steps = args.steps or (40 if toy else 30)
    res = 64 if toy else 512
    precision = "bf16" if torch.cuda.is_available() else "no"
    work = args.work / f"preference-{args.model}"
    model = ROOT / "adapters" / "toy_base" if toy else build_sd15_random(args.work / args.model / "model")
    reference = "toy" if toy else str(model)  # sdtune's name for the bundled toy base; a folder otherwise
    pairs = voted_pairs(args.images, res)
    home = work / "home"
    cid = stored_comparison(home, pairs, reference)
    memory = "cuda_peak_allocated_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    rows = []
    for batch in batches:
        run = work / f"run-{int(time.time())}-batch{batch}"
        common = (res, batch, steps, args.rank, precision)
        planned = {"sdtune": sdtune_planned(home, reference, cid, *common, run / "sdtune")}
        if args.example:
            data = pick_a_pic_folder(work / f"pick-a-pic-{res}", pairs)
            planned["example"] = example_planned(args.example, model, data, *common, run / "example")
        if args.interleave and args.example:
            measured = measured_in_turns(planned, steps)
        else:
            measured = {name: measured_run(each) for name, each in planned.items()}
        ours = measured["sdtune"]
        row = {"batch": batch, "sdtune_s": ours["seconds_per_step"], "sdtune_mem": ours[memory]}
        if args.example:
            theirs = measured["example"]
            row |= {"example_s": theirs["seconds_per_step"], "example_mem": theirs[memory]}
            row["ratio"] = row["sdtune_s"] / row["example_s"]
            if ours["in_turns"]:
                ratios = step_ratios([ours], [theirs], "step_intervals")
                quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                row |= {"ratio": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]]}
        print(json.dumps(row))
        rows.append(row)
    write_results(args, rows, res, steps, precision)


def table_row(r: dict, spread: bool) -> str:
    theirs = ["not run", "", "not run"]
    if "example_s" in r:
        theirs = [f"{r['example_s']:.4f}", f"{r['ratio']:.2f}x", gib(r["example_mem"])]
    middle = [f"{r['quartiles'][0]:.2f}-{r['quartiles'][1]:.2f}x"] if spread else []
    cells = [r["batch"], f"{r['sdtune_s']:.4f}", *theirs[:2], *middle, gib(r["sdtune_mem"]), theirs[2]]
    return "| " + " | ".join(map(str, cells)) + " |"


def write_results(args, rows: list[dict], res, steps, precision):
    command = f"python bench/train_preference.py --model {args.model}" + (" --example ..." if args.example else "")
    command += f" --steps {steps}" * (args.steps is not None) + " --interleave" * bool(
        args.interleave and args.example
    )
    how = ", interleaved step by step" if args.interleave and args.example else ""
    title = f"Preference (Diffusion-DPO): {args.model}, {res} px, {steps} steps, mixed precision {precision}{how}"
    spread = ["middle half of the step ratios"] if "quartiles" in rows[0] else []
    header = ["pairs per step", "sdtune s/step", "example s/step", "time ratio", *spread, "sdtune memory"]
    header += ["example memory"]
    lines = results_header(title, command, device_name(), time.strftime("%Y-%m-%d %H:%M"))
    lines += [
        f"Rank {args.rank} on the attention projections, {args.images} voted pairs; a step trains on `pairs` pairs "
        "(twice as many images) and runs the UNet twice over them (the model, and the reference with the LoRA off).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *(table_row(r, bool(spread)) for r in rows),
    ]
    append_results(args.results, lines)


if __name__ == "__main__":
    main()
