"""Pretrains the bundled toy base: a small model in the exact SD v1-5 folder layout, on the toy world.

Usage:
    python trainers/tools/pretrain_toy.py --out adapters/toy_base            # everything, seeded, ~1 h on 2 CPU cores
    python trainers/tools/pretrain_toy.py --out /tmp/toy --unet-steps 500    # a quick, weaker one

What it builds, in order (each stage is cached under --work, so a rerun resumes after the last finished one):
    1. tokenizer/    the real CLIP BPE tokenizer, from `clip_bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI CLIP);
                     "a photo of sks dog" -> [49406, 320, 1125, 539, 48136, 1929, 49407] as in SD v1-5.
    2. text_encoder/ a 2-layer CLIPTextModel, hidden size 64. It stays at its seeded random init: the toy world
                     needs no language model, only distinct features per word, and random CLIP layers give that.
    3. vae/          AutoencoderKL, 8x downsampling to 4 latent channels, trained for reconstruction on the
                     WHOLE toy world (every colour and shape, plus random-hue fills), like SD's general-purpose
                     VAE: a fine-tune can then draw held-out concepts (purple, stars) that the UNet never saw. Its
                     `scaling_factor` is 1 / std of the UNet's training latents, as SD's 0.18215 was. Then its
                     decoder alone is polished on the frozen encoder's latents (truer colours, crisper edges).
    4. unet/         UNet2DConditionModel with cross-attention, trained with the same diffusion loss as the
                     sdtune trainers on cached latents and text states, 10% caption dropout for guidance, on the
                     base vocabulary only (red/green/blue/yellow circles, squares, triangles).
    5. scheduler/, model_index.json, feature_extractor/ as in SD v1-5; then the bar check (12 prompts x 4 seeds).

The weights are saved in fp16 (the folder must stay small enough to commit); sdtune loads them in fp32 on CPU.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import gzip
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune.adapters import toyworld
from sdtune.adapters.errors import NotFoundError
from sdtune.adapters.toy_architecture import SD15_SCHEDULE, TOY_TEXT_ENCODER, TOY_UNET, TOY_VAE
from sdtune.trainers.core.diffusion import denoising_step_loss

DEFAULT_BPE = Path(__file__).resolve().parents[3] / "shared" / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder to write the toy base to.")
    parser.add_argument("--work", type=Path, default=Path("toy_base_work"), help="Cache of finished stages.")
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE, help="clip_bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=12000, help="Toy-world images to train on.")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=500, help="Decoder polish with the encoder frozen.")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


# 1) Tokenizer ---------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the base alphabet of its BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def build_clip_tokenizer(bpe_path: Path, out_dir: Path) -> CLIPTokenizer:
    """Writes vocab.json + merges.txt exactly as OpenAI CLIP derives them (49,408 tokens) and loads them."""
    if not bpe_path.is_file():
        raise NotFoundError(f"--bpe: {bpe_path} not found; it ships in ../shared/data/ beside the checkout")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return CLIPTokenizer.from_pretrained(out_dir)


# 2) Text encoder ------------------------------------------------------------------------------------------------


def build_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(**TOY_TEXT_ENCODER)
    return CLIPTextModel(config).eval()


# 3) VAE ---------------------------------------------------------------------------------------------------------


def vae_images(n: int, seed: int) -> list:
    """The VAE's data: every colour and shape of the world, half of them with a random saturated fill."""
    rng = random.Random(seed + 17)
    images = []
    for _ in range(n):
        scene = toyworld.sample_scene(rng, tuple(toyworld.COLORS), toyworld.SHAPES)
        if rng.random() < 0.5:
            r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.55, 0.95))
            scene = dataclasses.replace(scene, fill=(int(r * 255), int(g * 255), int(b * 255)))
        images.append(toyworld.render(scene))
    return images


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def fit(module: torch.nn.Module, steps: int, lr: float, label: str, batch_loss) -> None:
    """AdamW with a one-cycle schedule over `module`'s parameters; `batch_loss()` draws a batch, returns its loss."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.time()
    for step in range(steps):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{label} step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)


def train_vae(pixels: torch.Tensor, steps: int, batch: int, seed: int, device: str) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE).to(device)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss():
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges crisp (the scorer measures geometry); the tiny KL term keeps the latent well-scaled.
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    fit(vae, steps, 1e-3, "vae", batch_loss)
    return vae.eval().cpu()


def polish_decoder(vae: AutoencoderKL, latents: torch.Tensor, pixels: torch.Tensor, steps: int, seed: int, device):
    """Fine-tunes the decoder alone on (latent, image) pairs of the frozen encoder: crisper, truer colours.

    The UNet's training latents come from the encoder, which does not change here, so this stage is independent
    of the UNet's. Latents get a little noise, as the UNet's samples are never exactly on the data."""
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).to(device).train()
    gen, noise_scale = torch.Generator().manual_seed(seed + 3), 0.1 * latents.std().item()

    def batch_loss():
        idx = torch.randint(0, len(latents), (32,), generator=gen)
        z = latents[idx] + noise_scale * torch.randn(latents[idx].shape, generator=gen)
        recon, x = vae.decode(z.to(device)).sample, pixels[idx].to(device)
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)

    fit(decoder, steps, 5e-4, "decoder", batch_loss)
    return vae.eval().cpu()


@torch.no_grad()
def vae_check(vae: AutoencoderKL, seed: int = 99) -> dict[str, float]:
    """Share of VAE round trips in which the scorer still reads the right colour and shape, per colour."""
    results = {}
    for color in toyworld.COLORS:
        data = toyworld.generate(24, seed=seed, colors=[color], shapes=toyworld.SHAPES)
        x = to_tensor([image for image, _, _ in data])
        out = vae.decode(vae.encode(x).latent_dist.mean).sample
        arr = ((out.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        images = [Image.fromarray(a) for a in arr]
        results[color] = toyworld.score_images(images, [(s.color, s.shape) for _, _, s in data]).both
    return results


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, device: str) -> torch.Tensor:
    vae.to(device)
    chunks = [vae.encode(pixels[i : i + 256].to(device)).latent_dist.mean.cpu() for i in range(0, len(pixels), 256)]
    vae.cpu()
    return torch.cat(chunks)


# 4) UNet --------------------------------------------------------------------------------------------------------


def build_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TOY_UNET)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(latents, caption_ids, text_states, steps, batch, lr, seed, device) -> UNet2DConditionModel:
    """Plain diffusion pretraining on cached latents. `text_states[k]` belongs to caption k; the last is ""."""
    unet = build_unet(seed).to(device).train()
    scheduler = DDPMScheduler(**SD15_SCHEDULE, prediction_type="epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warmup = max(steps // 50, 1)
    # 1) linear warmup, 2) cosine decay to 5% of the peak: stable start, fine end.
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    gen = torch.Generator().manual_seed(seed + 1)
    empty = len(text_states) - 1
    text_states, latents, start = text_states.to(device), latents.to(device), time.time()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        cond = caption_ids[idx].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = empty  # caption dropout -> unconditional model for CFG
        loss = denoising_step_loss(
            unet, scheduler, latents[idx.to(device)], text_states[cond.to(device)], generator=gen
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"unet step {step:5d}  loss {loss.item():.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
    return unet.eval().cpu()


# 5) Assemble ----------------------------------------------------------------------------------------------------


def write_pipeline_files(out: Path):
    """scheduler/, feature_extractor/ and model_index.json as SD v1-5 has them (no safety checker)."""
    PNDMScheduler(
        **SD15_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon"
    ).save_pretrained(out / "scheduler")
    CLIPImageProcessor(crop_size=224, size=224).save_pretrained(out / "feature_extractor")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# 6) Bar check and model card --------------------------------------------------------------------------------------

BAR_GUIDANCE = (3.0, 5.0, 7.5)


def bar_check(out: Path) -> dict[float, dict]:
    """The bar (12 prompts x 4 seeds, 25 steps) on the saved folder, at several guidance scales."""
    from sdtune.adapters import quiet_libraries, scoring
    from sdtune.adapters.base import load_pipeline

    quiet_libraries()
    pipe = load_pipeline(str(out))
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for guidance in BAR_GUIDANCE:
        results[guidance] = scoring.score_targets(pipe, scoring.bar_targets(), guidance=guidance).as_dict()
        print(f"bar at guidance {guidance}: {results[guidance]}", flush=True)
    return results


def write_model_card(out: Path, args, results: dict[float, dict], best: float, reconstruction: dict[str, float]):
    rows = "\n".join(f"| {g} | {r['color']:.0%} | {r['shape']:.0%} | {r['both']:.0%} |" for g, r in results.items())
    (out / "README.md").write_text(f"""# sdtune toy base

