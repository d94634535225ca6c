"""Issue 26's (before it 13's) measurements in one call on a lent GPU: most important first, within a deadline, everything into --out.

Usage (on the device machine, from the repository root, after `source bench/device/setup.sh`):
    python3 bench/gpu_suite.py --out $OUT --deadline 420
    python3 bench/gpu_suite.py --out $OUT --deadline 300 --tasks presets gpu-tests dreambooth controlnet
    python3 bench/gpu_suite.py --model toy --out /tmp/rehearsal --steps 9   # a rehearsal of every task on the CPU

Tasks, in the order they run by default (each is skipped, and says so, when what is left of the deadline cannot
hold it; the table gives its budget on an H100):

    lora        sdtune's LoRA trainer vs diffusers' train_text_to_image_lora.py, rank 16, batch 1/4/8, 512 px, bf16:
                s/step, samples/s, peak allocated and reserved memory, MFU (FLOPs of one whole step counted by
                FlopCounterMode, over the GPU's dense bf16 peak), host syncs per step (profiler)      ~150 s
    infer       bench/infer.py, SD v1-5 fp16, 25 steps, batch 1 and 4: base, 1/3 unfused LoRAs, fused   ~100 s
    presets     every recipes/sd15-*-low-vram.yaml for a few steps at 512 px: measured peak vs `sdtune doctor`'s
                estimate                                                                                ~100 s
    gpu-tests   pytest -m gpu tests/test_gpu.py (fp16 + bf16 reach the CPU's scores, export check, resume) ~200 s
    lab         bench/step_lab.py at batch 8: SDPA vs math attention, channels_last, fused AdamW, fp32 base, and
                torch.compile (its compile time apart)                                                  ~150 s
    dreambooth  full and LoRA DreamBooth vs diffusers' examples/dreambooth scripts                       ~120 s
    controlnet  ControlNet vs diffusers' examples/controlnet/train_controlnet.py, batch 1 and 4           ~120 s
    lab-graphs  step_lab's CUDA graphs (compile mode reduce-overhead) and all speed-ups together        ~150 s

The diffusers examples are read from --examples (default bench/.work/examples: copy them there from a diffusers
checkout; they are never committed); a missing one leaves its column empty. What comes back, at most 8 files:
results.json (every figure), RESULTS-gpu.md (sections for bench/RESULTS.md), suite.log, profiles.txt (the profiled
steps' top kernels), pytest-gpu.log and gpu-bench.png (s/step and peak memory by batch size, sdtune vs the
example; drawn when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import benchlib
import torch

ROOT = benchlib.ROOT
BUDGET = {  # seconds a task needs on an H100, to decide whether it still fits the deadline; in issue 26's order
    "lora": 150,
    "infer": 100,
    "presets": 100,
    "gpu-tests": 200,
    "lab": 150,
    "dreambooth": 120,
    "controlnet": 120,
    "lab-graphs": 150,
}
PRESETS = ["sd15-lora-low-vram", "sd15-dreambooth-low-vram", "sd15-controlnet-low-vram"]
PRESET_TARGET_GB = {"sd15-lora-low-vram": 8, "sd15-dreambooth-low-vram": 12, "sd15-controlnet-low-vram": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="Where everything goes (the device tool's $OUT).")
    p.add_argument("--deadline", type=float, default=420, help="Seconds from the start the suite may use.")
    p.add_argument("--tasks", nargs="+", choices=list(BUDGET), default=list(BUDGET))
    p.add_argument("--model", choices=["sd15-random", "toy"], default="sd15-random")
    p.add_argument("--steps", type=int, default=14, help="Optimizer steps per training run (>= 9).")
    p.add_argument("--precision", choices=["bf16", "fp16", "no"], default=None, help="Default: bf16 on a GPU.")
    p.add_argument("--examples", type=benchlib.absolute, default=ROOT / "bench" / ".work" / "examples")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sdtune-gpu-suite")
    return p.parse_args(argv)


class Suite:
    """Runs tasks against a deadline; keeps every row, and rewrites the output files after each task."""

    def __init__(self, args):
        self.args, self.out, self.work = args, args.out, args.work
        self.started = time.time()
        self.deadline = self.started + args.deadline
        self.toy = args.model == "toy"
        self.res = 64 if self.toy else 512
        self.cuda = torch.cuda.is_available()
        self.precision = args.precision or ("bf16" if self.cuda else "no")
        self.rows: list[dict] = []
        self.tasks: dict[str, str] = {}
        self.environment = environment() | {"model": args.model, "resolution": self.res}
        self.profiles: list[str] = []
        benchlib.MEASURE_FLAGS[:] = ["--flops-step", "4", "--profile-steps", "2"]
        benchlib.CACHE = self.work / "cache"

    # -- plumbing ----------------------------------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str):
        line = f"[{time.time() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.out / "suite.log", "a") as handle:
            handle.write(line + "\n")

    def run_task(self, name: str, function):
        budget = BUDGET[name] if not self.toy else 0
        if self.left() < budget:
            self.tasks[name] = f"skipped: {self.left():.0f} s left, it needs ~{budget} s"
            self.log(f"{name}: {self.tasks[name]}")
            return
        self.log(f"{name}: start ({self.left():.0f} s left)")
        benchlib.DEADLINE = self.deadline
        try:
            function()
            self.tasks[name] = "done"
        except subprocess.TimeoutExpired:  # its message is the whole command line: say what happened instead
            self.tasks[name] = "stopped: a run reached the suite's deadline (its finished rows are kept)"
        except Exception as exc:
            self.tasks[name] = f"error: {type(exc).__name__}: {str(exc)[-1500:]}"
            self.log(f"{name}: {traceback.format_exc()[-3000:]}")
        self.log(f"{name}: {self.tasks[name][:200]}")
        self.write()

    def add(self, **row):
        self.rows.append(row)
        self.log(json.dumps({k: v for k, v in row.items() if k != "profile"}))

    def measured_row(self, task: str, who: str, measurement: dict, **fields):
        """A training run's row: speed, memory, FLOPs and MFU, syncs, from bench/measure.py's result."""
        seconds, batch = measurement["seconds_per_step"], fields.get("batch", 1)
        flops, peak = measurement.get("flops_per_step"), self.environment["peak_bf16_flops"]
        profile = measurement.get("profile") or {}
        table = Path(measurement["result_path"]).with_suffix(".profile.txt")
        if table.is_file():
            self.profiles.append(f"==== {task} {who} {fields} ====\n{table.read_text()}")
        self.add(
            task=task,
            who=who,
            **fields,
            seconds_per_step=seconds,
            samples_per_second=batch / seconds,
            peak_allocated=measurement.get("cuda_peak_allocated_bytes") or measurement.get("peak_rss_bytes"),
            peak_reserved=measurement.get("cuda_peak_reserved_bytes"),
            flops_per_step=flops,
            mfu=flops / seconds / peak if flops and peak else None,
            syncs_per_step=profile.get("syncs_per_step"),
            copies_to_host_per_step=profile.get("device_to_host_copies_per_step"),
            wall_seconds=measurement["wall_seconds"],
        )

    def example(self, name: str) -> Path | None:
        path = self.args.examples / name
        return path if path.is_file() else None

    # -- inputs ------------------------------------------------------------------------------------------------

    def model(self) -> Path:
        if self.toy:
            return ROOT / "adapters" / "toy_base"
        return benchlib.build_sd15_random(self.work / "sd15-random")

    def data(self, conditioning: bool = False) -> Path:
        name = f"data-{self.res}" + ("-controlnet" if conditioning else "")
        return benchlib.build_data(self.work / name, 64, self.res, conditioning=conditioning)

    # -- tasks -------------------------------------------------------------------------------------------------

    def lora(self):
        import train_lora

        script = self.example("train_text_to_image_lora.py")
        for batch in [1, 4, 8]:
            run = self.work / f"lora-b{batch}-{int(time.time())}"
            common = (self.model(), self.data(), self.res, batch, self.args.steps, 16, self.precision)
            self.measured_row("lora", "sdtune", train_lora.sdtune_run(*common, run / "sdtune"), batch=batch)
            if script:
                theirs = train_lora.example_run(script, *common, run / "example")
                self.measured_row("lora", "example", theirs, batch=batch)

    def lab(self, variants=("baseline", "math_attention", "channels_last", "fused_adamw", "fp32_base", "compile")):
        result = self.work / f"lab-{int(time.time())}.json"
        model = "toy" if self.toy else "sd15"
        steps = ["--steps", "3", "--warmup", "1"] if self.toy else ["--steps", "10", "--warmup", "3"]
        command = [sys.executable, str(ROOT / "bench" / "step_lab.py"), "--model", model, "--batch", "8", *steps]
        try:
            self.subprocess([*command, "--variants", *variants, "--json", str(result)], "lab")
        finally:  # stopped at the deadline: keep the variants it measured
            for variant in json.loads(result.read_text())["variants"] if result.is_file() else []:
                self.add(task="lab", who="sdtune", **variant)

    def lab_graphs(self):
        self.lab(variants=("baseline", "cudagraphs", "all"))

    def infer(self):
        result = self.work / f"infer-{int(time.time())}.json"
        model = ["--model", "toy", "--steps", "5"] if self.toy else ["--model", "sd15", "--steps", "25"]
        command = [sys.executable, str(ROOT / "bench" / "infer.py"), *model, "--batch", "1", "4"]
        self.subprocess([*command, "--images", "3", "--warmup", "1", "--json", str(result)], "infer")
        for row in json.loads(result.read_text())["rows"]:
            self.add(task="infer", who="sdtune", **row)

    def presets(self):
        import train_dreambooth

        from sdtune.trainers.core.estimate import estimate_run
        from sdtune.trainers.core.recipe import load_recipe

        model, steps = self.model(), max(self.args.steps, 9)
        for preset in PRESETS:
            recipe = ROOT / "recipes" / f"{preset}.yaml"
            run = self.work / f"{preset}-{int(time.time())}"
            overrides = [
                f"base={model}",
                f"train.max_train_steps={steps}",
                "train.lr_warmup_steps=0",
                "train.checkpointing_steps=100000",
                "validation.seeds=[0]",
                "validation.num_inference_steps=5",
                "validation.validation_steps=0",
                "output.report_to=none",
                "output.export_check=false",
                "output.register=false",
                f"output.dir={run / 'out'}",
                "output.overwrite=true",
                *([] if self.cuda else ["train.mixed_precision=no", "train.optimizer=adamw"]),
            ]
            if "dreambooth" in preset:
                instance = train_dreambooth.build_folder(self.work / f"instance-{self.res}", 8, self.res, "purple", 5)
                klass = train_dreambooth.build_folder(self.work / f"class-{self.res}", 16, self.res, "green", 6)
                overrides += [
                    f"data.train_data_dir={instance}",
                    f"method.class_data_dir={klass}",
                    "method.num_class_images=16",
                    "method.extract_lora_rank=null",
                    "method.save_single_file=false",
                ]
            else:
                overrides.append(f"data.train_data_dir={self.data()}")
            if self.toy:
                overrides += ["data.resolution=64", "data.min_bucket_reso=64", "data.bucket_reso_steps=8"]
            trainer = {"lora": "lora", "dreambooth": "dreambooth", "controlnet": "controlnet"}[preset.split("-")[1]]
            measurement = benchlib.measured(
                str(ROOT / "trainers" / f"{trainer}.py"), [str(recipe), *overrides], run / "measure.json", ROOT
            )
            estimate = estimate_run(load_recipe(recipe, overrides), "cuda" if self.cuda else "cpu")
            self.measured_row(
                "presets",
                "sdtune",
                measurement,
                preset=preset,
                target_gib=PRESET_TARGET_GB[preset],
                doctor_estimate=estimate.memory_bytes,
            )

    def gpu_tests(self):
        log = self.out / "pytest-gpu.log"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
        code = self.subprocess(command, "gpu-tests", log=log, check=False)
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        self.add(task="gpu-tests", who="sdtune", exit_code=code, summary=last[0] if last else "")

    def dreambooth(self):
        import train_dreambooth

        folder = self.args.examples if (self.args.examples / "train_dreambooth.py").is_file() else None
        model = self.model()
        instance = train_dreambooth.build_folder(self.work / f"instance-{self.res}", 8, self.res, "purple", 5)
        klass = train_dreambooth.build_folder(self.work / f"class-{self.res}", 16, self.res, "green", 6)
        for mode in ["full", "lora"]:
            settings = train_dreambooth.settings(self.args.model, mode)
            run = self.work / f"dreambooth-{mode}-{int(time.time())}"
            common = (model, instance, klass, self.res, 1, self.args.steps, 16, mode, settings)
            options = {"mode": mode, "batch": 1, **settings}
            self.measured_row("dreambooth", "sdtune", train_dreambooth.sdtune_run(*common, run / "sdtune"), **options)
            if folder:
                theirs = train_dreambooth.example_run(folder, *common, run / "example")
                self.measured_row("dreambooth", "example", theirs, **options)

    def controlnet(self):
        import train_controlnet

        script = self.example("train_controlnet.py")
        precision = "fp16" if self.cuda else "no"
        for batch in [1, 4]:
            run = self.work / f"controlnet-b{batch}-{int(time.time())}"
            common = (self.model(), self.data(conditioning=True), self.res, batch, self.args.steps, precision, {})
            options = {"batch": batch, "precision": precision}
            self.measured_row("controlnet", "sdtune", train_controlnet.sdtune_run(*common, run / "sdtune"), **options)
            if script:
                theirs = train_controlnet.example_run(script, *common, run / "example")
                self.measured_row("controlnet", "example", theirs, **options)

    def subprocess(self, command: list[str], name: str, log: Path | None = None, check: bool = True) -> int:
        log = log or self.work / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SDTUNE_CACHE": str(self.work / "cache")}
        with open(log, "w") as handle:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=max(self.left(), 1)
            )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-3000:]}")
        return proc.returncode

    # -- outputs -----------------------------------------------------------------------------------------------

    def write(self):
        results = {"environment": self.environment, "tasks": self.tasks, "rows": self.rows}
        (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (self.out / "RESULTS-gpu.md").write_text(markdown(results))
        if self.profiles:
            (self.out / "profiles.txt").write_text("\n".join(self.profiles))
        plot(self.rows, self.environment, self.out / "gpu-bench.png")


def environment() -> dict:
    from step_lab import peak_flops

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()}"
    driver = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    libraries = {n: version(n) for n in ["diffusers", "transformers", "accelerate", "peft", "bitsandbytes"]}
    return {
        "device": name,
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "libraries": libraries,
        "peak_bf16_flops": peak_flops(name),
        "command": " ".join(["python3", "bench/gpu_suite.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- Markdown and the plot ------------------------------------------------------------------------------------------


def gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def number(x, digits=4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def percent(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def training_columns(*first):
    """A training run's columns (lora, dreambooth, controlnet rows), after the task's own `first` ones."""
    return [
        *first,
        ("s/step", lambda r: number(r["seconds_per_step"])),
        ("samples/s", lambda r: number(r["samples_per_second"], 2)),
        ("peak alloc GiB", lambda r: gib(r["peak_allocated"])),
        ("peak reserved GiB", lambda r: gib(r["peak_reserved"])),
        ("TFLOP/step", lambda r: number(r["flops_per_step"] and r["flops_per_step"] / 1e12, 3)),
        ("MFU", lambda r: percent(r["mfu"])),
        ("host syncs/step", lambda r: number(r["syncs_per_step"], 1)),
    ]


BATCH, TRAINER = ("batch", lambda r: r["batch"]), ("trainer", lambda r: r["who"])
COLUMNS = {
    # task: [(heading, function of a row)]
    "lora": training_columns(BATCH, TRAINER),
    "lab": [
        ("variant", lambda r: r["variant"]),
        ("s/step", lambda r: number(r.get("seconds_per_step")) or r.get("error", "")[:80]),
        ("MFU", lambda r: percent(r.get("mfu"))),
        ("peak alloc GiB", lambda r: gib(r.get("peak_allocated_bytes"))),
        ("warm-up s (compile)", lambda r: number(r.get("warmup_seconds"), 1)),
    ],
    "infer": [
        BATCH,
        ("configuration", lambda r: r["configuration"]),
        ("s/batch", lambda r: number(r["seconds"])),
        ("it/s", lambda r: number(r["it_per_s"], 2)),
    ],
    "presets": [
        ("preset", lambda r: r["preset"]),
        ("peak alloc GiB", lambda r: gib(r["peak_allocated"])),
        ("peak reserved GiB", lambda r: gib(r["peak_reserved"])),
        ("target GiB", lambda r: r["target_gib"]),
        ("doctor estimate GiB", lambda r: gib(r["doctor_estimate"])),
        (
            "estimate error",
            lambda r: percent(r["doctor_estimate"] / r["peak_reserved"] - 1 if r["peak_reserved"] else None),
        ),
        ("s/step", lambda r: number(r["seconds_per_step"])),
    ],
    "gpu-tests": [("exit code", lambda r: r["exit_code"]), ("pytest", lambda r: r["summary"])],
    "dreambooth": training_columns(
        ("mode", lambda r: r["mode"]),
        TRAINER,
        ("precision, 8-bit Adam, checkpointing", lambda r: f"{r['precision']}, {r['adam8bit']}, {r['checkpointing']}"),
    ),
    "controlnet": training_columns(BATCH, TRAINER, ("precision", lambda r: r["precision"])),
}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"## GPU suite: {env['device']}",
        f"Driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
        + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
        + f". Measured {env['date']} by `{env['command']}`. Dense bf16 peak used for MFU: "
        + (f"{env['peak_bf16_flops'] / 1e12:.0f} TFLOP/s." if env["peak_bf16_flops"] else "unknown for this device."),
        "",
        "Tasks: " + "; ".join(f"{name}: {state}" for name, state in results["tasks"].items()),
    ]
    for task, columns in COLUMNS.items():
        rows = [r for r in results["rows"] if r["task"] == task]
        if not rows:
            continue
        lines += ["", f"### {task}", "", "| " + " | ".join(h for h, _ in columns) + " |"]
        lines.append("| " + " | ".join("---" for _ in columns) + " |")
        lines += ["| " + " | ".join(str(f(r)) for _, f in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], env: dict, path: Path):
    """s/step and peak memory by batch size, sdtune vs the diffusers example (the LoRA task)."""
    lora = [r for r in rows if r["task"] == "lora"]
    if not lora:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for who, marker in (("sdtune", "o"), ("example", "s")):
        mine = sorted((r["batch"], r["seconds_per_step"], r["peak_allocated"]) for r in lora if r["who"] == who)
        if not mine:
            continue
        label = "sdtune" if who == "sdtune" else "diffusers example"
        speed.plot([b for b, _, _ in mine], [s for _, s, _ in mine], marker=marker, label=label)
        memory.plot([b for b, _, _ in mine], [m / 2**30 for _, _, m in mine], marker=marker, label=label)
    speed.set(xlabel="batch size", ylabel="s / step", title="LoRA step time (lower is better)")
    counter = "CUDA peak allocated" if env["cuda"] else "peak RSS"
    memory.set(xlabel="batch size", ylabel=f"{counter}, GiB", title="LoRA peak memory (lower is better)")
    for axes in (speed, memory):
        axes.grid(alpha=0.3)
        axes.legend()
    model = "SD v1-5 (random weights)" if env["model"] == "sd15-random" else "toy base"
    figure.suptitle(f"{model} LoRA rank 16, {env['resolution']} px, {env['device']}, torch {env['torch']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args)
    suite.log(f"suite: {json.dumps(suite.environment)}")
    tasks = {
        "lora": suite.lora,
        "lab": suite.lab,
        "infer": suite.infer,
        "presets": suite.presets,
        "gpu-tests": suite.gpu_tests,
        "dreambooth": suite.dreambooth,
        "controlnet": suite.controlnet,
        "lab-graphs": suite.lab_graphs,
    }
    for name in args.tasks:
        suite.run_task(name, tasks[name])
    suite.write()
    suite.log(f"suite: done, {suite.left():.0f} s of the deadline left")


if __name__ == "__main__":
    main()
