"""The worker's retry policy: which failures are transient, and what a retry changes.

A job with `max_tries` set (every run of a sweep: `DEFAULT_MAX_TRIES`, 3 attempts in all) is queued again by the
worker when an attempt ended for one of these transient reasons:

    worker-gone  its worker died or was stopped under it (kill -9, Ctrl-C, a reboot): the job is `interrupted`
                 (`jobs.settle`), and is queued again to continue from its last checkpoint (`train.resume=latest`);
                 a run that had finished is `done` and never trained twice.
    oom          CUDA out of memory: queued again from scratch with `train.train_batch_size` halved and
                 `train.gradient_accumulation_steps` doubled, so an optimizer step still sees as many images with
                 half the memory per forward pass. Not retried at batch size 1 (there is nothing left to halve).
    disk-full    "No space left on device": the job stays `failed` until the disk it writes to has
                 `DISK_FREE_BYTES` free again (someone freed space), then continues from its last checkpoint.

Never retried: a recipe or data error (the trainer's one `error:` line, exit status 2: the same recipe would fail the
same way), a cancel, and any other crash (retrying a failure nobody understood could loop; it stays `failed` with
its log). A job submitted alone has no `max_tries` and is never retried by itself: `sdtune jobs resume|retry ID`.
Every retry writes a `=== retry policy:` line into the job's log saying what it changed.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import yaml

from sdtune.adapters.atomic import write_text_atomic
from sdtune.studio import jobs

DEFAULT_MAX_TRIES = 3  # attempts in all: the first and two retries
DISK_FREE_BYTES = 1 << 30  # a disk-full job waits for this much free space before it continues
KINDS = ("worker-gone", "oom", "disk-full", "recipe", "other")
TRANSIENT = ("worker-gone", "oom", "disk-full")
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED")
_DISK_FULL = re.compile(r"No space left on device|\[Errno 28\]")


def last_attempt(log: Path) -> str:
    """The console output of the job's latest attempt (the worker heads each with `=== attempt N`): an older
    attempt's out-of-memory must not decide how this one ended."""
    if not log.is_file():
        return ""
    text = log.read_text(errors="replace")
    return text[text.rfind("\n=== attempt") + 1 :]


def classify(attempt_text: str, exit_code: int | None) -> str:
    """Why a trainer that exited on its own failed: one of `KINDS` (worker-gone is decided by the worker, not here).
    Memory and disk come first: their traceback may end in a one-line error that is not the recipe's fault."""
    if _OOM.search(attempt_text):
        return "oom"
    if _DISK_FULL.search(attempt_text):
        return "disk-full"
    if exit_code == 2 or any(line.startswith("error: ") for line in attempt_text.splitlines()):
        return "recipe"
    return "other"


def halve_batch(recipe_file: Path) -> str | None:
    """Rewrites a job's recipe for its out-of-memory retry: half the batch, twice the accumulation. Returns what
    changed, or None at batch size 1."""
    recipe = yaml.safe_load(recipe_file.read_text())
    train = recipe.setdefault("train", {})
    batch, accumulation = train.get("train_batch_size", 1), train.get("gradient_accumulation_steps", 1)
    if batch <= 1:
        return None
    train["train_batch_size"], train["gradient_accumulation_steps"] = batch // 2, accumulation * 2
    write_text_atomic(recipe_file, yaml.safe_dump(recipe, sort_keys=False))
    return (
        f"train_batch_size {batch} -> {batch // 2}, gradient_accumulation_steps {accumulation} -> {accumulation * 2}"
    )


def disk_freed(job: jobs.Job, need: int = DISK_FREE_BYTES) -> bool:
    """Whether the disk the job writes to has `need` bytes free again."""
    folder = Path(job.job_dir)
    return shutil.disk_usage(folder if folder.exists() else folder.parent).free >= need


def _plan(job: jobs.Job, disk_free=disk_freed) -> tuple[bool | None, str] | None:
    """(continue from the last checkpoint?, what the retry does) for a job the policy retries now; None to leave it
    for now (a full disk not yet freed); (None, why) to give it up. May rewrite the job's recipe (out of memory)."""
    if job.state == "interrupted":
        return True, "worker-gone: continues from its last checkpoint"
    if job.failure == "disk-full" and disk_free(job):
        return True, "disk-full: space is free again; continues from its last checkpoint"
    if job.failure == "oom":
        changed = halve_batch(job.recipe)
        return (False, f"oom: from scratch with {changed}") if changed else (None, "out of memory at batch size 1")
    return None


def requeue_due(*, home: str | Path | None = None, disk_free=disk_freed) -> list[tuple[jobs.Job, str]]:
    """Queues again every job the policy retries now; returns (job, what the retry does) for each. One transaction
    per job, so of two workers only one requeues it (and rewrites its recipe)."""
    query = (
        "SELECT id FROM jobs WHERE max_tries IS NOT NULL AND attempts < max_tries AND (state = 'interrupted'"
        " OR (state = 'failed' AND failure IN ('oom', 'disk-full'))) ORDER BY id"
    )
    with jobs.connect(home) as conn:
        candidates = [row["id"] for row in conn.execute(query).fetchall()]
    done = []
    for job_id in candidates:
        with jobs.connect(home) as conn, jobs.transaction(conn):
            job = jobs.fetch(conn, job_id)
            if job.state not in ("interrupted", "failed") or (job.state == "failed" and job.failure not in TRANSIENT):
                continue  # another worker took it meanwhile
            plan = _plan(job, disk_free)
            if plan is None:
                continue
            resume, note = plan
            if resume is None:  # nothing a retry could change: no more tries
                error = f"{job.error or ''} [not retried: {note}]".strip()
                conn.execute("UPDATE jobs SET max_tries = attempts, error = ? WHERE id = ?", (error, job.id))
                continue
            failure = "worker-gone" if job.state == "interrupted" else job.failure
            conn.execute(
                "UPDATE jobs SET state = 'queued', resume = ?, failure = ?, error = NULL, cancel_requested = 0"
                " WHERE id = ?",
                (int(resume), failure, job.id),
            )
            with job.log.open("a") as log:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"\n=== retry policy ({stamp}): attempt {job.attempts} of {job.max_tries}; {note}\n")
            done.append((jobs.fetch(conn, job.id), note))
    return done


def unretried_note(kind: str, job: jobs.Job) -> str:
    """Appended to a failed job's error: why the policy leaves it (shown by `sdtune jobs show` and the Jobs page)."""
    if job.max_tries is None:
        return ""
    if kind not in TRANSIENT:
        return f" [not retried: {kind} failures are not transient]"
    if job.attempts >= job.max_tries:
        return f" [not retried: {job.attempts} of {job.max_tries} tries used]"
    return f" [{kind}: the worker retries it]"
