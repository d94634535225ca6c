"""What the benchmarks share: the machine's name, the SD v1-5 architecture with random weights, toy-world data,
and running a training script under bench/measure.py.

The bench scripts run as `python bench/<name>.py`, so this folder is on sys.path and they `import benchlib`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_CONFIG = ROOT / "adapters" / "sd15_config"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"CPU: {model}, {os.cpu_count()} cores (torch {torch.__version__})"


def build_sd15_random(folder: Path) -> Path:
    """The full SD v1-5 UNet/VAE/text encoder with seeded random weights, saved once as a diffusers folder."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_data(folder: Path, n: int, size: int, conditioning: bool = False) -> Path:
    """n toy-world images at `size` px with an imagefolder metadata.jsonl (both trainers read this layout); with
    `conditioning`, each image's shape mask too, as `conditioning_image_file_name` (the ControlNet example's column).
    """
    if (folder / "metadata.jsonl").is_file():
        return folder
    from sdtune.adapters import toyworld

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (_, caption, scene) in enumerate(toyworld.generate(n, seed=123)):
        toyworld.render(scene, size).save(folder / f"{i:04d}.png")
        row = {"file_name": f"{i:04d}.png", "text": caption}
        if conditioning:
            toyworld.scene_mask(scene, size).save(folder / f"{i:04d}-mask.png")
            row["conditioning_image_file_name"] = f"{i:04d}-mask.png"
        rows.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


# Set by bench/gpu_suite.py for every run: bench/measure.py's options (count FLOPs, profile), a time (epoch seconds)
# by which a run must have ended, and one latent cache for all of sdtune's runs (as a user's runs share one).
MEASURE_FLAGS: list[str] = []
DEADLINE: float | None = None
CACHE: Path | None = None


def measured(cmd_script: str, args: list[str], result: Path, cwd: Path) -> dict:
    return measured_run(Run(cmd_script, args, result, cwd))


