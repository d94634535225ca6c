"""Held-out validation loss: the diffusion loss of images the run does not train on, at fixed timesteps and noise.

A training loss is noisy (each step draws its own timesteps and noise) and measured on the images being fitted,
so it cannot say when a run starts to overfit or which checkpoint generalises best. Here the held-out images are
noised once, at `TIMESTEPS` timesteps spread over the schedule, each with its own fixed noise tensor, and every
evaluation runs the same (x_t, t) pairs through the model as it is then:

    val_loss = mean over images i and timesteps t_k of || model(x_t_k(i), t_k, caption(i)) - target_k(i) ||^2

so two evaluations differ only by the weights: the number is comparable across steps and across runs. The noise
of image i at t_k comes from a generator seeded with (content hash of i, k), never from the training RNG, so
turning validation on changes nothing that training draws.

The images come from `validation.loss_split` (a share of the training images, chosen by `split_held_out`) or
`validation.loss_dir` (a folder, scanned as the training data is). Their latents are the VAE posterior means,
cached on disk like the training latents (trainers/core/cache.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sdtune.trainers.core.cache import LatentCache, cache_latents, default_cache_dir, encode_text, vae_fingerprint
from sdtune.trainers.core.data import CaptionBuilder, DataError, DatasetScan, load_pixels, scan_dataset
from sdtune.trainers.core.diffusion import training_schedule, training_target
from sdtune.trainers.core.recipe import DataConfig, Recipe, RecipeError

TIMESTEPS = 4  # fixed timesteps per image, at the middles of 4 equal slices of the schedule (125, 375, 625, 875)


def held_out_rank(seed: int, record) -> str:
    """The key that orders images for `loss_split`: a hash of the seed and the image's bytes (and its place, for
    identical copies), so the same dataset and seed hold back the same images whatever order they are scanned in."""
    where = record.path if record.path is not None else f"row {record.index}"
    return hashlib.sha256(f"{seed}|{record.content_hash}|{Path(str(where)).name}".encode()).hexdigest()


def split_held_out(scan: DatasetScan, share: float, seed: int) -> tuple[DatasetScan, DatasetScan]:
    """(the scan without the held-out images, a scan of the held-out images): round(share x images) of them, the
    lowest `held_out_rank`s. A split that leaves no image on either side is one RecipeError."""
    count = round(share * len(scan.records))
    if count < 1 or count >= len(scan.records):
        raise RecipeError(
            f"validation.loss_split: {share} of {len(scan.records)} images holds back {count}, leaving "
            f"{len(scan.records) - count} to train on; at least 1 must be held back and 1 trained on (raise the "
            "share, add images, or name a folder in validation.loss_dir)"
        )
    ranked = sorted(range(len(scan.records)), key=lambda i: held_out_rank(seed, scan.records[i]))
    held = set(ranked[:count])

    def part(keep: bool, **fields) -> DatasetScan:
        chosen = [i for i in range(len(scan.records)) if (i in held) != keep]
        if getattr(scan, "conditions", None) is not None:  # a ControlNet's pairs: each condition with its image
            fields["conditions"] = [scan.conditions[i] for i in chosen]
        return dataclasses.replace(scan, records=[scan.records[i] for i in chosen], **fields)

    return part(True), part(False, skipped=[])


def held_out_images(
    recipe: Recipe, scan: DatasetScan, scan_folder: Callable[[DataConfig], DatasetScan] = scan_dataset
) -> tuple[DatasetScan, DatasetScan | None]:
    """The training scan and the held-out scan of a recipe (None: no held-out loss). With `loss_split` the
    training scan loses the held-out images; with `loss_dir` it is unchanged, and the folder is read by
    `scan_folder` as the training data is (a ControlNet's: `scan_pairs`, conditions and all)."""
    v = recipe.validation
    if v.loss_split is not None:
        return split_held_out(scan, v.loss_split, recipe.train.seed)
    if v.loss_dir is None:
        return scan, None
    where = Path(v.loss_dir).expanduser()
    if not where.is_dir():
        found = "a file, not a folder" if where.exists() else "folder not found"
        raise RecipeError(f"validation.loss_dir: {found}: {where}")
    folder = recipe.data.model_copy(update={"train_data_dir": str(where), "dataset_name": None, "subsets": []})
    try:
        return scan, scan_folder(folder)
    except DataError as exc:
        raise RecipeError(f"validation.loss_dir: {str(exc).removeprefix('data.train_data_dir: ')}") from None


def image_names(held: DatasetScan) -> list[str]:
    return [Path(r.path).name if r.path is not None else f"row {r.index}" for r in held.records]


def fixed_noise(content_hash: str, k: int, shape) -> torch.Tensor:
    """Image `content_hash`'s noise at its k-th timestep, from a generator of its own (the training RNG untouched)."""
    seed = int(hashlib.sha256(f"val_loss|{content_hash}|{k}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@dataclasses.dataclass
class HeldOutItem:
    """One held-out image at one fixed timestep: what the model sees and what it should predict."""

    noisy: torch.Tensor  # [4, h, w] float32, CPU
    target: torch.Tensor
    timestep: int
    caption: str
    index: int  # its record in the held-out scan


class HeldOutLoss:
    """The held-out loss of one run: the items are built once (latents cached), `__call__` evaluates the model.

    The model is the base's UNet as it trains (a LoRA run's adapted UNet, a full fine-tune's UNet), or
    `forward(index)`: the model for held-out image `index` (a ControlNet with that image's condition, over the
    UNet), with `trained` the modules it adds. All run in eval mode under no_grad, each module's mode restored
    after. `history` keeps {step: val_loss} for the manifest.
    """

    def __init__(self, recipe: Recipe, held: DatasetScan, frozen, accelerator, forward=None, trained=()):
        self.held, self.accelerator = held, accelerator
        self.unet, self.text_encoder, self.tokenizer = frozen.unet, frozen.text_encoder, frozen.tokenizer
        self.forward, self.trained = forward or (lambda index: self.unet), list(trained)
        self.dtype = frozen.dtype
        self.source = (
            {"loss_split": recipe.validation.loss_split}
            if recipe.validation.loss_split is not None
            else {"loss_dir": recipe.validation.loss_dir}
        )
        self.history: dict[int, float] = {}
        scheduler = training_schedule(frozen.noise_scheduler, recipe.train.zero_terminal_snr)
        total = scheduler.config.num_train_timesteps
        self.timesteps = [int((k + 0.5) * total / TIMESTEPS) for k in range(TIMESTEPS)]
        means = held_out_latents(held, recipe.data, frozen.vae)
        captions = CaptionBuilder(recipe.data)  # the template only: no shuffle, no dropout
        self.items = []
        for index, (record, mean) in enumerate(zip(held.records, means)):
            for k, t in enumerate(self.timesteps):
                noise = fixed_noise(record.content_hash, k, mean.shape)
                timestep = torch.tensor([t])
                noisy = scheduler.add_noise(mean[None], noise[None], timestep)[0]
                target = training_target(scheduler, mean[None], noise[None], timestep)[0]
                self.items.append(HeldOutItem(noisy, target, t, captions.template(record.caption), index))
        accelerator.print(f"held-out validation loss: {len(held.records)} images: {', '.join(image_names(held))}")

    @torch.no_grad()
    def __call__(self, step: int) -> float:
        """The mean held-out loss of the model as it is now (plain MSE on the model's target)."""
        device = self.accelerator.device
        # every submodule's own mode, restored one by one: a loaded base sits in eval mode while the LoRA layers
        # peft added to it train (their dropout), and `train(mode)` on the whole model would change that
        models = [self.unet, self.text_encoder, *self.trained]
        modules = [m for model in models if model is not None for m in model.modules()]
        modes = [m.training for m in modules]
        for module in modules:
            module.training = False
        try:
            with self.accelerator.autocast():
                losses = [self._item_loss(item, device) for item in self.items]
        finally:
            for module, mode in zip(modules, modes):
                module.training = mode
        value = float(torch.stack(losses).mean())
        self.history[step] = value
        return value

    def _item_loss(self, item: HeldOutItem, device) -> torch.Tensor:
        states = encode_text(self.tokenizer, self.text_encoder, [item.caption], device).to(self.dtype)
        noisy = item.noisy[None].to(device, self.dtype)
        timestep = torch.tensor([item.timestep], device=device)
        pred = self.forward(item.index)(noisy, timestep, states, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), item.target[None].to(device)).cpu()

    def manifest_entry(self) -> dict:
        """The manifest's `training.val_loss`: where the images come from, which they are, the fixed timesteps,
        and the loss at every evaluated step (checkpoints and the end among them)."""
        return {
            **self.source,
            "images": image_names(self.held),
            "timesteps": self.timesteps,
            "by_step": {str(step): value for step, value in sorted(self.history.items())},
        }


def recorded_history(metrics_file: Path, up_to_step: int) -> dict[int, float]:
    """{step: val_loss} a run logged to its metrics.jsonl up to `up_to_step`: what a resumed run takes over, so its
    manifest still lists every checkpoint's loss. Lines past that step (a killed run's last steps, replayed now)
    are left out; a step logged twice keeps its last value."""
    found = {}
    if not metrics_file.is_file():
        return found
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "val_loss" in record and record.get("step", up_to_step + 1) <= up_to_step:
            found[record["step"]] = record["val_loss"]
    return found


def held_out_latents(held: DatasetScan, data, vae) -> list[torch.Tensor]:
    """The posterior mean of every held-out image, through the training latents' disk cache (unflipped)."""
    cache = LatentCache(default_cache_dir(data.cache_dir), vae_fingerprint(vae))
    loader = functools.partial(load_pixels, cfg=data, dataset=held.dataset)
    latents, _ = cache_latents(held.records, loader, vae, cache, flip=False)
    return [latent.mean for latent in latents]


def held_out_loss(
    recipe: Recipe, held: DatasetScan | None, frozen, accelerator, forward=None, trained=()
) -> HeldOutLoss | None:
    """The run's held-out loss from `held_out_images`' held-out scan (None: the recipe asks for none); `forward`
    and `trained` as `HeldOutLoss` takes them. Build it while the VAE is on the device (before the loop parks it)."""
    return None if held is None else HeldOutLoss(recipe, held, frozen, accelerator, forward, trained)
