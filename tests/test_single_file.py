"""Single-file SD v1 checkpoints: golden keys, diffusers' reader as an independent check, round trips, bad inputs.

The golden keys and counts are those of the real SD v1-5 single file (v1-5-pruned-emaonly): 686 UNet, 248 VAE and
197 text encoder tensors, the last including `embeddings.position_ids`. They equal diffusers' own key counts (the
mapping is 1:1) plus that one buffer, and the published per-component key lists of SD v1 checkpoints (e.g. the A1111
model-toolkit's UNET-v1-SD / VAE-v1-SD / CLIP-v1-SD) list exactly these keys and shapes. The full SD v1-5 models are
built on the meta device from the bundled adapters/sd15_config, so no weights are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune.adapters import single_file as sf
from sdtune.adapters import single_file_keys as sfk
from sdtune.adapters.base import SD15_CONFIG
from sdtune.adapters.toy_architecture import TOY_TEXT_ENCODER, TOY_UNET, TOY_VAE

U, V, T = sfk.UNET_PREFIX, sfk.VAE_PREFIX, sfk.TEXT_PREFIX


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    """The full SD v1-5 UNet / VAE / text encoder on the meta device, from the bundled configs."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder"))
    return unet, vae, text_encoder


@pytest.fixture(scope="module")
def sd15_original(sd15):
    unet, vae, text_encoder = sd15
    return {
        "unet": sfk.unet_to_original(unet.state_dict(), unet.config),
        "vae": sfk.vae_to_original(vae.state_dict()),
        "text_encoder": sfk.text_encoder_to_original(text_encoder.state_dict()),
    }


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges: one token per character, enough for a round trip."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
    )
    return CLIPTokenizer.from_pretrained(folder)


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds noise to every parameter, so that no two tensors of one shape are equal (ones, zeros): a swapped
    mapping (norm1 <-> norm2, q <-> k) then changes values and the round trip catches it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    """A diffusers folder with random components in the toy-base sizes."""
    root = tmp_path_factory.mktemp("toy")
    tokenizer = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TOY_UNET)
    vae = AutoencoderKL(**TOY_VAE, scaling_factor=0.83)
    special = dict(bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TOY_TEXT_ENCODER, "vocab_size": len(tokenizer), **special}))
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=jitter(vae, 1),
        text_encoder=jitter(text_encoder, 2),
        tokenizer=tokenizer,
        unet=jitter(unet, 3),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def render(pipe) -> np.ndarray:
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def component_tensors(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


# -- the bundled SD v1-5 configs --------------------------------------------------------------------------------------


def test_sd15_config_builds_sd15_sizes(sd15):
    # Parameter counts of SD v1-5's UNet / VAE / CLIP ViT-L/14 text tower: a wrong config field changes them.
    counts = [sum(p.numel() for p in model.parameters()) for model in sd15]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    unet, vae, text_encoder = sd15
    assert (unet.config.sample_size, unet.config.cross_attention_dim, vae.config.scaling_factor) == (64, 768, 0.18215)
    index = json.loads((SD15_CONFIG / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG / "scheduler")
    assert (scheduler.config.beta_schedule, scheduler.config.steps_offset, scheduler.config.skip_prk_steps) == (
        "scaled_linear",
        1,
        True,
    )
    assert CLIPImageProcessor.from_pretrained(SD15_CONFIG / "feature_extractor").crop_size == {
        "height": 224,
        "width": 224,
    }


def test_bundled_config_names():
    assert sf.bundled_config("sd15") == SD15_CONFIG
    with pytest.raises(ValueError, match="unknown name 'sdxl'"):
        sf.bundled_config("sdxl")


# -- golden keys ------------------------------------------------------------------------------------------------------

SD15_GOLDEN = [
    ("unet", U + "time_embed.0.weight", (1280, 320)),
    ("unet", U + "time_embed.2.bias", (1280,)),
    ("unet", U + "input_blocks.0.0.weight", (320, 4, 3, 3)),
    ("unet", U + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
    ("unet", U + "input_blocks.1.0.emb_layers.1.weight", (320, 1280)),
    ("unet", U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320)),
    ("unet", U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    ("unet", U + "input_blocks.3.0.op.weight", (320, 320, 3, 3)),
    ("unet", U + "input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("unet", U + "input_blocks.11.0.out_layers.3.weight", (1280, 1280, 3, 3)),
    ("unet", U + "middle_block.0.in_layers.0.weight", (1280,)),
    ("unet", U + "middle_block.1.proj_in.weight", (1280, 1280, 1, 1)),
    ("unet", U + "middle_block.2.out_layers.3.bias", (1280,)),
    ("unet", U + "output_blocks.0.0.skip_connection.weight", (1280, 2560, 1, 1)),
    ("unet", U + "output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
    ("unet", U + "output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
    ("unet", U + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320)),
    ("unet", U + "output_blocks.11.0.skip_connection.weight", (320, 640, 1, 1)),
    ("unet", U + "out.0.weight", (320,)),
    ("unet", U + "out.2.weight", (4, 320, 3, 3)),
    ("vae", V + "encoder.conv_in.weight", (128, 3, 3, 3)),
    ("vae", V + "encoder.down.0.block.0.conv1.weight", (128, 128, 3, 3)),
    ("vae", V + "encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
    ("vae", V + "encoder.down.2.downsample.conv.weight", (512, 512, 3, 3)),
    ("vae", V + "encoder.mid.block_2.norm2.weight", (512,)),
    ("vae", V + "encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
    ("vae", V + "encoder.mid.attn_1.proj_out.weight", (512, 512, 1, 1)),
    ("vae", V + "encoder.norm_out.weight", (512,)),
    ("vae", V + "decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
    ("vae", V + "decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
    ("vae", V + "decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)),
    ("vae", V + "decoder.mid.attn_1.norm.weight", (512,)),
    ("vae", V + "quant_conv.weight", (8, 8, 1, 1)),
    ("vae", V + "post_quant_conv.weight", (4, 4, 1, 1)),
    ("text_encoder", T + "embeddings.token_embedding.weight", (49408, 768)),
    ("text_encoder", T + "embeddings.position_ids", (1, 77)),
    ("text_encoder", T + "encoder.layers.0.self_attn.q_proj.weight", (768, 768)),
    ("text_encoder", T + "encoder.layers.11.mlp.fc2.weight", (768, 3072)),
    ("text_encoder", T + "final_layer_norm.weight", (768,)),
]


@pytest.mark.parametrize("component,key,shape", SD15_GOLDEN, ids=[k for _, k, _ in SD15_GOLDEN])
def test_sd15_golden_keys(sd15_original, component, key, shape):
    assert tuple(sd15_original[component][key].shape) == shape


@pytest.mark.parametrize("component,count", [("unet", 686), ("vae", 248), ("text_encoder", 197)])
def test_sd15_key_counts_match_the_real_single_file(sd15, sd15_original, component, count):
    # Every diffusers key converts (1:1, no duplicates: a dict would swallow them), plus position_ids for CLIP.
    model = dict(zip(("unet", "vae", "text_encoder"), sd15))[component]
    assert len(sd15_original[component]) == count
    assert len(model.state_dict()) + (component == "text_encoder") == count


def test_sd15_components_do_not_collide(sd15_original):
    merged = {k for keys in sd15_original.values() for k in keys}
    assert len(merged) == 686 + 248 + 197
    assert sf.detect_config({k: v for part in sd15_original.values() for k, v in part.items()}) == "sd15"


TOY_GOLDEN = [  # the toy UNet: (CrossAttnDown, Down) / (Up, CrossAttnUp), 2 layers per block
    U + "input_blocks.2.1.proj_in.weight",
    U + "input_blocks.3.0.op.weight",
    U + "input_blocks.5.0.in_layers.2.weight",
    U + "middle_block.1.transformer_blocks.0.attn2.to_v.weight",
    U + "output_blocks.2.1.conv.weight",  # Upsample after a block without attention: second module
    U + "output_blocks.5.1.transformer_blocks.0.norm3.weight",
    U + "out.2.bias",
]


def test_toy_golden_keys(toy_folder):
    unet = load_file(toy_folder / "unet" / "diffusion_pytorch_model.safetensors")
    original = sfk.unet_to_original(unet, json.loads((toy_folder / "unet" / "config.json").read_text()))
    assert set(TOY_GOLDEN) <= set(original)
    assert not any(k.startswith(U + "input_blocks.4.1") or k.startswith(U + "output_blocks.2.2") for k in original)
    assert len(original) == len(unet)


# -- independent cross-check: diffusers' own reader -------------------------------------------------------------------


def test_diffusers_reader_inverts_sd15_conversion(sd15, sd15_original):
    unet, vae, text_encoder = sd15
    whole = {k: v for part in sd15_original.values() for k, v in part.items()}
    readers = {
        "unet": (unet, convert_ldm_unet_checkpoint(whole, dict(unet.config))),
        "vae": (vae, convert_ldm_vae_checkpoint(whole, dict(vae.config))),
        # diffusers strips `text_model.` itself for the flattened transformers 5 CLIPTextModel; position_ids is
        # ignored on load (a non-persistent buffer).
        "text_encoder": (
            text_encoder,
            {
                k.removeprefix("text_model."): v
                for k, v in convert_ldm_clip_checkpoint(whole).items()
                if not k.endswith("position_ids")
            },
        ),
    }
    for name, (model, read) in readers.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in read.items()} == expected, name


def test_own_inverse_matches_diffusers_keys(sd15, sd15_original):
    unet, vae, text_encoder = sd15
    assert set(sfk.unet_from_original(sd15_original["unet"], unet.config)) == set(unet.state_dict())
    back = sfk.vae_from_original(sd15_original["vae"])
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert set(sfk.text_encoder_from_original(sd15_original["text_encoder"])) == set(text_encoder.state_dict())


def test_text_encoder_accepts_both_transformers_layouts():
    weight = torch.randn(77, 8)
    flat = sfk.text_encoder_to_original({"embeddings.position_embedding.weight": weight})
    nested = sfk.text_encoder_to_original(
        {
            "text_model.embeddings.position_embedding.weight": weight,
            "text_model.embeddings.position_ids": torch.zeros(1, 77),
        }
    )
    assert flat.keys() == nested.keys() == {T + "embeddings.position_embedding.weight", T + "embeddings.position_ids"}
    ids = nested[T + "embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


def test_vae_accepts_deprecated_attention_names():
    new = {"encoder.mid_block.attentions.0.to_q.weight": torch.randn(4, 4)}
    old = {"encoder.mid_block.attentions.0.query.weight": new["encoder.mid_block.attentions.0.to_q.weight"]}
    assert torch.equal(
        sfk.vae_to_original(old)[V + "encoder.mid.attn_1.q.weight"],
        sfk.vae_to_original(new)[V + "encoder.mid.attn_1.q.weight"],
    )


# -- round trips on the toy sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_round_trip_folder_file_folder(toy_folder, tmp_path, half):
    before = StableDiffusionPipeline.from_pretrained(toy_folder, local_files_only=True)
    path = sf.save_single_file(toy_folder, tmp_path / "toy.safetensors", half=half)
    with safe_open(path, framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("position_ids")}
        assert dtypes == {"F16" if half else "F32"} and len(list(f.keys())) == len(component_tensors(before)) + 1
    assert sf.detect_config(path) == "toy"
    after = sf.load_single_file(path, toy_folder, tmp_path / "back")
    expected, got = component_tensors(before), component_tensors(after)
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        want = tensor.half().float() if half else tensor  # fp16 storage: exactly the fp16 rounding, nothing else
        assert torch.equal(got[key], want), key
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "back", local_files_only=True)
    assert all(torch.equal(v, component_tensors(reloaded)[k]) for k, v in got.items())
    if not half:  # same weights, same seed: the same pixels (and real pixels, not NaN or a flat image)
        images = render(before)
        assert np.isfinite(images).all() and images.std() > 0.01
        # Bitwise-equal weights still differ by ~2e-6 here: CPU conv kernels round differently with the tensors'
        # memory alignment (mmap'd from_pretrained vs copied from_single_file; cloning both gives exact equality).
        assert np.abs(images - render(after)).max() < 1e-5


def test_convert_both_ways(toy_folder, tmp_path):
    file = sf.convert(toy_folder, tmp_path / "toy.safetensors")
    folder = sf.convert(file, tmp_path / "folder", config=toy_folder)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert (folder / "model_index.json").is_file() and {v.dtype for v in unet.values()} == {torch.float32}
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.83
    with pytest.raises(FileExistsError, match="already exists"):
        sf.convert(file, tmp_path / "folder", config=toy_folder)
    sf.convert(file, tmp_path / "folder", config=toy_folder, overwrite=True, half=True)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.float16}
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*old"))


def test_the_toy_base_keeps_its_recommended_guidance_through_convert(toy_base, tmp_path):
    """The toy base renders well at guidance 3 (its sdtune.json) and as noise at SD's 7.5: `sdtune convert` to one
    file and back must not fall back to 7.5. A single file takes the settings of the config it is read with."""
    from sdtune.adapters.base import recommended_guidance

    file = sf.convert(toy_base, tmp_path / "toy.safetensors", half=True)
    assert recommended_guidance(str(file)) == 3.0
    folder = sf.convert(file, tmp_path / "back")
    assert json.loads((folder / "sdtune.json").read_text()) == {"guidance_scale": 3.0}
    assert recommended_guidance(str(folder)) == 3.0


# -- bad inputs: one clear line each ----------------------------------------------------------------------------------


def _sdxl_like():
    return {
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280),
        U + "label_emb.0.0.weight": torch.zeros(1280, 2816),
        U + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
    }


def _sd2_like():
    return {
        "cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 1024),
        U + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
    }


def _inpainting_like():
    return {
        U + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
    }


def _bad(tmp_path: Path, toy_folder: Path, case: str):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_vae").mkdir()
    for name in ("model_index.json", "unet", "text_encoder"):
        src = toy_folder / name
        (tmp_path / "no_vae" / name).symlink_to(src, target_is_directory=src.is_dir())
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"")
    toy_file = tmp_path / "toy.safetensors"
    save_file({U + "input_blocks.0.0.weight": torch.zeros(64, 4, 3, 3)}, toy_file)
    return {
        "missing folder": lambda: sf.save_single_file(tmp_path / "nope", tmp_path / "o.safetensors"),
        "not a diffusers folder": lambda: sf.save_single_file(tmp_path / "empty", tmp_path / "o.safetensors"),
        "missing component": lambda: sf.save_single_file(tmp_path / "no_vae", tmp_path / "o.safetensors"),
        "ckpt output": lambda: sf.save_single_file(toy_folder, tmp_path / "o.ckpt"),
        "existing output": lambda: sf.save_single_file(toy_folder, existing),
        "sdxl keys": lambda: sf.detect_config(_sdxl_like()),
        "sd2 keys": lambda: sf.detect_config(_sd2_like()),
        "inpainting unet": lambda: sf.detect_config(_inpainting_like()),
        "diffusers keys": lambda: sf.detect_config({"conv_in.weight": torch.zeros(320, 4, 3, 3)}),
        "pickle input": lambda: sf.convert(pickle_file, tmp_path / "x"),
        "unet-only file": lambda: sf.load_single_file(toy_file, toy_folder),
        "config of another size": lambda: sf.load_single_file(
            sf.save_single_file(toy_folder, tmp_path / "full.safetensors"), SD15_CONFIG
        ),
        "sdxl unet key": lambda: sfk.unet_to_original(
            {"add_embedding.linear_1.weight": torch.zeros(1)},
            {"layers_per_block": 2, "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]},
        ),
    }[case]


BAD = [
    ("missing folder", FileNotFoundError, "no such folder"),
    ("not a diffusers folder", ValueError, "no model_index.json"),
    ("missing component", FileNotFoundError, "no vae/ folder"),
    ("ckpt output", ValueError, "must be a .safetensors file"),
    ("existing output", FileExistsError, "already exists"),
    ("sdxl keys", ValueError, "SDXL"),
    ("sd2 keys", ValueError, "SD 2.x"),
    ("inpainting unet", ValueError, "9 input channels"),
    ("diffusers keys", ValueError, "diffusers-layout"),
    ("pickle input", ValueError, "diffusers folder or a .safetensors"),
    ("unet-only file", ValueError, "no VAE weights"),
    ("config of another size", ValueError, "does not match"),
    ("sdxl unet key", ValueError, "add_embedding"),
]


@pytest.mark.parametrize("case,error,message", BAD, ids=[c for c, _, _ in BAD])
def test_bad_inputs_fail_with_one_clear_line(tmp_path, toy_folder, case, error, message):
    with pytest.raises(error, match=message) as info:
        _bad(tmp_path, toy_folder, case)()
    assert "\n" not in str(info.value)
