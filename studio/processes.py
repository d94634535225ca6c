"""Process groups of trainers, read from /proc: who still runs, and how to stop a group (torch-free).

The job worker starts each trainer in its own process group (a new session), so that the `accelerate launch`
wrapper and the training processes under it are signalled together, and a group outlives neither its job's record
(`jobs.pgid`) nor the worker's restart: a later worker, or the studio, can still tell whether it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from sdtune.trainers.core.run_files import process_start_time

__all__ = ["group_members", "group_runs", "process_start_time", "stop_group"]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`. Read from /proc, because a zombie orphan that nobody
    reaps still answers `killpg(pgid, 0)`."""
    if not Path("/proc/self/stat").is_file():  # no procfs: ask the kernel
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_runs(pgid: int, recipe: Path) -> bool:
    """Whether process group `pgid` still runs the trainer of `recipe` (and is not a stranger that reused the id)."""
    for pid in group_members(pgid):
        try:
            if str(recipe).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def stop_group(pgid: int, grace: float, leader: subprocess.Popen | None = None) -> str:
    """SIGTERM to the whole group, up to `grace` seconds for it to exit, then SIGKILL.

    Returns "gone" (nothing was running), "graceful" or "killed"."""

    def wait_empty(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if leader is not None:
                leader.poll()  # reap our own child, or its zombie would count
            if not group_members(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    if not group_members(pgid):
        return "gone"
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return "gone"
    if wait_empty(grace):
        return "graceful"
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_empty(30)
    return "killed"
