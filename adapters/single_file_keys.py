"""Single-file Stable Diffusion v1 checkpoints, the key tables: diffusers names <-> the original CompVis layout.

A diffusers folder keeps the UNet, VAE and text encoder in three subfolders with diffusers / transformers module
names. The original ("ldm") layout puts all three into one state dict under three prefixes:

    model.diffusion_model.*                     UNet: input_blocks / middle_block / output_blocks / time_embed / out
    first_stage_model.*                         VAE: encoder.down.N.block.M, mid.attn_1.q (1x1 conv weights) ...
    cond_stage_model.transformer.text_model.*   CLIP text encoder (Hugging Face names under that prefix)

`*_to_original` are pure dict -> dict functions (golden-key tests in tests/test_single_file.py), `*_from_original`
invert them. The prefix tables (`Row`, `unet_rows`, `rename_all`, ...) also serve the ControlNet layout
(adapters/controlnet.py), whose encoder is the UNet's. Reading and writing files is in adapters/single_file.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import torch

from sdtune.adapters.errors import SdtuneError

__all__ = [
    "TEXT_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "Row",
    "invert_rows",
    "rename_all",
    "strip_prefix",
    "text_encoder_from_original",
    "text_encoder_to_original",
    "unet_from_original",
    "unet_rows",
    "unet_to_original",
    "vae_from_original",
    "vae_to_original",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# A prefix table row: (source prefix, target prefix, inner renames applied to what follows the prefix, or None to
# copy the rest as is). Every table here is a bijection, so the same rows read backwards give the inverse.
Row = tuple[str, str, tuple[tuple[str, str], ...] | None]

# 1) UNet -----------------------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D -> ldm ResBlock: in_layers = [GroupNorm, SiLU, Conv], out_layers = [GroupNorm, SiLU,
# Dropout, Conv], emb_layers = [SiLU, Linear]; the indices skip the parameter-free modules.
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP: tuple[Row, ...] = (
    ("time_embedding.linear_1.", "time_embed.0.", None),  # time_embed = [Linear, SiLU, Linear]
    ("time_embedding.linear_2.", "time_embed.2.", None),
    ("conv_in.", "input_blocks.0.0.", None),
    ("conv_norm_out.", "out.0.", None),  # out = [GroupNorm, SiLU, Conv]
    ("conv_out.", "out.2.", None),
    ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
    ("mid_block.attentions.0.", "middle_block.1.", None),
    ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
)


class LayoutError(SdtuneError, ValueError):
    """A state dict that does not fit the SD v1 layout (unmapped or clashing keys, not a CLIP model)."""


def unet_rows(config: Mapping) -> list[Row]:
    """The UNet prefix table for any SD v1-style config (block count, attention placement, layers per block).

    ldm numbers the encoder as one flat list: input_blocks.0 is conv_in, then per down block `layers` entries of
    [ResBlock, (SpatialTransformer)] and, except after the last block, one Downsample entry. The decoder has
    `layers + 1` entries per up block; the last entry of every up block but the last also holds the Upsample, as
    its second module (no attention) or third (after the SpatialTransformer).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise LayoutError(f"unet config: layers_per_block must be one int in the SD v1 layout, got {layers!r}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    rows: list[Row] = list(_UNET_TOP)
    for i, block_type in enumerate(down):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", _UNET_RESNET))
            if "CrossAttn" in block_type:
                rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", None))
        if i < len(down) - 1:
            rows.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", None)
            )
    for i, block_type in enumerate(up):
        attention = "CrossAttn" in block_type
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", _UNET_RESNET))
            if attention:
                rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", None))
        if i < len(up) - 1:
            n = i * (layers + 1) + layers
            rows.append(
                (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{n}.{2 if attention else 1}.conv.", None)
            )
    return rows


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Renames a diffusers `UNet2DConditionModel` state dict to the original `model.diffusion_model.*` layout.

    Args:
        state_dict: the UNet's own keys (`conv_in.weight`, `down_blocks.0.resnets.0.norm1.weight`, ...).
        config: the UNet config (`unet.config` or unet/config.json); only the block layout is read.

    Returns:
        A new dict with the same tensors (not copied) under `model.diffusion_model.` keys.

    Raises:
        LayoutError: a key with no place in the SD v1 layout (e.g. SDXL's `add_embedding`), or a bad config.
    """
    return rename_all(state_dict, unet_rows(config), UNET_PREFIX, "unet")


def unet_from_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `unet_to_original`. Keys outside `model.diffusion_model.` are ignored (pass a whole checkpoint)."""
    return rename_all(strip_prefix(state_dict, UNET_PREFIX), invert_rows(unet_rows(config)), "", "unet")


# 2) VAE ------------------------------------------------------------------------------------------------------------

_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_VAE_RESNET += (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
# Folders saved by diffusers < 0.14 (SD v1-5's own vae/ among them) still use the old attention names.
_VAE_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# ldm's AttnBlock projects with 1x1 convolutions where diffusers uses Linear: [C, C, 1, 1] <-> [C, C].
_VAE_CONV_ATTENTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _vae_rows(blocks: int, encoder_resnets: int, decoder_resnets: int) -> list[Row]:
    """The VAE prefix table. ldm numbers decoder blocks from the lowest resolution up, diffusers the other way."""
    rows: list[Row] = [
        ("quant_conv.", "quant_conv.", None),
        ("post_quant_conv.", "post_quant_conv.", None),
    ]
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv_in.", f"{side}.conv_in.", None),
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", None),
            (f"{side}.conv_out.", f"{side}.conv_out.", None),
            (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
            (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for i in range(blocks):
        rows += [
            (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
            for j in range(encoder_resnets)
        ]
        rows += [
            (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.", _VAE_RESNET)
            for j in range(decoder_resnets)
        ]
        if i < blocks - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", None))
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.", None))
    return rows


def _count(keys, pattern: str) -> int:
    """1 + the largest index captured by `pattern` among `keys` (0 when none match)."""
    found = [int(m.group(1)) for key in keys if (m := re.match(pattern, key))]
    return max(found) + 1 if found else 0


def _vae_rows_for(keys, down: str, enc: str, dec: str) -> list[Row]:
    return _vae_rows(_count(keys, down), _count(keys, enc), _count(keys, dec))


def vae_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a diffusers `AutoencoderKL` state dict to the original `first_stage_model.*` layout.

    The block count and resnets per block are read from the keys, so any SD-style VAE converts (SD v1-5: 4 blocks
    of 2 resnets; the toy base: 4 blocks of 1). The mid-block attention q/k/v/proj_out weights become [C, C, 1, 1]
    conv weights, as ldm stores them.

    Raises:
        LayoutError: a key with no place in the SD v1 VAE layout.
    """
    renamed = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        renamed[".".join(_VAE_DEPRECATED.get(p, p) if "attentions" in parts else p for p in parts)] = tensor
    rows = _vae_rows_for(
        renamed,
        r"encoder\.down_blocks\.(\d+)\.",
        r"encoder\.down_blocks\.0\.resnets\.(\d+)\.",
        r"decoder\.up_blocks\.0\.resnets\.(\d+)\.",
    )
    out = rename_all(renamed, rows, VAE_PREFIX, "vae")
    for key, tensor in out.items():
        if _VAE_CONV_ATTENTION.search(key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def vae_from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `vae_to_original`. Keys outside `first_stage_model.` are ignored (pass a whole checkpoint)."""
    sd = strip_prefix(state_dict, VAE_PREFIX)
    sd = {k: (v[:, :, 0, 0] if _VAE_CONV_ATTENTION.search(k) and v.ndim == 4 else v) for k, v in sd.items()}
    rows = _vae_rows_for(
        sd, r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.", r"decoder\.up\.0\.block\.(\d+)\."
    )
    return rename_all(sd, invert_rows(rows), "", "vae")


# 3) Text encoder ---------------------------------------------------------------------------------------------------

_TEXT_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_POSITION_IDS = "embeddings.position_ids"


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a `CLIPTextModel` state dict to `cond_stage_model.transformer.text_model.*`.

    transformers >= 5.6 dropped the `text_model.` level from `CLIPTextModel` names (`encoder.layers.0...`); older
    versions and older saved folders (SD v1-5's own) keep it (`text_model.encoder.layers.0...`). Both are accepted,
    and the original layout always gets the level back, as A1111, ComfyUI and diffusers' reader expect.

    `embeddings.position_ids` is written as int64 `arange(max_positions)[None]`, as in SD v1-5's own file (197 text encoder
    keys): old loaders that load strictly need it. A copy in the input is not carried over, since merged
    checkpoints are known to carry float, off-by-rounding copies; the constant is written fresh instead.

    Raises:
        LayoutError: a key that is not part of a CLIP text tower (e.g. `text_projection.weight` of
            `CLIPTextModelWithProjection`, which SD v1 does not have).
    """
    out, bad = {}, []
    for key, tensor in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == _POSITION_IDS:
            continue
        if not name.startswith(_TEXT_PARTS):
            bad.append(key)
            continue
        out[TEXT_PREFIX + name] = tensor
    _raise_unmapped(bad, "text_encoder")
    positions = out.get(TEXT_PREFIX + "embeddings.position_embedding.weight")
    if positions is None:
        raise LayoutError("text_encoder: no embeddings.position_embedding.weight; is this a CLIP text model?")
    out[TEXT_PREFIX + _POSITION_IDS] = torch.arange(positions.shape[0], dtype=torch.int64)[None]
    return out


def text_encoder_from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `text_encoder_to_original`, in the module layout of the installed transformers.

    Keys outside `cond_stage_model.transformer.` are ignored; `position_ids` (a non-persistent buffer in current
    transformers) is dropped. The `text_model.` level is kept only if the installed `CLIPTextModel` has it.
    """
    sd = strip_prefix(state_dict, "cond_stage_model.transformer.")
    keep_level = _clip_has_text_model_level()
    out = {}
    for key, tensor in sd.items():
        name = key.removeprefix("text_model.")
        if name != _POSITION_IDS:
            out[f"text_model.{name}" if keep_level else name] = tensor
    return out


@lru_cache(maxsize=1)
def _clip_has_text_model_level() -> bool:
    """Whether this transformers' `CLIPTextModel` nests its modules under `text_model` (true before 5.6)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = CLIPTextConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with init_empty_weights():
        return hasattr(CLIPTextModel(tiny), "text_model")


# 4) Shared renaming ------------------------------------------------------------------------------------------------


def invert_rows(rows: list[Row]) -> list[Row]:
    """The same table read backwards (target -> source), for the `*_from_original` direction."""
    return [(dst, src, None if inner is None else tuple((b, a) for a, b in inner)) for src, dst, inner in rows]


def _rename_key(key: str, rows: list[Row]) -> str | None:
    for src, dst, inner in rows:
        if not key.startswith(src):
            continue
        rest = key[len(src) :]
        if inner is None:
            return dst + rest
        for a, b in inner:
            if rest.startswith(a + "."):
                return dst + b + rest[len(a) :]
        return None
    return None


def rename_all(state_dict: Mapping, rows: list[Row], add: str, what: str) -> dict[str, torch.Tensor]:
    """Renames every key through `rows`; refuses unmapped keys and two keys landing on one name.

    Args:
        state_dict: the keys to rename (tensors are passed through, not copied).
        rows: the prefix table; the first row whose source prefix a key starts with renames it.
        add: a prefix put before every renamed key (e.g. `UNET_PREFIX`), or "".
        what: the component named in error messages ("unet", "vae", "controlnet").

    Raises:
        LayoutError: keys with no row (the first three named), or two keys renamed to one.
    """
    out, bad = {}, []
    for key, tensor in state_dict.items():
        new = _rename_key(key, rows)
        if new is None:
            bad.append(key)
        elif add + new in out:
            raise LayoutError(f"{what}: two keys map to {add + new}; the state dict mixes two layouts")
        else:
            out[add + new] = tensor
    _raise_unmapped(bad, what)
    return out


def _raise_unmapped(bad: list[str], what: str) -> None:
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise LayoutError(f"{what}: {len(bad)} key(s) have no place in the SD v1 layout: {', '.join(bad[:3])}{more}")


def strip_prefix(state_dict: Mapping, prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed; every other key is left out."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
