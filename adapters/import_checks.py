"""What an import checks and reports: the report, the refusal, and the checks of a LoRA (LoHa, LoKr), a ControlNet or
a full model against the base it is imported for (adapters/importer.py runs them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtune.adapters.base import PICKLE_SUFFIXES, resolve_base
from sdtune.adapters.errors import SdtuneError


class ImportRefused(SdtuneError, ValueError):
    """A file that is not imported: unreadable, a pickle, an unsupported format or a LoRA for another model."""


@dataclass
class ImportReport:
    """What the checks found. `ok` means every module matched a layer of the base with the right shape."""

    source: str
    format: str  # peft, kohya, controlnet, dreambooth
    detail: str  # e.g. "LoRA, attention only" / "LoCon (conv layers too)" / "single file"
    base: str
    modules: int = 0
    matched: int = 0
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # block -> modules with no layer in the base
    shape_mismatches: dict[str, str] = field(default_factory=dict)
    claimed_base: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.shape_mismatches

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = f"{self.source}: {self.format} ({self.detail}), {self.matched}/{self.modules} modules match {self.base}"
        lines = [head]
        for block, names in self.unmatched.items():
            lines.append(
                f"  unmatched in {block}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        for name, problem in list(self.shape_mismatches.items())[:5]:
            lines.append(f"  shape: {name}: {problem}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# -- validating a LoRA against a base --------------------------------------------------------------------------------

_BLOCK = re.compile(r"(down_blocks_\d+|mid_block|up_blocks_\d+|encoder_layers_\d+|conv_in|conv_out|time_embedding)")


def block_of(kohya_module: str) -> str:
    """`unet down_blocks.0`, `text_encoder layers.3`...: how unmatched modules are grouped in the report."""
    component = "text_encoder" if kohya_module.startswith("lora_te") else "unet"
    match = _BLOCK.search(kohya_module)
    block = match[1] if match else kohya_module.split("_", 3)[-1]
    block = re.sub(r"_(\d+)$", r".\1", block).replace("encoder_layers", "layers")
    return f"{component} {block}"


def check_lora(modules, table, report: ImportReport) -> None:
    """Every module names a layer of the base (`table`) and fits its shape: LoRA modules, or LoHa/LoKr ones."""
    from sdtune.adapters import lora_modules, lycoris

    report.modules = len(modules)
    for name, module in sorted(modules.items()):
        base_module = table.get(name)
        fits = lycoris.shape_problem if isinstance(module, lycoris.LycorisModule) else lora_modules.shape_problem
        if base_module is None:
            report.unmatched.setdefault(block_of(name), []).append(name)
        elif problem := fits(module, base_module):
            report.shape_mismatches[name] = problem
        else:
            report.matched += 1


def check_controlnet(shapes: Mapping[str, tuple], expected: Mapping[str, tuple], report: ImportReport) -> None:
    """Every tensor a ControlNet of the base has, at its shape, and nothing else: a ControlNet steers through the
    base's own blocks, so one made for another UNet (SDXL, SD 2) cannot load."""
    report.modules = len(expected)
    for name, shape in expected.items():
        found = shapes.get(name)
        if found is None:
            report.unmatched.setdefault(f"missing: {name.split('.')[0]}", []).append(name)
        elif tuple(found) != tuple(shape):
            report.shape_mismatches[name] = f"{tuple(found)} in the file, {tuple(shape)} in a ControlNet of this base"
        else:
            report.matched += 1
    for name in sorted(set(shapes) - set(expected)):
        report.unmatched.setdefault(f"not in a ControlNet of this base: {name.split('.')[0]}", []).append(name)


ARCHITECTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                     "attention_head_dim", "down_block_types", "up_block_types")  # fmt: skip


def check_architecture(folder: Path, base: str, report: ImportReport) -> None:
    """A full model (diffusers folder) has the base's UNet architecture: it is used wherever the base is, with the
    base's LoRAs and ControlNets, so an SD 2 or SDXL folder (other text width, other blocks) does not fit."""
    expected = _base_unet_config(base)
    config_file = folder / "unet" / "config.json"
    if not config_file.is_file():
        raise ImportRefused(f"{folder}: a diffusers model without unet/config.json; is it a Stable Diffusion model?")
    found = json.loads(config_file.read_text())
    levels = len(expected["block_out_channels"])

    def per_level(value):  # attention_head_dim may be one number or one per block level
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    report.modules = len(ARCHITECTURE_KEYS)
    for key in ARCHITECTURE_KEYS:
        want, got = expected.get(key), found.get(key)
        if want is not None and got is not None and per_level(want) != per_level(got):
            report.shape_mismatches[f"unet.{key}"] = f"{got} in the model, {want} in {base}"
        else:
            report.matched += 1


def _base_unet_config(base: str) -> dict:
    """The base UNet's config: read from the folder (toy, local diffusers folder), else from the loaded base."""
    from diffusers import UNet2DConditionModel

    source = resolve_base(base)
    if source.kind in ("toy", "folder"):
        return dict(UNet2DConditionModel.load_config(str(Path(source.location) / "unet")))
    from sdtune.adapters.base import load_pipeline

    return dict(load_pipeline(base).unet.config)


def controlnet_shapes(base: str) -> tuple[dict[str, tuple], dict]:
    """The tensors (name -> shape) and config of the ControlNet `base` takes: diffusers' `ControlNetModel.from_unet`
    of the base UNet, built on the meta device (no weights, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_base_unet_config(base))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return {k: tuple(v.shape) for k, v in controlnet.state_dict().items()}, dict(controlnet.config)


def folder_shapes(folder: Path) -> dict[str, tuple]:
    """name -> shape of a diffusers model folder's safetensors weights, read from the headers only."""
    import safetensors

    files = sorted(folder.glob("*.safetensors"))
    preferred = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"]
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise ImportRefused(
            f"{folder}: no .safetensors weights"
            + (f" (only {', '.join(pickled)}: pickle files run code when loaded; convert them)" if pickled else "")
        )
    shapes = {}
    for file in preferred or files[:1]:
        with safetensors.safe_open(str(file), "pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes
