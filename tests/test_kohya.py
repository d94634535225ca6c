"""kohya/A1111 LoRA export: golden keys, true alphas, loads back through diffusers, A1111/ComfyUI key coverage.

Tiny models from config (the toy UNet and CLIP), and the full SD v1-5 UNet/CLIP on the meta device for names only.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.adapters.a1111_keys import (
    a1111_module_for,
    comfyui_lora_key_map,
    comfyui_unmatched_kohya_keys,
    compvis_modules_from_checkpoint_keys,
    kohya_modules,
    kohya_to_compvis_module,
    unmatched_kohya_keys,
)
from sdtune.adapters.file_metadata import BaseFacts, LoraFacts, ModelFacts, TrainingFacts, kohya_metadata
from sdtune.adapters.kohya import (
    a1111_lora_hash,
    kohya_alphas_from_lora_config,
    lora_configs_from_diffusers_metadata,
    peft_to_kohya,
    split_diffusers_lora,
    sshs_hashes,
)
from sdtune.adapters.lora_files import save_kohya
from sdtune.adapters.toy_architecture import TOY_UNET
from sdtune.trainers.core.lora_layers import TEXT_ENCODER_TARGETS, UNET_PRESETS

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TOY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
SD15_CLIP = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408
)
RANK, ALPHA = 4, 8.0  # lora_alpha != rank: a converter writing alpha = rank halves the LoRA's strength


def make_clip(**config) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, bos_token_id=0, eos_token_id=2, **config))


def module_names(peft_state_dict: dict) -> set[str]:
    return {key.rsplit(".lora_", 1)[0] for key in peft_state_dict}


def add_random_lora(model, config: LoraConfig):
    """peft LoRA with lora_B randomized, so the adapter changes the output (B starts at zero)."""
    model.add_adapter(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model


def lora_config(targets, **kwargs) -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two intra-op threads on a busy 2-core machine spin-wait: a toy UNet forward takes 3 s instead of 0.02 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TOY_UNET).eval(), make_clip(**TOY_CLIP).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, 64, generator=generator),
        input_ids=torch.randint(0, 1000, (2, 7), generator=generator),
    )


def outputs(unet, text_encoder, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        sample = unet(inputs["sample"], 10, encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        return sample, text_encoder(inputs["input_ids"]).last_hidden_state


def trained(bases, preset: str, unet_kwargs=None, te_kwargs=None):
    """(peft unet, peft text encoder, their configs) over copies of the toy bases."""
    unet_config = lora_config(UNET_PRESETS[preset], **(unet_kwargs or {}))
    te_config = lora_config(TEXT_ENCODER_TARGETS, **(te_kwargs or {}))
    unet = add_random_lora(copy.deepcopy(bases[0]), unet_config)
    text_encoder = add_random_lora(copy.deepcopy(bases[1]), te_config)
    return unet, text_encoder, unet_config, te_config


@pytest.fixture(scope="module")
def toy_locon(bases):
    unet, text_encoder, _, _ = trained(bases, "locon")
    unet_sd, te_sd = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    return peft_to_kohya(unet_sd, te_sd, unet_alpha=ALPHA, text_encoder_alpha=ALPHA)


# -- golden keys ----------------------------------------------------------------------------------------------------

TOY_GOLDEN = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", (4, 64)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", (64, 4)),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha", ()),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight", (4, 64)),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight", (512, 4)),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_2.lora_down.weight", (4, 256)),
    ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", (4, 128, 1, 1)),
    ("lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight", (4, 64, 3, 3)),
    ("lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight", (128, 4, 1, 1)),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight", (4, 64, 1, 1)),
    ("lora_unet_up_blocks_1_resnets_2_time_emb_proj.lora_down.weight", (4, 256)),
    ("lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight", (4, 64, 3, 3)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight", (128, 4, 1, 1)),
    ("lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight", (64, 4)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", (4, 64)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", ()),
]


@pytest.mark.parametrize("key, shape", TOY_GOLDEN)
def test_toy_golden_keys_and_shapes(toy_locon, key, shape):
    assert key in toy_locon
    assert tuple(toy_locon[key].shape) == shape


def test_toy_export_is_sd1_named_with_true_alpha(toy_locon):
    assert not [key for key in toy_locon if key.startswith("lora_te1_")]
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for key in toy_locon)
    alphas = {key: tensor for key, tensor in toy_locon.items() if key.endswith(".alpha")}
    assert len(alphas) * 3 == len(toy_locon)  # down, up and alpha for every module
    assert {tensor.dtype for tensor in alphas.values()} == {torch.float32}
    assert {tensor.item() for tensor in alphas.values()} == {8.0}  # lora_alpha, not the rank 4


SD15_GOLDEN = [
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    ),
    ("lora_unet_down_blocks_2_attentions_1_proj_out", "diffusion_model_input_blocks_8_1_proj_out"),
    (
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
        "diffusion_model_output_blocks_11_1_transformer_blocks_0_attn2_to_k",
    ),
    (
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "diffusion_model_output_blocks_3_1_transformer_blocks_0_ff_net_0_proj",
    ),
    (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "diffusion_model_middle_block_1_transformer_blocks_0_attn1_to_out_0",
    ),
    ("lora_unet_mid_block_attentions_0_proj_in", "diffusion_model_middle_block_1_proj_in"),
    ("lora_unet_mid_block_resnets_1_conv2", "diffusion_model_middle_block_2_out_layers_3"),
    ("lora_unet_down_blocks_1_resnets_0_conv1", "diffusion_model_input_blocks_4_0_in_layers_2"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "diffusion_model_input_blocks_4_0_skip_connection"),
    ("lora_unet_down_blocks_3_resnets_1_time_emb_proj", "diffusion_model_input_blocks_11_0_emb_layers_1"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "diffusion_model_input_blocks_9_0_op"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "diffusion_model_output_blocks_8_2_conv"),
    ("lora_unet_up_blocks_0_resnets_2_conv_shortcut", "diffusion_model_output_blocks_2_0_skip_connection"),
    (
        "lora_te_text_model_encoder_layers_11_self_attn_v_proj",
        "transformer_text_model_encoder_layers_11_self_attn_v_proj",
    ),
]


@pytest.fixture(scope="module")
def sd15():
    """SD v1-5 UNet and CLIP on the meta device, their locon + text-encoder kohya export, and checkpoint keys."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = make_clip(**SD15_CLIP)
    # Only module names matter: fake peft tensors of the right rank, built from the real module paths.
    unet_modules = [name for name, _ in unet.named_modules() if _targeted(name, UNET_PRESETS["locon"])]
    te_modules = [name for name, _ in text_encoder.named_modules() if _targeted(name, TEXT_ENCODER_TARGETS)]
    kohya = peft_to_kohya(_fake_peft(unet_modules), _fake_peft(te_modules), unet_alpha=ALPHA, text_encoder_alpha=ALPHA)
    checkpoint_keys = ldm_checkpoint_keys(unet.config, text_encoder)
    return dict(unet=unet, text_encoder=text_encoder, kohya=kohya, checkpoint_keys=checkpoint_keys)


def _targeted(name: str, targets: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)  # peft's list matching


def _fake_peft(modules: list[str]) -> dict[str, torch.Tensor]:
    fake = {}
    for module in modules:
        fake[f"{module}.lora_A.weight"] = torch.zeros(RANK, 8)
        fake[f"{module}.lora_B.weight"] = torch.zeros(8, RANK)
    return fake


@pytest.mark.parametrize("kohya_module, compvis_module", SD15_GOLDEN)
def test_sd15_golden_names_and_a1111_mapping(sd15, kohya_module, compvis_module):
    assert f"{kohya_module}.lora_down.weight" in sd15["kohya"]
    assert kohya_to_compvis_module(kohya_module) == compvis_module
    compvis = compvis_modules_from_checkpoint_keys(sd15["checkpoint_keys"])
    assert a1111_module_for(kohya_module, compvis) == compvis_module


def test_sd15_export_module_count(sd15):
    # SD v1-5 locon: 16 transformers x (4 + 4 attn + 2 ff + proj_in/out) + 22 resnets x 3 + 14 shortcuts (2 down,
    # 12 up) + 3 downsamplers + 3 upsamplers; text encoder 12 layers x 4.
    modules = kohya_modules(sd15["kohya"])
    assert len([m for m in modules if m.startswith("lora_unet_")]) == 16 * 12 + 22 * 3 + 14 + 3 + 3
    assert len([m for m in modules if m.startswith("lora_te_")]) == 12 * 4


