"""Single-file Stable Diffusion v1 checkpoints: the original CompVis / A1111 layout, both ways.

A diffusers folder keeps the UNet, VAE and text encoder in three subfolders with diffusers / transformers module
names. The original ("ldm") layout puts all three into one state dict under three prefixes:

    model.diffusion_model.*                     UNet: input_blocks / middle_block / output_blocks / time_embed / out
    first_stage_model.*                         VAE: encoder.down.N.block.M, mid.attn_1.q (1x1 conv weights) ...
    cond_stage_model.transformer.text_model.*   CLIP text encoder (Hugging Face names under that prefix)

diffusers reads that layout (`from_single_file`) but has no writer, so the writer lives here: `*_to_original` are
pure dict -> dict functions (golden-key tests in tests/test_single_file.py), `*_from_original` invert them, and
`save_single_file` / `load_single_file` / `convert` are the file-level entry points behind `sdtune convert`:

    sdtune convert path/to/diffusers-folder model.safetensors --half     # folder -> one fp16 file
    sdtune convert model.safetensors path/to/new-folder                  # file -> folder (config detected)

A file written here has exactly the keys and shapes of SD v1-5's own single file (686 UNet, 248 VAE, 197 text
encoder tensors), so A1111 / ComfyUI style loaders take it; reading goes through diffusers' own reader. Only
`.safetensors` is ever written: pickle `.ckpt` files can run code when loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.adapters.atomic import atomic_folder, atomic_path
from sdtune.adapters.base import BUNDLED_CONFIGS, PICKLE_SUFFIXES
from sdtune.adapters.errors import NotFoundError

__all__ = [
    "CONFIG_NAMES",
    "bundled_config",
    "convert",
    "detect_config",
    "load_single_file",
    "save_single_file",
    "text_encoder_from_original",
    "text_encoder_to_original",
    "unet_from_original",
    "unet_to_original",
    "vae_from_original",
    "vae_to_original",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# The SD v1 family by UNet width and cross-attention width: (conv_in out channels, context dim) -> config name.
CONFIG_NAMES = {(320, 768): "sd15", (64, 64): "toy"}

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


def _unet_rows(config: Mapping) -> list[Row]:
    """The UNet prefix table for any SD v1-style config (block count, attention placement, layers per block).

    ldm numbers the encoder as one flat list: input_blocks.0 is conv_in, then per down block `layers` entries of
    [ResBlock, (SpatialTransformer)] and, except after the last block, one Downsample entry. The decoder has
    `layers + 1` entries per up block; the last entry of every up block but the last also holds the Upsample, as
    its second module (no attention) or third (after the SpatialTransformer).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"unet config: layers_per_block must be one int in the SD v1 layout, got {layers!r}")
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
        ValueError: a key with no place in the SD v1 layout (e.g. SDXL's `add_embedding`), or a bad config.
    """
    return _rename_all(state_dict, _unet_rows(config), UNET_PREFIX, "unet")


def unet_from_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `unet_to_original`. Keys outside `model.diffusion_model.` are ignored (pass a whole checkpoint)."""
    return _rename_all(_strip(state_dict, UNET_PREFIX), _invert(_unet_rows(config)), "", "unet")


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
        ValueError: a key with no place in the SD v1 VAE layout.
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
    out = _rename_all(renamed, rows, VAE_PREFIX, "vae")
    for key, tensor in out.items():
        if _VAE_CONV_ATTENTION.search(key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def vae_from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `vae_to_original`. Keys outside `first_stage_model.` are ignored (pass a whole checkpoint)."""
    sd = _strip(state_dict, VAE_PREFIX)
    sd = {k: (v[:, :, 0, 0] if _VAE_CONV_ATTENTION.search(k) and v.ndim == 4 else v) for k, v in sd.items()}
    rows = _vae_rows_for(
        sd, r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.", r"decoder\.up\.0\.block\.(\d+)\."
    )
    return _rename_all(sd, _invert(rows), "", "vae")


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
        ValueError: a key that is not part of a CLIP text tower (e.g. `text_projection.weight` of
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
        raise ValueError("text_encoder: no embeddings.position_embedding.weight; is this a CLIP text model?")
    out[TEXT_PREFIX + _POSITION_IDS] = torch.arange(positions.shape[0], dtype=torch.int64)[None]
    return out


def text_encoder_from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `text_encoder_to_original`, in the module layout of the installed transformers.

    Keys outside `cond_stage_model.transformer.` are ignored; `position_ids` (a non-persistent buffer in current
    transformers) is dropped. The `text_model.` level is kept only if the installed `CLIPTextModel` has it.
    """
    sd = _strip(state_dict, "cond_stage_model.transformer.")
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


def _invert(rows: list[Row]) -> list[Row]:
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


def _rename_all(state_dict: Mapping, rows: list[Row], add: str, what: str) -> dict[str, torch.Tensor]:
    """Renames every key through `rows`; refuses unmapped keys and two keys landing on one name."""
    out, bad = {}, []
    for key, tensor in state_dict.items():
        new = _rename_key(key, rows)
        if new is None:
            bad.append(key)
        elif add + new in out:
            raise ValueError(f"{what}: two keys map to {add + new}; the state dict mixes two layouts")
        else:
            out[add + new] = tensor
    _raise_unmapped(bad, what)
    return out


def _raise_unmapped(bad: list[str], what: str) -> None:
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"{what}: {len(bad)} key(s) have no place in the SD v1 layout: {', '.join(bad[:3])}{more}")


def _strip(state_dict: Mapping, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# 5) Files ----------------------------------------------------------------------------------------------------------


def _read_component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """One component's weights from a diffusers folder: `<stem>.safetensors` or a sharded index of them."""
    sub = folder / name
    stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
    single, index = sub / f"{stem}.safetensors", sub / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(sub / shard).items()}
    if not sub.is_dir():
        raise NotFoundError(f"{folder}: no {name}/ folder; expected a diffusers SD v1 pipeline folder")
    found = sorted(p.name for p in sub.iterdir() if p.is_file())
    raise NotFoundError(
        f"{sub}: no {stem}.safetensors (found {found}); only safetensors weights are read, re-save the model "
        "with save_pretrained()"
    )


def _atomic_save_file(tensors: dict[str, torch.Tensor], out: Path) -> None:
    with atomic_path(out, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def save_single_file(
    pipeline_folder: str | os.PathLike, out_path: str | os.PathLike, *, half: bool = False, overwrite: bool = False
) -> Path:
    """Writes a diffusers SD v1 folder as one original-layout `.safetensors` checkpoint (A1111 / ComfyUI style).

    Args:
        pipeline_folder: a diffusers `StableDiffusionPipeline` folder (model_index.json, unet/, vae/,
            text_encoder/ with safetensors weights).
        out_path: the file to write; must end in `.safetensors`.
        half: store floating-point tensors as fp16 (half the size); otherwise each keeps its stored dtype.
        overwrite: replace an existing `out_path`.

    Returns:
        `out_path` as a `Path`. The write is atomic (`sdtune.adapters.atomic`): a temp file beside it, then a rename.

    Raises:
        NotFoundError (a FileNotFoundError): the folder or one of its components/weight files is missing.
        FileExistsError: `out_path` exists and `overwrite` is False.
        ValueError: a wrong output extension, a folder that is not a diffusers pipeline, or weights outside the
            SD v1 layout.
    """
    folder, out = Path(pipeline_folder), Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file (pickle .ckpt files are never written)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not folder.is_dir():
        raise NotFoundError(f"{folder}: no such folder")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    unet_config_file = folder / "unet" / "config.json"
    if not unet_config_file.is_file():
        raise NotFoundError(f"{unet_config_file}: missing; expected a diffusers SD v1 pipeline folder")
    tensors = unet_to_original(_read_component(folder, "unet"), json.loads(unet_config_file.read_text()))
    tensors |= vae_to_original(_read_component(folder, "vae"))
    tensors |= text_encoder_to_original(_read_component(folder, "text_encoder"))
    if half:  # integer tensors (position_ids) stay int64
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return out


def _read_shapes(path: Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file; for safetensors only the header is read."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if path.suffix in PICKLE_SUFFIXES and allow_pickle:
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        return {k: tuple(v.shape) for k, v in load_single_file_checkpoint(str(path)).items() if hasattr(v, "shape")}
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
    raise ValueError(f"{path}: not a .safetensors checkpoint")


def detect_config(state_dict_or_path, *, allow_pickle: bool = False) -> str:
    """Which bundled config describes an original-layout SD v1 checkpoint: "sd15" or "toy".

    Decided from tensor shapes: the UNet's conv_in width (320 for SD v1-5, 64 for the toy base) and its
    cross-attention width (768 / 64).

    Args:
        state_dict_or_path: an original-layout state dict (tensors or anything with `.shape`), or a path to a
            `.safetensors` file (only its header is read).
        allow_pickle: also read pickle files (`.ckpt`); loading them can run code.

    Raises:
        ValueError: not an SD v1 checkpoint (SDXL, SD 2.x, a diffusers-layout dict, an inpainting UNet, ...).
    """
    if isinstance(state_dict_or_path, Mapping):
        shapes, name = {k: tuple(v.shape) for k, v in state_dict_or_path.items()}, "state dict"
    else:
        name = str(state_dict_or_path)
        shapes = _read_shapes(Path(state_dict_or_path), allow_pickle)
    keys = shapes.keys()
    if any(k.startswith("conditioner.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise ValueError(f"{name}: an SDXL checkpoint (conditioner.* / label_emb keys), not an SD v1 checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(f"{name}: an SD 2.x checkpoint (OpenCLIP cond_stage_model.model.*), not an SD v1 checkpoint")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    context = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if conv_in is None or context is None:
        hint = (
            " (it has diffusers-layout keys; convert a folder with save_single_file)"
            if "conv_in.weight" in keys
            else ""
        )
        raise ValueError(f"{name}: not an SD v1 checkpoint: no {UNET_PREFIX}input_blocks.* UNet with attention{hint}")
    if conv_in[1] != 4:
        raise ValueError(
            f"{name}: the UNet takes {conv_in[1]} input channels (inpainting / pix2pix); only 4 is supported"
        )
    found = CONFIG_NAMES.get((conv_in[0], context[1]))
    if found is None:
        raise ValueError(
            f"{name}: an SD v1-style UNet of width {conv_in[0]} and context {context[1]}, which matches no bundled "
            f"config ({', '.join(f'{v}: {k}' for k, v in CONFIG_NAMES.items())}); pass a config folder"
        )
    return found


def bundled_config(name: str) -> Path:
    """The config folder for a `detect_config` name: adapters/sd15_config or adapters/toy_base."""
    if name not in BUNDLED_CONFIGS:
        raise ValueError(f"config: unknown name {name!r}; expected one of {sorted(BUNDLED_CONFIGS)} or a folder")
    folder = BUNDLED_CONFIGS[name]
    if not (folder / "model_index.json").is_file():
        raise NotFoundError(f"{folder}: bundled '{name}' config missing (no model_index.json)")
    return folder


def _resolve_config(config: str | os.PathLike) -> Path:
    """A config given as "sd15" / "toy", a local diffusers folder, or a hub id already in the local cache."""
    if str(config) in BUNDLED_CONFIGS:
        return bundled_config(str(config))
    folder = Path(config).expanduser()
    if not folder.is_dir() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(config)):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:  # configs only, from the local cache: never a download
            folder = Path(snapshot_download(str(config), local_files_only=True, allow_patterns=["*.json", "*.txt"]))
        except LocalEntryNotFoundError:
            raise NotFoundError(f"config: {config} is not a local folder nor a cached hub repo") from None
    if not folder.is_dir():
        raise NotFoundError(f"config: {folder}: no such folder")
    for needed in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"):
        if not (folder / needed).is_file():
            raise NotFoundError(f"config: {folder / needed} missing; a config folder is a diffusers SD v1 folder")
    return folder


def _check_fits(shapes: dict[str, tuple[int, ...]], config: Path, path: Path) -> None:
    """Clear errors for a file that lacks a component or does not match the config's sizes."""
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in shapes):
            raise ValueError(f"{path}: no {what} weights ({prefix}*); a full SD v1 checkpoint is needed")
    unet = json.loads((config / "unet" / "config.json").read_text())
    width = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (None,))[0]
    if width != unet["block_out_channels"][0]:
        raise ValueError(
            f"{path}: UNet width {width} does not match {config} (block_out_channels[0] = "
            f"{unet['block_out_channels'][0]}); pass the config that fits this file"
        )


def save_pipeline_folder(pipe, out: Path, overwrite: bool) -> None:
    """`pipe.save_pretrained(out)`, atomically: a temp folder beside `out`, swapped in by renames."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_folder(out) as tmp:  # an earlier folder is swapped out in two renames, never half-written
        pipe.save_pretrained(tmp)


def load_single_file(
    path: str | os.PathLike,
    config_folder: str | os.PathLike,
    out_folder: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    overwrite: bool = False,
):
    """Loads an original-layout SD v1 checkpoint as a `StableDiffusionPipeline`, offline.

    The weights come from the file, read by diffusers' `from_single_file`; everything else (model configs, VAE
    scaling factor, scheduler, tokenizer, feature extractor) from `config_folder`. No safety checker is loaded.

    Args:
        path: the `.safetensors` checkpoint.
        config_folder: "sd15", "toy", a diffusers folder (with tokenizer/), or a hub id already in the cache.
        out_folder: if given, also save the pipeline there as a diffusers folder (atomically: a temp folder
            beside it, then a rename).
        torch_dtype: dtype of every component (and of the saved folder).
        allow_pickle: also read `.ckpt` pickle files (diffusers loads them with `weights_only=True`).
        overwrite: replace an existing `out_folder`.

    Returns:
        The `StableDiffusionPipeline`, on the CPU.

    Raises:
        NotFoundError / FileExistsError / ValueError: with one line naming the file or folder.
    """
    from diffusers import StableDiffusionPipeline

    path, config = Path(path), _resolve_config(config_folder)
    _check_fits(_read_shapes(path, allow_pickle), config, path)
    if not (config / "tokenizer").is_dir():
        raise NotFoundError(f"config: {config / 'tokenizer'} missing; copy the CLIP tokenizer files there")
    if out_folder is not None and Path(out_folder).exists() and not overwrite:
        raise FileExistsError(f"{out_folder} already exists; pass overwrite=True (--overwrite) to replace it")
    # With the default dtype, pass None: the models are built in it anyway, and diffusers' extra `.to(dtype)` only
    # logs a spurious "modules that should be kept in float32: []" warning per model.
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        dtype=None if torch_dtype == torch.get_default_dtype() else torch_dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    # diffusers loads into meta-device models: a weight the file lacks would stay meta and fail much later.
    for name in ("unet", "vae", "text_encoder"):
        missing = [n for n, p in getattr(pipe, name).named_parameters() if p.device.type == "meta"]
        if missing:
            raise ValueError(f"{path}: {name} weights missing from the file: {', '.join(missing[:3])}")
    if out_folder is not None:
        save_pipeline_folder(pipe, Path(out_folder), overwrite)
    return pipe


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    half: bool = False,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """`sdtune convert SRC DST`: a diffusers folder -> one `.safetensors` file, or such a file -> a diffusers folder.

    Args:
        src: a diffusers SD v1 folder, or an original-layout `.safetensors` checkpoint.
        dst: the `.safetensors` file to write (from a folder), or the folder to create (from a file).
        half: fp16 weights in the output.
        config: for a file: "sd15", "toy" or a config folder; default: chosen by `detect_config`.
        overwrite: replace an existing `dst`.

    Returns:
        `dst` as a `Path`.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        if config is not None:
            raise ValueError(f"{src}: --config applies to a single-file source, not to a folder")
        return save_single_file(src, dst, half=half, overwrite=overwrite)
    if not src.exists():
        raise NotFoundError(f"{src}: no such file or folder")
    if src.suffix != ".safetensors":
        raise ValueError(
            f"{src}: expected a diffusers folder or a .safetensors checkpoint (pickle files are not read: they can run "
            "code when loaded)"
        )
    if dst.suffix == ".safetensors":
        raise ValueError(f"{dst}: converting a single file needs a folder as destination, not a .safetensors file")
    config_folder = config if config is not None else detect_config(src)
    load_single_file(
        src, config_folder, dst, torch_dtype=torch.float16 if half else torch.float32, overwrite=overwrite
    )
    return dst
