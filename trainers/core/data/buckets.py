"""Aspect-ratio buckets, as kohya's sd-scripts makes them, and the fit of an image to its bucket.

Bucket sides are multiples of `bucket_reso_steps`, area <= resolution^2, and an image goes to the bucket of nearest
aspect ratio; it is resized to cover the bucket and center-cropped. One sdtune rule on top: an image is never
upscaled (see `assign_bucket`). Torch-free: the studio's dataset report buckets with it.
"""

from __future__ import annotations

import functools
import math

from PIL import Image

from sdtune.trainers.core.recipe import DataConfig

from .records import DataError


@functools.lru_cache(maxsize=32)
def _bucket_table(resolution: int, min_reso: int, max_reso: int, step: int) -> tuple[tuple[int, int], ...]:
    max_area = resolution * resolution
    side = resolution // step * step
    if side < step:
        raise DataError(f"data.resolution ({resolution}) must be at least data.bucket_reso_steps ({step})")
    if max_reso < side:
        raise DataError(f"data.max_bucket_reso ({max_reso}) must be at least data.resolution ({resolution})")
    candidates = {(side, side)}
    # 1) as sd-scripts' make_bucket_resolutions: for each width, the tallest height that keeps the area in budget
    for width in range(math.ceil(min_reso / step) * step, max_reso + 1, step):
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            candidates.update({(width, height), (height, width)})
    # 2) one bucket per aspect ratio: the one with the largest area
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for w, h in candidates:
        ratio = (w // math.gcd(w, h), h // math.gcd(w, h))
        if ratio not in best or w * h > best[ratio][0] * best[ratio][1]:
            best[ratio] = (w, h)
    return tuple(sorted(best.values()))


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """The kohya bucket set: (width, height) pairs with sides multiples of `step` in [min_reso, max_reso] and
    width * height <= resolution^2, one per aspect ratio (the largest), plus the square (resolution // step * step).

    When `min_reso` exceeds what the area allows (e.g. resolution 64 with min_reso 256), only the square remains.
    """
    return list(_bucket_table(resolution, min_reso, max_reso, step))


def _floor_bucket(width: int, height: int, step: int, max_side: int, max_area: int) -> tuple[int, int]:
    w = min(max_side, max(step, width // step * step))
    h = min(max_side, max(step, height // step * step))
    while w * h > max_area and max(w, h) > step:  # keep within the area budget; shrink the long side
        w, h = (w - step, h) if w >= h else (w, h - step)
    return w, h


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of nearest aspect ratio (distance |log(w/h) - log(bw/bh)|, ties to the first in `buckets`)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]], step: int = 64) -> tuple[int, int]:
    """The bucket an image of `width` x `height` trains at.

    1) The bucket of nearest aspect ratio (distance |log(w/h) - log(bw/bh)|, ties to the first in `buckets`).
    2) Never upscale: if the image cannot cover that bucket (resizing to cover it would enlarge the image), the
       bucket becomes the image's own size rounded DOWN to multiples of `step` (each side at least `step`, at most
       the largest bucket side, area within the largest bucket's). That is the largest step-aligned rectangle
       inside the image, so such a bucket may not be in `buckets`; it crops less than `step` pixels per side.
       Only a side shorter than `step` itself is enlarged (to `step`); `min_image_size` normally skips those.
    """
    nearest = nearest_bucket(width, height, buckets)
    if max(nearest[0] / width, nearest[1] / height) <= 1:
        return nearest
    max_side = max(max(b) for b in buckets)
    max_area = max(b[0] * b[1] for b in buckets)
    return _floor_bucket(width, height, step, max_side, max_area)


def bucket_for(width: int, height: int, cfg: DataConfig) -> tuple[int, int]:
    """The bucket of an image under `cfg`: `assign_bucket` over `make_buckets`, or with `enable_bucket: false`
    the square resolution x resolution (rounded down to `bucket_reso_steps`), never upscaled: a smaller image gets
    the largest square multiple of the step that fits inside it."""
    step = cfg.bucket_reso_steps
    if cfg.enable_bucket:
        buckets = _bucket_table(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, step)
        return assign_bucket(width, height, list(buckets), step)
    side = cfg.resolution // step * step
    if side < step:
        raise DataError(f"data.resolution ({cfg.resolution}) must be at least data.bucket_reso_steps ({step})")
    side = min(side, max(step, min(width, height) // step * step))
    return side, side


def cover_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image is fitted to its bucket: ((resized_w, resized_h), (left, top)).

    The image is scaled, keeping its aspect ratio, so that it just covers the bucket, then the excess is cropped
    evenly from both ends (center crop: deterministic, so cached latents stay valid).
    """
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return resized, ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resizes `image` to cover `bucket` and center-crops it to exactly that size.

    Shrinking uses a box reduce by an integer factor and then Lanczos (PIL's `reducing_gap`): antialiased like an
    area filter, much faster than Lanczos over a large factor, and visually the same.
    """
    (width, height), (left, top) = cover_crop(image.width, image.height, bucket)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))
