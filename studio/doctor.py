"""`sdtune doctor`: what this machine can train, and which shipped recipes fit in its memory."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import torch

from sdtune.adapters.base import resolve_base
from sdtune.studio import jobs, threads
from sdtune.studio.versions import versions_section
from sdtune.trainers.core.estimate import GB, estimate_run, size_text
from sdtune.trainers.core.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _bitsandbytes_status(device: str) -> str:
    """Imports bitsandbytes and takes one 8-bit AdamW step on `device`: the only honest test that it works."""
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.ones(4096, device=device))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
        return f"ok ({bnb.__version__}, 8-bit AdamW steps on {device})"
    except Exception as exc:  # any failure means: do not pick adamw8bit here
        return f"NOT usable on {device}: {str(exc).splitlines()[0][:120]} -> use optimizer_type: adamw"


def _sdpa_status(device: str) -> str:
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "missing (torch too old)"
    if device != "cuda":
        return "ok (math kernel on CPU)"
    flags = [
        name
        for name, on in (
            ("flash", torch.backends.cuda.flash_sdp_enabled()),
            ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
        )
        if on
    ]
    return "ok (" + ", ".join(flags or ["math only"]) + ")"


def _bf16_status(device: str) -> str:
    if device != "cuda":
        return "CPU autocast only (slow on most CPUs): train with mixed_precision: no"
    return "yes" if torch.cuda.is_bf16_supported() else "no: use mixed_precision: fp16"


def _memory_budget(device: str) -> tuple[float, str]:
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total, f"{torch.cuda.get_device_name(0)}, {total / GB:.1f} GB ({free / GB:.1f} GB free)"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages, f"no GPU; {pages / GB:.1f} GB RAM, {os.cpu_count()} CPU cores"


def _threads_lines() -> list[str]:
    """CPU threads per trainer and per render, from the live workers' concurrency (1 when none runs)."""
    workers = jobs.workers() if (jobs.sdtune_home() / jobs.DB_FILE).is_file() else []
    concurrency = max([w["concurrency"] for w in workers], default=1)
    return threads.report_lines(concurrency, threads.busy_threads())


def recipe_fit_lines(device: str, budget: float) -> list[str]:
    lines = []
    for path in sorted(RECIPES.glob("*.yaml")):
        try:
            recipe = load_recipe(path)
            estimate = estimate_run(recipe, device=device)
        except (RecipeError, OSError, ValueError) as exc:
            lines.append(f"  {path.name:34s} cannot estimate: {exc}")
            continue
        if device != "cuda" and resolve_base(recipe.base).kind != "toy":
            verdict = "needs a CUDA GPU (SD v1-5 on a CPU would take days)"
        elif estimate.memory_bytes <= budget * 0.95:
            verdict = "fits"
        else:
            verdict = "too big"
        lines.append(f"  {path.name:34s} ~{size_text(estimate.memory_bytes):>7s}  {verdict}")
    return lines or [f"  (no recipes found in {RECIPES})"]


def doctor_report() -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget, memory_text = _memory_budget(device)
    disk = shutil.disk_usage(Path.cwd())
    cuda = f"yes, CUDA {torch.version.cuda}" if device == "cuda" else "no (training runs on the CPU: toy base only)"
    lines = [
        "sdtune doctor",
        f"  python        {platform.python_version()} ({platform.machine()})",
        f"  torch         {torch.__version__}",
        f"  CUDA          {cuda}",
        f"  device        {memory_text}",
        f"  bitsandbytes  {_bitsandbytes_status(device)}",
        f"  SDPA          {_sdpa_status(device)}",
        f"  bf16          {_bf16_status(device)}",
        f"  free disk     {disk.free / GB:.1f} GB in {Path.cwd()}",
        *_threads_lines(),
        f"Shipped recipes vs this machine's {'GPU' if device == 'cuda' else 'RAM'} ({budget / GB:.1f} GB):",
    ]
    return "\n".join(lines + recipe_fit_lines(device, budget) + versions_section())
