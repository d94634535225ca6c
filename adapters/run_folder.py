"""Reading a training run folder from the inference side: its saved checkpoints and the LoRA each one holds.

Trainers write `checkpoints/checkpoint-N/` (trainers/core/checkpointing.py, through Accelerate `save_state`) and,
for a LoRA run, that step's LoRA files beside the state: `pytorch_lora_weights.safetensors` (PEFT) and
`<name>.safetensors` (kohya). A checkpoint being written is `.tmp-checkpoint-N` until it is complete, so it never
matches here. Torch-free: the studio lists checkpoints without loading a model.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdtune.adapters.lora_files import PEFT_FILE

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir() and any(p.iterdir())  # an emptied one: no
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    match = CHECKPOINT_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint-N folder")
    return int(match.group(1))


def lora_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints that hold a LoRA file (oldest first), then the run folder itself if it holds the
    final LoRA: everything a "which step is best?" comparison can load."""
    run_dir = Path(run_dir)
    found = [p for p in list_checkpoints(run_dir) if (p / PEFT_FILE).is_file()]
    return found + ([run_dir] if (run_dir / PEFT_FILE).is_file() else [])