A small model in the exact Stable Diffusion v1-5 folder layout, pretrained by `trainers/tools/pretrain_toy.py` on the
toy world (`sdtune.adapters.toyworld`): one flat red, green, blue or yellow circle, square or triangle on a
light background, 64 x 64 px, captioned "a {{color}} {{shape}}". Purple, orange, cyan and stars are held out, so
fine-tunes have something new to learn.

Command: `python trainers/tools/pretrain_toy.py --out {out} --seed {args.seed} --images {args.images} \
--vae-steps {args.vae_steps} --decoder-steps {args.decoder_steps} --unet-steps {args.unet_steps} --unet-batch {args.unet_batch} --unet-lr {args.unet_lr}`

Recommended guidance: {best} (in `sdtune.json`; `sdtune sample` and validation use it unless told otherwise).
At higher guidance this tiny UNet overshoots: colours drift and shapes melt.

VAE round trips the scorer reads correctly (24 images of every shape per colour):
{", ".join(f"{c} {v:.0%}" for c, v in reconstruction.items())}.

Bar (toy-world scorer; 12 prompts x 4 seeds, 25 steps of the default PNDM scheduler):

| guidance | colour | shape | both |
| --- | --- | --- | --- |
{rows}
""")


def main(argv=None):
    args = parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed), np.random.seed(args.seed)

    tokenizer = build_clip_tokenizer(args.bpe, work / "tokenizer")
    text_encoder = build_text_encoder(args.seed)

    data = toyworld.generate(args.images, seed=args.seed)
    pixels = to_tensor([image for image, _, _ in data])

    world_pixels = to_tensor(vae_images(args.images, args.seed))
    if (work / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(work / "vae")
    else:
        vae = train_vae(world_pixels, args.vae_steps, args.vae_batch, args.seed, args.device)
        latents = encode_latents(vae, pixels, args.device)
        vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
        vae.save_pretrained(work / "vae")
    latents = encode_latents(vae, pixels, args.device) * vae.config.scaling_factor
    if (work / "vae_polished" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(work / "vae_polished")
    else:
        # half base-world images (what the UNet draws), half whole-world ones (what fine-tunes will ask for)
        both = torch.cat([pixels, world_pixels])
        vae = polish_decoder(
            vae, encode_latents(vae, both, args.device), both, args.decoder_steps, args.seed, args.device
        )
        vae.save_pretrained(work / "vae_polished")
    reconstruction = vae_check(vae)
    print(f"VAE round trips read correctly (colour and shape): {reconstruction}", flush=True)

    captions = sorted({caption for _, caption, _ in data})
    caption_ids = torch.tensor([captions.index(caption) for _, caption, _ in data])
    text_states = encode_prompts(tokenizer, text_encoder, captions + [""])

    if (work / "unet" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(work / "unet")
    else:
        unet = train_unet(
            latents, caption_ids, text_states, args.unet_steps, args.unet_batch, args.unet_lr, args.seed, args.device
        )
        unet.save_pretrained(work / "unet")

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work / "tokenizer", out / "tokenizer")
    text_encoder.half().save_pretrained(out / "text_encoder")
    vae.half().save_pretrained(out / "vae")
    unet.half().save_pretrained(out / "unet")
    write_pipeline_files(out)
    print(f"toy base written to {out}")
    results = bar_check(out)
    # The guidance this base is best sampled at becomes its recommended default (sdtune sample, validation).
    best = max(results, key=lambda g: (results[g]["both"], -g))
    (out / "sdtune.json").write_text(json.dumps({"guidance_scale": best}, indent=2) + "\n")
    write_model_card(out, args, results, best, reconstruction)


if __name__ == "__main__":
    main()
