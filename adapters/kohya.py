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
    save_kohya_lora("my_lora.safetensors", kohya, kohya_metadata(...))
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sdtune.adapters.atomic import atomic_path

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"  # SD v1/v2; SDXL uses lora_te1_/lora_te2_.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfigs
SAI_MODEL_SPEC_VERSION = "1.0.1"  # the current SAI model spec, as sd-scripts writes it since Aug 2025 (1.0.0 before).

# peft key = <module path>.<part>; parts get_peft_model_state_dict writes for a LoRA layer.
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_KOHYA_PART = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


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
            raise ValueError(f"LoRA key {key!r}: expected a 'unet.' or 'text_encoder.' prefix (diffusers format)")
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
        ValueError: on a key that is not a peft LoRA key, a DoRA or lora_bias adapter (no kohya equivalent that
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
            raise ValueError(
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
                raise ValueError(f"peft_to_kohya: {alpha_arg} has no alpha for LoRA module {module!r}")
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
        raise ValueError(
            f"LoRA module {module!r} is DoRA (peft use_dora=True): the kohya format has no DoRA that A1111, "
            "ComfyUI and diffusers apply like peft; export a merged checkpoint instead, or train with use_dora=False"
        )
    if "lora_B.bias" in parts:
        raise ValueError(
            f"LoRA module {module!r} has a lora_B bias (peft lora_bias=True): kohya LoRA has no bias term"
        )
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        raise ValueError(f"LoRA module {module!r} needs both lora_A.weight and lora_B.weight, got {sorted(parts)}")
    down, up = parts["lora_A.weight"], parts["lora_B.weight"]
    linear = down.dim() == 2 and up.dim() == 2
    conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    if not (linear or conv) or down.shape[0] != up.shape[1]:
        raise ValueError(
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
        ValueError: for a DoRA or lora_bias config, or one without `r` / `lora_alpha`.
    """
    from peft.utils.other import get_pattern_key

    for field in ("r", "lora_alpha"):
        if field not in lora_config:
            raise ValueError(f"LoRA config has no {field!r}: pass a LoraConfig.to_dict() (peft) as lora_config")
    if lora_config.get("use_dora"):
        raise ValueError("LoRA config has use_dora=True: DoRA has no kohya equivalent (see peft_to_kohya)")
    if lora_config.get("lora_bias"):
        raise ValueError("LoRA config has lora_bias=True: kohya LoRA has no bias term")
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
        ValueError: when the file has no adapter metadata: its lora_alpha is then unknown and must be given.
    """
    if not metadata or DIFFUSERS_METADATA_KEY not in metadata:
        raise ValueError(
            f"LoRA file has no {DIFFUSERS_METADATA_KEY!r} header: it was saved without "
            "unet_lora_adapter_metadata=LoraConfig.to_dict(); pass lora_alpha to peft_to_kohya yourself"
        )
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata[DIFFUSERS_METADATA_KEY]).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


# -- metadata -------------------------------------------------------------------------------------------------------


def kohya_metadata(
    *,
    base_model_name: str,
    base_model_hash: str | None,
    trigger_words: list[str],
    resolution: tuple[int, int],
    steps: int,
    epochs: int,
    rank: int,
    alpha: float,
    learning_rate: float,
    text_encoder_lr: float | None,
    unet_lr: float | None,
    seed: int,
    mixed_precision: str,
    optimizer: str,
    lr_scheduler: str,
    batch_size: int,
    num_train_images: int,
    dataset_dirs: dict[str, dict],
    tag_frequency: dict[str, dict[str, int]],
    title: str,
    network_module: str = "networks.lora",
    network_args: dict | None = None,
    training_started_at: float,
    training_finished_at: float,
    prediction_type: str = "epsilon",
    base_model_legacy_hash: str | None = None,
    bucket_counts: Mapping[tuple[int, int], int] | None = None,
    output_name: str | None = None,
    max_train_steps: int | None = None,
    num_reg_images: int = 0,
    gradient_accumulation_steps: int = 1,
    clip_skip: int | None = None,
    network_dropout: float | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The `ss_*` training metadata of sd-scripts' `train_network.py` plus the SAI model spec `modelspec.*` keys.

    Values are strings formatted as sd-scripts formats them (`str()` of the Python value, JSON for nested data), so
    A1111's Lora tab, the civitai uploader and metadata viewers read them as they read a kohya-trained LoRA.

    Args:
        base_model_name: file name of the base checkpoint (sd-scripts writes the basename) or its hub id.
        base_model_hash: sha256 hex of the base checkpoint file (A1111's "new" hash) -> `ss_new_sd_model_hash`.
        trigger_words: words that call up the concept -> `modelspec.trigger_phrase` (comma-joined).
        resolution: training (width, height) -> `ss_resolution` "(512, 512)", `modelspec.resolution` "512x512".
        steps / epochs: optimizer steps and epochs done at save time (`ss_steps`, `ss_epoch`).
        rank / alpha: LoRA rank and the TRUE lora_alpha (`ss_network_dim`, `ss_network_alpha`).
        learning_rate / text_encoder_lr / unet_lr: as sd-scripts' --learning_rate, --text_encoder_lr, --unet_lr.
        seed / mixed_precision / optimizer / lr_scheduler / batch_size: the run's settings; `optimizer` as sd-scripts
            writes it, e.g. "torch.optim.adamw.AdamW" or "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)".
        num_train_images: images x repeats (sd-scripts counts repeats).
        dataset_dirs: `{folder name: {"n_repeats": int, "img_count": int}}`.
        tag_frequency: `{folder name: {tag: count}}` of the captions.
        title: model title -> `modelspec.title` (and `ss_output_name` unless `output_name` is given).
        network_module / network_args: `ss_network_module`, and `ss_network_args` (written only when given; values
            become strings as sd-scripts parses `key=value`), e.g. {"conv_dim": 4, "conv_alpha": 8} for LoCon.
        training_started_at / training_finished_at: unix times; the finish also dates `modelspec.date`.
        prediction_type: "epsilon" or "v_prediction" (diffusers' name; "v" accepted).
        base_model_legacy_hash: A1111's old 8-hex hash of the base file -> `ss_sd_model_hash` (see
            `legacy_model_hash`).
        bucket_counts: `{(width, height): images}` of the aspect-ratio buckets -> `ss_bucket_info` as sd-scripts
            writes it (`{"buckets": {"0": {"resolution": [w, h], "count": n}, ...}}`); A1111's Lora tab shows the
            training resolutions from it.
        output_name: `ss_output_name`, which A1111 shows as the LoRA's alias; defaults to `title`.
        max_train_steps: planned steps (`ss_max_train_steps`); defaults to `steps`.
        extra: further `ss_*` keys (e.g. {"ss_noise_offset": 0.05}), stringified.

    Returns:
        metadata for `save_kohya_lora`, all values `str`.
    """
    if len(resolution) != 2 or any(int(side) <= 0 for side in resolution):
        raise ValueError(f"kohya_metadata: resolution must be (width, height), got {resolution!r}")
    if prediction_type not in ("epsilon", "v_prediction", "v"):
        raise ValueError(
            f"kohya_metadata: prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"kohya_metadata: mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    v_param = prediction_type != "epsilon"
    width, height = int(resolution[0]), int(resolution[1])
    metadata: dict[str, Any] = {
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at,
        "ss_output_name": output_name if output_name is not None else title,
        "ss_learning_rate": learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_epochs": epochs,
        "ss_epoch": epochs,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps if max_train_steps is not None else steps,
        "ss_gradient_accumulation_steps": gradient_accumulation_steps,
        "ss_lr_scheduler": lr_scheduler,
        "ss_network_module": network_module,
        "ss_network_dim": int(rank),
        "ss_network_alpha": float(alpha),  # sd-scripts' --network_alpha is a float: "8.0"
        "ss_network_dropout": network_dropout,
        "ss_mixed_precision": mixed_precision,
        "ss_v2": False,
        "ss_base_model_version": "sd_v1_v" if v_param else "sd_v1",
        "ss_clip_skip": clip_skip,
        "ss_seed": seed,
        "ss_optimizer": optimizer,
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * gradient_accumulation_steps,
        "ss_resolution": (width, height),  # str((512, 512)) == "(512, 512)", as sd-scripts writes its args tuple
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_sd_model_name": base_model_name,
    }
    if bucket_counts:
        buckets = {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(bucket_counts.items())}
        metadata["ss_bucket_info"] = json.dumps({"buckets": buckets})
    if network_args:
        metadata["ss_network_args"] = json.dumps({key: str(value) for key, value in network_args.items()})
    if base_model_hash is not None:
        metadata["ss_new_sd_model_hash"] = base_model_hash
    if base_model_legacy_hash is not None:
        metadata["ss_sd_model_hash"] = base_model_legacy_hash
    for key, value in (extra or {}).items():
        if not key.startswith("ss_"):
            raise ValueError(
                f"kohya_metadata: extra key {key!r} must start with 'ss_' (modelspec keys are built here)"
            )
        metadata[key] = value
    metadata = {key: str(value) for key, value in metadata.items()}
    metadata.update(_model_spec(title, width, height, v_param, training_finished_at, trigger_words, clip_skip))
    for key, value in (("author", author), ("description", description), ("license", license)):
        if value is not None:
            metadata[f"modelspec.{key}"] = str(value)
    return metadata


def _model_spec(title, width, height, v_param, timestamp, trigger_words, clip_skip) -> dict[str, str]:
    # sd-scripts' library/sai_model_spec.build_metadata for an SD v1 LoRA: LoRA of a v1/v2 model -> "diffusers"
    # implementation; date = local ISO-8601 of the save time without microseconds.
    spec = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
    }
    if trigger_words:
        spec["modelspec.trigger_phrase"] = ", ".join(trigger_words)
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return spec


# -- hashes and saving ----------------------------------------------------------------------------------------------


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


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-hex model hash (`ss_sd_model_hash`): sha256 of the 64 KiB at offset 1 MiB of the file."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def save_kohya_lora(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes a kohya LoRA `.safetensors` atomically, with its metadata and the `sshs_*` hashes sd-scripts adds.

    Args:
        path: target file; must end in `.safetensors`.
        state_dict: `peft_to_kohya` output.
        metadata: `kohya_metadata` output (string values); `sshs_model_hash` / `sshs_legacy_hash` are added.
        dtype: cast every tensor (alphas included, as sd-scripts' save_dtype does), e.g. torch.float16.

    Returns:
        the written path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_kohya_lora: {path} must end in .safetensors (A1111/ComfyUI read LoRAs from it)")
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise ValueError(f"save_kohya_lora: metadata values must be strings (safetensors header); not: {bad}")
    tensors = {
        key: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous() for key, t in state_dict.items()
    }
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(tensors, metadata)
    with atomic_path(path, ".safetensors") as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return path


def a1111_lora_hash(path: str | Path) -> str:
    """The hash A1111 computes for a LoRA file (`hashes.sha256(..., use_addnet_hash=True)`): sha256 of the bytes
    after the safetensors header. Equal to the file's `sshs_model_hash` when the export is right."""
    data = Path(path).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


__all__ = [
    "a1111_lora_hash",
    "kohya_alphas_from_lora_config",
    "kohya_metadata",
    "legacy_model_hash",
    "lora_configs_from_diffusers_metadata",
    "peft_to_kohya",
    "save_kohya_lora",
    "split_diffusers_lora",
    "sshs_hashes",
]