# -- the single-file key list the A1111/ComfyUI checks run against --------------------------------------------------


def ldm_checkpoint_keys(config, text_encoder) -> list[str]:
    """Tensor names of an SD v1 single-file checkpoint, generated from the LDM `openaimodel.UNetModel` layout."""
    resblock = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    block = ["attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"]
    transformer = ["norm", "proj_in", "proj_out"] + [f"transformer_blocks.0.{m}" for m in block]
    no_bias = [f"transformer_blocks.0.attn{a}.to_{x}" for a in (1, 2) for x in "qkv"]
    keys: list[str] = []

    def add(prefix, names, bias=True):
        keys.extend(f"{prefix}.{name}.{p}" for name in names for p in (("weight", "bias") if bias else ("weight",)))

    def add_resblock(prefix, channels_in, channels_out):
        add(prefix, resblock + (["skip_connection"] if channels_in != channels_out else []))

    def add_transformer(prefix):
        add(prefix, transformer)
        add(prefix, no_bias, bias=False)

    add("", ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"])
    channels, skips, index = config.block_out_channels, [config.block_out_channels[0]], 1
    ch, last = channels[0], len(channels) - 1
    for level, width in enumerate(channels):
        for _ in range(config.layers_per_block):
            add_resblock(f"input_blocks.{index}.0", ch, width)
            ch = width
            if config.down_block_types[level].startswith("CrossAttn"):
                add_transformer(f"input_blocks.{index}.1")
            skips.append(ch)
            index += 1
        if level != last:
            add(f"input_blocks.{index}.0", ["op"])
            skips.append(ch)
            index += 1
    add_resblock("middle_block.0", ch, ch)
    add_transformer("middle_block.1")
    add_resblock("middle_block.2", ch, ch)
    index = 0
    for up, level in enumerate(reversed(range(len(channels)))):
        attention = config.up_block_types[up].startswith("CrossAttn")
        for j in range(config.layers_per_block + 1):
            skip = skips.pop()
            add_resblock(f"output_blocks.{index}.0", ch + skip, channels[level])
            ch = channels[level]
            if attention:
                add_transformer(f"output_blocks.{index}.1")
            if level != 0 and j == config.layers_per_block:
                add(f"output_blocks.{index}.{2 if attention else 1}", ["conv"])
            index += 1
    unet_keys = ["model.diffusion_model." + key.lstrip(".") for key in keys]
    text_keys = [f"cond_stage_model.transformer.text_model.{key}" for key in text_encoder.state_dict()]
    return unet_keys + text_keys


@pytest.mark.parametrize("which", ["toy", "sd15"])
def test_ldm_key_list_is_what_diffusers_single_file_loader_reads(bases, sd15, which):
    """The generated single-file keys convert, through diffusers' own LDM converter, to exactly the UNet's keys."""
    unet = bases[0] if which == "toy" else sd15["unet"]
    text_encoder = bases[1] if which == "toy" else sd15["text_encoder"]
    keys = ldm_checkpoint_keys(unet.config, text_encoder)
    converted = convert_ldm_unet_checkpoint({key: key for key in keys}, dict(unet.config))
    assert set(converted) == set(unet.state_dict())
    assert len(set(converted.values())) == len(converted)  # one checkpoint tensor per diffusers tensor


# -- A1111 / ComfyUI coverage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["toy", "sd15"])
def test_every_exported_module_is_found_by_a1111_and_comfyui(bases, toy_locon, sd15, which):
    unet = bases[0] if which == "toy" else sd15["unet"]
    text_encoder = bases[1] if which == "toy" else sd15["text_encoder"]
    kohya = toy_locon if which == "toy" else sd15["kohya"]
    compvis = compvis_modules_from_checkpoint_keys(ldm_checkpoint_keys(unet.config, text_encoder))
    assert unmatched_kohya_keys(kohya, compvis) == []
    comfy = comfyui_lora_key_map(unet.state_dict().keys(), text_encoder.state_dict().keys())
    assert comfyui_unmatched_kohya_keys(kohya, comfy) == []


CORRUPTIONS = [
    # (module renamed in the export, found by A1111, found by ComfyUI)
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq", False, False),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_proj", False, False),
    ("lora_unet_down_blocks_5_resnets_0_conv1", False, False),
    (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        True,
        False,
    ),  # A1111's SD1 fallback; not ComfyUI's lora_te_
    ("lora_te_encoder_layers_0_self_attn_q_proj", False, False),  # transformers 5 name without text_model
    ("lora_unet_down_blocks_0_resnets_0_norm1", False, True),  # A1111 renames no resnet norms; ComfyUI does
]


