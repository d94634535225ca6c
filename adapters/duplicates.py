"""Duplicate images in a dataset: exact (the same pixels under another name or format) and near (the same picture
re-encoded, resized, slightly recoloured), by a perceptual hash written here with numpy (no new dependency).

The perceptual hash (pHash, as imagehash's `phash`): the image as the trainers see it (`images.open_rgb`), to grey,
resized to 32x32, a 2-D DCT, the 8x8 lowest frequencies compared with their median: 64 bits. Two images are near
duplicates when their hashes differ in at most `PHASH_THRESHOLD` bits (Hamming distance) AND their colour layouts are
within `COLOR_THRESHOLD`: pHash sees only grey structure, so without the colour check a purple
circle and a green circle at the same place would be one group, and for a training set they are two different images.
The colour layout is the image at 8x8, each cell's chromaticity (r, g, b) / (r + g + b): a brightness change scales
all three channels and leaves it (dark cells are damped: JPEG noise swings their ratios), another colour moves it; the distance is the largest cell's L1 difference.

Why 10 bits: it is imagehash's usual near-duplicate cut (about 15% of 64 bits). Measured (tests/test_dataset_report.py
asserts the first ones): a re-encode as JPEG q70 after a 1.5x resize and 10% more brightness moves a toy-world image's
hash by 4 bits and a smooth photo-like one's by 0-2, while another shape is 28 bits away and another photo 28-36. (Of
300 random toy scenes, 2 small shapes moved more than 10 bits under that edit and were not grouped.)
Why 0.08 for the colour layout: the same edits move it by at most 0.06, while the same circle in another colour moves
it by 0.96, the same circle 4 pixels further by 0.2, and no two of 300 random toy scenes within 10 bits of each other
came closer than 0.10 (none of their 44,850 pairs is grouped).

Exact duplicates are found by a sha256 over the decoded pixels (and the size), so `a.png` and `a.webp` (lossless) are
marked exact even though their bytes differ; the same pixels hash the same, so they always share a group first, and
only a group's images are decoded whole for it. The perceptual hashes need 32x32 pixels: a JPEG is decoded at a
reduced scale (PIL's draft mode, several times faster). Both are cached per file by (path, size, mtime): the
preflight and the studio's panel hash each file once per change.

Torch-free: PIL and numpy (the studio imports it).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.adapters.images import open_rgb

HASH_SIDE, LOW = 32, 8  # pHash: the DCT of a 32x32 grey image, its 8x8 lowest frequencies
PHASH_THRESHOLD = 10  # bits of 64: see the module docstring for why
COLOR_THRESHOLD = 0.08  # the colour layout's largest cell difference: see the module docstring for why
COLOR_SIDE = 8  # the colour layout's cells per side
DECODE_SIDE = 256  # the hashes need 32x32 pixels: a JPEG is decoded at a reduced scale (1/8 of a 2048 side)
DARK = 96  # r + g + b below this is dark: its chromaticity is damped, as JPEG noise would swing it


def _dct_matrix(n: int) -> np.ndarray:
    """The DCT-II basis (unnormalized, as scipy's `dct`): row k is cos(pi * k * (2i + 1) / 2n). Its scale does not
    matter: each bit compares one coefficient with the median of all 64."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))


DCT = _dct_matrix(HASH_SIDE)


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of an image (see the module docstring), as an int."""
    grey = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    coefficients = DCT @ pixels @ DCT.T  # 2-D DCT: rows, then columns
    low = coefficients[:LOW, :LOW].ravel()
    bits = low > np.median(low)
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    """How many of the 64 bits differ."""
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class ImageHashes:
    """What duplicate detection keeps of one image."""

    phash: int
    colors: np.ndarray  # the colour layout: COLOR_SIDE x COLOR_SIDE x 3 chromaticities


def color_layout(image: Image.Image) -> np.ndarray:
    """Each cell's chromaticity, (r, g, b) / (r + g + b), of the image at 8x8 (see the module docstring)."""
    cells = np.asarray(image.convert("RGB").resize((COLOR_SIDE, COLOR_SIDE), Image.Resampling.BOX), dtype=np.float64)
    return cells / np.maximum(cells.sum(axis=2, keepdims=True), DARK)


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest cell's L1 chromaticity difference, between `a` and each layout of `b` (shape [..., 8, 8, 3])."""
    return np.abs(b - a).sum(axis=-1).max(axis=(-2, -1))


def hash_image(image: Image.Image) -> ImageHashes:
    rgb = image.convert("RGB")
    return ImageHashes(phash=phash(rgb), colors=color_layout(rgb))


def hash_file(path: str | Path) -> ImageHashes:
    """The hashes of an image file, cached by (path, size, mtime): a changed file is hashed again.

    Raises what PIL raises for a file it cannot read (the caller reports it with its reason)."""
    stat = os.stat(path)
    return _hash_file(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _hash_file(path: str, size: int, mtime_ns: int) -> ImageHashes:
    return hash_image(open_rgb(path, DECODE_SIDE))


def pixel_hash(path: str | Path) -> str:
    """sha256 of the size and the RGB pixels (as the trainers see them), cached like `hash_file`: equal only for the
    same picture. Decodes the whole image, so it is asked only of the images already in a group."""
    stat = os.stat(path)
    return _pixel_hash(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _pixel_hash(path: str, size: int, mtime_ns: int) -> str:
    rgb = open_rgb(path)
    return hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()


@dataclass
class DuplicateGroup:
    """Images that are the same picture. `exact`: all of them have the same pixels; `same_pixels`: the sets of two or
    more files within the group that do. `distance`: the largest pHash distance between two of them (0 for exact)."""

    files: list[str]
    exact: bool
    distance: int
    same_pixels: list[list[str]] = field(default_factory=list)


@dataclass
class Duplicates:
    """The groups (largest first), and the files that could not be read, each with its reason."""

    groups: list[DuplicateGroup] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The groups and the unreadable files as text, one line each."""
        out = []
        for number, group in enumerate(self.groups, 1):
            kind = "exact (same pixels)" if group.exact else f"near (pHash distance <= {group.distance})"
            line = f"group {number}, {kind}: {', '.join(group.files)}"
            if not group.exact and group.same_pixels:
                line += "; same pixels: " + "; ".join(" = ".join(files) for files in group.same_pixels)
            out.append(line)
        out += [f"skipped {file}: {reason}" for file, reason in self.unreadable]
        return out


def hash_files(paths) -> tuple[dict[str, ImageHashes], list[tuple[str, str]]]:
    """{path: hashes} of the readable files, and (path, reason) for each one that is not."""
    hashes, unreadable = {}, []
    for path in paths:
        try:
            hashes[str(path)] = hash_file(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            unreadable.append((str(path), f"cannot be read ({type(exc).__name__}: {exc})"))
    return hashes, unreadable


def find_duplicates(
    paths, threshold: int = PHASH_THRESHOLD, color_threshold: float = COLOR_THRESHOLD, names=None
) -> Duplicates:
    """Groups the images in `paths` that are exact or near duplicates of one another.

    Args:
        paths: image files.
        threshold: the largest pHash Hamming distance (of 64 bits) between two near duplicates.
        color_threshold: the largest distance between their colour layouts (`color_distance`).
        names: how to show a path in the groups (default: the path as given).

    A group is a connected set: a ~ b and b ~ c puts a, b and c in one group.
    """
    hashes, unreadable = hash_files(paths)
    keys = list(hashes)
    bits = np.array([hashes[k].phash for k in keys], dtype=np.uint64)
    colors = np.array([hashes[k].colors for k in keys], dtype=np.float64).reshape(-1, COLOR_SIDE, COLOR_SIDE, 3)
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(keys) - 1):  # one vectorized row of the distance matrix at a time
        distance = np.bitwise_count(bits[i + 1 :] ^ bits[i])
        close = color_distance(colors[i], colors[i + 1 :]) <= color_threshold
        for j in np.nonzero((distance <= threshold) & close)[0] + i + 1:
            parent[root(int(j))] = root(i)
    members: dict[int, list[str]] = {}
    for i, key in enumerate(keys):
        members.setdefault(root(i), []).append(key)
    show = names or (lambda path: path)
    groups = [_group(files, hashes, show) for files in members.values() if len(files) > 1]
    groups.sort(key=lambda g: (-len(g.files), g.files))
    return Duplicates(groups, [(show(file), reason) for file, reason in unreadable])


def _group(files: list[str], hashes: dict[str, ImageHashes], show) -> DuplicateGroup:
    by_pixels: dict[str, list[str]] = {}
    for file in files:
        try:
            key = pixel_hash(file)
        except Exception:  # changed or gone since it was hashed: not the same pixels as anything
            key = file
        by_pixels.setdefault(key, []).append(show(file))
    distance = max(hamming(hashes[a].phash, hashes[b].phash) for a in files for b in files)
    same = sorted(sorted(names) for names in by_pixels.values() if len(names) > 1)
    return DuplicateGroup(sorted(show(f) for f in files), len(by_pixels) == 1, distance, same)
