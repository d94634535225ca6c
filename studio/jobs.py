"""The job queue: training runs submitted from the CLI or the studio, run by a separate worker (`sdtune worker`).

Jobs live in SQLite (WAL mode) at `$SDTUNE_HOME/jobs.db` (default `~/.sdtune`), each with its folder:

    $SDTUNE_HOME/jobs/<id>/recipe.yaml   the resolved recipe the job trains: every default filled in, the overrides
                                         applied, `output.dir` set to run/ (the job records exactly what it trained)
    $SDTUNE_HOME/jobs/<id>/run/          the run folder: metrics.jsonl, samples/, checkpoints/, the adapter files
    $SDTUNE_HOME/jobs/<id>/log.txt       the trainer's console output, every attempt

States:

    queued --(worker claims)--> running --> done | failed | cancelled | interrupted
    cancel   queued/interrupted -> cancelled at once; running -> the worker stops it (SIGTERM to its process group:
             the trainer saves a checkpoint and exits; SIGKILL after a grace period) -> cancelled
    resume   interrupted/cancelled/failed -> queued; the trainer continues from its last checkpoint (train.resume)
    retry    any finished job -> queued from scratch (the previous run folder is kept as run.attempt-N)
    policy   a job with `max_tries` (a sweep's run) whose attempt failed for a transient reason -> queued again by
             the worker (studio/retry.py: its worker gone, CUDA out of memory, a full disk once freed)

A worker that dies takes its trainers with it: each stops at its next step with a checkpoint (it watches its worker,
see `run_files.worker_gone`). A job found `running` whose worker is dead becomes `interrupted` once its trainer is
gone (`settle_abandoned`, run by every worker, the Jobs page and `sdtune jobs list`), or `done` when its run folder
holds a finished run (`adapter.json`): a finished run is never trained or registered twice. The queue is the
database, so it survives a browser refresh, a studio restart and a worker restart; claims are single SQL
transactions (BEGIN IMMEDIATE), so two workers never run one job twice. A submission key makes a submit
idempotent: two clicks on one Launch queue one job.

Every function here takes and returns plain data (`Job` is a dataclass of strings and numbers; `progress` a dict)
and imports no torch, for the CLI and the Streamlit pages alike. Mistakes raise `JobError` with one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sdtune.adapters.atomic import write_text_atomic
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.workspace import enable_wal, sdtune_home
from sdtune.studio.processes import group_runs
from sdtune.trainers.core import run_files

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = ("done", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "cancelled", "failed")
DB_FILE = "jobs.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    method           TEXT NOT NULL,
    name             TEXT NOT NULL,
    state            TEXT NOT NULL,
    source           TEXT NOT NULL,             -- the recipe file as submitted
    overrides        TEXT NOT NULL DEFAULT '',  -- its command-line overrides, one per line
    workdir          TEXT NOT NULL,             -- relative paths in the recipe are relative to it
    job_dir          TEXT NOT NULL,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    worker           TEXT,                      -- id of the worker that runs / ran it
    pid              INTEGER,
    pgid             INTEGER,
    exit_code        INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    resume           INTEGER NOT NULL DEFAULT 0,  -- next attempt continues from the last checkpoint
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    submission_key   TEXT,                      -- one form submission: a second submit with it gets this job
    threads          INTEGER,                   -- CPU threads its trainer was given (studio/threads.py)
    sweep_id         INTEGER,                   -- the sweep it belongs to (studio/sweeps.py), NULL for a lone job
    max_tries        INTEGER,                   -- attempts the retry policy allows (studio/retry.py); NULL: no retry
    failure          TEXT                       -- why the last attempt failed: a `retry.KINDS` name
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    proc_start   TEXT,                          -- process start time from /proc: a reused pid is not the worker
    concurrency  INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""
# Columns added after the first release: (name, type), added to an older jobs.db when it is opened.
ADDED_COLUMNS = (
    ("submission_key", "TEXT"),
    ("threads", "INTEGER"),
    ("sweep_id", "INTEGER"),
    ("max_tries", "INTEGER"),
    ("failure", "TEXT"),
)
HEARTBEAT_SECONDS = 2.0  # a worker's heartbeat thread writes this often, whatever its main loop is doing
GONE_AFTER_SECONDS = 10.0  # a worker silent this long is shown as gone (and, on another host, taken for dead)


class JobError(SdtuneError, ValueError):
    """A request the queue cannot honour (no such job, wrong state, bad recipe); the message is one line."""


@dataclass
class Job:
    """One row of the queue, as plain data."""

    id: int
    method: str
    name: str
    state: str
    source: str
    overrides: str
    workdir: str
    job_dir: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    pid: int | None
    pgid: int | None
    exit_code: int | None
    attempts: int
    resume: int
    cancel_requested: int
    error: str | None
    submission_key: str | None = None
    threads: int | None = None
    sweep_id: int | None = None
    max_tries: int | None = None
    failure: str | None = None

    @property
    def recipe(self) -> Path:
        return Path(self.job_dir) / "recipe.yaml"

    @property
    def run_dir(self) -> Path:
        return Path(self.job_dir) / "run"

    @property
    def log(self) -> Path:
        return Path(self.job_dir) / "log.txt"

    def to_dict(self) -> dict:
        return {**asdict(self), "recipe": str(self.recipe), "run_dir": str(self.run_dir), "log": str(self.log)}


COLUMNS = [f.name for f in fields(Job)]


# -- the database ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(home: str | Path | None = None) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit, see `transaction`); WAL lets the studio read
    while a worker writes."""
    root = sdtune_home(home)
    root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(root / DB_FILE, timeout=30, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        enable_wal(conn)  # two processes opening a new jobs.db at once: one waits instead of failing "locked"
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(SCHEMA)
        _add_columns(conn)
        yield conn
    finally:
        conn.close()


def _add_columns(conn: sqlite3.Connection):
    """Brings a jobs.db made by an older sdtune up to `SCHEMA` (new columns are NULL in old rows). Checked again
    under the write lock: two processes opening the old file at once add each column once."""

    def missing() -> list[tuple[str, str]]:
        have = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        return [(name, kind) for name, kind in ADDED_COLUMNS if name not in have]

    if missing():
        with transaction(conn):
            for name, kind in missing():
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
    # NULLs are distinct in a UNIQUE index: only jobs submitted with a key are held to one job per key
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_submission_key ON jobs (submission_key)")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front: a read-then-update inside it cannot race another writer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def job_from_row(row: sqlite3.Row | None) -> Job | None:
    return None if row is None else Job(**{name: row[name] for name in COLUMNS})


def fetch(conn, job_id: int) -> Job:
    job = job_from_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    if job is None:
        raise JobError(f"job {job_id}: no such job (see `sdtune jobs list`)")
    return job


# -- submitting and reading -----------------------------------------------------------------------------------------


def submit(
    recipe: str | Path,
    overrides: list[str] | None = None,
    *,
    home: str | Path | None = None,
    submission_key: str | None = None,
) -> Job:
    """Validates `recipe` (+ `section.key=value` overrides) and queues it; returns the new job.

    The resolved recipe is written into the job's folder with `output.dir` pointing at the job's run folder, so
    a job never writes over another and records exactly what it trains. Relative paths in the recipe (the data)
    stay relative to the current directory, where the worker will run the trainer.

    `submission_key` names one submission (a form's Launch): a submit with a key already used returns that job
    instead of queueing another, however the two calls interleave (the check and the insert are one transaction).
    """
    from sdtune.trainers.core.recipe import RecipeError, load_recipe

    overrides = list(overrides or [])
    try:
        resolved = load_recipe(recipe, overrides)
    except RecipeError as exc:
        raise JobError(str(exc)) from None
    with connect(home) as conn, transaction(conn):
        same = conn.execute("SELECT id FROM jobs WHERE submission_key = ?", (submission_key,)).fetchone()
        if submission_key is not None and same is not None:
            return fetch(conn, same["id"])
        return insert(conn, resolved, recipe, overrides, home, submission_key=submission_key)


def insert(conn, resolved, recipe, overrides: list[str], home, **columns) -> Job:
    """Adds one queued job for the validated `resolved` recipe inside the caller's transaction, and writes its
    folder: `recipe.yaml` with `output.dir` set to the job's own run folder. `columns`: extra values of the row
    (`submission_key`, `sweep_id`, `max_tries`)."""
    import yaml

    names = ", ".join(["method", "name", "state", "source", "overrides", "workdir", "job_dir", "created_at", *columns])
    values = (resolved.method.type, resolved.output.name, "queued", str(Path(recipe).resolve()), "\n".join(overrides),
              os.getcwd(), "", time.time(), *columns.values())  # fmt: skip
    cursor = conn.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(values))})", values)
    job_id = cursor.lastrowid
    job_dir = sdtune_home(home) / "jobs" / str(job_id)
    shutil.rmtree(job_dir, ignore_errors=True)  # left by a submit that crashed before its commit
    resolved.output.dir = str(job_dir / "run")
    write_text_atomic(job_dir / "recipe.yaml", yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    conn.execute("UPDATE jobs SET job_dir = ? WHERE id = ?", (str(job_dir), job_id))
    return fetch(conn, job_id)


def get(job_id: int, *, home: str | Path | None = None) -> Job:
    with connect(home) as conn:
        return fetch(conn, int(job_id))


def list_jobs(states: list[str] | None = None, *, home: str | Path | None = None) -> list[Job]:
    """Jobs, newest first; only those in `states` if given."""
    with connect(home) as conn:
        rows = conn.execute("SELECT * FROM jobs ORDER BY id DESC").fetchall()
    jobs = [job_from_row(row) for row in rows]
    return [job for job in jobs if states is None or job.state in states]


# -- actions ------------------------------------------------------------------------------------------------------


def _change(job_id: int, allowed: tuple[str, ...], action: str, home, prepare=None, **values) -> Job:
    """Sets `values` on the job if its state is one of `allowed`, in one transaction (so no worker claims it
    half-changed); `prepare(job)` runs inside it first. Otherwise a one-line error."""
    with connect(home) as conn, transaction(conn):
        job = fetch(conn, int(job_id))
        if job.state not in allowed:
            raise JobError(f"job {job.id} is {job.state}: {action} needs a job that is {' or '.join(allowed)}")
        if prepare is not None:
            prepare(job)
        assignments = ", ".join(f"{key} = ?" for key in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job.id))
        return fetch(conn, job.id)