@pytest.mark.parametrize("module, a1111_finds, comfyui_finds", CORRUPTIONS)
def test_unmatched_keys_name_a_corrupted_module(bases, toy_locon, module, a1111_finds, comfyui_finds):
    unet, text_encoder = bases
    corrupted = dict(toy_locon)
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        corrupted[f"{module}.{part}"] = torch.zeros(())
    compvis = compvis_modules_from_checkpoint_keys(ldm_checkpoint_keys(unet.config, text_encoder))
    assert unmatched_kohya_keys(corrupted, compvis) == ([] if a1111_finds else [module])
    comfy = comfyui_lora_key_map(unet.state_dict().keys(), text_encoder.state_dict().keys())
    assert comfyui_unmatched_kohya_keys(corrupted, comfy) == ([] if comfyui_finds else [module])


def test_compvis_modules_from_checkpoint_keys():
    keys = [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.out.2.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "first_stage_model.decoder.conv_in.weight",  # the VAE takes no LoRA
    ]
    assert compvis_modules_from_checkpoint_keys(keys) == {
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "diffusion_model_out_2",
        "transformer_text_model_encoder_layers_0_self_attn_q_proj",
    }


# -- loads back at the same strength --------------------------------------------------------------------------------


def load_with_diffusers(bases, kohya_or_path, **kwargs):
    """Fresh base copies with the kohya LoRA loaded by diffusers' SD v1 LoRA loader (its kohya conversion)."""
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(kohya_or_path, **kwargs)
    unet, text_encoder = copy.deepcopy(bases[0]), copy.deepcopy(bases[1])
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet=unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, text_encoder=text_encoder)
    return unet, text_encoder


def merge_like_a1111(bases, kohya):
    """Fresh base copies with W += (alpha / rank) * up @ down per kohya module: A1111's and ComfyUI's LoRA math."""
    unet, text_encoder = copy.deepcopy(bases[0]), copy.deepcopy(bases[1])
    targets = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()}
    targets |= {"lora_te_text_model_" + name.replace(".", "_"): m for name, m in text_encoder.named_modules()}
    with torch.no_grad():
        for module in kohya_modules(kohya):
            down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
            weight = targets[module].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += kohya[f"{module}.alpha"].item() / down.shape[0] * delta
    return unet, text_encoder


