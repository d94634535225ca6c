"""Training batches from cached latents: bucketed, flipped and captioned deterministically.

Every random choice about a sample (flip, caption shuffle and dropout) comes from `item_rng(seed, epoch,
position)`, and every random tensor of a micro-batch (latent sampling, noise, timesteps) from a generator seeded
with (seed, epoch, batch index, process). Nothing depends on how many batches came before in this process, so a
run resumed from a checkpoint replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdtune.trainers.core.cache import (
    CachedLatent,
    LatentCache,
    TextEmbeddingCache,
    cache_latents,
    default_cache_dir,
    vae_fingerprint,
)
from sdtune.trainers.core.data import (
    BucketBatchSampler,
    CaptionBuilder,
    DataError,
    DatasetScan,
    load_mask,
    load_pixels,
)
from sdtune.trainers.core.data.masks import latent_weights
from sdtune.trainers.core.recipe import DataConfig
from sdtune.trainers.core.runtime import item_rng, step_generator, step_seed


@dataclass
class Batch:
    latents: torch.Tensor  # [b, 4, h, w], scaled, on the CPU
    captions: list[str]
    generator: torch.Generator  # for this micro-batch's noise and timesteps
    conditions: torch.Tensor | None = None  # [b, 3, H, W] in [0, 1]: ControlNet conditioning images, flipped as
    # their latents
    num_prior: int = 0  # DreamBooth: the last `num_prior` samples are class images (prior preservation)
    masks: torch.Tensor | None = None  # [b, 1, h, w] in [0, 1]: masked loss's weight of each latent pixel, flipped
    # as their latents


def prepare_latents(scan: DatasetScan, cfg: DataConfig, vae, log=print) -> list[CachedLatent] | None:
    """Encodes (or reads back) every image's VAE posterior; None when `cache_latents` is off."""
    if not cfg.cache_latents:
        return None
    cache = LatentCache(default_cache_dir(cfg.cache_dir), vae_fingerprint(vae))
    loader = functools.partial(load_pixels, cfg=cfg, dataset=scan.dataset)
    latents, encoded = cache_latents(scan.records, loader, vae, cache, flip=cfg.random_flip)
    log(
        f"latents: {len(scan.records) - encoded if encoded <= len(scan.records) else 0} images from cache, "
        f"{encoded} encodings computed ({cache.folder})"
    )
    return latents


