"""Single-file Stable Diffusion v1 checkpoints: reading and writing the original CompVis / A1111 layout.

The original ("ldm") layout puts the UNet, VAE and text encoder of a diffusers folder into one state dict under
three prefixes; the key tables and the pure dict -> dict renames are in adapters/single_file_keys.py. diffusers reads
that layout (`from_single_file`) but has no writer, so the writer lives here: `save_single_file` /
`load_single_file` / `convert` are the file-level entry points behind `sdtune convert`:

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
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.adapters.atomic import atomic_folder, atomic_path
from sdtune.adapters.base import BUNDLED_CONFIGS, PICKLE_SUFFIXES
from sdtune.adapters.errors import NotFoundError, SdtuneError
from sdtune.adapters.file_metadata import checkpoint_metadata, folder_facts
from sdtune.adapters.single_file_keys import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)

__all__ = [
    "CONFIG_NAMES",
    "bundled_config",
    "convert",
    "detect_config",
    "load_single_file",
    "save_pipeline_folder",
    "save_single_file",
]

# The SD v1 family by UNet width and cross-attention width: (conv_in out channels, context dim) -> config name.
CONFIG_NAMES = {(320, 768): "sd15", (64, 64): "toy"}


class CheckpointError(SdtuneError, ValueError):
    """A checkpoint, folder or option `convert` refuses: a pickle file, not SD v1, a wrong destination."""


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


def _atomic_save_file(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    with atomic_path(out, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


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
        Its header carries the SAI model spec (`modelspec.*`: title = the file's stem, the folder's native
        resolution and prediction type), as sd-scripts writes it for a checkpoint.

    Raises:
        NotFoundError (a FileNotFoundError): the folder or one of its components/weight files is missing.
        FileExistsError: `out_path` exists and `overwrite` is False.
        CheckpointError: a wrong output extension, a folder that is not a diffusers pipeline, or weights outside the
            SD v1 layout.
    """
    folder, out = Path(pipeline_folder), Path(out_path)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must be a .safetensors file (pickle .ckpt files are never written)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not folder.is_dir():
        raise NotFoundError(f"{folder}: no such folder")
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    unet_config_file = folder / "unet" / "config.json"
    if not unet_config_file.is_file():
        raise NotFoundError(f"{unet_config_file}: missing; expected a diffusers SD v1 pipeline folder")
    tensors = unet_to_original(_read_component(folder, "unet"), json.loads(unet_config_file.read_text()))
    tensors |= vae_to_original(_read_component(folder, "vae"))
    tensors |= text_encoder_to_original(_read_component(folder, "text_encoder"))
    if half:  # integer tensors (position_ids) stay int64
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = checkpoint_metadata(folder_facts(folder, out.stem))
    _atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata)
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
        raise CheckpointError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
    raise CheckpointError(f"{path}: not a .safetensors checkpoint")


def detect_config(state_dict_or_path, *, allow_pickle: bool = False) -> str:
    """Which bundled config describes an original-layout SD v1 checkpoint: "sd15" or "toy".

    Decided from tensor shapes: the UNet's conv_in width (320 for SD v1-5, 64 for the toy base) and its
    cross-attention width (768 / 64).

    Args:
        state_dict_or_path: an original-layout state dict (tensors or anything with `.shape`), or a path to a
            `.safetensors` file (only its header is read).
        allow_pickle: also read pickle files (`.ckpt`); loading them can run code.

    Raises:
        CheckpointError: not an SD v1 checkpoint (SDXL, SD 2.x, a diffusers-layout dict, an inpainting UNet, ...).
    """
    if isinstance(state_dict_or_path, Mapping):
        shapes, name = {k: tuple(v.shape) for k, v in state_dict_or_path.items()}, "state dict"
    else:
        name = str(state_dict_or_path)
        shapes = _read_shapes(Path(state_dict_or_path), allow_pickle)
    keys = shapes.keys()
    if any(k.startswith("conditioner.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise CheckpointError(f"{name}: an SDXL checkpoint (conditioner.* / label_emb keys), not an SD v1 checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(
            f"{name}: an SD 2.x checkpoint (OpenCLIP cond_stage_model.model.*), not an SD v1 checkpoint"
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    context = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if conv_in is None or context is None:
        hint = (
            " (it has diffusers-layout keys; convert a folder with save_single_file)"
            if "conv_in.weight" in keys
            else ""
        )
        raise CheckpointError(
            f"{name}: not an SD v1 checkpoint: no {UNET_PREFIX}input_blocks.* UNet with attention{hint}"
        )
    if conv_in[1] != 4:
        raise CheckpointError(
            f"{name}: the UNet takes {conv_in[1]} input channels (inpainting / pix2pix); only 4 is supported"
        )
    found = CONFIG_NAMES.get((conv_in[0], context[1]))
    if found is None:
        raise CheckpointError(
            f"{name}: an SD v1-style UNet of width {conv_in[0]} and context {context[1]}, which matches no bundled "
            f"config ({', '.join(f'{v}: {k}' for k, v in CONFIG_NAMES.items())}); pass a config folder"
        )
    return found


def bundled_config(name: str) -> Path:
    """The config folder for a `detect_config` name: adapters/sd15_config or adapters/toy_base."""
    if name not in BUNDLED_CONFIGS:
        raise CheckpointError(f"config: unknown name {name!r}; expected one of {sorted(BUNDLED_CONFIGS)} or a folder")
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
            raise CheckpointError(f"{path}: no {what} weights ({prefix}*); a full SD v1 checkpoint is needed")
    unet = json.loads((config / "unet" / "config.json").read_text())
    width = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight", (None,))[0]
    if width != unet["block_out_channels"][0]:
        raise CheckpointError(
            f"{path}: UNet width {width} does not match {config} (block_out_channels[0] = "
            f"{unet['block_out_channels'][0]}); pass the config that fits this file"
        )


def save_pipeline_folder(pipe, out: Path, overwrite: bool, settings_from: Path | None = None) -> None:
    """`pipe.save_pretrained(out)`, atomically: a temp folder beside `out`, swapped in by renames. `settings_from`:
    a base folder whose `sdtune.json` (its recommended guidance) goes with it."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_folder(out) as tmp:  # an earlier folder is swapped out in two renames, never half-written
        pipe.save_pretrained(tmp)
        if settings_from is not None and (settings_from / "sdtune.json").is_file():
            shutil.copy(settings_from / "sdtune.json", tmp / "sdtune.json")


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
        NotFoundError / FileExistsError / CheckpointError / LayoutError: with one line naming the file or folder.
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
            raise CheckpointError(f"{path}: {name} weights missing from the file: {', '.join(missing[:3])}")
    if out_folder is not None:
        save_pipeline_folder(pipe, Path(out_folder), overwrite, settings_from=config)
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
            raise CheckpointError(f"{src}: --config applies to a single-file source, not to a folder")
        return save_single_file(src, dst, half=half, overwrite=overwrite)
    if not src.exists():
        raise NotFoundError(f"{src}: no such file or folder")
    if src.suffix != ".safetensors":
        raise CheckpointError(
            f"{src}: expected a diffusers folder or a .safetensors checkpoint (pickle files are not read: they can run "
            "code when loaded)"
        )
    if dst.suffix == ".safetensors":
        raise CheckpointError(
            f"{dst}: converting a single file needs a folder as destination, not a .safetensors file"
        )
    config_folder = config if config is not None else detect_config(src)
    load_single_file(
        src, config_folder, dst, torch_dtype=torch.float16 if half else torch.float32, overwrite=overwrite
    )
    return dst