def cancel(job_id: int, *, home: str | Path | None = None) -> Job:
    """A queued or interrupted job is cancelled at once; a running one is flagged, and its worker stops it
    (graceful first: the trainer saves a checkpoint, so a cancelled job can still be resumed)."""
    with connect(home) as conn, transaction(conn):
        job = fetch(conn, int(job_id))
        if job.state == "running":
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
        elif job.state in ("queued", "interrupted"):
            conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?", (time.time(), job.id))
        else:
            raise JobError(f"job {job.id} is {job.state}: cancel needs a job that is queued, running or interrupted")
        return fetch(conn, job.id)


def resume(job_id: int, *, home: str | Path | None = None) -> Job:
    """Queues an interrupted, cancelled or failed job again; it continues from its last checkpoint."""
    return _change(job_id, RESUMABLE, "resume", home, state="queued", resume=1, cancel_requested=0, error=None)


def retry(job_id: int, *, home: str | Path | None = None) -> Job:
    """Queues a finished job again from scratch; its previous run folder is kept as `run.attempt-N`."""

    def set_aside(job: Job):
        if job.run_dir.exists():
            job.run_dir.rename(job.run_dir.with_name(f"run.attempt-{job.attempts}"))

    return _change(
        job_id, FINISHED, "retry", home, set_aside, state="queued", resume=0, cancel_requested=0, error=None
    )


