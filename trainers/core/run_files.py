"""The two files through which a running trainer talks to the outside world, without log scraping.

    <run dir>/metrics.jsonl      the trainer appends one JSON object per line: steps (loss, lr, ETA) and events
                                 ("start", "validation" with the grid's path, "checkpoint saved", "stopped", "done");
    <run dir>/requests/<kind>    anyone (the job worker, the studio, a shell) creates one to ask the trainer for
                                 "sample now" (`sample`) or "save now" (`save`); the trainer takes it at the next
                                 step boundary, so a request is honoured once.

This module imports no torch, so the studio's pages and the job worker can read and write these files cheaply. The
writer side is `trainers/core/progress.py` (an Accelerate tracker) and `trainers/core/loop.py` (the requests).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sdtune.adapters.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
REQUESTS_DIR = "requests"
REQUEST_KINDS = ("sample", "save")  # "sample now": render a validation grid; "save now": write a checkpoint


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
