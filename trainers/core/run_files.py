"""The two files through which a running trainer talks to the outside world, without log scraping.

    <run dir>/metrics.jsonl      the trainer appends one JSON object per line: steps (loss, lr, ETA) and events
                                 ("start", "validation" with the grid's path, "checkpoint saved", "stopped", "done");
    <run dir>/requests/<kind>    anyone (the job worker, the studio, a shell) creates one to ask the trainer for
                                 "sample now" (`sample`) or "save now" (`save`); the trainer takes it at the next
                                 step boundary, so a request is honoured once.

A trainer started by the job worker also watches that worker (`worker_gone`, through SDTUNE_WORKER_PID): when the
worker dies, the trainer stops at its next step as on Ctrl-C (a checkpoint, then exit), instead of running on alone.
A run is finished once its `adapter.json` is written (`run_finished`): the worker never runs such a job again.

This module imports no torch, so the studio's pages and the job worker can read and write these files cheaply. The
writer side is `trainers/core/progress.py` (an Accelerate tracker) and `trainers/core/loop.py` (the requests).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sdtune.adapters.atomic import write_text_atomic
from sdtune.adapters.manifest import MANIFEST_NAME

METRICS_FILE = "metrics.jsonl"
REQUESTS_DIR = "requests"
REQUEST_KINDS = ("sample", "save")  # "sample now": render a validation grid; "save now": write a checkpoint
WORKER_ENV = "SDTUNE_WORKER_PID"  # "<pid>:<start time>" of the job worker that launched this trainer


def append_line(path: str | Path, record: dict):
    """Appends `record` as one JSON line with a single `write` on an O_APPEND file: a reader sees whole lines (or
    none) and concurrent writers never interleave within a line."""
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every complete line of the run's metrics file, in order ([] before the trainer has written one).

    A line still being written (no newline yet) is left for the next read; a line that is not JSON is skipped."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def request_path(run_dir: str | Path, kind: str) -> Path:
    if kind not in REQUEST_KINDS:
        raise ValueError(f"request kind {kind!r}: expected one of {', '.join(REQUEST_KINDS)}")
    return Path(run_dir) / REQUESTS_DIR / kind


def write_request(run_dir: str | Path, kind: str) -> Path:
    """Asks the trainer of `run_dir` for `kind` ("sample" or "save") at its next step boundary (temp + rename)."""
    return write_text_atomic(request_path(run_dir, kind), json.dumps({"requested_at": time.time()}))


def take_requests(run_dir: str | Path) -> set[str]:
    """The requests waiting in `run_dir`, each removed as it is taken (two clicks before a step boundary: one)."""
    taken = set()
    for kind in REQUEST_KINDS:
        try:
            os.unlink(request_path(run_dir, kind))
        except FileNotFoundError:
            continue
        taken.add(kind)
    return taken


def pending_requests(run_dir: str | Path) -> list[str]:
    """Requests written but not yet taken by the trainer."""
    return [kind for kind in REQUEST_KINDS if request_path(run_dir, kind).is_file()]


# -- the trainer's worker, and a finished run -------------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), None if there is no such live process, ""
    if it cannot be read; with the pid it names a process uniquely, so a reused pid is not taken for another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ""
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else rest[18]


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid`, started at `start` (from `process_start_time`), still runs. Without procfs (macOS)
    the kernel is asked about the pid alone; an unreadable start time counts as alive (it cannot be told)."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            return True
        return True
    now = process_start_time(pid)
    return now is not None and (now == "" or not start or now == start)


def worker_env() -> dict[str, str]:
    """What the job worker puts in its trainers' environment so that they can tell when it is gone."""
    return {WORKER_ENV: f"{os.getpid()}:{process_start_time(os.getpid()) or ''}"}


def worker_gone() -> bool:
    """Whether this process was started by a job worker (SDTUNE_WORKER_PID) that no longer runs. False when run
    by hand: then the user's terminal, not a worker, owns the run."""
    value = os.environ.get(WORKER_ENV, "")
    pid, _, start = value.partition(":")
    return pid.isdigit() and not process_alive(int(pid), start)


def run_finished(run_dir: str | Path) -> bool:
    """Whether the run folder holds a finished run: `adapter.json` is written last, after every weight file and the
    final grid, and only by a run that trained all its steps (a stopped run writes none)."""
    return (Path(run_dir) / MANIFEST_NAME).is_file()


def loop_finished(run_dir: str | Path) -> bool:
    """Whether the run's training loop took its last step and did not stop early: the trainer is writing its final
    outputs (weights, grid, `adapter.json`, the registration), which a signal would cut short."""
    steps = [r for r in read_metrics(run_dir) if "event" not in r]
    return bool(steps) and bool(steps[-1].get("total_steps")) and steps[-1]["step"] >= steps[-1]["total_steps"]
