"""The optimizer a recipe names (`train.optimizer_type`, `train.optimizer_args`: sd-scripts' keys), and the weights
that outputs see when the optimizer keeps two sets (schedule-free).

Known names: adamw (torch), adamw8bit (bitsandbytes), adafactor (transformers), prodigy (prodigyopt), lion
(lion-pytorch: torch has none), schedulefree_adamw (schedulefree); anything else installed as `module.ClassName`,
built as sd-scripts does: `Class(params, lr=..., **optimizer_args)`.

Schedule-free AdamW (Defazio et al. 2024, https://arxiv.org/abs/2405.15682) steps at a point y between its iterate z
and the average x of the iterates; x is the model to evaluate and keep. `optimizer.eval()` moves the weights to x,
`optimizer.train()` back to y. The round trip is not exact in floating point, so `outputs_point` keeps y aside and
puts it back bit for bit: a validation grid in the middle of a run leaves the rest of the run as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import re

import torch

from sdtune.trainers.core.recipe import Recipe, RecipeError, TrainConfig

# The class of each known name, and the package to install when it is missing.
KNOWN = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}


def optimizer_class(train: TrainConfig):
    """The class `train.optimizer_type` names (prodigy, lion, schedulefree_adamw, module.ClassName); a missing module
    or class is one line naming the key. Called before the models load, so the mistake shows at once."""
    name = train.optimizer_type
    module_name, class_name, package = KNOWN.get(name, (*name.rsplit(".", 1), None))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        install = f"pip install {package}" if package else "install its package, or fix the module path"
        raise RecipeError(f"train.optimizer_type: {name}: cannot import {module_name} ({exc}); {install}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        found = "is not a torch.optim.Optimizer" if cls is not None else "does not exist"
        raise RecipeError(f"train.optimizer_type: {name}: {module_name}.{class_name} {found}; check the class name")
    return cls


def make_optimizer(param_groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over `param_groups` (each with its lr); `optimizer_args` override the adam_* keys."""
    name, args = train.optimizer_type, dict(train.optimizer_args)
    adam = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if name == "adamw":
        return torch.optim.AdamW(param_groups, **{**adam, "fused": train.fused_optimizer or None, **args})
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RecipeError(
                f"train.optimizer_type: adamw8bit needs bitsandbytes ({exc}); pip install bitsandbytes "
                "or use optimizer_type: adamw"
            ) from None
        return bnb.optim.AdamW8bit(param_groups, **{**adam, **args})
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # With an explicit lr and a diffusers schedule, Adafactor's own relative-step schedule must be off.
        fixed = dict(relative_step=False, scale_parameter=False, warmup_init=False)
        return Adafactor(
            param_groups, **{"lr": train.learning_rate, "weight_decay": train.adam_weight_decay, **fixed, **args}
        )
    cls = optimizer_class(train)
    if name == "prodigy":
        _one_lr_for_prodigy(param_groups)
    if name in ("prodigy", "schedulefree_adamw"):  # Adam-like: the adam_* keys apply
        extra = {"warmup_steps": train.lr_warmup_steps} if name == "schedulefree_adamw" else {}
        optimizer = cls(param_groups, **{**adam, **extra, **args})
    elif name == "lion":  # one momentum, its own betas (0.9, 0.99); decoupled weight decay as AdamW
        optimizer = cls(param_groups, **{"lr": train.learning_rate, "weight_decay": train.adam_weight_decay, **args})
    else:  # the free form, as sd-scripts builds it
        optimizer = _free_form(cls, param_groups, train, args)
    if is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers start in neither mode; a step needs train mode
    return optimizer


def _one_lr_for_prodigy(param_groups: list[dict]):
    """prodigyopt takes one lr (or 0) for every group and raises at the first step otherwise: name the keys now."""
    lrs = sorted({group["lr"] for group in param_groups} - {0.0})
    if len(lrs) > 1:
        raise RecipeError(
            f"train.optimizer_type: prodigy takes one lr for every parameter group, got {', '.join(f'{x:g}' for x in lrs)}"
            " (method.unet_lr / text_encoder_lr or the block lr weights); use one lr (block weights 0 or 1) or "
            "another optimizer"
        )


