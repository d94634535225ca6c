"""An exponential moving average of the trained weights, for every method (`method.use_ema` and its keys).

The EMA (diffusers' `EMAModel`) keeps shadow weights s <- d s + (1 - d) w after each optimizer step, d the decay
(`ema_decay`, or with `ema_warmup` 1 - (1 + step / ema_inv_gamma)^-ema_power capped at it). Averaging the last
~1 / (1 - d) steps smooths the noise of single steps out of what is saved. It is registered with the checkpoints
(shadow weights and its step count), so a resumed run continues the same average; the exported files and, with
`ema_validation`, the validation grids are the EMA weights.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.training_utils import EMAModel


class RunEma(EMAModel):
    """`EMAModel` whose shadow weights go back to the device of the weights it follows when a checkpoint is loaded
    (Accelerate loads custom state on the CPU; the EMA then steps against the device's weights)."""

    def __init__(self, params: list[torch.nn.Parameter], **kwargs):
        super().__init__(params, **kwargs)
        self.device = params[0].device if params else torch.device("cpu")

    def load_state_dict(self, state_dict: dict):
        super().load_state_dict(state_dict)
        self.to(device=self.device)


def make_ema(method, params: list[torch.nn.Parameter]) -> RunEma | None:
    """The run's EMA over `params` from the method's EMA keys, or None when `use_ema` is off."""
    if not getattr(method, "use_ema", False):
        return None
    return RunEma(
        params,
        decay=method.ema_decay,
        use_ema_warmup=method.ema_warmup,
        inv_gamma=method.ema_inv_gamma,
        power=method.ema_power,
        update_after_step=method.ema_update_after_step,
    )


@contextlib.contextmanager
def ema_weights(ema: RunEma | None, params: list[torch.nn.Parameter]):
    """The EMA weights in the model for the block (a save, a grid), then the training weights back, exactly."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
