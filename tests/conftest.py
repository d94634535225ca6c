"""Shared fixtures: the bundled toy base, an isolated sdtune cache and registry, and no network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forked_trainers import TrainerServer

from sdtune.adapters.base import TOY_BASE

# The tests never touch the Hub: a hub id must fail fast with sdtune's own message, never start a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own latent/hash cache instead of ~/.cache/sdtune."""
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "sdtune-cache"))


@pytest.fixture(scope="session", autouse=True)
def isolated_registry(tmp_path_factory):
    """Trainers register their runs: into the session's own registry, never the user's ~/.sdtune. Session-scoped
    so it is in place before any session fixture (a training run) starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDTUNE_HOME", str(tmp_path_factory.getbasetemp() / "sdtune-home"))
        yield


@pytest.fixture(scope="session")
def toy_base():
    assert (TOY_BASE / "model_index.json").is_file(), f"toy base missing at {TOY_BASE}"
    return TOY_BASE


@pytest.fixture(scope="session")
def toy_pipe(toy_base):
    """The toy base pipeline, fp32 on the CPU, loaded once per session (tests must not modify it)."""
    from sdtune.adapters import quiet_libraries
    from sdtune.adapters.base import load_pipeline

    quiet_libraries()
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


# -- training runs shared by test files (each trained once per session) -------------------------------------------


def trainer_env(cache: Path) -> dict:
    return {**os.environ, "SDTUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


# blocking trainer runs fork from one process that imported torch & co. once; SDTUNE_TEST_FRESH_PROCESSES=1 starts
# a fresh interpreter for each instead
TRAINERS = TrainerServer()


def run_trainer(
    args: list[str],
    cache: Path,
    launcher: str = "python",
    timeout: int = 900,
    script: str = "trainers/lora.py",
    threads: int | None = None,
):
    """A trainer run to its end: `python script args...` (forked, see TRAINERS) or `accelerate launch`; `threads`
    sets OMP_NUM_THREADS."""
    env = {**trainer_env(cache), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if launcher == "accelerate":
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]  # fmt: skip
    else:
        cmd = [sys.executable, script, *args]
        if not os.environ.get("SDTUNE_TEST_FRESH_PROCESSES"):
            return TRAINERS.run(cmd, ROOT, env, timeout)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_trainer(args: list[str], cache: Path, script: str = "trainers/lora.py", stdout=subprocess.DEVNULL):
    """A trainer started in the background (stderr merged into `stdout`), for tests that stop it part-way."""
    cmd = [sys.executable, script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(cache), stdout=stdout, stderr=subprocess.STDOUT, text=True)


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300, then: float = 0.0):
    """SIGKILLs a started trainer once its run folder holds checkpoint-`step` (polled for, not a fixed wait), and
    `then` seconds after it: a crash that lands mid-step rather than on the checkpoint boundary."""
    deadline = time.time() + timeout
    while not (out / "checkpoints" / f"checkpoint-{step}").is_dir():
        assert proc.poll() is None, f"the run ended before checkpoint-{step}"
        assert time.time() < deadline, f"no checkpoint-{step} after {timeout}s"
        time.sleep(0.02)
    time.sleep(then)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's quickstart (purple, a colour the toy base never saw), through `accelerate launch`, into a
    temporary run folder. tests/test_lora.py checks the run."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_trainer([str(QUICKSTART), f"output.dir={out}"], tmp_path_factory.mktemp("cache"), "accelerate")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout + proc.stderr


def colour_lora_run(tmp_path_factory, colour: str, seed: int, steps: int) -> Path:
    """A LoRA on the quickstart recipe teaching one colour the toy base never saw, from kohya folders: 16 shapes in
    that colour (`1_<colour>`) plus 8 in the base's own colours with their true captions (`1_base`). The second folder
    is the regularization of sd-scripts' DreamBooth-style training: the LoRA draws the colour when a prompt asks for
    it and leaves other colours alone, so two such LoRAs stack without pulling each other's prompts."""
    from sdtune.adapters import toyworld

    root = tmp_path_factory.mktemp(colour)
    toyworld.write_dataset(root / "data" / f"1_{colour}", 16, seed=seed, colors=[colour])
    toyworld.write_dataset(root / "data" / "1_base", 8, seed=seed + 10, colors=list(toyworld.BASE_COLORS))
    args = [
        str(QUICKSTART),
        f"output.dir={root / 'run'}",
        f"data.train_data_dir={root / 'data'}",
        f"data.trigger_word={colour}",
        f"output.name=toy-{colour}",
        f"train.max_train_steps={steps}",
        "train.checkpointing_steps=1000",
        "validation.validation_steps=0",
        f"validation.prompts=[a {colour} circle]",
        "validation.toy_score=[]",
    ]
    proc = run_trainer(args, root / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root / "run"


# The learned colours (the quickstart's 300 steps, ~50 s each) are for the slow proofs that measure concepts
# (tests/test_compose.py); the mechanism tests (fuse, block weights, merge files, checkpoint picking, pages) need a
# LoRA that moved the base, not one that learned it well: 40 steps draw the colour on part of the seeds already.


@pytest.fixture(scope="session")
def cyan_run(tmp_path_factory):
    """A short colour LoRA (see `colour_lora_run`) for cyan: 40 steps."""
    return colour_lora_run(tmp_path_factory, "cyan", seed=2, steps=40)


@pytest.fixture(scope="session")
def purple_run(tmp_path_factory):
    """A short colour LoRA (see `colour_lora_run`) for purple, with regularization images like `cyan_run`, so that
    tests/test_compose.py can stack, fuse and merge the two."""
    return colour_lora_run(tmp_path_factory, "purple", seed=1, steps=40)


@pytest.fixture(scope="session")
def learned_colour_runs(tmp_path_factory):
    """Purple and cyan trained for the quickstart's 300 steps: each learns its colour (for the slow proofs)."""
    return {
        "purple": colour_lora_run(tmp_path_factory, "purple", seed=1, steps=300),
        "cyan": colour_lora_run(tmp_path_factory, "cyan", seed=2, steps=300),
    }


# -- a short ControlNet run (tests/test_controlnet.py, tests/test_ab.py, the studio's A/B page) ---------------------

CONTROLNET_SHORT = [
    "train.max_train_steps=4",
    "train.train_batch_size=2",
    "train.checkpointing_steps=2",
    "train.lr_warmup_steps=0",
    "validation.prompts=[a red circle]",
    "method.validation_image=[]",
    "validation.seeds=[0]",
    "validation.num_inference_steps=2",
    "validation.validation_steps=0",
    "validation.toy_score=[]",
    "output.report_to=none",
    "output.save_precision=fp32",
]


def run_controlnet_trainer(args: list[str], cache: Path, timeout: int = 900):
    # one thread: on a shared 2-core machine two threads per process fight each other (measured 3-9x slower), and
    # a resumed run must use the thread count of the run it is compared with
    return run_trainer(args, cache, timeout=timeout, script="trainers/controlnet.py", threads=1)


@pytest.fixture(scope="session")
def controlnet_short_run(tmp_path_factory):
    """`recipes/controlnet-toy.yaml` for 4 steps on 6 mask pairs, a checkpoint every 2 steps (~10 s): a ControlNet
    that steers a little, registered as toy-masks. Returns (root, run folder, trainer args, log)."""
    from sdtune.adapters import toyworld

    root = tmp_path_factory.mktemp("cn-short")
    toyworld.write_control_dataset(root / "data", 6, seed=9)
    out = root / "run"
    args = [str(ROOT / "recipes" / "controlnet-toy.yaml"), f"data.train_data_dir={root / 'data'}",
            f"output.dir={out}", *CONTROLNET_SHORT]  # fmt: skip
    proc = run_controlnet_trainer(args, root / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root, out, args, proc.stdout + proc.stderr
