"""PEFT/diffusers LoRA -> kohya-ss (sd-scripts) LoRA, the format AUTOMATIC1111, ComfyUI, Forge and civitai read.

A kohya LoRA file holds, per adapted module, three tensors and no config:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [r, in] or [r, in, kh, kw]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, r] or [out, r, 1, 1]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              0-dim float

and every loader applies W + (alpha / r) * up @ down, with r read from the tensor shape. peft's lora_A / lora_B are
exactly lora_down / lora_up (for conv layers too: A is the kh x kw conv, B the 1x1 conv), and peft's scaling is
lora_alpha / r, so the export is a renaming plus the TRUE alpha per module. The module name is the diffusers module
path with "." -> "_" behind `lora_unet_` / `lora_te_` (SD v1: `lora_te_`, not SDXL's `lora_te1_`), and the text
encoder's path keeps the `text_model.` level that transformers 5 dropped from `CLIPTextModel`.

Known traps this module avoids (verified in diffusers 0.42.1): `diffusers.utils.convert_state_dict_to_kohya` writes
alpha = rank whatever lora_alpha was, and names the SD v1 text encoder `lora_te1_`.

Usage:

    unet_lora, te_lora = split_diffusers_lora(safetensors.torch.load_file("pytorch_lora_weights.safetensors"))
    kohya = peft_to_kohya(unet_lora, te_lora, unet_alpha=8.0, text_encoder_alpha=8.0)
    save_kohya("my_lora.safetensors", kohya, kohya_metadata(facts))   # adapters/lora_files.py, file_metadata.py
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sdtune.adapters.errors import SdtuneError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"  # SD v1/v2; SDXL uses lora_te1_/lora_te2_.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfigs

# peft key = <module path>.<part>; parts get_peft_model_state_dict writes for a LoRA layer.
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_KOHYA_PART = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


class LoraFormatError(SdtuneError, ValueError):
    """A LoRA file or config with no kohya equivalent, or keys in neither the peft nor the kohya layout."""


# -- PEFT -> kohya tensors ------------------------------------------------------------------------------------------


def split_diffusers_lora(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """Splits a `pytorch_lora_weights.safetensors` dict (`unet.` / `text_encoder.` prefixed) into peft-named dicts.

    Args:
        state_dict: the tensors of a file written by `StableDiffusionPipeline.save_lora_weights`.

    Returns:
        `(unet_lora, text_encoder_lora)`, prefixes removed; `text_encoder_lora` is None when the file has none.
    """
    unet, text = {}, {}
    for key, tensor in state_dict.items():
        if key.startswith("unet."):
            unet[key.removeprefix("unet.")] = tensor
        elif key.startswith("text_encoder."):
            text[key.removeprefix("text_encoder.")] = tensor
        else:
            raise LoraFormatError(f"LoRA key {key!r}: expected a 'unet.' or 'text_encoder.' prefix (diffusers format)")
    return unet, (text or None)


def peft_to_kohya(
    unet_lora: Mapping[str, torch.Tensor],
    text_encoder_lora: Mapping[str, torch.Tensor] | None = None,
    *,
    unet_alpha: float | Mapping[str, float],
    text_encoder_alpha: float | Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Converts peft LoRA state dicts of an SD v1 UNet (and CLIP text encoder) to a kohya/A1111 LoRA state dict.

    Args:
        unet_lora: `get_peft_model_state_dict(unet)` (`down_blocks.0...to_q.lora_A.weight`); the `unet.`-prefixed
            keys of a diffusers LoRA file are accepted too.
        text_encoder_lora: the same for the `CLIPTextModel`, or None (UNet-only LoRA).
        unet_alpha: peft `lora_alpha` of the UNet LoRA, or a mapping module path -> alpha covering every module
            (see `kohya_alphas_from_lora_config` for `alpha_pattern` / `rank_pattern` / rsLoRA configs).
        text_encoder_alpha: the same for the text encoder; required when `text_encoder_lora` is given.

    Returns:
        `{lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha, lora_te_text_model_<module>...}`; the alpha
        tensors are 0-dim float32 and hold the true alpha, so every loader scales by alpha / rank like peft did.

    Raises:
        LoraFormatError: on a key that is not a peft LoRA key, a DoRA or lora_bias adapter (no kohya equivalent that
            loaders apply the same way), inconsistent shapes, or a module missing from an alpha mapping.
    """
    if text_encoder_lora and text_encoder_alpha is None:
        raise ValueError("peft_to_kohya: text_encoder_alpha is required with a text_encoder_lora (its lora_alpha)")
    if any(key.startswith("text_encoder.") for key in unet_lora):
        raise ValueError(
            "peft_to_kohya: unet_lora holds 'text_encoder.' keys; split the file with split_diffusers_lora"
        )
    kohya = {}
    if text_encoder_lora:
        modules = _group_by_module(text_encoder_lora, "text_encoder.", rename=_with_text_model)
        alphas = _normalize_alphas(text_encoder_alpha, rename=_with_text_model)
        kohya |= _to_kohya_modules(modules, alphas, TEXT_ENCODER_PREFIX, "text_encoder_alpha")
    modules = _group_by_module(unet_lora, "unet.")
    kohya |= _to_kohya_modules(modules, _normalize_alphas(unet_alpha), UNET_PREFIX, "unet_alpha")
    return kohya


