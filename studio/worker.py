"""The job worker: takes queued jobs and runs each as `accelerate launch trainers/<method>.py <recipe>`.

Usage:
    sdtune worker                                  # one job at a time (one GPU), until Ctrl-C
    sdtune worker --concurrency 2 --grace 120      # two jobs at once; 120 s for a cancelled trainer to save
    python -m sdtune.studio.worker --once          # run what is queued, then exit
    sdtune worker --accelerate-args "--multi_gpu --num_processes 4"

How it stays correct:
    1. Claims are one `BEGIN IMMEDIATE` transaction that also counts every worker's running jobs, so a second worker
       started by mistake neither runs a job twice nor exceeds the concurrency (it waits).
    2. Each trainer runs in its own process group (a new session): cancel and shutdown signal the whole group
       (the `accelerate launch` wrapper and the training processes under it), never just the wrapper.
    3. Stopping is graceful first: SIGTERM makes the trainer finish its step, save a checkpoint and exit; after
       `--grace` seconds the group gets SIGKILL.
    4. Each worker records itself (pid + process start time) in the database. A worker that finds a job `running`
       under a worker that no longer exists (killed, crashed, machine rebooted) stops what is left of its trainer
       and marks it `interrupted`; `sdtune jobs resume ID` continues it from its last checkpoint.
    5. Ctrl-C / SIGTERM on the worker stops its trainers gracefully and leaves their jobs `interrupted`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.studio import jobs
from sdtune.trainers.core import run_files


@dataclass
class WorkerConfig:
    """How a worker runs its jobs."""

    concurrency: int = 1  # jobs running at once, counted over every worker on this queue
    poll_seconds: float = 1.0  # how often the queue and the running trainers are looked at
    grace_seconds: float = 60.0  # from SIGTERM (the trainer saves a checkpoint) to SIGKILL
    accelerate_args: list[str] = field(default_factory=list)  # e.g. ["--num_processes", "1"]
    once: bool = False  # exit when nothing is queued or running
    home: str | None = None  # the workspace (default: $SDTUNE_HOME or ~/.sdtune)

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"--concurrency: at least 1, got {self.concurrency}")
        if self.grace_seconds < 0:
            raise ValueError(f"--grace: seconds >= 0, got {self.grace_seconds}")
        if self.poll_seconds <= 0:
            raise ValueError(f"--poll: seconds > 0, got {self.poll_seconds}")


# -- processes ------------------------------------------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), None if there is no such live process;
    with the pid it names a process uniquely, so a reused pid is not taken for a dead worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ""
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else rest[18]


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


def trainer_command(job: jobs.Job, accelerate_args: list[str]) -> list[str]:
    """`accelerate launch --quiet <args> trainers/<method>.py <job recipe> <train.resume=latest or
    output.overwrite=true>`: the job owns its run folder, so a retry replaces what an earlier attempt left; --quiet
    keeps the launcher's traceback out of the log, which ends with the trainer's one `error:` line. The script
    comes from the method table `trainers.core.recipe.TRAINERS`."""
    import sdtune.trainers
    from sdtune.trainers.core.recipe import TRAINERS

    script = Path(sdtune.trainers.__file__).parent / Path(TRAINERS[job.method]).relative_to("trainers")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *accelerate_args]
    return [*launch, str(script), str(job.recipe), "train.resume=latest" if job.resume else "output.overwrite=true"]


def last_error_line(log: Path) -> str | None:
    """The trainer's one-line `error: ...` message, if it printed one (the end of the log is enough)."""
    if not log.is_file():
        return None
    with log.open("rb") as handle:
        handle.seek(max(0, log.stat().st_size - 64 * 1024))
        lines = handle.read().decode(errors="replace").splitlines()
    return next((line for line in reversed(lines) if line.startswith("error: ")), None)


# -- the worker -----------------------------------------------------------------------------------------------------


@dataclass
class Running:
    job: jobs.Job
    process: subprocess.Popen
    stop_reason: str | None = None  # "cancelled" or "interrupted" once the worker has stopped it