def _request(job_id: int, kind: str, home) -> Path:
    job = get(job_id, home=home)
    if job.state != "running":
        raise JobError(f"job {job.id} is {job.state}: 'sample now' and 'save now' need a running job")
    return run_files.write_request(job.run_dir, kind)


def request_sample(job_id: int, *, home: str | Path | None = None) -> Path:
    """Sample now: the trainer renders a validation grid at its next step (see `progress()["latest_grid"]`)."""
    return _request(job_id, "sample", home)


def request_save(job_id: int, *, home: str | Path | None = None) -> Path:
    """Save now: the trainer writes a checkpoint (and the adapter files) at its next step."""
    return _request(job_id, "save", home)


# -- progress -------------------------------------------------------------------------------------------------------


def progress(job_id: int, *, home: str | Path | None = None) -> dict:
    """What the trainer reported in the run's metrics file, ready for a progress bar, a loss chart and a grid.

    Returns a dict: `state`, `step`, `total_steps`, `fraction` (0-1), `loss`, `lr`, `seconds_per_step`, `eta`
    (seconds), `losses` ([step, loss] pairs; a resumed run's repeated steps keep their latest value),
    `latest_grid` (absolute path or None), `events` (the event lines), `done` (the trainer's final entry seen),
    `pending_requests` ("sample"/"save" not yet taken).
    """
    job = get(job_id, home=home)
    records = run_files.read_metrics(job.run_dir)
    steps = [r for r in records if "event" not in r]
    events = [r for r in records if "event" in r]
    # the latest training step: a held-out val_loss line that follows it has no loss, lr or step speed of its own
    latest = next((r for r in reversed(steps) if "loss" in r), {})
    losses = {r["step"]: r["loss"] for r in steps if "loss" in r}
    grids = [e["grid"] for e in events if e["event"] == "validation" and e.get("grid")]
    step = (records[-1].get("step") or 0) if records else 0
    total = next((r["total_steps"] for r in reversed(records) if r.get("total_steps")), None)
    return {
        "state": job.state,
        "step": step,
        "total_steps": total,
        "fraction": min(step / total, 1.0) if total else 0.0,
        "loss": latest.get("loss"),
        "lr": latest.get("lr"),
        "seconds_per_step": latest.get("seconds_per_step"),
        "eta": latest.get("eta") if job.state == "running" else None,
        "losses": sorted([s, loss] for s, loss in losses.items()),
        "latest_grid": str(job.run_dir / grids[-1]) if grids else None,
        "events": events,
        "done": bool(events) and events[-1]["event"] == "done",
        "pending_requests": run_files.pending_requests(job.run_dir),
    }


