"""The samplers `sdtune sample`, validation and recipes can name: one table, no torch import.

Recipes validate `validation.scheduler` against `SCHEDULER_NAMES` and the CLI offers them as choices, so this table
is the only place a sampler is spelled. `default` keeps the base's own scheduler.
"""

from __future__ import annotations

from typing import Literal

# name -> (diffusers scheduler class, extra config over the base's, A1111 sampler name for PNG parameters)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PNDM"),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)
SchedulerName = Literal[SCHEDULER_NAMES]  # the recipe field's type, built from the same table


def a1111_sampler_name(name: str, scheduler_class: str | None = None) -> str:
    """The sampler as A1111 writes it in a PNG's parameters; for `default`, the name of the base's own scheduler
    class when the table knows it (SD v1-5's PNDM), else "Default"."""
    if name in SCHEDULERS:
        return SCHEDULERS[name][2]
    by_class = {cls: a1111 for cls, _, a1111 in SCHEDULERS.values()}
    return by_class.get(scheduler_class, "Default")
