"""The trackers a recipe's `output.report_to` asks for, beside the run's own metrics.jsonl (progress.py).

TensorBoard is Accelerate's, writing into `<output.dir>/logs`. Weights & Biases is Accelerate's `WandBTracker` too,
with its run kept in the run folder (`<output.dir>/logs/wandb/`) and offline unless `output.wandb_mode: online`:
a run needs no network and no account, and its log names the folder to upload later with `wandb sync FOLDER`.
wandb is an optional extra (`pip install 'sdtune[wandb]'`); the recipe check refuses `report_to: wandb` without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate.tracking import WandBTracker

WANDB_LOGS = "logs"  # under output.dir, beside TensorBoard's event files: `overwrite` clears both


class RunFolderWandB(WandBTracker):
    """Accelerate's wandb tracker, its run in the run folder, in `mode` (offline or online), named after the adapter;
    it says where the run folder is when it starts."""

    def __init__(self, project: str, run_dir: str | Path, name: str, mode: str):
        self.logs = Path(run_dir) / WANDB_LOGS
        super().__init__(project, dir=str(self.logs), name=name, mode=mode)
        self.mode = mode
        self.folder: Path | None = None

    def start(self):
        self.logs.mkdir(parents=True, exist_ok=True)  # wandb.init(dir=) falls back to a temp folder if it is missing
        super().start()
        self.folder = Path(self.run.dir).parent  # run.dir is <run folder>/files
        if self.mode == "offline":
            print(f"wandb: offline run in {self.folder}; upload it with: wandb sync {self.folder}", flush=True)
        else:
            print(f"wandb: run {self.run.url} (local copy in {self.folder})", flush=True)


def report_trackers(recipe) -> list:
    """Accelerate's `log_with` entries for `recipe.output.report_to` (the progress tracker is added by the caller)."""
    output = recipe.output
    trackers: list = []
    if output.report_to in ("tensorboard", "all"):
        trackers.append("tensorboard")
    if output.report_to in ("wandb", "all"):
        project = f"sdtune-{recipe.method.type}"
        trackers.append(RunFolderWandB(project, output.dir, output.name, output.wandb_mode))
    return trackers


def log_grid(accelerator, image, step: int):
    """A validation grid to the image-taking trackers (TensorBoard, wandb); metrics.jsonl records its path instead."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(image)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [image]}, step=step)