def workers(*, home: str | Path | None = None, include_gone: bool = False) -> list[dict]:
    """The workers running this queue, each a dict of its row plus `seen_seconds_ago` and `alive`. [] means no
    worker runs the queue. A worker is gone within seconds of dying: at once on this host (its pid is checked), after
    `GONE_AFTER_SECONDS` without a heartbeat anywhere. `include_gone` lists the gone ones too (their rows stay until
    a worker starts and clears them)."""
    with connect(home) as conn:
        rows = conn.execute("SELECT * FROM workers ORDER BY started_at").fetchall()
        found = [{**dict(row), "alive": worker_alive(conn, row["id"], fresh=True)} for row in rows]
    for row in found:
        row["seen_seconds_ago"] = round(time.time() - row["heartbeat_at"], 1)
    return [row for row in found if include_gone or row["alive"]]


def worker_alive(conn, worker_id: str | None, fresh: bool = False) -> bool:
    """Whether the worker recorded as `worker_id` still runs: its row exists and, on this host, its pid is the same
    process (same start time); on another host, its heartbeat is recent. With `fresh`, a worker of this host must
    be heartbeating too (a frozen worker is shown gone, but its jobs are not taken from it while it lives)."""
    row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone() if worker_id else None
    if row is None:
        return False
    recent = time.time() - row["heartbeat_at"] < GONE_AFTER_SECONDS
    if row["host"] != socket.gethostname():
        return recent
    return run_files.process_alive(row["pid"], row["proc_start"]) and (recent or not fresh)


