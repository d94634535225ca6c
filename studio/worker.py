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
    4. Each worker records itself (pid + process start time) in the database and heartbeats from a thread. A worker
       that finds a job `running` under a worker that no longer exists (killed, crashed, machine rebooted) stops
       what is left of its trainer and marks it `interrupted`; `sdtune jobs resume ID` continues it from its last
       checkpoint. A job whose run folder holds a finished run (`adapter.json`) becomes `done` instead, registered
       if its trainer did not get to it: a finished run is never trained or registered twice.
    5. A trainer dies with its worker, even a worker killed with SIGKILL, which can clean nothing up: the worker's
       pid is in the trainer's environment (SDTUNE_WORKER_PID), and the trainer's loop looks at it at every step
       and stops as on Ctrl-C (a checkpoint, then exit) once the worker is gone. Why not a parent-death signal
       (PR_SET_PDEATHSIG): it reaches only the worker's own child, the `accelerate launch` wrapper, which forwards
       no signal to the trainer under it (the setting is not inherited either), and a signal could cut a trainer
       short while it writes its final outputs; a check at a step boundary can do neither.
    6. Ctrl-C / SIGTERM on the worker stops its trainers gracefully and leaves their jobs `interrupted`.
    7. Each trainer gets its share of the CPU cores (studio/threads.py): cores // concurrency, less room for a
       studio render, as OMP_NUM_THREADS/MKL_NUM_THREADS, so that torch processes side by side do not starve.
    8. A job with a retry budget (every sweep run) that failed for a transient reason (its worker gone, CUDA out of
       memory, a full disk once freed) is queued again under the policy of studio/retry.py; a recipe error never.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdtune.studio import jobs, retry, threads
from sdtune.studio.processes import group_members, group_runs, process_start_time, stop_group
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


# -- launching a trainer ---------------------------------------------------------------------------------------------

# What `accelerate launch` guesses, with a warning block at the top of every job's log, when neither the command line
# nor an accelerate config file says it (the Makefile's values). A recipe's train.mixed_precision still wins: the
# trainer passes it to Accelerator itself.
ACCELERATE_DEFAULTS = {
    "--num_processes": "1",
    "--num_machines": "1",
    "--mixed_precision": "no",
    "--dynamo_backend": "no",
}


def accelerate_config_file() -> Path:
    """Where `accelerate config` writes its answers (as accelerate.commands.config.config_args finds it, without
    importing accelerate and torch into the worker)."""
    cache = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(cache).expanduser() / "accelerate" / "default_config.yaml"


def launch_args(accelerate_args: list[str]) -> list[str]:
    """The worker's `--accelerate-args`, plus `ACCELERATE_DEFAULTS` for what they leave out, unless the user
    configured accelerate (a --config_file, or the file `accelerate config` writes): then accelerate reads it."""
    given = {arg.split("=", 1)[0].replace("-", "_").replace("__", "--", 1) for arg in accelerate_args}
    if "--config_file" in given or accelerate_config_file().is_file():
        return list(accelerate_args)
    missing = {flag: value for flag, value in ACCELERATE_DEFAULTS.items() if flag not in given}
    if "--multi_gpu" in given:  # one process per GPU is accelerate's own (right) guess there
        missing.pop("--num_processes", None)
    return [*accelerate_args, *(part for pair in missing.items() for part in pair)]


