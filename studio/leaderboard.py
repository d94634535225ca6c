"""A sweep's leaderboard: every run of the sweep once, with what it measured, ranked by one metric.

    sdtune jobs sweep show lr-rank [--rank-by val_loss] [--top 3] [--ab-top 2]

Per run (read from its run folder's `adapter.json`, so a finished run counts once however often it was retried):
the swept values; the toy-world scores of its final LoRA (colour, shape, both); the best checkpoint and its held-out
validation loss, picked by the rule of `sdtune ab --checkpoints --rank-by val_loss` (`adapters.ab.render.
best_candidate`: the lowest recorded val_loss, the earliest of equals; a run that recorded none has "final"); the
median seconds per step and the peak memory. Runs not finished yet are listed after the ranked ones.

`--top N` writes `top.png`: the N best runs' best checkpoints rendered side by side at the runs' validation prompts
and fixed seeds (the `ab --checkpoints` grid); `--ab-top 2` starts a blind A/B of the two best (`sdtune ab vote ID`).
Torch is imported only to render.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.studio import jobs, sweeps

# name: (what it is, higher is better)
METRICS = {
    "score": ("toy score, colour and shape right (final LoRA)", True),
    "color": ("toy colour score (final LoRA)", True),
    "shape": ("toy shape score (final LoRA)", True),
    "val_loss": ("held-out validation loss at the best checkpoint", False),
    "step_time": ("median seconds per optimizer step", False),
    "peak_memory": ("peak memory (CUDA allocated, or the process's RSS on a CPU)", False),
    "iou": ("layout IoU of a ControlNet: its drawn shape against its validation conditions", True),
}


def _best_checkpoint(run_dir: Path) -> tuple[str, int | None, float | None]:
    """(label, step, val_loss) of the run's best checkpoint by `ab --checkpoints --rank-by val_loss`'s rule."""
    from sdtune.adapters.ab.render import best_candidate, recorded_val_loss, run_steps
    from sdtune.adapters.run_folder import checkpoint_step, lora_checkpoints

    recorded = recorded_val_loss(run_dir, "score")  # "score": no error when the run recorded none
    found = []
    for path in lora_checkpoints(run_dir):
        step = run_steps(run_dir) if path == run_dir else checkpoint_step(path)
        label = "final" if path == run_dir else path.name
        found.append({"label": label, "step": step, "val_loss": recorded.get(str(step))})
    if not any(c["val_loss"] is not None for c in found):
        return "final", run_steps(run_dir), None
    best = best_candidate(found, "val_loss", run_dir)
    return best["label"], best["step"], best["val_loss"]


def run_row(sweep: sweeps.Sweep, job: jobs.Job) -> dict:
    """One leaderboard row: the job, its swept values, and what its finished run measured (None while unfinished)."""
    from sdtune.adapters.manifest import ManifestError, read_manifest

    row = {"job": job.id, "name": job.name, "state": job.state, "attempts": job.attempts,
           "values": sweeps.swept_values(sweep, job), "run_dir": str(job.run_dir), "best_checkpoint": None,
           "best_step": None, "problem": None, **{metric: None for metric in METRICS}}  # fmt: skip
    try:
        manifest = read_manifest(job.run_dir) if job.state == "done" else None
    except ManifestError as exc:  # a finished run whose folder is gone or whose adapter.json is broken: say which
        row["problem"] = str(exc)
        return row
    if manifest is None:
        return row
    adapter = (manifest.scores or {}).get("adapter") or {}
    training = manifest.training
    row.update(score=adapter.get("both"), color=adapter.get("color"), shape=adapter.get("shape"))
    row["iou"] = adapter.get("iou")  # ControlNet runs only
    row.update(step_time=training.get("seconds_per_step"), peak_memory=training.get("peak_memory_bytes"))
    row["best_checkpoint"], row["best_step"], row["val_loss"] = _best_checkpoint(job.run_dir)
    return row


def leaderboard(name: str, rank_by: str = "score", *, home: str | Path | None = None) -> dict:
    """The sweep's runs ranked by `rank_by` (one of `METRICS`); runs without the metric come after, in grid order.

    Returns {"sweep": Sweep as dict, "rank_by", "rows": [run_row + "rank"], "counts": {state: n}}.
    """
    if rank_by not in METRICS:
        raise sweeps.SweepError(f"--rank-by {rank_by}: rank by one of {', '.join(METRICS)}")
    jobs.settle_abandoned(home=home)  # a dead worker's runs read as interrupted, not running
    sweep = sweeps.get_sweep(name, home=home)
    rows = [run_row(sweep, job) for job in sweeps.sweep_jobs(name, home=home)]
    higher = METRICS[rank_by][1]
    measured = sorted((r for r in rows if r[rank_by] is not None), key=lambda r: -r[rank_by] if higher else r[rank_by])
    rest = [r for r in rows if r[rank_by] is None]
    for rank, row in enumerate(measured, start=1):
        row["rank"] = rank
    for row in rest:
        row["rank"] = None
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"sweep": sweep.to_dict(), "rank_by": rank_by, "rows": measured + rest, "counts": counts}


def _cell(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "peak_memory":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.4f}" if metric in ("val_loss", "step_time") else f"{value:.2f}"


def table_text(board: dict) -> str:
    """The leaderboard as aligned text (the CLI's output; README's example)."""
    axes = [path for path, _ in board["sweep"]["axes"]]
    # The IoU column only where a run measured one (a ControlNet sweep): a LoRA sweep's table stays as it was.
    shown = [
        "score",
        "color",
        "shape",
        *(["iou"] if any(r["iou"] is not None for r in board["rows"]) else []),
        "val_loss",
    ]
    head = ["#", "job", *axes, "state", *shown, "best", "s/step", "peak"]
    lines = [head]
    for row in board["rows"]:
        best = "-" if row["best_checkpoint"] is None else f"{row['best_checkpoint']}@{row['best_step']}"
        metrics = [_cell(row[m], m) for m in shown]
        lines.append([str(row["rank"] or "-"), str(row["job"]), *(row["values"].get(a, "") for a in axes),
                      row["state"], *metrics, best, _cell(row["step_time"], "step_time"),
                      _cell(row["peak_memory"], "peak_memory")])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    title = f"sweep {board['sweep']['name']}: {runs_line(board)}, ranked by {board['rank_by']}"
    problems = [f"job {row['job']}: not measured: {row['problem']}" for row in board["rows"] if row["problem"]]
    table = ("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return "\n".join([title, *table, *problems])


def runs_line(board: dict) -> str:
    """The runs and their states, as "3 runs (2 done, 1 failed)"; "0 runs" for a sweep whose jobs left the queue."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(board["counts"].items()))
    return f"{len(board['rows'])} runs" + (f" ({counts})" if counts else "")