# -- jobs whose worker died -------------------------------------------------------------------------------------------


def settle_abandoned(*, home: str | Path | None = None) -> list[Job]:
    """Running jobs whose worker is dead and whose trainer is gone too (it stops by itself at its next step): each
    becomes `interrupted`, or `done` if its run finished. No signal is sent, so the studio and the CLI can call this
    without a worker: a worker that starts later also stops what is left of a trainer (`Worker.recover_orphans`)."""
    with connect(home) as conn:
        running = [job_from_row(r) for r in conn.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()]
        dead = [job for job in running if not worker_alive(conn, job.worker)]
    settled = []
    for job in dead:
        if job.pgid and group_runs(job.pgid, job.recipe):
            continue
        note = f"its worker {job.worker} died; trainer stopped"
        done = settle(job, note, adopter=f"{socket.gethostname()}:{os.getpid()}:settle", home=home)
        settled += [done] if done is not None else []
    return settled


def settle(job: Job, note: str, *, adopter: str, home: str | Path | None = None) -> Job | None:
    """Ends a `running` job whose trainer is gone: `done` if its run folder holds a finished run (registered now if
    the trainer did not get to it), else `interrupted` with `note` and how to resume. The job is first taken over by
    `adopter` with a conditional update, so of two settlers (a worker, the studio) only one acts; None for the other.
    """
    with connect(home) as conn:
        adopt = "UPDATE jobs SET worker = ? WHERE id = ? AND worker IS ? AND state = 'running'"
        if conn.execute(adopt, (adopter, job.id, job.worker)).rowcount != 1:
            return None
    if run_files.run_finished(job.run_dir):
        state, error = "done", None
        try:
            register_finished(job, home=home)
        except ValueError as exc:  # RegistryError, ManifestError: the run stays done, the reason is shown
            error = f"the run finished, but registering it failed: {exc}"
    else:
        state, error = "interrupted", f"{note}; continue with: sdtune jobs resume {job.id}"
    with connect(home) as conn:
        conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, error = ?, cancel_requested = 0 WHERE id = ? AND worker = ?",
            (state, time.time(), error, job.id, adopter),
        )
        return fetch(conn, job.id)


def register_finished(job: Job, *, home: str | Path | None = None) -> str | None:
    """Registers the finished run of `job` unless its recipe says `output.register: false` or the registry already
    holds it (its trainer registered it before it was stopped). Returns the new name, None when nothing was added."""
    import yaml

    from sdtune.adapters.registry import Registry

    recipe = (yaml.safe_load(job.recipe.read_text()) if job.recipe.is_file() else None) or {}
    registry = Registry(sdtune_home(home))
    if not (recipe.get("output") or {}).get("register", True) or registry.find_run(job.run_dir) is not None:
        return None
    return registry.register_run(job.run_dir).name


def log_tail(job_id: int, lines: int = 40, *, home: str | Path | None = None) -> str:
    """The last `lines` lines of the job's console log (progress bars' carriage returns folded)."""
    path = get(job_id, home=home).log
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 256 * 1024))
        text = handle.read().decode(errors="replace")
    # split on newlines only: a progress bar redraws itself with "\r", and only its last state is worth showing
    lines_read = text.rstrip("\n").split("\n")
    folded = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines_read]
    return "\n".join(folded[-lines:])