def _free_form(cls, param_groups, train: TrainConfig, args: dict):
    try:
        return cls(param_groups, **{"lr": train.learning_rate, **args})
    except TypeError as exc:  # an argument the class does not take
        raise RecipeError(f"train.optimizer_args: {train.optimizer_type} refused them ({exc})") from None


def is_schedule_free(optimizer) -> bool:
    """Whether the optimizer keeps a train point and an eval point (schedulefree's classes, any free-form one too)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


@contextlib.contextmanager
def outputs_point(optimizer, params: list[torch.nn.Parameter]):
    """The weights to save or render: a schedule-free optimizer's averaged point x for the block, then its training
    point y exactly as it was (kept aside: eval() then train() would round it). Others: the weights as they are."""
    if optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)


def optimizer_notes(recipe: Recipe) -> list[str]:
    """Preflight warnings where a recipe contradicts what its optimizer expects."""
    train, method = recipe.train, recipe.method
    notes = []
    if train.optimizer_type == "prodigy":
        lrs = {"train.learning_rate": train.learning_rate}
        for key in ("unet_lr", "text_encoder_lr"):
            if getattr(method, key, None) is not None:
                lrs[f"method.{key}"] = getattr(method, key)
        off = [f"{key} is {value:g}" for key, value in lrs.items() if value != 1.0]
        if off:
            notes.append(
                f"warning: prodigy finds its own step size and scales it by the lr: keep the lr at 1.0 ({', '.join(off)})"
            )
        if train.lr_warmup_steps:
            notes.append(
                f"warning: prodigy needs no warmup (its estimate starts small): train.lr_warmup_steps is "
                f"{train.lr_warmup_steps}, set 0"
            )
    return notes


# -- block-wise learning rates ----------------------------------------------------------------------------------------

# A UNet parameter's block as SD v1-5's original layout numbers them (diffusers' names: down_blocks.i.attentions.j):
# input block 1 + 3i + j (j = 2: the downsampler), the middle block, output block 3i + j (j = 2: the upsampler too).
_UPDOWN = re.compile(r"(?:^|\.)(up|down)_blocks\.(\d+)\.(resnets|attentions|upsamplers|downsamplers)\.(\d+)\.")
_MID = re.compile(r"(?:^|\.)mid_block\.")


def block_lr_weight(method, name: str) -> float:
    """The lr weight of UNet parameter `name` from `method`'s down/mid/up_lr_weight, as sd-scripts' LoRA network
    args weigh its modules: 1 outside the blocks (conv_in, time embedding, conv_out) and where a side is unset."""
    found = _UPDOWN.search(name)
    if found:
        side, i, kind, j = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
        index = 3 * i + (2 if kind.endswith("samplers") else j) + (1 if side == "down" else 0)
        weights = method.down_lr_weight if side == "down" else method.up_lr_weight
        if weights is None:
            return 1.0
        return weights if not isinstance(weights, list) else weights[index] if index < len(weights) else 1.0
    if _MID.search(name) and method.mid_lr_weight is not None:
        return method.mid_lr_weight
    return 1.0


def has_block_weights(method) -> bool:
    return any(getattr(method, key, None) is not None for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))


def param_groups(module: torch.nn.Module, lr: float, method=None) -> list[dict]:
    """The optimizer's parameter groups for one trained model at `lr`: one group, or with block weights one group
    per weight at lr x weight. A block of weight 0 is frozen (requires_grad off: no gradient, no update, no state)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if method is None or not has_block_weights(method):
        return [{"params": [p for _, p in named], "lr": lr}]
    by_weight: dict[float, list] = {}
    for name, param in named:
        by_weight.setdefault(block_lr_weight(method, name), []).append(param)
    for param in by_weight.pop(0.0, []):
        param.requires_grad_(False)
    return [{"params": params, "lr": lr * weight} for weight, params in by_weight.items()]
