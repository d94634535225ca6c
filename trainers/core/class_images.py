"""DreamBooth's class images: the user's own, plus the shortfall generated from the base and cached on disk.

Prior preservation trains on images of the subject's class that the base itself draws ("a photo of dog"), so the
fine-tune keeps the class as it was while it learns "sks dog". Where they come from:

1. `method.class_data_dir`, if set: every image there is used; sdtune never writes, moves or deletes anything in it.
2. If that gives fewer than `method.num_class_images`, the rest are generated from the base, one seeded image at a
   time, into `<cache>/class_images/<key>/`. The key hashes the base's weights, the class prompt and every setting
   that decides the pixels (size, steps, guidance, sampler, negative prompt), so another run with the same class
   reuses them and a changed setting never mixes in stale ones. Image i always has seed i: a generation killed
   half-way resumes at the first missing index and ends with exactly the images an unbroken one would have made.
   Each PNG is written beside its final name and renamed, so a kill never leaves half an image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from sdtune.adapters import sampling
from sdtune.adapters.base import base_hash, recommended_guidance
from sdtune.adapters.images import image_files
from sdtune.trainers.core.cache import default_cache_dir
from sdtune.trainers.core.data import DataError, DatasetScan, scan_dataset
from sdtune.trainers.core.recipe import DreamBoothMethod, Recipe


def class_data_config(recipe: Recipe, folder: str | Path):
    """The `data` section as it applies to class images: the same buckets and flips, no caption dropout/repeats."""
    return recipe.data.model_copy(
        update={
            "train_data_dir": str(folder),
            "dataset_name": None,
            "caption_dropout_rate": 0.0,
            "repeats": 1,
            # the class images learn whole: the instance images' masks are theirs alone
            "masked_loss": False,
            "alpha_mask": False,
            "mask_dir": None,
            "subsets": [],
        }
    )


def scan_user_class_images(recipe: Recipe) -> DatasetScan | None:
    """The images in `method.class_data_dir`, checked before any model loads (None when there is no folder).

    Raises `DataError` for an unreadable image (it would silently shrink the prior) and for a folder holding more
    images than `num_class_images` (they are all used, never deleted: the number must say so).
    """
    method: DreamBoothMethod = recipe.method
    if not method.with_prior_preservation or method.class_data_dir is None:
        return None
    folder = Path(method.class_data_dir).expanduser()
    if not folder.is_dir() or not image_files(folder):
        return None  # nothing yet: every class image is generated
    scan = scan_dataset(class_data_config(recipe, folder))
    if scan.skipped:
        bad = scan.skipped[0]
        raise DataError(
            f"method.class_data_dir: {len(scan.skipped)} unusable image(s) in {folder}, e.g. {Path(bad.file).name}: "
            f"{bad.reason}; fix or remove them (nothing was written)"
        )
    if len(scan.records) > method.num_class_images:
        raise DataError(
            f"method.num_class_images: {method.num_class_images} is smaller than the {len(scan.records)} images "
            f"already in {folder}; all of them are used and none is deleted: set num_class_images: "
            f"{len(scan.records)} or more, or move some out"
        )
    return _with_prompt(scan, method.class_prompt)


def _with_prompt(scan: DatasetScan, prompt: str) -> DatasetScan:
    scan.records = [replace(r, caption=prompt) for r in scan.records]
    return scan


def generation_settings(recipe: Recipe) -> list[sampling.SampleSettings]:
    """The settings of class image i, for every i < num_class_images (seed i)."""
    method = recipe.method
    guidance = method.class_guidance_scale
    size = recipe.data.resolution
    return [
        sampling.SampleSettings(
            prompt=method.class_prompt,
            seed=i,
            negative_prompt=method.class_negative_prompt,
            steps=method.class_inference_steps,
            guidance=guidance if guidance is not None else recommended_guidance(recipe.base),
            width=size,
            height=size,
            scheduler=recipe.validation.scheduler,
        )
        for i in range(method.num_class_images)
    ]


def generated_folder(recipe: Recipe) -> Path:
    """`<cache>/class_images/<key>`: the key is the base's hash, the class prompt and the pixel-deciding settings."""
    first = generation_settings(recipe)[0]
    identity = {"base": base_hash(recipe.base), **{k: v for k, v in vars(first).items() if k != "seed"}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir(recipe.data.cache_dir) / "class_images" / key


def generate_class_images(recipe: Recipe, pipe, count: int, log=print, enabled: bool = True) -> Path:
    """Makes sure the first `count` generated class images exist in the cache; generates the missing ones.

    Args:
        pipe: the base pipeline (frozen, before any training).
        enabled: False on the processes other than the main one (they wait, then read the folder).
    """
    folder = generated_folder(recipe)
    settings = generation_settings(recipe)[:count]
    missing = [s for s in settings if not (folder / f"{s.seed:05d}.png").is_file()]
    if enabled and missing:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps(vars(settings[0]) | {"base": str(recipe.base)}, indent=1))
        log(f"class images: generating {len(missing)} of {count} into {folder} ({count - len(missing)} cached)")
        for s in tqdm(missing, desc="class images", disable=not enabled):
            sampling.save_png(sampling.generate(pipe, [s], "base")[0], folder / f"{s.seed:05d}.png")
    elif enabled:
        log(f"class images: {count} reused from {folder}")
    return folder


def class_image_scan(recipe: Recipe, user: DatasetScan | None, generated: Path | None, count: int) -> DatasetScan:
    """The user's class images followed by the first `count` generated ones, all captioned with class_prompt."""
    records, skipped = list(user.records) if user else [], list(user.skipped) if user else []
    if count:
        wanted = {f"{i:05d}.png" for i in range(count)}
        scan = scan_dataset(class_data_config(recipe, generated))
        records += [r for r in scan.records if Path(r.path).name in wanted]
    return _with_prompt(DatasetScan(records=records, skipped=skipped, kind="folder"), recipe.method.class_prompt)