def _best_lora(row: dict) -> str:
    from sdtune.adapters.lora_files import PEFT_FILE

    run_dir = Path(row["run_dir"])
    folder = run_dir if row["best_checkpoint"] == "final" else run_dir / "checkpoints" / row["best_checkpoint"]
    return str(folder / PEFT_FILE)


def _top(board: dict, count: int) -> list[dict]:
    ranked = [row for row in board["rows"] if row["rank"] is not None and row["best_checkpoint"] is not None]
    if len(ranked) < count:
        raise sweeps.SweepError(
            f"sweep {board['sweep']['name']}: {len(ranked)} finished run(s) ranked by {board['rank_by']}, {count} "
            "needed; let the worker finish more runs"
        )
    return ranked[:count]


def _run_settings(row: dict, seeds: list[int] | None, steps: int | None):
    """The run's own validation prompts and seeds (the same for every run of a sweep unless swept)."""
    from sdtune.adapters.ab.spec import Settings
    from sdtune.adapters.manifest import read_manifest

    validation = read_manifest(row["run_dir"]).recipe.get("validation") or {}
    return Settings(prompts=list(validation.get("prompts") or []), seeds=list(seeds or validation.get("seeds") or [0]),
                    steps=steps or validation.get("num_inference_steps") or 25,
                    guidance=validation.get("guidance_scale"))  # fmt: skip


def top_grid(board: dict, top: int = 3, *, seeds: list[int] | None = None, steps: int | None = None,
             home: str | Path | None = None) -> Path:  # fmt: skip
    """Renders the `top` best runs' best checkpoints at the same prompts and fixed seeds, one row per run, into
    `$SDTUNE_HOME/sweeps/<name>/top.png` (the `ab --checkpoints` grid); returns its path."""
    from sdtune.adapters import contact_sheet
    from sdtune.adapters.ab.render import Renderer, run_base
    from sdtune.adapters.ab.spec import Side
    from sdtune.adapters.compose import AdapterUse, PipelineSpec

    rows = _top(board, top)
    settings, renderer = _run_settings(rows[0], seeds, steps), Renderer()
    images, labels = [], []
    for row in rows:
        side = Side(PipelineSpec(run_base(Path(row["run_dir"])), [AdapterUse(_best_lora(row))]))
        images.append([sample.image for sample in renderer.render(side, settings)])
        values = " ".join(f"{path.split('.')[-1]}={value}" for path, value in row["values"].items())
        metric = board["rank_by"]
        labels.append(f"#{row['rank']} job {row['job']} {values}: {metric} {_cell(row[metric], metric)}")
    columns = [f"{p[:18]}, seed {s}" for p in settings.prompts for s in settings.seeds]
    title = f"sweep {board['sweep']['name']}: top {top} by {board['rank_by']} (best checkpoint of each)"
    path = jobs.sdtune_home(home) / "sweeps" / board["sweep"]["name"] / "top.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet.save_grid(contact_sheet.make_grid(images, labels, columns, title), path)
    return path


def ab_top(board: dict, count: int = 2, *, seeds: list[int] | None = None, steps: int | None = None) -> dict:
    """Starts a blind A/B of the two best runs (their best checkpoints, on their base) at their validation prompts
    and seeds, through the A/B API the `sdtune ab` command uses; returns the comparison (`sdtune ab vote ID`)."""
    from sdtune.adapters.ab.render import run_base
    from sdtune.studio import api

    if count != 2:
        raise sweeps.SweepError(f"--ab-top {count}: a blind A/B compares two runs; give --ab-top 2")
    first, second = _top(board, 2)
    settings = _run_settings(first, seeds, steps)
    a, b = (f"{run_base(Path(row['run_dir']))}+{_best_lora(row)}" for row in (first, second))
    return api.ab_compare(a, b, settings.prompts, settings.seeds, blind=True, steps=settings.steps,
                          guidance=settings.guidance)  # fmt: skip