def _group_by_module(lora: Mapping[str, torch.Tensor], prefix: str, rename=None) -> dict[str, dict]:
    """{module path: {"lora_A.weight": tensor, ...}}, the optional file prefix removed and the path renamed."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        match = _PEFT_KEY.match(key.removeprefix(prefix))
        if match is None:
            raise LoraFormatError(
                f"LoRA key {key!r} is not a peft LoRA key: expected <module>.lora_A.weight / .lora_B.weight "
                "as get_peft_model_state_dict writes them (one adapter, no adapter name in the key)"
            )
        module = rename(match["module"]) if rename else match["module"]
        modules.setdefault(module, {})[match["part"]] = tensor
    return modules


def _with_text_model(module: str) -> str:
    # transformers 5 flattened CLIPTextModel (encoder.layers.N...); kohya/A1111/ComfyUI keys keep text_model.
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _normalize_alphas(alpha: float | Mapping[str, float], rename=None) -> float | dict[str, float]:
    if isinstance(alpha, Mapping):
        return {(rename(module) if rename else module): float(value) for module, value in alpha.items()}
    return float(alpha)


def _to_kohya_modules(modules: dict, alphas: float | dict, prefix: str, alpha_arg: str) -> dict[str, torch.Tensor]:
    kohya = {}
    for module, parts in modules.items():
        _check_plain_lora(module, parts)
        if isinstance(alphas, dict):
            if module not in alphas:
                raise LoraFormatError(f"peft_to_kohya: {alpha_arg} has no alpha for LoRA module {module!r}")
            alpha = alphas[module]
        else:
            alpha = alphas
        name = prefix + module.replace(".", "_")
        for part, tensor in parts.items():
            kohya[f"{name}.{_KOHYA_PART[part]}"] = tensor.detach().contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return kohya


def _check_plain_lora(module: str, parts: dict[str, torch.Tensor]):
    if "lora_magnitude_vector" in parts:
        # peft's DoRA magnitude is per OUTPUT row, normed over W + dW. A1111 applies `dora_scale` per INPUT column
        # only, ComfyUI's output-axis branch divides by the norm of the base W (not W + dW), and diffusers'
        # StableDiffusionPipeline drops dora_scale keys: no kohya file loads a peft DoRA back the same.
        raise LoraFormatError(
            f"LoRA module {module!r} is DoRA (peft use_dora=True): the kohya format has no DoRA that A1111, "
            "ComfyUI and diffusers apply like peft; export a merged checkpoint instead, or train with use_dora=False"
        )
    if "lora_B.bias" in parts:
        raise LoraFormatError(
            f"LoRA module {module!r} has a lora_B bias (peft lora_bias=True): kohya LoRA has no bias term"
        )
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        raise LoraFormatError(
            f"LoRA module {module!r} needs both lora_A.weight and lora_B.weight, got {sorted(parts)}"
        )
    down, up = parts["lora_A.weight"], parts["lora_B.weight"]
    linear = down.dim() == 2 and up.dim() == 2
    conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    if not (linear or conv) or down.shape[0] != up.shape[1]:
        raise LoraFormatError(
            f"LoRA module {module!r}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} are not a linear "
            "([r, in] / [out, r]) or conv ([r, in, kh, kw] / [out, r, 1, 1]) LoRA pair of one rank"
        )


# -- alphas from a peft LoraConfig ----------------------------------------------------------------------------------


def kohya_alphas_from_lora_config(lora_config: Mapping[str, Any], module_names: Iterable[str]) -> dict[str, float]:
    """The kohya alpha of each LoRA module, so that kohya's alpha / r equals the scaling peft used in training.

    Resolves `rank_pattern` and `alpha_pattern` the way peft does (`peft.utils.other.get_pattern_key`), and rsLoRA
    (peft scales by lora_alpha / sqrt(r); kohya by alpha / r, so the kohya alpha is lora_alpha * sqrt(r)).

    Args:
        lora_config: `LoraConfig.to_dict()`, or one entry of `lora_configs_from_diffusers_metadata`.
        module_names: peft module paths, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.

    Returns:
        module path -> alpha, for `peft_to_kohya(unet_alpha=...)`.

    Raises:
        LoraFormatError: for a DoRA or lora_bias config; ValueError: one without `r` / `lora_alpha`.
    """
    from peft.utils.other import get_pattern_key

    for field in ("r", "lora_alpha"):
        if field not in lora_config:
            raise ValueError(f"LoRA config has no {field!r}: pass a LoraConfig.to_dict() (peft) as lora_config")
    if lora_config.get("use_dora"):
        raise LoraFormatError("LoRA config has use_dora=True: DoRA has no kohya equivalent (see peft_to_kohya)")
    if lora_config.get("lora_bias"):
        raise LoraFormatError("LoRA config has lora_bias=True: kohya LoRA has no bias term")
    rank_pattern = lora_config.get("rank_pattern") or {}
    alpha_pattern = lora_config.get("alpha_pattern") or {}
    alphas = {}
    for module in module_names:
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), lora_config["r"])
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), lora_config["lora_alpha"]))
        alphas[module] = alpha * math.sqrt(rank) if lora_config.get("use_rslora") else alpha
    return alphas


def lora_configs_from_diffusers_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """Reads the LoraConfigs that `save_lora_weights(..., unet_lora_adapter_metadata=...)` stored in a file header.

    Args:
        metadata: the safetensors header metadata (`safe_open(path, "pt").metadata()`).

    Returns:
        `{"unet": {...}, "text_encoder": {...}}` (only the components present), each a `LoraConfig.to_dict()`.

    Raises:
        LoraFormatError: when the file has no adapter metadata: its lora_alpha is then unknown and must be given.
    """
    if not metadata or DIFFUSERS_METADATA_KEY not in metadata:
        raise LoraFormatError(
            f"LoRA file has no {DIFFUSERS_METADATA_KEY!r} header: it was saved without "
            "unet_lora_adapter_metadata=LoraConfig.to_dict(); pass lora_alpha to peft_to_kohya yourself"
        )
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata[DIFFUSERS_METADATA_KEY]).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


# -- hashes ---------------------------------------------------------------------------------------------------------


def sshs_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """sd-scripts' `precalculate_safetensors_hashes`: the hashes sd-webui-additional-networks and A1111 index by.

    The tensors are serialized with only the `ss_*` metadata (user-editable keys would change the hash), then:
    `sshs_model_hash` = sha256 of everything after the safetensors header (what A1111 computes for the file itself,
    since the tensor bytes do not depend on the header), `sshs_legacy_hash` = first 8 hex of the sha256 of the
    64 KiB at offset 1 MiB (empty input for files under 1 MiB).

    Returns:
        `(sshs_model_hash, sshs_legacy_hash)`.
    """
    ss_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(dict(state_dict), ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def a1111_lora_hash(path: str | Path) -> str:
    """The hash A1111 computes for a LoRA file (`hashes.sha256(..., use_addnet_hash=True)`): sha256 of the bytes
    after the safetensors header. Equal to the file's `sshs_model_hash` when the export is right."""
    data = Path(path).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


__all__ = [
    "a1111_lora_hash",
    "kohya_alphas_from_lora_config",
    "lora_configs_from_diffusers_metadata",
    "peft_to_kohya",
    "split_diffusers_lora",
    "sshs_hashes",
]