class Worker:
    """One worker process. `run()` loops until Ctrl-C/SIGTERM (or, with `once`, until the queue is empty)."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.home = config.home
        self.id = f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"
        self.running: dict[int, Running] = {}
        self.stopping = False

    # 1) the worker's own row: other workers look at it to decide whether its jobs are orphans
    def register(self):
        now = time.time()
        with jobs.connect(self.home) as conn:
            conn.execute(
                "INSERT INTO workers (id, host, pid, proc_start, concurrency, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self.id,
                    socket.gethostname(),
                    os.getpid(),
                    process_start_time(os.getpid()),
                    self.config.concurrency,
                    now,
                    now,
                ),
            )

    def heartbeat(self):
        with jobs.connect(self.home) as conn:
            conn.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (time.time(), self.id))

    def unregister(self):
        with jobs.connect(self.home) as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (self.id,))

    # 2) orphans: running jobs whose worker is gone become interrupted
    def recover_orphans(self):
        """Running jobs whose worker is gone: each is adopted first (a conditional UPDATE, so of two live workers
        only one handles it and its trainer gets one SIGTERM, not two: a second one aborts without saving), then
        what is left of its trainer is stopped cleanly, and the job becomes interrupted."""
        with jobs.connect(self.home) as conn:
            running = conn.execute("SELECT * FROM jobs WHERE state = 'running' AND worker != ?", (self.id,))
            orphans = [jobs.job_from_row(row) for row in running.fetchall() if not worker_alive(conn, row["worker"])]
            adopt = "UPDATE jobs SET worker = ? WHERE id = ? AND worker = ? AND state = 'running'"
            adopted = [job for job in orphans if conn.execute(adopt, (self.id, job.id, job.worker)).rowcount == 1]
            others = conn.execute("SELECT id FROM workers WHERE id != ?", (self.id,)).fetchall()
            for (worker_id,) in others:  # rows of workers that died without unregistering
                if not worker_alive(conn, worker_id):
                    conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
        for job in adopted:
            how = "gone"
            if job.pgid and group_runs(job.pgid, job.recipe):  # its trainer outlived the worker: stop it cleanly
                how = stop_group(job.pgid, self.config.grace_seconds)
            note = f"its worker {job.worker} died; trainer {how}"
            self.finish(job.id, "interrupted", None, f"{note}; continue with: sdtune jobs resume {job.id}")

    # 3) claiming: at most `concurrency` running jobs over all workers, the oldest queued job first
    def claim(self) -> jobs.Job | None:
        with jobs.connect(self.home) as conn, jobs.transaction(conn):
            (running,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()
            if running >= self.config.concurrency:
                return None
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', worker = ?, started_at = ?, finished_at = NULL, pid = NULL,"
                " pgid = NULL, exit_code = NULL, error = NULL, attempts = attempts + 1 WHERE id = ? AND state = 'queued'",
                (self.id, time.time(), row["id"]),
            )
            return jobs.fetch(conn, row["id"])

    def start(self, job: jobs.Job):
        command = trainer_command(job, self.config.accelerate_args)
        run_files.take_requests(job.run_dir)  # "sample/save now" left from an earlier attempt are stale
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SDTUNE_JOB_ID": str(job.id)}
        with job.log.open("a") as log:
            log.write(f"\n=== attempt {job.attempts} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, cwd=job.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with jobs.connect(self.home) as conn:
            conn.execute("UPDATE jobs SET pid = ?, pgid = ? WHERE id = ?", (process.pid, process.pid, job.id))
        self.running[job.id] = Running(job, process)
        print(f"job {job.id}: started ({job.method}, attempt {job.attempts}, pid {process.pid})", flush=True)

    # 4) cancel requests for this worker's jobs
    def handle_cancels(self):
        if not self.running:
            return
        with jobs.connect(self.home) as conn:
            marks = ",".join("?" * len(self.running))
            flagged = conn.execute(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})", tuple(self.running)
            ).fetchall()
        for (job_id,) in flagged:
            self.stop(self.running[job_id], "cancelled")

    def stop(self, entry: Running, reason: str):
        entry.stop_reason = reason
        how = stop_group(entry.process.pid, self.config.grace_seconds, entry.process)
        print(f"job {entry.job.id}: {reason} (trainer stopped: {how})", flush=True)

    # 5) finished trainers: record how they ended
    def reap(self):
        for job_id, entry in list(self.running.items()):
            code = entry.process.poll()
            if code is None:
                continue
            if group_members(entry.process.pid):  # the wrapper exited but something of the group lives on
                stop_group(entry.process.pid, self.config.grace_seconds, entry.process)
            if code == 0:  # finished, even if a cancel arrived as it did
                state, error = "done", None
            elif entry.stop_reason == "cancelled":
                state, error = "cancelled", None
            elif entry.stop_reason == "interrupted":
                state, error = "interrupted", f"the worker was stopped; continue with: sdtune jobs resume {job_id}"
            else:
                state, error = "failed", last_error_line(entry.job.log) or f"exit code {code} (see {entry.job.log})"
            self.finish(job_id, state, code, error)
            del self.running[job_id]

    def finish(self, job_id: int, state: str, code: int | None, error: str | None):
        with jobs.connect(self.home) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, exit_code = ?, finished_at = ?, error = ?, cancel_requested = 0"
                " WHERE id = ? AND worker = ?",
                (state, code, time.time(), error, job_id, self.id),
            )
        print(f"job {job_id}: {state}" + (f" (exit code {code})" if code is not None else f": {error}"), flush=True)

    def queue_empty(self) -> bool:
        with jobs.connect(self.home) as conn:
            return conn.execute("SELECT 1 FROM jobs WHERE state IN ('queued', 'running') LIMIT 1").fetchone() is None

    def run(self) -> int:
        def request_stop(signum, frame):
            self.stopping = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.register()
        print(
            f"worker {self.id}: queue {jobs.sdtune_home(self.home) / jobs.DB_FILE}, concurrency "
            f"{self.config.concurrency}",
            flush=True,
        )
        try:
            while not self.stopping:
                self.heartbeat()
                self.recover_orphans()
                self.handle_cancels()
                self.reap()
                while len(self.running) < self.config.concurrency and not self.stopping:
                    job = self.claim()
                    if job is None:
                        break
                    try:
                        self.start(job)
                    except (OSError, KeyError, ValueError) as exc:  # no such workdir, a method this install lacks
                        self.finish(job.id, "failed", None, f"could not start the trainer: {exc!r}")
                if self.config.once and not self.running and self.queue_empty():
                    break
                time.sleep(self.config.poll_seconds)
            for entry in list(self.running.values()):  # shutting down: trainers save a checkpoint and stop
                self.stop(entry, "interrupted")
            self.reap()
        finally:
            self.unregister()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def worker_alive(conn, worker_id: str | None) -> bool:
    """Whether the worker recorded as `worker_id` still runs: its row exists and, on this host, its pid is the
    same process (same start time). Workers on other hosts count as alive while their heartbeat is recent."""
    row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone() if worker_id else None
    if row is None:
        return False
    if row["host"] != socket.gethostname():
        return time.time() - row["heartbeat_at"] < 120
    return process_start_time(row["pid"]) == row["proc_start"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="sdtune worker", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=1, help="Jobs at once over all workers (default 1).")
    parser.add_argument("--grace", type=float, default=60.0, help="Seconds from SIGTERM to SIGKILL (default 60).")
    parser.add_argument("--poll", type=float, default=1.0, help="Seconds between looks at the queue (default 1).")
    parser.add_argument("--accelerate-args", default="", help='Passed to accelerate launch, e.g. "--multi_gpu".')
    parser.add_argument("--once", action="store_true", help="Exit when nothing is queued or running.")
    parser.add_argument("--home", default=None, help="Workspace (default: $SDTUNE_HOME or ~/.sdtune).")
    return parser


def run_worker(args) -> int:
    try:
        config = WorkerConfig(
            concurrency=args.concurrency,
            poll_seconds=args.poll,
            grace_seconds=args.grace,
            accelerate_args=shlex.split(args.accelerate_args),
            once=args.once,
            home=args.home,
        )
    except ValueError as exc:
        raise SystemExit(f"sdtune worker: {exc}") from None
    return Worker(config).run()


if __name__ == "__main__":
    sys.exit(run_worker(build_parser().parse_args()))