def measured_run(run: Run) -> dict:
    timeout = None if DEADLINE is None else max(DEADLINE - time.time(), 1)
    proc = subprocess.run(
        run.command(), cwd=run.cwd, env=run.environment(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{run.script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return run.measurement()


@dataclass
class Run:
    """A training script run under bench/measure.py: its arguments, result file, folder and extra environment."""

    script: str
    args: list[str]
    result: Path
    cwd: Path
    env: dict = field(default_factory=dict)

    def command(self, *flags: str) -> list[str]:
        measure = str(ROOT / "bench" / "measure.py")
        return [sys.executable, measure, str(self.result), *MEASURE_FLAGS, *flags, "--", self.script, *self.args]

    def environment(self) -> dict:
        cache = str(CACHE or self.result.parent / "cache")
        return {**os.environ, "SDTUNE_CACHE": cache, "PYTHONUNBUFFERED": "1", **self.env}

    def measurement(self) -> dict:
        measurement = json.loads(self.result.read_text()) | {"result_path": str(self.result)}
        if measurement["seconds_per_step"] is None:
            raise RuntimeError(
                f"{self.script}: only {measurement['steps']} optimizer steps were timed; run more steps"
            )
        return measurement


def measured_in_turns(runs: dict[str, Run], steps: int) -> dict[str, dict]:
    """Runs several training scripts at once, each of `steps` optimizer steps, taking turns one step at a time.

    Each sets up (all at once), takes its first step and waits; then they step in rounds, one at a time, the order
    rotating each round, and the others paused (measure.py --baton). Step k of every run falls in the same few
    seconds, so what the machine does meanwhile (other work, clock drift) weighs on all of them alike: the ratio
    of two runs' step k resolves a difference of a few percent on a shared machine, where the medians of separate
    runs do not. They finish one after another. Returns each run's measurement, as `measured`.
    """
    turns: dict[str, _Turn] = {}
    try:
        for name, run in runs.items():
            turns[name] = _Turn(run)
        for turn in turns.values():
            turn.wait_for_step()
        names = list(turns)
        for k in range(steps - 1):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                turns[name].take_step()
        return {name: turn.finish() for name, turn in turns.items()}
    finally:
        for turn in turns.values():
            turn.close()


class _Turn:
    """One run of `measured_in_turns`: its process, the pipe that lets it step and the one it reports a step on."""

    def __init__(self, run: Run):
        self.run = run
        run.result.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(run.result.with_suffix(".log"), "w")
        go_read, self.go = os.pipe()
        self.done, done_write = os.pipe()
        self.proc = subprocess.Popen(
            run.command("--baton", f"{go_read},{done_write}"),
            cwd=run.cwd,
            env=run.environment(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(go_read, done_write),
        )
        os.close(go_read)
        os.close(done_write)  # the child holds the only write end: its exit reads as an empty read

    def wait_for_step(self):
        if not os.read(self.done, 1):
            self.proc.wait()
            log = self.run.result.with_suffix(".log").read_text()[-4000:]
            raise RuntimeError(f"{self.run.script} stopped (exit {self.proc.returncode}) before its last step:\n{log}")

    def take_step(self):
        with contextlib.suppress(BrokenPipeError):  # it has exited: wait_for_step says how
            os.write(self.go, b".")
        self.wait_for_step()

    def finish(self) -> dict:
        os.write(self.go, b".")
        if self.proc.wait() != 0:
            log = self.run.result.with_suffix(".log").read_text()[-4000:]
            raise RuntimeError(f"{self.run.script} failed:\n{log}")
        return self.run.measurement()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.go, self.done):
            os.close(fd)
        self.log.close()


class StepTimer:
    """Marks between steps: CUDA events recorded on the stream on a GPU (no synchronize until the intervals are read,
    so timing adds no host sync), perf_counter on the CPU. `resume()` after a wait that is not part of the next step
    (a run taking turns with others) starts that step's interval there instead of at the last mark.

    On the CPU the process's CPU time is marked too (`cpu_intervals`): the work of a step, which other processes on a
    shared machine delay (wall time) but do not add to."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks, self.cpu_marks = cuda, [], []
        self.resumes: dict[int, object] = {}  # index of a mark -> the stamp its interval starts from instead

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self):
        self.marks.append(self.stamp())
        self.cpu_marks.append(time.process_time())

    def resume(self):
        self.resumes[len(self.marks) - 1] = self.stamp()

    def intervals(self) -> list[float]:
        starts = [self.resumes.get(i, mark) for i, mark in enumerate(self.marks[:-1])]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(starts, self.marks[1:])]
        return [b - a for a, b in zip(starts, self.marks[1:])]

    def cpu_intervals(self) -> list[float] | None:
        return None if self.cuda else [b - a for a, b in zip(self.cpu_marks, self.cpu_marks[1:])]


def absolute(path: str) -> Path:
    """A path argument made absolute: the example scripts run from their own run folder."""
    return Path(path).resolve()


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def add_common_arguments(parser, example: str):
    """The options every bench script takes: data size, the diffusers example to compare with, where to work."""
    parser.add_argument("--images", type=int, default=64, help="Training images to generate.")
    parser.add_argument("--example", type=absolute, default=None, help=f"diffusers' {example}.")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="Scratch folder (models, data).")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")


# Overrides that leave a bench run its training alone: no grids, scores, logs or registry entry, and a re-run
# replacing the last one's folder.
MEASURE_ONLY = [
    "validation.prompts=[]",
    "validation.toy_score=[]",
    "output.report_to=none",
    "output.register=false",
    "output.overwrite=true",
]


def recipe_overrides(model, data, res: int, batch: int, steps: int, precision: str, lr: float, out) -> list[str]:
    """sdtune recipe overrides both trainers' benchmarks share: model, data, size, steps, batch, a constant lr,
    precision, no checkpoints, no validation, no logging."""
    return [
        f"base={model}",
        f"data.train_data_dir={data}",
        f"data.resolution={res}",
        f"data.min_bucket_reso={res}",
        f"data.max_bucket_reso={res}",
        "data.bucket_reso_steps=8",
        "data.enable_bucket=false",
        "data.random_flip=false",
        f"train.max_train_steps={steps}",
        f"train.train_batch_size={batch}",
        f"train.learning_rate={lr}",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        f"train.mixed_precision={precision}",
        "train.checkpointing_steps=100000",
        f"output.dir={out}",
        *MEASURE_ONLY,
    ]


def example_arguments(model, data, res: int, batch: int, steps: int, precision: str, lr: float, out) -> list[str]:
    """The same settings as `recipe_overrides`, as a diffusers example script's arguments."""
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--resolution={res}",
        f"--train_batch_size={batch}",
        f"--max_train_steps={steps}",
        f"--learning_rate={lr}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--seed=0",
        f"--mixed_precision={precision}",
        "--checkpointing_steps=100000",
        f"--output_dir={out}",
        "--dataloader_num_workers=0",
    ]


def results_header(title: str, command: str, device: str, stamp: str) -> list[str]:
    """The opening lines of a RESULTS.md section: what was run, on which machine, and what the numbers mean."""
    memory = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS"
    return [
        f"\n## {title}",
        f"Machine: {device}. Measured {stamp} by `{command}`.",
        f"Memory is {memory}; s/step is the median interval between optimizer steps after 3 warm-up steps.",
        "",
    ]


def append_results(path: Path, lines: list[str]):
    text = "\n".join(lines) + "\n"
    print(text)
    with open(path, "a") as handle:
        handle.write(text)