class BatchBuilder:
    """Turns sampler positions into `Batch`es for one process of the run."""

    def __init__(
        self,
        scan: DatasetScan,
        cfg: DataConfig,
        latents: list[CachedLatent] | None,
        vae,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
        conditions: Callable[[int], torch.Tensor] | None = None,
    ):
        """`conditions(record_index)` gives a record's conditioning tensor, when the method has one (ControlNet);
        it is flipped together with the image, so the pair stays aligned."""
        self.scan, self.cfg, self.latents, self.vae, self.seed = scan, cfg, latents, vae, seed
        self.conditions = conditions
        # one caption builder per subset (its own caption settings), or one for all
        self.captions = {i: CaptionBuilder(cfg.for_subset(i)) for i in range(len(cfg.subsets))} or {
            None: CaptionBuilder(cfg)
        }
        self.sampler = BucketBatchSampler(scan.records, batch_size, seed)
        self.expanded = self.sampler.expanded()
        self.rank, self.world = process_index, num_processes
        # masked loss: record index -> its mask on the latent grid, as is and mirrored. Static like the latents, so
        # with cached latents they are all made now, before the first step, and a step only stacks them.
        self._latent_masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if cfg.masked_loss and latents is not None:
            for i, cached in enumerate(latents):
                self.latent_mask(i, tuple(cached.mean.shape[-2:]))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's share of the epoch: every `world`-th batch, the same count on every process."""
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)
        usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
        return batches[:usable][self.rank :: self.world]

    def possible_captions(self) -> set[str] | None:
        """Every caption a batch can carry, if that set is fixed (no tag shuffle): lets the text states be cached."""
        texts = set()
        for subset, builder in self.captions.items():
            if builder.cfg.shuffle_caption:
                return None
            texts |= builder.fixed_captions([r.caption for r in self.scan.records if r.subset == subset])
        return texts

    def _encode_on_the_fly(self, records, flips, generator) -> torch.Tensor:
        pixels = []
        for record, flip in zip(records, flips):
            image = load_pixels(record, self.cfg, self.scan.dataset)
            pixels.append(torch.flip(image, dims=[-1]) if flip else image)
        with torch.no_grad():
            dist = self.vae.encode(torch.stack(pixels).to(self.vae.device, self.vae.dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
            if self.cfg.latent_sampling == "mean":
                noise = torch.zeros_like(noise)
            return ((dist.mean + dist.std * noise.to(dist.mean.dtype)) * self.vae.config.scaling_factor).float().cpu()

    def build(self, positions: list[int], epoch: int, batch_index: int) -> Batch:
        generator = step_generator(self.seed, epoch, batch_index, self.rank)
        records, flips, captions = [], [], []
        for position in positions:
            rng = item_rng(self.seed, epoch, position)
            record_index = self.expanded[position]
            flips.append(self.cfg.random_flip and rng.random() < 0.5)
            record = self.scan.records[record_index]
            captions.append(self.captions[record.subset](record.caption, rng))
            records.append(record_index)
        if self.latents is None:
            latents = self._encode_on_the_fly([self.scan.records[i] for i in records], flips, generator)
        else:
            draw = self.cfg.latent_sampling == "sample"
            latents = torch.stack([self.latents[i].sample(f, generator, draw) for i, f in zip(records, flips)])
        conditions = None
        if self.conditions is not None:
            pairs = [(self.conditions(i), f) for i, f in zip(records, flips)]
            conditions = torch.stack([torch.flip(c, dims=[-1]) if f else c for c, f in pairs])
        masks = None
        if self.cfg.masked_loss:
            size = tuple(latents.shape[-2:])
            masks = torch.stack([self.latent_mask(i, size)[int(f)] for i, f in zip(records, flips)])
        return Batch(latents, captions, generator, conditions, masks=masks)

    def latent_mask(self, record_index: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A record's loss weights on the latent grid [1, h, w], as is and mirrored, computed once (all ones without
        a mask). Bucket sides are multiples of the VAE's 8, so the mirrored grid equals averaging the mirrored pixel
        mask."""
        if record_index not in self._latent_masks:
            mask = load_mask(self.scan.records[record_index], self.cfg, self.scan.dataset)
            weights = torch.ones(1, *size) if mask is None else latent_weights(mask, size)
            self._latent_masks[record_index] = (weights, torch.flip(weights, dims=[-1]))
        return self._latent_masks[record_index]


class PriorPairedBatches:
    """DreamBooth batches: each instance micro-batch followed by as many class images, as in the paper.

    The class images of micro-batch (epoch, index) are drawn from the class images of the instance batch's bucket
    (so both halves stack into one UNet call) by an rng seeded with (seed, epoch, index, process): a resumed run
    pairs exactly as an unbroken one.
    """

    def __init__(self, instance: BatchBuilder, prior: BatchBuilder, source_key: str = "method.class_data_dir"):
        self.instance, self.prior = instance, prior
        self.pools: dict[tuple[int, int], list[int]] = {}
        for position, record_index in enumerate(prior.expanded):
            self.pools.setdefault(prior.scan.records[record_index].bucket, []).append(position)
        lacking = sorted({r.bucket for r in instance.scan.records} - set(self.pools))
        if lacking:
            w, h = lacking[0]
            raise DataError(
                f"{source_key}: no class image in the {w}x{h} bucket of some instance images; class and "
                "instance images must share buckets (crop them alike, or set data.enable_bucket: false)"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self.instance.epoch_batches(epoch)

    def possible_captions(self) -> set[str] | None:
        instance, prior = self.instance.possible_captions(), self.prior.possible_captions()
        return None if instance is None or prior is None else instance | prior

    def build(self, positions: list[int], epoch: int, batch_index: int) -> Batch:
        batch = self.instance.build(positions, epoch, batch_index)
        pool = self.pools[self.instance.scan.records[self.instance.expanded[positions[0]]].bucket]
        rng = random.Random(step_seed(self.instance.seed, epoch, batch_index, self.instance.rank, 11))
        chosen = (
            rng.sample(pool, len(positions)) if len(pool) >= len(positions) else rng.choices(pool, k=len(positions))
        )
        prior = self.prior.build(chosen, epoch, batch_index)
        latents = torch.cat([batch.latents, prior.latents])
        masks = _joined_masks(batch, prior)
        return Batch(latents, batch.captions + prior.captions, batch.generator, num_prior=len(chosen), masks=masks)


def _joined_masks(first: Batch, second: Batch) -> torch.Tensor | None:
    """The masks of two batches stacked into one, a batch without masks learning everywhere (None if neither has)."""
    if first.masks is None and second.masks is None:
        return None
    parts = [
        b.masks if b.masks is not None else torch.ones(len(b.latents), 1, *b.latents.shape[-2:])
        for b in (first, second)
    ]
    return torch.cat(parts)


def idle_during_steps(cfg: DataConfig, text_cache: TextEmbeddingCache | None, vae, text_encoder) -> list:
    """The frozen models a training step never calls: the VAE when latents are cached, the text encoder when the
    captions' states are. `RunLoop` keeps them in CPU memory between steps (SD v1-5 in fp16: ~0.4 GB of GPU memory
    back for activations)."""
    return ([vae] if cfg.cache_latents else []) + ([text_encoder] if text_cache is not None else [])


# Re-exported for trainers that build their own cache of another image column (ControlNet conditioning).
__all__ = ["Batch", "BatchBuilder", "LatentCache", "idle_during_steps", "prepare_latents"]


def make_batches(
    scan: DatasetScan,
    cfg: DataConfig,
    train,
    accelerator,
    vae,
    tokenizer,
    text_encoder,
    cache_text: bool,
    conditions: Callable[[int], torch.Tensor] | None = None,
    class_images: tuple[DatasetScan, DataConfig] | None = None,
) -> tuple[BatchBuilder | PriorPairedBatches, TextEmbeddingCache | None]:
    """The run's batches, with the VAE taken out of the step (cached latents, once per image, ever) and, when
    `cache_text` and the captions are a fixed set, the text encoder too (once per caption).

    `class_images` (DreamBooth's prior preservation: their scan and data section), or else the is_reg subsets of
    `data.subsets`, pairs every micro-batch with as many class images (`PriorPairedBatches`); they draw their own
    latent noise, from `train.seed + 1`.
    """

    def builder(images: DatasetScan, images_cfg: DataConfig, seed: int, conditions=None) -> BatchBuilder:
        latents = prepare_latents(images, images_cfg, vae, log=accelerator.print)
        process, world = accelerator.process_index, accelerator.num_processes
        batch_size = train.train_batch_size
        return BatchBuilder(images, images_cfg, latents, vae, batch_size, seed, process, world, conditions=conditions)

    batches = builder(scan, cfg, train.seed, conditions)
    if class_images is not None:
        batches = PriorPairedBatches(batches, builder(*class_images, train.seed + 1))
    elif scan.regularization is not None:  # is_reg subsets: kohya's regularization images, paired the same way
        batches = PriorPairedBatches(
            batches, builder(scan.regularization, cfg, train.seed + 1), "data.subsets (is_reg)"
        )
    captions = batches.possible_captions()
    if captions is None or not cache_text:
        return batches, None
    with torch.no_grad():
        return batches, TextEmbeddingCache(tokenizer, text_encoder, captions, accelerator.device)