def trainer_command(job: jobs.Job, accelerate_args: list[str]) -> list[str]:
    """`accelerate launch --quiet <args> trainers/<method>.py <job recipe> <train.resume=latest or
    output.overwrite=true>`: the job owns its run folder, so a retry replaces what an earlier attempt left; --quiet
    keeps the launcher's traceback out of the log, which ends with the trainer's one `error:` line. The script
    comes from the method table `trainers.core.recipe.TRAINERS`."""
    import sdtune.trainers
    from sdtune.trainers.core.recipe import TRAINERS

    script = Path(sdtune.trainers.__file__).parent / Path(TRAINERS[job.method]).relative_to("trainers")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *launch_args(accelerate_args)]
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

    def beat(self, stopped: threading.Event):
        """The heartbeat, from its own thread until `stopped`: the main loop can be busy for a while (a cancelled
        trainer has `--grace` seconds to save), and a worker whose heartbeat stops is shown as gone."""
        while not stopped.wait(jobs.HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except sqlite3.Error:  # a locked database: the next beat
                continue

    def unregister(self):
        with jobs.connect(self.home) as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (self.id,))

    # 2) orphans: running jobs whose worker is gone become interrupted (or done)
    def recover_orphans(self):
        """Running jobs whose worker is gone. A trainer still writing its final outputs (its loop took the last step)
        is left to finish, and looked at again at the next poll. Otherwise the job is adopted first (a conditional
        UPDATE, so of two live workers only one handles it and its trainer gets one SIGTERM, not two: a second one
        aborts without saving), what is left of its trainer is stopped cleanly, and the job is settled: `done` if
        its run finished, else `interrupted` (`jobs.settle`)."""
        with jobs.connect(self.home) as conn:
            running = conn.execute("SELECT * FROM jobs WHERE state = 'running' AND worker != ?", (self.id,))
            rows = running.fetchall()
            orphans = [jobs.job_from_row(row) for row in rows if not jobs.worker_alive(conn, row["worker"])]
            others = conn.execute("SELECT id FROM workers WHERE id != ?", (self.id,)).fetchall()
            for (worker_id,) in others:  # rows of workers that died without unregistering
                if not jobs.worker_alive(conn, worker_id):
                    conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
        adopt = "UPDATE jobs SET worker = ? WHERE id = ? AND worker = ? AND state = 'running'"
        for job in orphans:
            trainer_runs = bool(job.pgid) and group_runs(job.pgid, job.recipe)
            if trainer_runs and run_files.loop_finished(job.run_dir):
                continue
            with jobs.connect(self.home) as conn:
                if conn.execute(adopt, (self.id, job.id, job.worker)).rowcount != 1:
                    continue
            how = stop_group(job.pgid, self.config.grace_seconds) if trainer_runs else "gone"
            note = f"its worker {job.worker} died; trainer {how}"
            self.report(jobs.settle(replace(job, worker=self.id), note, adopter=self.id, home=self.home))

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
        sized = threads.trainer_env(self.config.concurrency)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SDTUNE_JOB_ID": str(job.id),
            "SDTUNE_HOME": str(jobs.sdtune_home(self.home)),  # the trainer registers its adapter in this workspace
            **run_files.worker_env(),  # the trainer stops once this worker is gone
            **sized,
        }
        with job.log.open("a") as log:
            log.write(f"\n=== attempt {job.attempts} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, cwd=job.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with jobs.connect(self.home) as conn:
            conn.execute(
                "UPDATE jobs SET pid = ?, pgid = ?, threads = ? WHERE id = ?",
                (process.pid, process.pid, int(sized["OMP_NUM_THREADS"]), job.id),
            )
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
        if run_files.loop_finished(entry.job.run_dir):  # writing its final outputs: a signal would cut them short
            try:
                entry.process.wait(timeout=self.config.grace_seconds)
            except subprocess.TimeoutExpired:
                pass
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
            del self.running[job_id]
            if code != 0 and run_files.run_finished(entry.job.run_dir):  # stopped after its adapter.json: done
                self.report(jobs.settle(entry.job, "", adopter=self.id, home=self.home))
                continue
            if code == 0:  # finished, even if a cancel arrived as it did
                state, error = "done", None
            elif entry.stop_reason == "cancelled":
                state, error = "cancelled", None
            elif entry.stop_reason == "interrupted":
                state, error = "interrupted", f"the worker was stopped; continue with: sdtune jobs resume {job_id}"
            else:
                self.failed(entry.job, code)
                continue
            self.finish(job_id, state, code, error)

    def failed(self, job: jobs.Job, code: int):
        """Records a failed attempt with its kind (studio/retry.py), which the retry policy reads."""
        kind = retry.classify(retry.last_attempt(job.log), code)
        error = last_error_line(job.log) or f"exit code {code} (see {job.log})"
        self.finish(job.id, "failed", code, error + retry.unretried_note(kind, job), failure=kind)

    def finish(self, job_id: int, state: str, code: int | None, error: str | None, failure: str | None = None):
        with jobs.connect(self.home) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, exit_code = ?, finished_at = ?, error = ?, cancel_requested = 0,"
                " failure = ? WHERE id = ? AND worker = ?",
                (state, code, time.time(), error, failure, job_id, self.id),
            )
        print(f"job {job_id}: {state}" + (f" (exit code {code})" if code is not None else f": {error}"), flush=True)

    def report(self, job: jobs.Job | None):
        if job is not None:
            print(f"job {job.id}: {job.state}" + (f": {job.error}" if job.error else ""), flush=True)

    def queue_empty(self) -> bool:
        with jobs.connect(self.home) as conn:
            return conn.execute("SELECT 1 FROM jobs WHERE state IN ('queued', 'running') LIMIT 1").fetchone() is None

    def run(self) -> int:
        def request_stop(signum, frame):
            self.stopping = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.register()
        stopped = threading.Event()
        beating = threading.Thread(target=self.beat, args=(stopped,), name="heartbeat", daemon=True)
        beating.start()
        print(
            f"worker {self.id}: queue {jobs.sdtune_home(self.home) / jobs.DB_FILE}, concurrency "
            f"{self.config.concurrency}",
            flush=True,
        )
        try:
            while not self.stopping:
                self.recover_orphans()
                self.handle_cancels()
                self.reap()
                for job, note in retry.requeue_due(home=self.home):
                    print(f"job {job.id}: queued again by the retry policy ({note})", flush=True)
                while len(self.running) < self.config.concurrency and not self.stopping:
                    job = self.claim()
                    if job is None:
                        break
                    if job.resume and run_files.run_finished(job.run_dir):  # it finished before it was stopped
                        self.report(jobs.settle(job, "", adopter=self.id, home=self.home))
                        continue
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
            stopped.set()
            beating.join()
            self.unregister()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


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
