"""Live progress of a run as JSON lines: an Accelerate tracker writing `<run dir>/metrics.jsonl`.

`make_accelerator` puts it beside TensorBoard in every trainer built on the core, so whatever a trainer passes to
`accelerator.log(...)` (the loop logs loss and lr each optimizer step) becomes one line with the step, the total,
elapsed seconds and an ETA. The loop and the validator add events: "start", "validation" (with the grid's path),
"checkpoint saved", "stopped"; `accelerator.end_training()` adds "done". The job worker and the studio read the file
with `run_files.read_metrics`; nobody parses the console log.

    {"event":"start","step":0,"total_steps":300,"time":1764012345.1}
    {"step":12,"total_steps":300,"loss":0.061,"lr":0.001,"seconds":8.3,"seconds_per_step":0.52,"eta":150.1,...}
    {"event":"validation","step":100,"grid":"samples/step-000100.png",...}
    {"event":"done","step":300,"manifest":"adapter.json",...}
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

from accelerate.tracking import GeneralTracker

from sdtune.trainers.core.run_files import METRICS_FILE, append_line

PACE_WINDOW = 20  # the ETA follows the pace of the last 20 steps (the first steps are slow: caches, compilation)


class ProgressTracker(GeneralTracker):
    """Appends steps and events to `<run_dir>/metrics.jsonl`, one flushed JSON object per line (main process)."""

    name = "sdtune-progress"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_dir: str | Path, total_steps: int):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.total_steps = total_steps
        self.step = 0
        self.stopped = False
        self.started = time.time()
        self._pace = deque(maxlen=PACE_WINDOW + 1)  # (time, step) of the latest steps

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.started = time.time()

    def store_init_configuration(self, values: dict):
        """The configuration is the recipe, which the run folder records in full (adapter.json); nothing to add."""

    def log(self, values: dict, step: int | None = None, at: float | None = None, **kwargs):
        """One step's line; `at` is when the step ended (the loop logs losses in batches, after the fact)."""
        now = time.time() if at is None else at
        if step is not None:
            self.step = step
            self._pace.append((now, step))
        record = {"step": self.step, "total_steps": self.total_steps}
        record.update({k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) and _finite(v)})
        record.update(seconds=round(now - self.started, 3), **self._eta(), time=now)
        append_line(self.path, record)

    def _eta(self) -> dict:
        if len(self._pace) < 2:
            return {}
        (t0, s0), (t1, s1) = self._pace[0], self._pace[-1]
        if s1 <= s0:
            return {}
        per_step = (t1 - t0) / (s1 - s0)
        return {"seconds_per_step": round(per_step, 4), "eta": round(per_step * max(self.total_steps - s1, 0), 1)}

    def event(self, name: str, step: int | None = None, **fields):
        """One event line; paths inside the run folder are written relative to it."""
        if name == "stopped":
            self.stopped = True
        record = {"event": name, "step": self.step if step is None else step, "total_steps": self.total_steps}
        for key, value in fields.items():
            if isinstance(value, Path):
                value = str(value.relative_to(self.run_dir)) if value.is_relative_to(self.run_dir) else str(value)
            record[key] = value
        record["time"] = time.time()
        append_line(self.path, record)

    def finish(self):
        """`accelerator.end_training()`: the final entry, "done" (with the manifest when one was written)."""
        if self.stopped:
            return
        manifest = self.run_dir / "adapter.json"
        self.event("done", **({"manifest": manifest} if manifest.is_file() else {}))


def _finite(value) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def progress_event(accelerator, name: str, step: int | None = None, **fields):
    """Logs an event to the run's progress tracker, if this process has one (the main process after
    `init_trackers`); a no-op elsewhere, so trainers and the loop can call it unconditionally."""
    for tracker in accelerator.trackers:
        if isinstance(tracker, ProgressTracker):
            tracker.event(name, step, **fields)
