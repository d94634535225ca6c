"""Trainer runs for the tests, forked from one process that has already imported torch, diffusers, transformers,
peft and accelerate, instead of started as a fresh interpreter each time.

Those imports are 5-8 s of every trainer start on the CI's 2 cores, and the default suite's longest tests are mostly
waits for trainer runs. The server below imports them once (no sdtune module, and no tensor work: a process that
has run OpenMP work must not fork), then forks a child per run. The child takes the run's environment, working folder,
argument list and thread count, and runs the trainer script as `python script args...` would, output into files.

Only blocking runs come here (`conftest.run_trainer`). Runs a test signals (SIGKILL, Ctrl-C), `accelerate launch`,
the job worker's trainers and the studio's keep real processes, so every path a user takes still starts one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

PRELOAD = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors.torch")


class TrainerServer:
    """The client side, in the pytest process: one server process, one run at a time."""

    def __init__(self):
        self.process = None
        self.lock = threading.Lock()

    def _start(self):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """`subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)` for a
        `[sys.executable, script, *args]` command, in a forked child of the server."""
        import tempfile

        with self.lock, tempfile.TemporaryDirectory() as tmp:
            if self.process is None or self.process.poll() is not None:
                self._start()
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": cmd[1:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self.process.stdout.readline())["pid"]
            timer = threading.Timer(timeout, _kill, (pid,))
            timer.start()
            try:
                code = json.loads(self.process.stdout.readline())["returncode"]
            finally:
                timed_out = not timer.is_alive()
                timer.cancel()
            if timed_out:
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


def _kill(pid: int):
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child(request: dict) -> None:
    """In the forked child: become `python script args...` in the run's folder and environment, then exit."""
    import atexit
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # fd 0 is the server's request pipe
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    # a fresh interpreter's thread count: OMP_NUM_THREADS if the run sets it, else the server's own default
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or DEFAULT_THREADS))
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(script).resolve().parent)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:  # as the interpreter ends: None is 0, a message is printed and is 1
        code = exc.code or 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """The server: import once, then fork one child per request line; answer its pid, then its exit code."""
    global DEFAULT_THREADS
    import importlib

    os.environ.pop("OMP_NUM_THREADS", None)  # the default a run without the variable gets
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    DEFAULT_THREADS = torch.get_num_threads()
    answer = sys.stdout
    print(json.dumps({"ready": True}), file=answer, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), file=answer, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answer, flush=True)


DEFAULT_THREADS = 1

if __name__ == "__main__":
    serve()
