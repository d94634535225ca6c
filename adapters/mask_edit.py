"""Masks for masked loss made from threshold and fill controls, and the overlay that previews one.

A mask is what `data.mask_dir` reads (trainers/core/data/masks.py): greyscale, the image's size, white = learn,
black = ignore. Here it comes from the image's background, the median colour of its border:

1. distance: how far each pixel's colour is from the background colour (0-1, the largest channel difference);
2. threshold: a pixel further than `threshold` is subject (white);
3. flood fill from the border: only background-coloured pixels connected to the border count as background, so a
   white shirt inside a subject on a white wall stays subject (the plain threshold would cut it out);
4. grow (> 0) or shrink (< 0) the subject by that many pixels: a margin around hair, or off a halo.

`sdtune annotate --kind mask` is step 1-2 alone (`annotate.mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtune.adapters.errors import SdtuneError


class MaskError(SdtuneError, ValueError):
    """Mask controls out of range."""


@dataclass(frozen=True)
class MaskOptions:
    threshold: float = 0.18  # colour distance (0-1) from the background colour above which a pixel is subject
    flood: bool = True  # background = background-coloured pixels connected to the border (holes in the subject stay)
    grow: int = 0  # pixels: > 0 widens the subject, < 0 narrows it
    invert: bool = False  # learn the background instead

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise MaskError(f"threshold {self.threshold}: a colour distance, 0 to 1")
        if abs(self.grow) > 256:
            raise MaskError(f"grow {self.grow}: at most 256 pixels either way")


def background_distance(image: Image.Image) -> np.ndarray:
    """[H, W] float32 in [0, 1]: each pixel's largest channel difference from the median colour of the border."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.abs(rgb - np.median(border, axis=0)).max(axis=-1)


def _border_connected(background: np.ndarray) -> np.ndarray:
    """The pixels of `background` (bool [H, W]) that a 4-connected flood fill from the image border reaches."""
    import cv2

    _, labels = cv2.connectedComponents(background.astype(np.uint8), connectivity=4)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    touching = np.unique(edge[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])])
    return np.isin(labels, touching) & background


def _grow(subject: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    if pixels == 0:
        return subject
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(pixels) + 1,) * 2)
    change = cv2.dilate if pixels > 0 else cv2.erode
    return change(subject.astype(np.uint8), kernel).astype(bool)


def make_mask(image: Image.Image, options: MaskOptions = MaskOptions()) -> Image.Image:
    """The mask (mode L, the image's size, 255 = learn) of `image` under `options` (see the module docstring)."""
    near = background_distance(image) <= options.threshold
    background = _border_connected(near) if options.flood else near
    subject = _grow(~background, options.grow)
    if options.invert:
        subject = ~subject
    return Image.fromarray((subject * 255).astype(np.uint8), mode="L")


def coverage(mask: Image.Image) -> float:
    """The share of the image the mask learns (its mean, 0-1)."""
    return float(np.asarray(mask.convert("L"), dtype=np.float32).mean() / 255.0)


def overlay(image: Image.Image, mask: Image.Image, max_side: int = 512) -> Image.Image:
    """A preview: what the mask ignores dimmed and tinted red, what it learns as it is; at most `max_side` a side."""
    rgb = image.convert("RGB")
    scale = min(1.0, max_side / max(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    pixels = np.asarray(rgb.resize(size), dtype=np.float32)
    learn = np.asarray(mask.convert("L").resize(size), dtype=np.float32)[..., None] / 255.0
    ignored = pixels * 0.35 + np.array([150.0, 0.0, 0.0])
    return Image.fromarray(np.clip(pixels * learn + ignored * (1 - learn), 0, 255).astype(np.uint8))
