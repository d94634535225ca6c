"""The ControlNet file formats: golden keys of the original `control_model.*` layout, and round trips.

The golden keys and shapes are those of lllyasviel's SD v1-5 ControlNets (cldm/cldm.py with models/cldm_v15.yaml:
model_channels 320, channel_mult 1,2,4,4, 2 res blocks, context 768; control_v11p_sd15_canny.pth), which A1111's
sd-webui-controlnet and ComfyUI load.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from sdtune.adapters.base import BUNDLED_CONFIGS
from sdtune.adapters.controlnet import (
    controlnet_from_original,
    controlnet_to_original,
    load_controlnet,
    save_controlnet,
)
from sdtune.adapters.file_metadata import ModelFacts
from sdtune.adapters.single_file_keys import unet_to_original

GOLDEN = {
    "control_model.time_embed.0.weight": (1280, 320),
    "control_model.time_embed.2.bias": (1280,),
    "control_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "control_model.input_blocks.1.0.in_layers.0.weight": (320,),
    "control_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "control_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "control_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "control_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "control_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "control_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
    "control_model.middle_block.2.out_layers.3.bias": (1280,),
    "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
    "control_model.input_hint_block.2.weight": (16, 16, 3, 3),
    "control_model.input_hint_block.4.weight": (32, 16, 3, 3),
    "control_model.input_hint_block.12.weight": (256, 96, 3, 3),
    "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
    "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
    "control_model.zero_convs.4.0.weight": (640, 640, 1, 1),
    "control_model.zero_convs.11.0.bias": (1280,),
    "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
}


@pytest.fixture(scope="module")
def sd15_controlnet_keys():
    """Names and shapes of an SD v1-5 ControlNet (meta tensors: no weights are made), and the UNet config."""
    config = json.loads((BUNDLED_CONFIGS["sd15"] / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return controlnet.state_dict(), controlnet.config, unet.state_dict(), config


def test_sd15_controlnet_golden_keys(sd15_controlnet_keys):
    state, config, _, _ = sd15_controlnet_keys
    original = controlnet_to_original(state, config)
    assert all(key.startswith("control_model.") for key in original)
    for key, shape in GOLDEN.items():
        assert key in original, key
        assert tuple(original[key].shape) == shape, key
    # 8 hint convs, 12 zero convs (one per encoder output), 1 middle zero conv: 21 weight/bias pairs
    assert sum(1 for k in original if ".input_hint_block." in k) == 16
    assert sum(1 for k in original if ".zero_convs." in k) == 24
    assert sum(1 for k in original if ".middle_block_out." in k) == 2
    assert len(original) == len(state)


def test_controlnet_encoder_keys_are_the_base_single_file_keys(sd15_controlnet_keys):
    """The copied encoder has exactly the names the SD single file gives the UNet's encoder (time_embed,
    input_blocks, middle_block) under `control_model.` instead of `model.diffusion_model.`."""
    state, config, unet_state, unet_config = sd15_controlnet_keys
    original = controlnet_to_original(state, config)
    encoder = {
        "control_model." + key.removeprefix("model.diffusion_model."): tensor.shape
        for key, tensor in unet_to_original(unet_state, unet_config).items()
        if key.startswith(
            (
                "model.diffusion_model.input_blocks",
                "model.diffusion_model.middle_block",
                "model.diffusion_model.time_embed",
            )
        )
    }
    ours = {
        k: v.shape
        for k, v in original.items()
        if not k.startswith(
            ("control_model.input_hint_block", "control_model.zero_convs", "control_model.middle_block_out")
        )
    }
    assert ours == encoder


def test_round_trip_is_exact_and_accepts_unprefixed_files(sd15_controlnet_keys):
    state, config, _, _ = sd15_controlnet_keys
    original = controlnet_to_original(state, config)
    assert set(controlnet_from_original(original, config)) == set(state)
    bare = {k.removeprefix("control_model."): v for k, v in original.items()}
    assert set(controlnet_from_original(bare, config)) == set(state)


def test_unmapped_key_is_refused_by_name(sd15_controlnet_keys):
    state, config, _, _ = sd15_controlnet_keys
    with pytest.raises(ValueError, match="add_embedding.linear_1.weight"):
        controlnet_to_original({**state, "add_embedding.linear_1.weight": torch.zeros(1)}, config)


def test_saved_files_reload_identically_through_diffusers_and_sdtune(toy_pipe, tmp_path):
    """Both files of a (toy) ControlNet: diffusers' own single-file reader and `load_controlnet` give back the
    exact tensors, from the original-layout file and from the diffusers folder."""
    controlnet = ControlNetModel.from_unet(toy_pipe.unet)
    with torch.no_grad():  # non-zero zero convs, so a mix-up of zero convs would show
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    files = save_controlnet(controlnet, tmp_path, ModelFacts("toy-cn", (64, 64)), torch.float32)
    assert sorted(p.name for p in files["diffusers"].iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert all(k.startswith("control_model.") for k in load_file(str(files["original"])))
    expected = controlnet.state_dict()
    by_diffusers = ControlNetModel.from_single_file(
        str(files["original"]), config=str(files["diffusers"]), local_files_only=True
    )
    for loaded in (by_diffusers, load_controlnet(files["original"], unet=toy_pipe.unet), load_controlnet(tmp_path)):
        state = loaded.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_load_controlnet_errors(toy_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ControlNet"):
        load_controlnet(tmp_path / "missing.safetensors", unet=toy_pipe.unet)
    with pytest.raises(FileNotFoundError, match="no ControlNet here"):
        load_controlnet(tmp_path)
    (tmp_path / "x.ckpt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_controlnet(tmp_path / "x.ckpt", unet=toy_pipe.unet)
