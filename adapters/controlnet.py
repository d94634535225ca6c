"""ControlNet files: the diffusers folder, the original single-file layout, and loading either for sampling.

A diffusers `ControlNetModel` folder holds `config.json` + `diffusion_pytorch_model.safetensors`. The tools most
people use (A1111's sd-webui-controlnet, ComfyUI) load the *original* layout of lllyasviel's ControlNet instead:
one file whose keys all start with `control_model.`:

    control_model.time_embed.* / input_blocks.* / middle_block.*   the copied UNet encoder, named as in the SD
                                                                    single file (see adapters/single_file_keys.py)
    control_model.input_hint_block.{0,2,...,14}.*                   the conditioning-image encoder (convs between
                                                                    SiLUs: the even indices)
    control_model.zero_convs.N.0.*                                  one zero-initialised 1x1 conv per encoder output
    control_model.middle_block_out.0.*                              the zero conv of the middle block

`controlnet_to_original` / `controlnet_from_original` are pure dict -> dict renames (golden-key tests in
tests/test_controlnet_format.py); `save_controlnet` writes both files of a trained ControlNet; `load_controlnet`
reads a folder, a run folder or a single file of either layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtune.adapters.atomic import atomic_folder
from sdtune.adapters.errors import NotFoundError, SdtuneError
from sdtune.adapters.file_metadata import ModelFacts, controlnet_metadata
from sdtune.adapters.single_file import _atomic_save_file
from sdtune.adapters.single_file_keys import Row, invert_rows, rename_all, strip_prefix, unet_rows

CONTROL_PREFIX = "control_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
RUN_SUBFOLDER = "controlnet"  # where a training run keeps its diffusers folder


class ControlNetError(SdtuneError, ValueError):
    """A ControlNet file that cannot be read safely or does not fit the base."""


def _controlnet_rows(config: Mapping) -> list[Row]:
    """The ControlNet prefix table: the UNet encoder's rows, then the conditioning encoder and the zero convs."""
    encoder_only = {**config, "up_block_types": []}  # a ControlNet has no decoder
    rows = unet_rows(encoder_only)
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    rows.append(("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", None))
    rows += [
        (f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * (k + 1)}.", None)
        for k in range(hint_blocks)
    ]
    rows.append(("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (hint_blocks + 1)}.", None))
    outputs = 1 + len(config["down_block_types"]) * (config["layers_per_block"] + 1) - 1
    rows += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", None) for i in range(outputs)]
    rows.append(("controlnet_mid_block.", "middle_block_out.0.", None))
    return rows


def controlnet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Renames a diffusers `ControlNetModel` state dict to the original `control_model.*` layout.

    Args:
        state_dict: the ControlNet's own keys (`conv_in.weight`, `controlnet_down_blocks.0.weight`, ...).
        config: its config (`controlnet.config` or config.json); the block layout is read.

    Raises:
        LayoutError: a key with no place in the SD v1 ControlNet layout.
    """
    return rename_all(state_dict, _controlnet_rows(config), CONTROL_PREFIX, "controlnet")


def controlnet_from_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `controlnet_to_original`. Files without the `control_model.` prefix (some are distributed so)
    are read too."""
    if any(key.startswith(CONTROL_PREFIX) for key in state_dict):
        state_dict = strip_prefix(state_dict, CONTROL_PREFIX)
    return rename_all(state_dict, invert_rows(_controlnet_rows(config)), "", "controlnet")


def is_original_layout(keys) -> bool:
    return any(key.startswith(CONTROL_PREFIX) or key.startswith("input_hint_block.") for key in keys)


def save_controlnet(
    controlnet, out_dir: str | Path, facts: ModelFacts, dtype: torch.dtype = torch.float16
) -> dict[str, Path]:
    """Writes a ControlNet twice: `out_dir/controlnet/` (diffusers folder) and `out_dir/<facts.title>.safetensors`
    (original `control_model.*` layout, for A1111 and ComfyUI), each with the SAI model spec of its layout in its
    header (`facts`: title, training resolution, prediction type). Both writes are atomic. Returns {format: path}."""
    out_dir = Path(out_dir)
    folder = out_dir / RUN_SUBFOLDER
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in controlnet.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / DIFFUSERS_WEIGHTS), metadata=controlnet_metadata(facts, original=False))
        (tmp / "config.json").write_text(controlnet.to_json_string())  # with _class_name, as save_pretrained writes
    single = out_dir / f"{facts.title}.safetensors"
    original = controlnet_to_original(state, controlnet.config)
    _atomic_save_file(original, single, controlnet_metadata(facts, original=True))
    return {"diffusers": folder, "original": single}


def _weights_file(path: Path) -> Path | None:
    """The diffusers folder a path means: the folder itself, or a run folder's `controlnet/`."""
    for folder in (path, path / RUN_SUBFOLDER):
        if (folder / "config.json").is_file():
            return folder
    return None


def load_controlnet(path: str | Path, unet=None, torch_dtype: torch.dtype | None = None):
    """A `ControlNetModel` from a diffusers folder, a training run folder, or a single `.safetensors` file.

    Args:
        path: the folder or file. A single file may be in either key layout (original `control_model.*` or
            diffusers); its architecture is taken from `unet`, the base it steers (an SD v1 ControlNet copies it).
        unet: the base UNet; needed for a single file.
        torch_dtype: the dtype to load in.

    Raises:
        NotFoundError (a FileNotFoundError): nothing at `path`, or a folder without a ControlNet config.
        ControlNetError: a pickle file, or a file whose keys do not fit this base's ControlNet.
    """
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_dir():
        folder = _weights_file(path)
        if folder is None:
            raise NotFoundError(f"{path}: no ControlNet here (expected config.json or {RUN_SUBFOLDER}/config.json)")
        return ControlNetModel.from_pretrained(str(folder), torch_dtype=torch_dtype)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such ControlNet file or folder")
    if path.suffix != ".safetensors":
        raise ControlNetError(
            f"{path}: only .safetensors ControlNets are read (pickle files can run code when loaded)"
        )
    if unet is None:
        raise ControlNetError(f"{path}: a single-file ControlNet needs the base UNet for its architecture")
    state = load_file(str(path))
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    if is_original_layout(state):
        state = controlnet_from_original(state, controlnet.config)
    missing, unexpected = controlnet.load_state_dict(state, strict=False)
    if missing or unexpected:
        odd = (missing or unexpected)[0]
        raise ControlNetError(
            f"{path}: does not fit a ControlNet of this base ({len(missing)} missing, {len(unexpected)} unexpected "
            f"keys, e.g. {odd}); is it a ControlNet for another model family?"
        )
    return controlnet.to(dtype=torch_dtype) if torch_dtype is not None else controlnet
