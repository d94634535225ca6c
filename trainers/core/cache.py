"""Caches that take the VAE and the text encoder out of the training step.

Latents: each training image is encoded once per (image content, bucket size, VAE) and the posterior's mean and
std are stored on disk, so a second run on the same data starts training at once. A step then samples
latent = mean + std * eps, exactly what encoding on the fly would give (the diffusers examples call
`latent_dist.sample()` each step), at no VAE cost. With random_flip the mirrored image is cached too; flipping
a latent is not the same as encoding a flipped image.

Text embeddings: when the text encoder is frozen and captions are fixed (no tag shuffle), every caption the run
can use is encoded once up front and kept on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.workspace import default_cache_dir as default_cache_dir  # where it lives: torch-free
from sdtune.trainers.core.diffusion import host_to_device


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's config and weights: a different VAE must never reuse another's latents."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CachedLatent:
    mean: torch.Tensor  # [4, h, w], already multiplied by the VAE scaling factor
    std: torch.Tensor
    mean_flipped: torch.Tensor | None = None
    std_flipped: torch.Tensor | None = None

    def sample(self, flip: bool, generator: torch.Generator | None, draw: bool = True) -> torch.Tensor:
        """A latent from the posterior (`draw`), or its mean. The noise is drawn either way, so the generator's
        stream, and with it every later draw of the step, does not depend on the choice."""
        mean, std = (self.mean_flipped, self.std_flipped) if flip else (self.mean, self.std)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + std * eps if draw else mean


class LatentCache:
    """Disk cache of VAE posteriors under `<root>/latents/<vae fingerprint[:16]>/<key>.safetensors`."""

    def __init__(self, root: Path, vae_id: str):
        self.folder = Path(root) / "latents" / vae_id[:16]
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(content_hash: str, bucket: tuple[int, int], flip: bool) -> str:
        return hashlib.sha256(f"{content_hash}|{bucket[0]}x{bucket[1]}|flip={int(flip)}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            return tensors["mean"], tensors["std"]
        except Exception:  # a torn or foreign file: recompute rather than train on garbage
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor):
        with atomic_path(self.path(key), ".safetensors") as tmp:
            save_file({"mean": mean.contiguous(), "std": std.contiguous()}, tmp)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, 3, H, W] pixels in [-1, 1] -> (mean, std) of the scaled latent posterior, float32 on the CPU."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return (dist.mean * scale).float().cpu(), (dist.std * scale).float().cpu()


def cache_latents(records, load_pixels, vae, cache: LatentCache, flip: bool, progress=None) -> tuple[list, int]:
    """Encodes every record not yet in `cache`; returns ([CachedLatent per record], number newly encoded).

    Args:
        records: objects with `content_hash` and `bucket`.
        load_pixels: record -> [3, H, W] tensor in [-1, 1] at the record's bucket size.
        flip: also cache the mirrored image.
    """
    results, encoded = [], 0
    for i, record in enumerate(records):
        entries = []
        for flipped in [False, True] if flip else [False]:
            key = LatentCache.key(record.content_hash, record.bucket, flipped)
            hit = cache.get(key)
            if hit is None:
                pixels = load_pixels(record)
                if flipped:
                    pixels = torch.flip(pixels, dims=[-1])
                mean, std = encode_posterior(vae, pixels[None])
                hit = (mean[0], std[0])
                cache.put(key, *hit)
                encoded += 1
            entries.extend(hit)
        results.append(CachedLatent(*entries))
        if progress is not None:
            progress(i + 1, len(records))
    return results, encoded


class TextEmbeddingCache:
    """Encoder hidden states of a fixed set of captions, computed once with the frozen text encoder."""

    def __init__(self, tokenizer, text_encoder, captions: set[str], device, batch_size: int = 64):
        self.states: dict[str, torch.Tensor] = {}
        ordered = sorted(captions)
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            for caption, state in zip(chunk, encode_text(tokenizer, text_encoder, chunk, device)):
                self.states[caption] = state

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.stack([self.states[c] for c in captions])


def text_states(cache: TextEmbeddingCache | None, tokenizer, text_encoder, captions: list[str], device):
    """Encoder hidden states of a batch's captions: from the cache when there is one, else encoded now (a trained
    text encoder, or shuffled tags)."""
    if cache is not None:
        return cache(captions)
    return encode_text(tokenizer, text_encoder, captions, device)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """Last hidden state of the CLIP text encoder (what SD v1-5 cross-attends to)."""
    ids = host_to_device(tokenize(tokenizer, captions), device)
    return text_encoder(ids, return_dict=False)[0]
