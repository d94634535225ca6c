"""Runs a training script in this process and measures it the same way whatever the script is.

Usage:
    python bench/measure.py RESULT.json -- path/to/train_script.py [its arguments...]

Every optimizer step is timestamped through torch's global optimizer step hook (after a CUDA synchronize), so
sdtune's trainer and diffusers' example are timed by identical code. At exit RESULT.json holds the step
timestamps, the median seconds per step after warm-up, the wall time, the CUDA peak allocated memory, and the
process's peak RSS.

If torchvision cannot be imported (there is no CPU build of it for every torch), a minimal stand-in for the
handful of `torchvision.transforms` the diffusers example uses is installed first (bench/torchvision_shim.py):
image preprocessing only, outside the timed GPU/CPU work of a step.
"""

from __future__ import annotations

import json
import resource
import runpy
import statistics
import sys
import time
from pathlib import Path

WARMUP_STEPS = 3


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    result_path, script, script_args = Path(sys.argv[1]), sys.argv[3], sys.argv[4:]
    import torch

    try:
        import torchvision  # noqa: F401

        shim = False
    except Exception:
        # the libraries record at import time that torchvision is absent; only the script's own import sees the shim
        import diffusers  # noqa: F401
        import transformers.utils.import_utils  # noqa: F401

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torchvision_shim

        torchvision_shim.install()
        shim = True

    stamps: list[float] = []

    def on_step(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(on_step)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, exit_code = time.perf_counter(), 0
    sys.argv = [script, *script_args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    wall = time.perf_counter() - start
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP_STEPS:]
    result = {
        "script": script,
        "args": script_args,
        "exit_code": exit_code,
        "steps": len(stamps),
        "seconds_per_step": statistics.median(intervals) if intervals else None,
        "wall_seconds": wall,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torchvision_shim": shim,
        "step_timestamps": stamps,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
