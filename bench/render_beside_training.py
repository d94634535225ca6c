"""A toy render beside a training job, with every torch process taking every core (before issue 20) and with the
threads sized by what runs at once (studio/threads.py).

Usage:
    python bench/render_beside_training.py                                # 48 images, each render capped at 600 s
    python bench/render_beside_training.py --images 2 --timeout 60        # a rehearsal: does every step run?
    python bench/render_beside_training.py --append bench/RESULTS.md      # and a section for the results file

Each mode renders `--images` images of the toy base (`sdtune sample`, the code path of the studio's Sample and A/B
pages) once alone and once beside a LoRA training that a real worker (`sdtune worker`) runs from a queue in a
temporary SDTUNE_HOME. The modes differ only in the threads each process gets:

    all-cores   OMP_NUM_THREADS = every core, for the worker's trainer and for the render: two torch processes that
                each take the whole machine (what issue 20 describes)
    d6344c6     as the worker launched trainers before issue 20: accelerate's default of 1 thread for the trainer
                (OMP_NUM_THREADS=1 given to the worker), every core for the render
    sized       issue 20: no OMP_NUM_THREADS anywhere; the worker gives its trainer (cores - reserve) // concurrency
                threads and the render takes the cores the trainer leaves

A render still running after --timeout seconds is stopped and reported as "> N s" (OpenMP's spin-waiting threads can
make it crawl for far longer than that). Also reported: the training steps the trainer took during the render.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDTUNE = Path(sys.executable).parent / "sdtune"
DATA = ROOT / "datasets" / "quickstart-purple"
MODES = ("all-cores", "d6344c6", "sized")
TRAINING = [  # the quickstart LoRA, small steps, for as long as the measurement needs
    f"data.train_data_dir={DATA}", "train.train_batch_size=2", "train.max_train_steps=1000000",
    "train.checkpointing_steps=1000000", "validation.validation_steps=0", "validation.toy_score=[]",
    "output.report_to=none", "output.export_check=false", "output.register=false",
]  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="Images per render (default 48).")
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps per image (default 25).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds before a render is stopped.")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--append", type=Path, help="Append a results section to this Markdown file.")
    return parser.parse_args(argv)


def mode_env(mode: str, cores: int) -> tuple[dict, dict]:
    """(the worker's environment, the render's environment) of one mode, over this process's own."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if mode == "all-cores":
        every = {"OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
        return {**base, **every}, {**base, **every}
    if mode == "d6344c6":
        return {**base, "OMP_NUM_THREADS": "1"}, {**base, "OMP_NUM_THREADS": str(cores)}
    return base, dict(base)


def render(env: dict, out: Path, images: int, steps: int, timeout: float) -> tuple[float | None, int]:
    """`sdtune sample` of `images` seeds; (seconds, or None when stopped at `timeout`; images written)."""
    seeds = [part for seed in range(images) for part in ("--seed", str(seed))]
    command = [str(SDTUNE), "sample", "--base", "toy", "--prompt", "a purple circle", *seeds]
    command += ["--steps", str(steps), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, len(list(out.glob("*.png")))
    if proc.returncode != 0:
        raise SystemExit(f"sdtune sample failed ({proc.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - started, len(list(out.glob("*.png")))


def start_training(home: Path, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    """A worker on its own queue in `home`, running one long quickstart job; returns once the trainer steps."""
    from sdtune.studio import jobs

    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml", TRAINING, home=home)
    with log.open("w") as out:
        worker = subprocess.Popen(
            [str(SDTUNE), "worker", "--home", str(home), "--poll", "0.5", "--grace", "30"],
            cwd=ROOT, env={**env, "SDTUNE_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 600
    while jobs.progress(job.id, home=home)["step"] < 3:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the training did not start: see {log} and {jobs.get(job.id, home=home).log}")
        time.sleep(0.5)
    return worker, job.id


def measure(mode: str, args, work: Path, cores: int) -> dict:
    from sdtune.studio import jobs

    worker_env, render_env = mode_env(mode, cores)
    home = work / mode
    home.mkdir(parents=True)
    render_env["SDTUNE_HOME"] = str(home)
    alone, _ = render(render_env, home / "alone", args.images, args.steps, args.timeout)
    worker, job_id = start_training(home, worker_env, home / "worker.log")
    try:
        step_before = jobs.progress(job_id, home=home)["step"]
        started = time.monotonic()
        beside, written = render(render_env, home / "beside", args.images, args.steps, args.timeout)
        seconds = time.monotonic() - started
        trained = jobs.progress(job_id, home=home)["step"] - step_before  # logged every 2 s: close enough here
    finally:
        worker.send_signal(signal.SIGTERM)  # the trainer saves and stops, the worker exits
        worker.wait(timeout=120)
    threads = jobs.get(job_id, home=home).threads
    return {"mode": mode, "alone": alone, "beside": beside, "written": written, "trained": trained,
            "window": seconds, "trainer_threads": threads}  # fmt: skip


def seconds_text(value: float | None, timeout: float) -> str:
    return f"> {timeout:.0f} s" if value is None else f"{value:.1f} s"


def table(rows: list[dict], args) -> str:
    lines = [
        "| mode | render alone | render beside the training | images written beside | trainer threads "
        "| training steps during the render |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {seconds_text(row['alone'], args.timeout)} | "
            f"{seconds_text(row['beside'], args.timeout)} | {row['written']}/{args.images} | "
            f"{row['trainer_threads']} | {row['trained']} in {row['window']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import device_name

    from sdtune.studio.threads import available_cores

    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="sdtune-render-bench-") as tmp:
        rows = []
        for mode in args.modes:
            rows.append(measure(mode, args, Path(tmp), cores))
            print(table(rows[-1:], args).splitlines()[-1], flush=True)
    section = (
        f"\n## A toy render beside a training (issue 20): {args.images} images, {args.steps} steps, 64 px\n"
        f"Machine: {device_name()}, {cores} cores available. Measured {time.strftime('%Y-%m-%d %H:%M')} by "
        f"`python bench/render_beside_training.py --images {args.images} --steps {args.steps} --timeout "
        f"{args.timeout:.0f} --modes {' '.join(args.modes)}`.\n\n"
        f"{table(rows, args)}\n"
    )
    print(section)
    if args.append:
        with args.append.open("a") as handle:
            handle.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
