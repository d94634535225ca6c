"""How many CPU threads each torch process gets, so that the torch processes running at once share the cores.

Why: torch runs its CPU kernels on an OpenMP team as large as the machine. Two such processes on the same cores (a
trainer and a studio render, or two trainers) ask for twice the cores there are; OpenMP's idle threads spin-wait
for team members the other process has pre-empted, and both crawl (on 2 cores a toy render that takes seconds
alone wrote nothing in 18 CPU-minutes beside a training: bench/render_beside_training.py, bench/RESULTS.md).

The rule, from what runs at once:
    1. OMP_NUM_THREADS set by the user wins everywhere: they have decided.
    2. A trainer started by the worker gets (cores - render reserve) // concurrency threads (at least 1): the
       worker's concurrency is how many trainers run at once; the reserve (a quarter of the cores, at least one
       core when there are two or more) is room for a studio render beside the training.
    3. A studio render (sample, A/B) takes the cores the running trainers leave: all of them when no job runs.

The count reaches a trainer as OMP_NUM_THREADS/MKL_NUM_THREADS (torch sizes its pool from them at start); a studio
process calls `size_torch_for_render` before each render. Importing this module loads no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call (macOS)
        return os.cpu_count() or 1


def user_threads() -> int | None:
    """OMP_NUM_THREADS when the user set it to a positive whole number, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def render_reserve(cores: int) -> int:
    """Cores kept free of trainers for a studio render: a quarter, at least one when there are two or more."""
    return max(1, cores // 4) if cores >= 2 else 0


def trainer_threads(concurrency: int, cores: int | None = None) -> int:
    """Threads for each trainer a worker of this `concurrency` runs (rule 2), or the user's OMP_NUM_THREADS."""
    cores = cores or available_cores()
    return user_threads() or max(1, (cores - render_reserve(cores)) // max(1, concurrency))


def trainer_env(concurrency: int, cores: int | None = None) -> dict[str, str]:
    """The environment variables that size a trainer's thread pools (torch's OpenMP team, MKL)."""
    threads = str(trainer_threads(concurrency, cores))
    return {name: threads for name in THREAD_VARIABLES}


def render_threads(busy: int, cores: int | None = None) -> int:
    """Threads for a render while trainers hold `busy` threads (rule 3), or the user's OMP_NUM_THREADS."""
    cores = cores or available_cores()
    return user_threads() or max(1, cores - busy)


def busy_threads(home: str | Path | None = None) -> int:
    """Threads the queue's running trainers were given (a job started by an older worker counts as one)."""
    from sdtune.studio import jobs

    if not (jobs.sdtune_home(home) / jobs.DB_FILE).is_file():  # no queue yet: nothing runs (and none is made here)
        return 0
    with jobs.connect(home) as conn:
        (busy,) = conn.execute("SELECT SUM(COALESCE(threads, 1)) FROM jobs WHERE state = 'running'").fetchone()
    return busy or 0


def size_torch_for_render(home: str | Path | None = None) -> int:
    """Sets torch's thread count for a render in this process from the jobs running now; returns it. Called before
    each render, since a long-lived studio process sees jobs start and end."""
    import torch

    threads = render_threads(busy_threads(home))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def report_lines(concurrency: int, busy: int, cores: int | None = None) -> list[str]:
    """`sdtune doctor`'s threads section: what a trainer and a render get on this machine, and why."""
    cores = cores or available_cores()
    user = user_threads()
    if user:
        return [f"  threads       {user} per torch process: OMP_NUM_THREADS is set, every process takes it as is"]
    per_trainer = trainer_threads(concurrency, cores)
    beside = render_threads(per_trainer * concurrency, cores)
    return [
        f"  threads       {cores} CPU cores, shared by the torch processes that run at once (else they starve):",
        f"                a trainer gets {per_trainer} (worker concurrency {concurrency}; "
        f"{render_reserve(cores)} core(s) kept for a studio render)",
        f"                a render gets {cores} alone, {beside} beside {concurrency} training(s); "
        f"{render_threads(busy, cores)} now ({busy} held by running trainers)",
    ]
