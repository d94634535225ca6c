"""Runs a training script in this process and measures it the same way whatever the script is.

Usage:
    python bench/measure.py RESULT.json [--flops-step N] [--profile-steps N] [--baton IN,OUT] -- train_script.py [args...]

Every optimizer step is timestamped through torch's global optimizer step hook, so sdtune's trainer and diffusers'
example are timed by identical code. On a GPU the stamp is a CUDA event recorded on the stream, not a synchronize:
the measurement adds no host sync of its own, and the intervals are those of the GPU's timeline. At exit
RESULT.json holds the median seconds per step after warm-up, the wall time, the CUDA peak allocated and reserved
memory, and the process's peak RSS.

--flops-step N counts the FLOPs of one whole optimizer step (the interval after step N: forward, backward,
optimizer) with torch.utils.flop_counter.FlopCounterMode, on the script's own step; that interval is left out of
the timing. With the GPU's dense bf16 peak this gives MFU (bench/gpu_suite.py).
--profile-steps N profiles N steps (after the FLOPs step) with torch.profiler and records the host syncs per step
(cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize and device-to-host copies) and the top
kernels in RESULT.profile.txt; those intervals are left out of the timing too.
--baton IN,OUT takes turns with other runs (benchlib.measured_in_turns, `bench/train_lora.py --interleave`): after
each optimizer step it writes a byte to file descriptor OUT and waits for one on IN, and the clock restarts when the
turn comes back, so an interval is this run's step alone while the others are paused (on a GPU the step's kernels are
waited for before the turn passes: one synchronize per step, in this mode only).

If torchvision cannot be imported (there is no CPU build of it for every torch), a minimal stand-in for the
handful of `torchvision.transforms` the diffusers example uses is installed first (bench/torchvision_shim.py):
image preprocessing only, outside the timed GPU/CPU work of a step. Likewise, if wandb is not installed, an empty
module stands in for it: diffusers' DPO example imports it at the top, and uses it only with --report_to=wandb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import sys
import time
from pathlib import Path

WARMUP_STEPS = 3
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def parse_args(argv):
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--flops-step", type=int, default=0, help="Count the FLOPs of the step after step N (0: off).")
    parser.add_argument("--profile-steps", type=int, default=0, help="Profile this many steps after the FLOPs step.")
    parser.add_argument(
        "--baton", default=None, metavar="IN,OUT", help="Take turns: file descriptors to wait/pass on."
    )
    args = parser.parse_args(argv[:split])
    if len(argv) <= split + 1:
        raise SystemExit(__doc__)
    args.script, args.script_args = argv[split + 1], argv[split + 2 :]
    return args


def install_torchvision_shim_if_needed() -> bool:
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        # the libraries record at import time that torchvision is absent; only the script's own import sees the shim
        import diffusers  # noqa: F401
        import transformers.utils.import_utils  # noqa: F401

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torchvision_shim

        torchvision_shim.install()
        return True


def install_wandb_stand_in_if_needed() -> bool:
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("wandb") is not None:
        return False
    module = types.ModuleType("wandb")  # no attribute: any use (only --report_to=wandb) fails by name
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries' availability checks read it
    sys.modules["wandb"] = module
    return True


class StepClock:
    """Stamps each optimizer step (CUDA events on a GPU, perf_counter on the CPU), counts one step's FLOPs and
    profiles a few steps, at the step numbers asked for."""

    def __init__(self, flops_step: int, profile_steps: int, baton: tuple[int, int] | None = None):
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        from benchlib import StepTimer  # this folder is on sys.path: the script runs as bench/measure.py

        self.timer = StepTimer(self.cuda)
        self.flops_step, self.profile_steps = flops_step, profile_steps
        self.profile_from = flops_step + 1 if flops_step else WARMUP_STEPS + 2
        self.flop_counter, self.flops, self.profiler = None, None, None
        self.excluded: set[int] = set()  # intervals (index of their first stamp) disturbed by counting or profiling
        self.baton = baton

    def __call__(self, optimizer, args, kwargs):
        torch = self.torch
        self.timer.mark()
        step = len(self.timer.marks)
        if self.flop_counter is not None:  # the counted step has just ended
            self.flop_counter.__exit__(None, None, None)
            self.flops, self.flop_counter = self.flop_counter.get_total_flops(), None
        if self.flops_step and step == self.flops_step:
            from torch.utils.flop_counter import FlopCounterMode

            self.flop_counter = FlopCounterMode(display=False)
            self.flop_counter.__enter__()
            self.excluded.add(step - 1)
        if self.profile_steps and step == self.profile_from + self.profile_steps:
            self.profiler.__exit__(None, None, None)
        if self.profile_steps and step == self.profile_from:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        if self.profile_steps and self.profile_from <= step < self.profile_from + self.profile_steps:
            self.excluded.add(step - 1)
        if self.baton is not None:
            self.take_turns()

    def take_turns(self):
        """Hands the turn to the conductor and waits for it to come back; the next interval starts then."""
        if self.cuda:  # this step's kernels end before another run's begin
            self.torch.cuda.synchronize()
        wait_on, pass_on = self.baton
        os.write(pass_on, b".")
        if not os.read(wait_on, 1):
            raise SystemExit("measure.py --baton: the conductor is gone")
        self.timer.resume()

    def seconds_per_step(self) -> tuple[float | None, list[float]]:
        intervals = self.timer.intervals()
        kept = [t for i, t in enumerate(intervals) if i >= WARMUP_STEPS and i not in self.excluded]
        return (statistics.median(kept) if kept else None), intervals

    def profile_summary(self, path: Path) -> dict | None:
        """Host syncs per profiled step, and the top kernels by GPU time (written beside the result)."""
        if self.profiler is None or len(self.timer.marks) < self.profile_from + self.profile_steps:
            return None
        events = self.profiler.key_averages()
        syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
        copies_to_host = sum(e.count for e in events if "DtoH" in e.key or "Device -> Pageable" in e.key)
        sort_by = "cuda_time_total" if self.cuda else "cpu_time_total"
        path.write_text(events.table(sort_by=sort_by, row_limit=25))
        return {
            "steps": self.profile_steps,
            "syncs": syncs,
            "syncs_per_step": sum(syncs.values()) / self.profile_steps,
            "device_to_host_copies_per_step": copies_to_host / self.profile_steps,
            "table": path.name,
        }


def main():
    args = parse_args(sys.argv[1:])
    import torch

    shim = install_torchvision_shim_if_needed()
    install_wandb_stand_in_if_needed()
    baton = tuple(int(fd) for fd in args.baton.split(",")) if args.baton else None
    clock = StepClock(args.flops_step, args.profile_steps, baton)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, exit_code = time.perf_counter(), 0
    sys.argv = [args.script, *args.script_args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - start
    seconds, intervals = clock.seconds_per_step()
    cuda = torch.cuda.is_available()
    result = {
        "script": args.script,
        "args": args.script_args,
        "exit_code": exit_code,
        "steps": len(clock.timer.marks),
        "seconds_per_step": seconds,
        "wall_seconds": wall,
        "flops_per_step": clock.flops,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "profile": clock.profile_summary(args.result.with_suffix(".profile.txt")),
        "torchvision_shim": shim,
        "step_intervals": intervals,
        "step_cpu_intervals": clock.timer.cpu_intervals(),  # on the CPU: the process's CPU time of each step
        "warmup_steps": WARMUP_STEPS,
        "in_turns": baton is not None,  # --baton: each interval is this run's step alone, the others paused
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
