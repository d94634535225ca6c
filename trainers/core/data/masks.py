"""Masked loss (kohya's `masked_loss`): where in each image the loss counts, found and checked at scan time, then
fitted exactly like its image and averaged down to the latent grid.

A mask is greyscale: white = learn, black = ignore, grey = partial. It comes from one of two places:

1. `data.alpha_mask: true`: the image's own alpha channel (an image without one learns whole);
2. `data.mask_dir`: a file per image with the image's relative path (or, at the top of `mask_dir`, its name), any
   image type, of the image's size. `sdtune annotate --kind mask` makes such masks from a plain background.

The mask goes through the same `fit_to_bucket` (resize to cover, center crop) as its image and is flipped with it,
so it stays on the same pixels. Then each latent pixel, which sees an 8x8 block of image, takes the block's mean
(area averaging: a half-covered block learns at half weight).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdtune.adapters.images import is_image_name
from sdtune.trainers.core.recipe import DataConfig

from .records import DataError, ImageRecord

ANNOTATE_HINT = "sdtune annotate --kind mask IMAGES -o MASKS makes masks from a plain background"


def has_alpha(data: bytes) -> bool:
    """Whether encoded image bytes carry transparency (an alpha band, or a palette's transparent index)."""
    with Image.open(io.BytesIO(data)) as image:
        return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _mask_file(mask_dir: Path, relative: Path) -> Path | None:
    """The mask of the image at `relative` (under its data folder): same relative path and stem, else the same stem
    at the top of `mask_dir`; any image extension, the image's own first."""
    for folder in dict.fromkeys([mask_dir / relative.parent, mask_dir]):
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.iterdir() if p.stem == relative.stem and is_image_name(p.name))
        found.sort(key=lambda p: p.suffix.lower() != relative.suffix.lower())
        if found:
            return found[0]
    return None


def _check_mask(record: ImageRecord, mask_dir: Path, root: Path) -> tuple[ImageRecord | None, str | None]:
    """(the record with its mask attached, None) or (None, what is wrong with its mask)."""
    relative = Path(record.path).relative_to(root)
    found = _mask_file(mask_dir, relative)
    if found is None:
        return None, f"{relative}: no mask in {mask_dir} (expected {relative.with_suffix('.png')})"
    try:
        data = found.read_bytes()
        with Image.open(io.BytesIO(data)) as opened:
            size = ImageOps.exif_transpose(opened).size
    except Exception as exc:  # PIL raises OSError, SyntaxError, ... for broken files
        return None, f"{relative}: mask {found.name} is not a readable image ({type(exc).__name__})"
    if size != (record.width, record.height):
        image_size, mask_size = f"{record.width}x{record.height}", f"{size[0]}x{size[1]}"
        return None, f"{relative}: mask {found.name} is {mask_size}, the image is {image_size}"
    return dataclasses.replace(record, mask=str(found), mask_hash=hashlib.sha256(data).hexdigest()), None


def attach_mask_files(records: list[ImageRecord], cfg: DataConfig, root: Path) -> list[ImageRecord]:
    """Every record with its mask file from `cfg.mask_dir`.

    Raises:
        DataError: naming, one line each, every image whose mask is missing, unreadable or of another size.
    """
    mask_dir = Path(cfg.mask_dir).expanduser()
    if not mask_dir.is_dir():
        raise DataError(f"data.mask_dir: folder not found: {mask_dir} ({ANNOTATE_HINT})")
    checked = [_check_mask(record, mask_dir, root) for record in records]
    problems = [f"  {problem}" for _, problem in checked if problem]
    if problems:
        head = f"data.mask_dir: {len(problems)} of {len(records)} images have no usable mask ({ANNOTATE_HINT}):"
        raise DataError("\n".join([head, *problems]))
    return [masked for masked, _ in checked]


def mask_problems(records: list[ImageRecord], mask_dir: Path, root: Path) -> list[str]:
    """One line per image whose mask in `mask_dir` is missing, unreadable or of another size (the dataset report
    counts them; a masked-loss run refuses to start on them)."""
    return [problem for record in records if (problem := _check_mask(record, mask_dir, root)[1])]


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode L) of an EXIF-rotated source image, or None if it has no transparency."""
    bands = image.getbands()
    if "A" not in bands and "a" not in bands and "transparency" not in image.info:
        return None
    return image.convert("RGBA").getchannel("A")


def open_mask(path: str) -> Image.Image:
    """A mask file as greyscale (mode L), EXIF-rotated as its image is."""
    with Image.open(path) as opened:
        return ImageOps.exif_transpose(opened).convert("L")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A fitted greyscale mask as a float tensor [1, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def latent_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [1, H, W] averaged over the area each latent pixel covers: [1, h, w] (kohya's `mode="area"`)."""
    return F.interpolate(mask[None], size=size, mode="area")[0]
