"""A LoRA as plain modules: {kohya module name: (down, up, alpha)}; adapters/lora_files.py reads and writes them.

The kohya name (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`) is the
key because it is what every tool agrees on and what merges in sd-scripts work on. Going back to peft module paths
needs the base: "_" -> "." is ambiguous (`to_out_0` is `to_out.0`, `transformer_blocks` is one word), so
`module_table` lists the base's own weights under their kohya names, with their shapes, the way ComfyUI builds its
key map. The same table validates an imported file (key coverage and shapes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters import kohya

_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class LoraModule:
    """One adapted layer: W' = W + (alpha / rank) * up @ down (for a conv, down is the k x k conv, up a 1x1)."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to(self, dtype: torch.dtype) -> LoraModule:
        return LoraModule(self.down.to(dtype), self.up.to(dtype), self.alpha)

    def delta(self) -> torch.Tensor:
        """The weight change it makes, in float32, shaped like the layer's weight ([out, in] or [out, in, kh, kw])."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        return self.scale * product.reshape(up.shape[0], *down.shape[1:])


LoraModules = dict[str, LoraModule]


def read_kohya(state_dict: Mapping[str, torch.Tensor]) -> LoraModules:
    """kohya tensors -> modules. A missing `.alpha` means alpha = rank (kohya's default, scale 1).

    `lora_te1_` (what diffusers' own kohya converter writes for SD v1) is read as `lora_te_` when no `lora_te2_`
    is present, so a file from that converter imports under the names A1111 uses.
    """
    sdxl = any(key.startswith("lora_te2_") for key in state_dict)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.startswith("bundle_emb."):  # an embedding bundled with the LoRA (pivotal tuning), not a module
            continue
        module, _, part = key.partition(".")
        if part not in _PARTS:
            raise kohya.LoraFormatError(
                f"kohya LoRA key {key!r}: expected <module>.lora_down.weight / .lora_up.weight / .alpha"
            )
        if module.startswith("lora_te1_") and not sdxl:
            module = "lora_te_" + module.removeprefix("lora_te1_")
        grouped.setdefault(module, {})[part] = tensor
    modules = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise kohya.LoraFormatError(f"kohya LoRA module {name!r} needs both lora_down.weight and lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        modules[name] = LoraModule(down, up, alpha)
    return modules


def read_peft(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> LoraModules:
    """A diffusers/PEFT file (`unet.` / `text_encoder.` keys, LoraConfig in the header) -> modules, true alphas."""
    unet, text_encoder = kohya.split_diffusers_lora(state_dict)
    configs = kohya.lora_configs_from_diffusers_metadata(metadata)
    unet_alpha = kohya.kohya_alphas_from_lora_config(configs["unet"], _module_paths(unet))
    te_alpha = None
    if text_encoder:
        te_alpha = kohya.kohya_alphas_from_lora_config(configs["text_encoder"], _module_paths(text_encoder))
    return read_kohya(kohya.peft_to_kohya(unet, text_encoder, unet_alpha=unet_alpha, text_encoder_alpha=te_alpha))


def _module_paths(peft_state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    return {key.rsplit(".", 2)[0] for key in peft_state_dict}  # strip ".lora_A.weight" / ".lora_B.weight"


def to_kohya(modules: LoraModules) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in sorted(modules.items()):
        tensors[f"{name}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


# -- the base's modules under kohya names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModule:
    component: str  # unet or text_encoder
    path: str  # peft module path inside the component, e.g. down_blocks.0.attentions.0.proj_in
    shape: tuple[int, ...]  # the layer's weight shape


def module_table(unet_shapes: Mapping[str, tuple], text_encoder_shapes: Mapping[str, tuple]) -> dict[str, BaseModule]:
    """{kohya module name: BaseModule} for every Linear/Conv weight of the base's UNet and CLIP text encoder.

    Args:
        unet_shapes / text_encoder_shapes: state-dict key -> shape (`{k: tuple(v.shape) for k, v in sd.items()}`);
            text-encoder keys with or without the `text_model.` level (transformers 5 dropped it).
    """
    table = {}
    for component, shapes, prefix in (
        ("unet", unet_shapes, kohya.UNET_PREFIX),
        ("text_encoder", text_encoder_shapes, kohya.TEXT_ENCODER_PREFIX),
    ):
        for key, shape in shapes.items():
            if not key.endswith(".weight") or len(shape) not in (2, 4):
                continue
            path = key.removesuffix(".weight")
            named = path if component == "unet" or path.startswith("text_model.") else f"text_model.{path}"
            table[prefix + named.replace(".", "_")] = BaseModule(component, path, tuple(shape))
    return table


def base_shapes(pipe_or_folder) -> tuple[dict, dict]:
    """UNet and text-encoder weight shapes of a loaded pipeline, or of a diffusers folder read without its weights
    (the models are built from their configs on the meta device)."""
    if not isinstance(pipe_or_folder, (str, Path)):
        pipe = pipe_or_folder
        return _shapes(pipe.unet), _shapes(pipe.text_encoder)
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(pipe_or_folder)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return _shapes(unet), _shapes(text_encoder)


def _shapes(model) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def shape_problem(module: LoraModule, base: BaseModule) -> str | None:
    """Why a LoRA module does not fit its base layer, or None."""
    down, up = tuple(module.down.shape), tuple(module.up.shape)
    want_in = base.shape[1:]
    if up[0] != base.shape[0] or down[1:] != want_in or up[1] != down[0]:
        return f"down {down} / up {up} do not fit the base weight {base.shape}"
    return None


# -- the peft form (adapters/lora_files.py writes it) ---------------------------------------------------------------


def lora_config_dict(modules: dict[str, LoraModule], table: Mapping[str, BaseModule]) -> dict:
    """A peft `LoraConfig.to_dict()` for one component: the commonest rank/alpha, and patterns for the others (a
    resized LoRA has a rank per module), so diffusers reloads each module at its true scale."""
    from peft import LoraConfig

    paths = {name: table[name].path for name in modules}
    ranks = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alphas = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=ranks,
        lora_alpha=alphas,
        target_modules=sorted(paths.values()),
        rank_pattern={paths[n]: m.rank for n, m in modules.items() if m.rank != ranks},
        alpha_pattern={paths[n]: m.alpha for n, m in modules.items() if m.alpha != alphas},
        init_lora_weights="gaussian",
    )
    return config.to_dict()


def peft_layers(modules: LoraModules, table: Mapping[str, BaseModule]) -> tuple[dict, dict]:
    """The modules as diffusers' `save_lora_weights` takes them: per component (unet, text_encoder), the peft-named
    tensors (`<path>.lora_A.weight` = down, `.lora_B.weight` = up) and a `LoraConfig.to_dict()`; see
    `lora_files.save_modules_peft`."""
    layers, configs = {}, {}
    for component in ("unet", "text_encoder"):
        part = {n: m for n, m in modules.items() if table[n].component == component}
        if part:
            layers[component] = {
                f"{table[n].path}.{ab}.weight": t
                for n, m in part.items()
                for ab, t in (("lora_A", m.down), ("lora_B", m.up))
            }
            configs[component] = lora_config_dict(part, table)
    return layers, configs


__all__ = [
    "BaseModule",
    "LoraModule",
    "LoraModules",
    "base_shapes",
    "module_table",
    "peft_layers",
    "read_kohya",
    "read_peft",
    "shape_problem",
    "to_kohya",
]
