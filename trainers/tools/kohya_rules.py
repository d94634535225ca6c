"""The rules of `sdtune recipe from-kohya`'s key table (`kohya_keys.py`), and the converters its values go through.

A rule is one of three kinds:
    Map(("train.learning_rate",), float)   the sdtune key(s) it means, first one the recipe schema has wins, and a
                                           converter when the value changes form; a key the schema lacks (a feature
                                           still to land) is reported "not supported" until it exists
    Ignore("why")                           no effect in sdtune (attention kernels, data-loader workers, ...)
    Unsupported("why")                      changes training, and sdtune cannot do it (yet)

A converter returns the value as the recipe takes it, raises `Skip` to list the key instead, or raises ValueError
for a value that cannot mean anything. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Skip(Exception):  # noqa: N818 - an outcome, not an error: the key goes to a report list
    """Raised by a converter: this value is not mapped. `kind` is "ignored" or "not supported"."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


@dataclass(frozen=True)
class Map:
    to: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None
    note: str = ""  # why the value changes form, written beside the key in the recipe


@dataclass(frozen=True)
class Ignore:
    why: str


@dataclass(frozen=True)
class Unsupported:
    why: str


Rule = Map | Ignore | Unsupported


# -- value converters: GUI presets hold numbers as strings ("0.0001", "1234"); a bad one names itself --------------


def to_bool(value):
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def to_int(value):
    number = float(value)
    if number != int(number):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def to_float(value):
    return float(value)


def first_float(value):
    """sd-scripts takes `text_encoder_lr` as a list (one per text encoder); SD v1-5 has one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise Skip("not supported", "one learning rate per text encoder; SD v1-5 has one")
        value = value[0]
    return float(value)


def resolution(value):
    """`512`, `"512"`, `"512,512"` or `[512, 512]`: sdtune trains at one square area (buckets of ~resolution^2)."""
    parts = value if isinstance(value, list) else str(value).replace("x", ",").split(",")
    sides = [to_int(p) for p in parts if str(p).strip()]
    if len(set(sides)) != 1:
        raise Skip("not supported", f"{value!r} is not square; sdtune trains at one size: set data.resolution")
    return sides[0]


def precision(value):
    names = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    if str(value) not in names:
        raise ValueError(f"expected float, fp16 or bf16, got {value!r}")
    return names[str(value)]


def mixed_precision(value):
    if str(value) not in ("no", "fp16", "bf16"):
        raise Skip("not supported", f"{value!r}: sdtune takes no, fp16 or bf16")
    return str(value)


# sd-scripts' optimizer_type names (case-insensitive there) -> sdtune's train.optimizer values. A value sdtune does
# not have yet fails the schema check and is reported "not supported" until it lands.
OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "adafactor": "adafactor",
    "lion": "lion",
    "prodigy": "prodigy",
    "adamwschedulefree": "schedulefree_adamw",
    "schedulefree_adamw": "schedulefree_adamw",
}


def optimizer(value):
    name = str(value).strip()
    if name.lower() in OPTIMIZERS:
        return OPTIMIZERS[name.lower()]
    if "." in name:  # sd-scripts' free form, `module.ClassName`
        return name
    raise Skip("not supported", f"optimizer {name!r}: sdtune has {', '.join(sorted(set(OPTIMIZERS.values())))}")


def sampler(value):
    names = {"ddim": "ddim", "euler": "euler", "euler_a": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a",
             "pndm": "pndm", "dpmsolver++": "dpm++2m", "k_dpm_2": None}  # fmt: skip
    if names.get(str(value).lower()) is None:
        raise Skip("not supported", f"sampler {value!r}: sdtune samples with ddim, euler, euler_a, dpm++2m or pndm")
    return names[str(value).lower()]


def report_to(value):
    if str(value) not in ("tensorboard", "wandb", "all"):
        raise Skip("not supported", f"{value!r}: sdtune reports to tensorboard, wandb or all (both)")
    return str(value)


def block_weights(value):
    """`down_lr_weight`: one number or a comma list (one per block), as sd-scripts' LoRA network args."""
    numbers = [float(p) for p in str(value).split(",") if p.strip()]
    return numbers[0] if len(numbers) == 1 else numbers


def clip_skip(value):
    """sd-scripts' clip_skip 1 is the text encoder's last layer with its final norm, every preset's and what sdtune
    does; another count maps to train.clip_skip (reported "not supported" while the schema lacks it)."""
    count = to_int(value)
    if count == 1:
        raise Skip("ignored", "1: the text encoder's last layer, which sdtune uses")
    return count


def only_off(why: str):
    """A flag sdtune cannot honour when on; off it changes nothing."""

    def convert(value):
        if to_bool(value):
            raise Skip("not supported", why)
        raise Skip("ignored", "off, as in sdtune")

    return convert


def only_if(expected, why: str):
    """A setting whose one value (kohya's default) is what sdtune always does; any other is not supported."""

    def convert(value):
        if str(value) == str(expected):
            raise Skip("ignored", f"{expected} is what sdtune does")
        raise Skip("not supported", why)

    return convert
