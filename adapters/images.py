"""Image files as every part of sdtune reads them: which files of a folder are images, the caption file beside an
image, kohya's `N_name` folders, and pixels normalised to 8-bit RGB.

The trainers (trainers/core/data/), the annotators and the studio's Datasets page all go through these, so what the
page shows and counts is what a run trains on, and a 16-bit PNG looks on the page as it trains.

>>> from sdtune.adapters.images import image_files, open_rgb
>>> [open_rgb(path).mode for path in image_files("datasets/quickstart-purple")][:1]
['RGB']
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # sd-scripts' DreamBooth layout: `10_sks dog` = 10 repeats of "sks dog"
HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNGs open as I;16 (older Pillow: I)


# -- which files are images -----------------------------------------------------------------------------------------


def is_hidden(relative: str | PurePath) -> bool:
    """True when a part of the path starts with '.' (`.hidden.png`, `.thumbs/a.png`): the trainers skip these, and
    temp files of atomic writes are named so."""
    return any(part.startswith(".") for part in PurePath(relative).parts)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(root: str | Path) -> list[Path]:
    """Every candidate image under `root`, recursively, sorted; hidden files and folders are not candidates."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / name for name in sorted(files) if not name.startswith(".") and is_image_name(name)]
    return found


def kohya_folder(name: str) -> tuple[int, str] | None:
    """(repeats, concept) of a kohya folder name (`10_purple circle` -> (10, "purple circle")), else None."""
    match = KOHYA_FOLDER.match(name)
    return (int(match[1]), match[2]) if match else None


# -- captions -------------------------------------------------------------------------------------------------------


def caption_file(image: Path, extension: str = ".txt") -> Path:
    """The caption file of `image`: `a.txt` beside `a.png`, else an existing `a.TXT` (written on Windows, where the
    case does not matter); `a.txt` when neither exists, which is where a new caption goes."""
    exact = image.with_name(image.stem + extension)
    if not exact.is_file():
        for other in (extension.lower(), extension.upper()):
            candidate = image.with_name(image.stem + other)
            if candidate.is_file():
                return candidate
    return exact


def decode_caption(data: bytes) -> str:
    """Caption bytes as text; a UTF-8 byte-order mark (Notepad writes one) is dropped, or it would glue itself to
    the first tag. Raises UnicodeDecodeError for text that is not UTF-8."""
    return data.decode("utf-8-sig")


def read_caption(path: Path) -> str:
    return decode_caption(path.read_bytes())


# -- pixels ---------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens; transparency is composited on white (a transparent background must not
    train as black).

    1) 16-bit grey (PNG from a uint16 array, mode I;16 or I): PIL's convert clips at 255, which turns almost every
       pixel white; keep the high byte instead. Float grey (F) is taken on PIL's 0..255 scale, clipped.
    2) Premultiplied alpha (RGBa, La) is unpremultiplied first; PIL cannot convert La to RGB directly.
    3) Everything else (1, L, P, RGB, CMYK, YCbCr, LAB, HSV) is PIL's own conversion.
    """
    if image.mode in HIGH_BIT_GREY:
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.nan_to_num(np.asarray(image)), 0, 255).astype(np.uint8))
    elif image.mode in ("RGBa", "La"):
        image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def open_rgb(source, max_side: int | None = None) -> Image.Image:
    """An image file (path or file object) as the trainers see it: EXIF-rotated, then `to_rgb`.

    Args:
        source: a path or a binary file object.
        max_side: shrink to fit max_side x max_side (a thumbnail); a JPEG is then decoded at a reduced scale.
    """
    with Image.open(source) as opened:
        if max_side is not None and opened.format == "JPEG":
            opened.draft(opened.mode, (max_side, max_side))  # the decoder skips detail the thumbnail drops anyway
        image = ImageOps.exif_transpose(opened)
        image.load()
    image = to_rgb(image)
    if max_side is not None:
        image.thumbnail((max_side, max_side))
    return image