@pytest.mark.parametrize("preset", ["attn", "attn+ff", "locon"])
def test_diffusers_loads_the_export_at_the_trained_strength(bases, inputs, preset):
    unet, text_encoder, _, _ = trained(bases, preset)
    expected = outputs(unet, text_encoder, inputs)
    kohya = peft_to_kohya(
        get_peft_model_state_dict(unet),
        get_peft_model_state_dict(text_encoder),
        unet_alpha=ALPHA,
        text_encoder_alpha=ALPHA,
    )
    base = outputs(*bases, inputs)
    for got, want, before in zip(outputs(*load_with_diffusers(bases, dict(kohya)), inputs), expected, base):
        assert (want - before).abs().max() > 1e-2  # the LoRA does change the output...
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # ...and comes back at the same strength
    for got, want in zip(outputs(*merge_like_a1111(bases, kohya), inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_saved_file_loads_through_diffusers(bases, inputs, tmp_path):
    unet, text_encoder, _, _ = trained(bases, "attn")
    unet_sd, te_sd = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    kohya = peft_to_kohya(unet_sd, te_sd, unet_alpha=ALPHA, text_encoder_alpha=ALPHA)
    path = save_kohya(tmp_path / "toy_lora.safetensors", kohya, {"ss_network_alpha": "8.0"})
    loaded = load_with_diffusers(bases, str(tmp_path), weight_name=path.name)
    for got, want in zip(outputs(*loaded, inputs), outputs(unet, text_encoder, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


PATTERNS = [
    # (unet LoraConfig extras, text-encoder extras, diffusers' kohya loader gets it right)
    (dict(rank_pattern={"to_k": 2, "conv2": 8}), {}, True),
    (dict(alpha_pattern={"conv1": 16, "proj_out": 2}), {}, True),
    (dict(use_rslora=True), dict(use_rslora=True), True),
    # diffusers 0.42.1 mis-names per-module alphas of attention processors and text-encoder modules (its
    # _get_alpha_name / alpha_pattern rebuild); A1111 and ComfyUI read the alpha next to each module.
    (dict(alpha_pattern={"to_v": 2}), {}, False),
    (dict(rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 2, "conv1": 16}), dict(alpha_pattern={"q_proj": 2}), False),
]


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")  # the diffusers bug above
@pytest.mark.parametrize("unet_kwargs, te_kwargs, diffusers_ok", PATTERNS)
def test_per_module_rank_and_alpha(bases, inputs, unet_kwargs, te_kwargs, diffusers_ok):
    unet, text_encoder, unet_config, te_config = trained(bases, "locon", unet_kwargs, te_kwargs)
    unet_sd, te_sd = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    unet_alpha = kohya_alphas_from_lora_config(unet_config.to_dict(), module_names(unet_sd))
    te_alpha = kohya_alphas_from_lora_config(te_config.to_dict(), module_names(te_sd))
    kohya = peft_to_kohya(unet_sd, te_sd, unet_alpha=unet_alpha, text_encoder_alpha=te_alpha)
    expected = outputs(unet, text_encoder, inputs)
    for got, want in zip(outputs(*merge_like_a1111(bases, kohya), inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    loaded = outputs(*load_with_diffusers(bases, dict(kohya)), inputs)
    worst = max((got - want).abs().max().item() for got, want in zip(loaded, expected))
    # A known diffusers limitation is asserted, so an upgrade that fixes it shows up here.
    assert (worst < 1e-5) == diffusers_ok, f"diffusers kohya loader: max error {worst:.2e}, expected ok={diffusers_ok}"


def test_alphas_from_lora_config_follow_peft_patterns():
    config = lora_config(["to_q", "to_k"], rank_pattern={"to_k": 16}, alpha_pattern={"down_blocks.0.*to_q": 2})
    modules = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.0.to_q", "x.to_k"]
    assert kohya_alphas_from_lora_config(config.to_dict(), modules) == {
        modules[0]: 2.0,
        modules[1]: 8.0,
        modules[2]: 8.0,
    }
    rslora = lora_config(["to_k"], rank_pattern={"to_k": 16}, use_rslora=True).to_dict()
    assert kohya_alphas_from_lora_config(rslora, ["a.to_k"]) == {"a.to_k": 8.0 * math.sqrt(16)}


def test_diffusers_lora_file_converts_like_the_peft_dicts(bases, tmp_path):
    """pytorch_lora_weights.safetensors (unet./text_encoder. prefixed, LoraConfig in its header) -> same export."""
    unet, text_encoder, unet_config, te_config = trained(bases, "attn+ff", dict(alpha_pattern={"ff.net.2": 4}))
    unet_sd, te_sd = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safetensors.safe_open(path, "pt") as file:
        configs = lora_configs_from_diffusers_metadata(file.metadata())
    file_unet, file_te = split_diffusers_lora(safetensors.torch.load_file(path))
    from_file = peft_to_kohya(
        file_unet,
        file_te,
        unet_alpha=kohya_alphas_from_lora_config(configs["unet"], module_names(file_unet)),
        text_encoder_alpha=kohya_alphas_from_lora_config(configs["text_encoder"], module_names(file_te)),
    )
    direct = peft_to_kohya(
        unet_sd,
        te_sd,
        unet_alpha=kohya_alphas_from_lora_config(unet_config.to_dict(), module_names(unet_sd)),
        text_encoder_alpha=ALPHA,
    )
    assert from_file.keys() == direct.keys()
    assert all(torch.equal(from_file[key], direct[key]) for key in direct)
    assert from_file["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.alpha"].item() == 4.0
    # the prefixed form also goes straight in
    assert peft_to_kohya({f"unet.{k}": v for k, v in unet_sd.items()}, unet_alpha=ALPHA).keys() == (
        peft_to_kohya(unet_sd, unet_alpha=ALPHA).keys()
    )


# -- what cannot be exported ----------------------------------------------------------------------------------------


def test_dora_is_refused(bases):
    unet = add_random_lora(copy.deepcopy(bases[0]), lora_config(["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        peft_to_kohya(get_peft_model_state_dict(unet), unet_alpha=ALPHA)
    with pytest.raises(ValueError, match="use_dora"):
        kohya_alphas_from_lora_config(lora_config(["to_q"], use_dora=True).to_dict(), ["a.to_q"])


def test_diffusers_sd1_loader_drops_dora_scale():
    """Why DoRA is refused: diffusers' SD v1 loader throws kohya `dora_scale` keys away (so would load plain LoRA)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya = {
        f"{name}.lora_down.weight": torch.zeros(4, 64),
        f"{name}.lora_up.weight": torch.zeros(64, 4),
        f"{name}.alpha": torch.tensor(8.0),
        f"{name}.dora_scale": torch.ones(1, 64),
    }
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(kohya)
    assert state_dict and not [key for key in state_dict if "magnitude" in key or "dora" in key]


BAD_INPUTS = [
    ({"down_blocks.0.to_q.weight": torch.zeros(4, 4)}, None, {}, "not a peft LoRA key"),
    ({"a.to_q.lora_A.default.weight": torch.zeros(4, 8)}, None, {}, "not a peft LoRA key"),
    ({"a.to_q.lora_A.weight": torch.zeros(4, 8)}, None, {}, "needs both lora_A.weight and lora_B.weight"),
    (
        {"a.to_q.lora_A.weight": torch.zeros(4, 8), "a.to_q.lora_B.weight": torch.zeros(8, 2)},
        None,
        {},
        "one rank",
    ),
    (
        {"a.to_q.lora_A.weight": torch.zeros(4, 8), "a.to_q.lora_B.weight": torch.zeros(8, 4)},
        None,
        {"unet_alpha": {"b.to_q": 8.0}},
        "no alpha for LoRA module 'a.to_q'",
    ),
    (
        {"a.to_q.lora_A.weight": torch.zeros(4, 8), "a.to_q.lora_B.weight": torch.zeros(8, 4)},
        {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
        {"text_encoder_alpha": None},
        "text_encoder_alpha is required",
    ),
    ({"text_encoder.x.lora_A.weight": torch.zeros(4, 8)}, None, {}, "split_diffusers_lora"),
    (
        {
            "a.to_q.lora_A.weight": torch.zeros(4, 8),
            "a.to_q.lora_B.weight": torch.zeros(8, 4),
            "a.to_q.lora_B.bias": torch.zeros(8),
        },
        None,
        {},
        "lora_bias",
    ),
]


@pytest.mark.parametrize("unet_lora, te_lora, kwargs, message", BAD_INPUTS)
def test_bad_inputs_are_refused(unet_lora, te_lora, kwargs, message):
    kwargs = {"unet_alpha": ALPHA, **kwargs}
    with pytest.raises(ValueError, match=message):
        peft_to_kohya(unet_lora, te_lora, **kwargs)


def test_metadata_without_adapter_config_is_refused():
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        lora_configs_from_diffusers_metadata({"format": "pt"})


# -- metadata, hashes, saving ---------------------------------------------------------------------------------------

STARTED, FINISHED = 1_700_000_000.25, 1_700_003_600.75


def sample_facts(model=None, training=None, **overrides) -> LoraFacts:
    """The facts of a kohya-style run: sks dog, 1500 steps, on SD v1-5's single file."""
    model = {"title": "sks-dog", "resolution": (512, 512), "date": FINISHED, "trigger_words": ("sks dog", "sks")} | (
        model or {}
    )
    training = dict(
        steps=1500,
        epochs=10,
        learning_rate=1e-4,
        text_encoder_lr=5e-5,
        unet_lr=None,
        seed=42,
        mixed_precision="fp16",
        optimizer="torch.optim.adamw.AdamW",
        lr_scheduler="constant",
        batch_size=2,
        num_train_images=150,
        dataset_dirs={"10_sks dog": {"n_repeats": 10, "img_count": 15}},
        tag_frequency={"10_sks dog": {"sks dog": 15, "grass": 3}},
        started_at=STARTED,
        finished_at=FINISHED,
    ) | (training or {})
    base = BaseFacts(
        "v1-5-pruned-emaonly.safetensors", "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    )
    kwargs = dict(model=ModelFacts(**model), base=base, rank=RANK, alpha=ALPHA, training=TrainingFacts(**training))
    return LoraFacts(**{**kwargs, **overrides})


def sample_metadata(model=None, training=None, **overrides) -> dict[str, str]:
    return kohya_metadata(sample_facts(model, training, **overrides))


METADATA_GOLDEN = [
    ("ss_network_module", "networks.lora"),
    ("ss_network_dim", "4"),
    ("ss_network_alpha", "8.0"),
    ("ss_base_model_version", "sd_v1"),
    ("ss_v2", "False"),
    ("ss_resolution", "(512, 512)"),
    ("ss_sd_model_name", "v1-5-pruned-emaonly.safetensors"),
    ("ss_new_sd_model_hash", "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    ("ss_learning_rate", "0.0001"),
    ("ss_text_encoder_lr", "5e-05"),
    ("ss_unet_lr", "None"),
    ("ss_steps", "1500"),
    ("ss_max_train_steps", "1500"),
    ("ss_epoch", "10"),
    ("ss_num_train_images", "150"),
    ("ss_seed", "42"),
    ("ss_mixed_precision", "fp16"),
    ("ss_optimizer", "torch.optim.adamw.AdamW"),
    ("ss_lr_scheduler", "constant"),
    ("ss_batch_size_per_device", "2"),
    ("ss_clip_skip", "None"),
    ("ss_network_dropout", "None"),
    ("ss_output_name", "sks-dog"),
    ("ss_training_started_at", "1700000000.25"),
    ("ss_training_finished_at", "1700003600.75"),
    ("ss_dataset_dirs", '{"10_sks dog": {"n_repeats": 10, "img_count": 15}}'),
    ("ss_tag_frequency", '{"10_sks dog": {"sks dog": 15, "grass": 3}}'),
    ("modelspec.sai_model_spec", "1.0.1"),
    ("modelspec.architecture", "stable-diffusion-v1/lora"),
    ("modelspec.implementation", "diffusers"),
    ("modelspec.title", "sks-dog"),
    ("modelspec.resolution", "512x512"),
    ("modelspec.prediction_type", "epsilon"),
    ("modelspec.trigger_phrase", "sks dog, sks"),
    ("modelspec.date", datetime.datetime.fromtimestamp(1_700_003_600).isoformat()),
]


@pytest.mark.parametrize("key, value", METADATA_GOLDEN)
def test_metadata_golden_values(key, value):
    assert sample_metadata()[key] == value


def test_metadata_is_all_strings_and_optional_keys():
    metadata = sample_metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert "ss_network_args" not in metadata and "ss_sd_model_hash" not in metadata  # only when known
    locon = sample_metadata(
        model={"prediction_type": "v_prediction", "clip_skip": 2},
        network_args={"conv_dim": 4, "conv_alpha": 8},
        extra={"ss_noise_offset": 0.05},
    )
    assert json.loads(locon["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8"}
    assert (locon["ss_base_model_version"], locon["modelspec.prediction_type"]) == ("sd_v1_v", "v")
    assert (locon["ss_clip_skip"], locon["modelspec.encoder_layer"], locon["ss_noise_offset"]) == ("2", "2", "0.05")


def test_bucket_info_is_what_a1111_reads_resolutions_from():
    base = BaseFacts("v1-5-pruned-emaonly.safetensors", "6ce0", "1a2b3c4d")
    metadata = sample_metadata(training={"bucket_counts": {(512, 512): 10, (448, 576): 5}}, base=base)
    info = json.loads(metadata["ss_bucket_info"])
    # A1111 (ui_edit_user_metadata.py) sums bucket["count"] per f"{resolution[1]}x{resolution[0]}"
    shown = {f"{b['resolution'][1]}x{b['resolution'][0]}": b["count"] for b in info["buckets"].values()}
    assert shown == {"512x512": 10, "576x448": 5} and metadata["ss_sd_model_hash"] == "1a2b3c4d"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model={"resolution": (512,)}), "resolution"),
        (dict(model={"prediction_type": "sample"}), "prediction_type"),
        (dict(training={"mixed_precision": "fp32"}), "mixed_precision"),
        (dict(extra={"modelspec.title": "x"}), "must start with 'ss_'"),
    ],
)
def test_metadata_bad_inputs(overrides, message):
    with pytest.raises(ValueError, match=message):
        sample_metadata(**overrides)


def test_save_writes_metadata_and_the_hash_a1111_computes(toy_locon, tmp_path):
    metadata = sample_metadata()
    path = save_kohya(tmp_path / "sks-dog.safetensors", toy_locon, metadata, dtype=torch.float16)
    assert [p.name for p in tmp_path.iterdir()] == ["sks-dog.safetensors"]  # no temp file left behind
    with safetensors.safe_open(path, "pt") as file:
        header = file.metadata()
        assert set(file.keys()) == set(toy_locon)
        assert file.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 8.0
    assert {k: header[k] for k in metadata} == metadata
    fp16 = {key: tensor.to(torch.float16) for key, tensor in toy_locon.items()}
    assert (header["sshs_model_hash"], header["sshs_legacy_hash"]) == sshs_hashes(fp16, metadata)
    assert header["sshs_model_hash"] == a1111_lora_hash(path)  # A1111 would compute the same from the file
    assert header["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # files under 1 MiB


def test_legacy_hash_covers_only_ss_metadata():
    big = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32)}  # 1.6 MB of tensor data
    base = sshs_hashes(big, {"ss_network_dim": "4"})
    assert sshs_hashes(big, {"ss_network_dim": "4", "modelspec.title": "renamed"}) == base
    # The legacy hash reads the file at offset 1 MiB, so a longer header shifts what it sees.
    changed = sshs_hashes(big, {"ss_network_dim": "4", "ss_training_comment": "a longer header"})
    assert changed[0] == base[0] and changed[1] != base[1]  # model hash: tensors only; legacy: header included


@pytest.mark.parametrize(
    "name, metadata, message",
    [("lora.ckpt", {}, "must end in .safetensors"), ("lora.safetensors", {"ss_network_dim": 4}, "must be strings")],
)
def test_save_bad_inputs(toy_locon, tmp_path: Path, name, metadata, message):
    with pytest.raises(ValueError, match=message):
        save_kohya(tmp_path / name, toy_locon, metadata)
