"""The training data shared by every trainer: find images and captions, refuse bad files, bucket by aspect ratio.

`scan_dataset(cfg)` reads a `DataConfig` and returns a `DatasetScan`: one `ImageRecord` per usable image (size,
caption, repeats, bucket, content hash) and one `Skipped` per rejected file with its reason. It loads no model and
decodes each image once, so the preflight summary (`format_preflight`) is printed before anything heavy starts.

Where the data can come from (exactly one of `data.train_data_dir` / `data.dataset_name`):

1. a folder of images with same-name caption files (`a.png` + `a.txt`); no caption file -> caption "";
2. kohya folders: `train_data_dir/3_sks dog/*.png`: every image in `N_name` is seen N times per epoch, and the
   folder's name ("sks dog") is the caption of an image without a caption file. Images outside such folders
   follow rule 1;
3. an HF imagefolder: a `metadata.jsonl` (or `metadata.csv`) whose rows name a `file_name` and a caption column;
4. `dataset_name`: a folder written by `datasets.Dataset.save_to_disk`, or a hub dataset id (its "train" split).

Captions are built per use by `CaptionBuilder` (template -> tag shuffle -> dropout) with an rng the trainer derives
from (seed, epoch, index), so a resumed run sees exactly the same captions.

Buckets follow kohya's sd-scripts: sides are multiples of `bucket_reso_steps`, area <= resolution^2, and an image
goes to the bucket of nearest aspect ratio; it is resized to cover the bucket and center-cropped. One sdtune rule
on top: an image is never upscaled (see `assign_bucket`).

Example:

```py
>>> from sdtune.trainers.core.data import scan_dataset, format_preflight, BucketBatchSampler
>>> scan = scan_dataset(recipe.data)
>>> print(format_preflight(scan, recipe.data.resolution))
>>> sampler = BucketBatchSampler(scan.records, batch_size=4, seed=42)
```
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.images import (
    IMAGE_EXTENSIONS,
    caption_file,
    decode_caption,
    image_files,
    kohya_folder,
    open_rgb,
    to_rgb,
)

from .recipe import DataConfig

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
PREFLIGHT_MAX_SKIPPED = 20


class DataError(SdtuneError, ValueError):
    """Training data that cannot be used; the message is one line naming the `data.` key and what to do."""


# -- data model -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image. Everything the trainer needs except the pixels, which `load_pixels` reads."""

    path: str | None  # file path, or None for an HF-dataset row
    index: int | None  # row index in an HF dataset, else None
    caption: str  # raw caption, before template / shuffle / dropout
    repeats: int
    width: int  # source size, after EXIF rotation
    height: int
    bucket: tuple[int, int]  # (width, height) it is trained at
    content_hash: str  # sha256 of the encoded image bytes: the cache key of its latents
    source: str  # folder or dataset it came from
    crop: tuple[int, int] = (0, 0)  # (left, top) of the center crop in the resized image (for the manifest)


@dataclass(frozen=True)
class Skipped:
    """A file that is not trained on, and why."""

    file: str
    reason: str


@dataclass
class DatasetScan:
    """What `scan_dataset` found. `dataset` is the loaded HF dataset (image column undecoded) for `hf_*` kinds."""

    records: list[ImageRecord]
    skipped: list[Skipped]
    kind: str  # "folder" | "kohya" | "imagefolder" | "hf_saved" | "hf_hub"
    dataset: Any = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """sha256 over the sorted (content_hash, caption, repeats, bucket) of every record.

        It identifies what is trained on, not where it lives: renaming or moving files keeps it, while changing an
        image's bytes, a caption, a repeat count or the bucketing (resolution, steps) changes it.
        """
        rows = sorted((r.content_hash, r.caption, r.repeats, list(r.bucket)) for r in self.records)
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    def _label(self, source: str) -> str:
        # kohya metadata names a folder by its own name ("3_sks dog"); an HF dataset by its name/path.
        return Path(source).name if self.kind in ("folder", "kohya", "imagefolder") else source

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per source folder: comma-separated tag -> number of images whose raw caption has it (ss_tag_frequency)."""
        frequency: dict[str, Counter] = defaultdict(Counter)
        for record in self.records:
            tags = {tag.strip() for tag in record.caption.split(",")} - {""}
            frequency[self._label(record.source)].update(tags)
        return {label: dict(counter) for label, counter in frequency.items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """Per source folder: {"n_repeats": N, "img_count": images} (kohya's ss_dataset_dirs)."""
        dirs: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = dirs.setdefault(self._label(record.source), {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket, each counted `repeats` times (what one epoch trains on)."""
        counts: Counter = Counter()
        for record in self.records:
            counts[record.bucket] += record.repeats
        return dict(sorted(counts.items()))


# -- captions -------------------------------------------------------------------------------------------------------


def tidy_caption(text: str) -> str:
    """Collapses whitespace and the empty comma slots an empty `{caption}` or `{trigger}` leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "sks, , a dog" -> "sks, a dog"
    text = re.sub(r"\s+,", ",", text)  # "sks , a dog" -> "sks, a dog"
    return text.strip(" ,")


class CaptionBuilder:
    """Builds the caption a training step sees from a raw caption: 1) template, 2) tag shuffle, 3) dropout.

    Args:
        cfg: the `data` section (caption_template, trigger_word, shuffle_caption, keep_tokens, caption_dropout_rate).

    The rng is passed to each call, never the global one: the trainer derives it from (seed, epoch, index), so a
    resumed run draws the same shuffles and dropouts as an uninterrupted one.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        try:
            cfg.caption_template.format(caption="", trigger="")
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(
                f"data.caption_template: {cfg.caption_template!r} is not a valid template ({exc!r}); "
                "use the placeholders {caption} and {trigger}"
            ) from None

    def template(self, raw_caption: str) -> str:
        """The templated, tidied caption (step 1 only)."""
        text = self.cfg.caption_template.format(caption=raw_caption, trigger=self.cfg.trigger_word or "")
        return tidy_caption(text)

    def __call__(self, raw_caption: str, rng: random.Random) -> str:
        text = self.template(raw_caption)
        if self.cfg.shuffle_caption:
            tags = [tag.strip() for tag in text.split(",") if tag.strip()]
            keep, rest = tags[: self.cfg.keep_tokens], tags[self.cfg.keep_tokens :]
            rng.shuffle(rest)
            text = ", ".join(keep + rest)
        if self.cfg.caption_dropout_rate > 0 and rng.random() < self.cfg.caption_dropout_rate:
            return ""
        return text

    @property
    def is_deterministic(self) -> bool:
        """True when a raw caption always gives the same text (no shuffle, no dropout)."""
        return not self.cfg.shuffle_caption and self.cfg.caption_dropout_rate == 0

    def fixed_captions(self, raw_captions) -> set[str]:
        """Every text a call can return for these raw captions; text embeddings of this set can be cached.

        Defined when tags are not shuffled: each templated caption, plus "" when caption dropout is on.
        """
        if self.cfg.shuffle_caption:
            raise ValueError("fixed_captions: with data.shuffle_caption the captions are not a fixed set")
        texts = {self.template(raw) for raw in raw_captions}
        if self.cfg.caption_dropout_rate > 0:
            texts.add("")
        return texts


# -- buckets --------------------------------------------------------------------------------------------------------


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


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]], step: int = 64) -> tuple[int, int]:
    """The bucket an image of `width` x `height` trains at.

    1) The bucket of nearest aspect ratio (distance |log(w/h) - log(bw/bh)|, ties to the first in `buckets`).
    2) Never upscale: if the image cannot cover that bucket (resizing to cover it would enlarge the image), the
       bucket becomes the image's own size rounded DOWN to multiples of `step` (each side at least `step`, at most
       the largest bucket side, area within the largest bucket's). That is the largest step-aligned rectangle
       inside the image, so such a bucket may not be in `buckets`; it crops less than `step` pixels per side.
       Only a side shorter than `step` itself is enlarged (to `step`); `min_image_size` normally skips those.
    """
    ratio = math.log(width / height)
    nearest = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
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


# -- checking one image ---------------------------------------------------------------------------------------------


def _probe(data: bytes, min_size: int) -> tuple[int, int] | str:
    """(width, height) after EXIF rotation of an encoded image, or the reason it is not usable."""
    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # container structure and checksums (PNG CRCs), without decoding
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format == "JPEG":  # decode at 1/8 scale: still reads every byte, so truncation still shows
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except Image.DecompressionBombError as exc:
        return f"too large to open safely ({exc})"
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        return f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: exif_transpose swaps the sides
        width, height = height, width
    if min(width, height) < min_size:
        return f"too small: {width}x{height}, shorter side < data.min_image_size {min_size}"
    return width, height


def _make_record(data: bytes, cfg: DataConfig, **fields) -> ImageRecord | str:
    """An `ImageRecord` for encoded image bytes, or the reason they are skipped."""
    min_size = cfg.min_image_size if cfg.min_image_size is not None else cfg.resolution // 2
    probed = _probe(data, min_size)
    if isinstance(probed, str):
        return probed
    width, height = probed
    bucket = bucket_for(width, height, cfg)
    _, crop = cover_crop(width, height, bucket)
    content_hash = hashlib.sha256(data).hexdigest()
    return ImageRecord(width=width, height=height, bucket=bucket, crop=crop, content_hash=content_hash, **fields)


def _collect(record: ImageRecord | str, where: str, records: list, skipped: list):
    if isinstance(record, str):
        skipped.append(Skipped(where, record))
    else:
        records.append(record)


# -- folders: plain, kohya, imagefolder -----------------------------------------------------------------------------


def _read_caption(image_path: Path, extension: str) -> str | None:
    """The caption file beside an image (`a.png` -> `a.txt`, or `a.TXT`), lines joined by spaces; None if absent or
    empty.

    Raises UnicodeDecodeError for a caption that is not UTF-8 (the caller skips the image with that reason).
    """
    caption_path = caption_file(image_path, extension)
    if not caption_path.is_file():
        return None
    lines = decode_caption(caption_path.read_bytes()).splitlines()
    text = " ".join(line.strip() for line in lines if line.strip())
    return text or None


def _scan_folder(root: Path, cfg: DataConfig) -> tuple[list[ImageRecord], list[Skipped], str]:
    """Plain and kohya layouts. Images under an `N_name` subfolder get N repeats and caption fallback "name"."""
    kohya = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and (parsed := kohya_folder(child.name)):
            kohya[child.name] = parsed
    records, skipped = [], []
    for path in image_files(root):
        top = path.relative_to(root).parts[0]
        repeats, fallback, source = cfg.repeats, "", root
        if top in kohya:
            (repeats, fallback), source = kohya[top], root / top
        if repeats == 0:
            skipped.append(Skipped(str(path), f"kohya folder {top!r} asks for 0 repeats"))
            continue
        try:
            caption = _read_caption(path, cfg.caption_extension)
            data = path.read_bytes()
        except UnicodeDecodeError:
            skipped.append(Skipped(str(path), f"caption file {path.stem + cfg.caption_extension} is not UTF-8 text"))
            continue
        except OSError as exc:
            skipped.append(Skipped(str(path), f"unreadable ({exc.strerror or exc})"))
            continue
        fields = dict(path=str(path), index=None, caption=caption if caption is not None else fallback)
        record = _make_record(data, cfg, repeats=repeats, source=str(source), **fields)
        _collect(record, str(path), records, skipped)
    return records, skipped, "kohya" if kohya else "folder"


def _metadata_rows(metadata: Path) -> list[dict]:
    if metadata.suffix == ".csv":
        with open(metadata, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data.train_data_dir: {metadata}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def _metadata_entries(metadata: Path, cfg: DataConfig) -> list[tuple[str, str]]:
    """(file_name, caption) per row of one metadata file, with imagefolder's key rules."""
    rows = _metadata_rows(metadata)
    name_keys = ("file_name", f"{cfg.image_column}_file_name")
    if rows and not any(cfg.caption_column in row for row in rows):
        keys = sorted({key for row in rows for key in row})
        raise DataError(
            f"data.caption_column: {cfg.caption_column!r} is not a key of {metadata} (keys: {', '.join(keys)})"
        )
    entries = []
    for number, row in enumerate(rows, start=1):
        name = next((row[key] for key in name_keys if row.get(key)), None)
        if not isinstance(name, str):
            raise DataError(f"data.train_data_dir: {metadata}: row {number} has no 'file_name'")
        caption = row.get(cfg.caption_column)
        entries.append((name, "" if caption is None else str(caption)))
    return entries


def _scan_imagefolder(root: Path, cfg: DataConfig) -> tuple[list[ImageRecord], list[Skipped], str]:
    """HF imagefolder: the rows of each metadata file are the dataset; images it does not list are not trained."""
    records, skipped, listed = [], [], set()
    for metadata in sorted(p for name in METADATA_FILES for p in root.rglob(name)):
        base = metadata.parent.resolve()
        for name, caption in _metadata_entries(metadata, cfg):
            path = metadata.parent / os.path.normpath(name)
            # as datasets' imagefolder: a file_name may not reach outside its metadata file's folder
            if "://" in name or os.path.isabs(name) or not path.resolve().is_relative_to(base):
                reason = f"file_name in {metadata.name} must be a relative path inside its folder"
                skipped.append(Skipped(name, reason))
                continue
            listed.add(path.resolve())
            if not path.is_file():
                skipped.append(Skipped(str(path), f"listed in {metadata.name} but not found"))
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                skipped.append(Skipped(str(path), f"unreadable ({exc.strerror or exc})"))
                continue
            fields = dict(path=str(path), index=None, caption=caption, repeats=cfg.repeats, source=str(root))
            record = _make_record(data, cfg, **fields)
            _collect(record, str(path), records, skipped)
    for path in image_files(root):
        if path.resolve() not in listed:
            skipped.append(
                Skipped(str(path), "not listed in the metadata file (imagefolder trains listed files only)")
            )
    return records, skipped, "imagefolder"


# -- HF datasets ----------------------------------------------------------------------------------------------------


def _load_hf_dataset(cfg: DataConfig):
    """(dataset, kind) for `data.dataset_name`: a save_to_disk folder if that path exists, else a hub id."""
    import datasets  # heavy import, only for this source

    name = cfg.dataset_name
    if Path(name).expanduser().exists():
        try:
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        except FileNotFoundError:
            raise DataError(
                f"data.dataset_name: {name} is not a folder written by Dataset.save_to_disk "
                "(for a folder of images use data.train_data_dir)"
            ) from None
        kind = "hf_saved"
    else:
        loaded, kind = _load_hub_dataset(name), "hf_hub"
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"data.dataset_name: {name} has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    for key in ("image_column", "caption_column"):
        column = getattr(cfg, key)
        if column not in loaded.column_names:
            columns = ", ".join(loaded.column_names)
            raise DataError(f"data.{key}: column {column!r} is not in dataset {name} (columns: {columns})")
    if isinstance(loaded.features[cfg.image_column], datasets.Image):
        # Keep the encoded bytes: they are hashed for the cache key and decoded once, by us.
        loaded = loaded.cast_column(cfg.image_column, datasets.Image(decode=False))
    return loaded, kind


def _load_hub_dataset(name: str):
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:  # hub and httpx errors are OSErrors
        # OfflineModeIsEnabled is a ConnectionError; without a network httpx raises ConnectError / ConnectTimeout.
        offline = datasets.config.HF_HUB_OFFLINE and isinstance(exc, FileNotFoundError)
        if offline or isinstance(exc, ConnectionError) or "Connect" in type(exc).__name__:
            raise DataError(
                f"data.dataset_name: hub dataset {name!r} is not available offline (not in the local cache); save "
                "it with Dataset.save_to_disk where there is internet and set data.dataset_name to that folder, or "
                "set data.train_data_dir to a folder of images"
            ) from None
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"data.dataset_name: hub dataset {name!r} could not be loaded ({reason})") from None


def _row_bytes(value) -> bytes:
    """Encoded image bytes of one cell of an (undecoded) image column."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return value["bytes"] or Path(value["path"]).read_bytes()
    if isinstance(value, str):
        return Path(value).read_bytes()
    raise TypeError(type(value).__name__)


def _scan_hf(cfg: DataConfig) -> tuple[list[ImageRecord], list[Skipped], str, Any]:
    dataset, kind = _load_hf_dataset(cfg)
    name = cfg.dataset_name
    records, skipped = [], []
    for index, row in enumerate(dataset.select_columns([cfg.image_column, cfg.caption_column])):
        where = f"{name}[{index}]"
        caption = row[cfg.caption_column]
        if caption is not None and not isinstance(caption, str):
            kind_name = type(caption).__name__
            raise DataError(f"data.caption_column: {cfg.caption_column!r} holds {kind_name} values, not text")
        try:
            data = _row_bytes(row[cfg.image_column])
        except TypeError as exc:
            raise DataError(f"data.image_column: {cfg.image_column!r} holds {exc} values, not images") from None
        except OSError as exc:
            skipped.append(Skipped(where, f"unreadable ({exc.strerror or exc})"))
            continue
        fields = dict(path=None, index=index, caption=caption or "", repeats=cfg.repeats, source=name)
        record = _make_record(data, cfg, **fields)
        _collect(record, where, records, skipped)
    return records, skipped, kind, dataset


# -- scan -----------------------------------------------------------------------------------------------------------


def scan_dataset(cfg: DataConfig) -> DatasetScan:
    """Finds every training image of `cfg`, checks it, and assigns its caption, repeats and bucket.

    Loads no model; decodes each image once and hashes its bytes. Bad files are skipped with a reason, never
    fatal; a dataset with no usable image at all raises `DataError`.

    Args:
        cfg: the recipe's `data` section.

    Returns:
        A `DatasetScan` (records in a stable order: sorted paths, or dataset row order).
    """
    if (cfg.train_data_dir is None) == (cfg.dataset_name is None):
        got = "both" if cfg.train_data_dir is not None else "neither"
        raise DataError(
            f"data: set exactly one of data.train_data_dir (a folder of images) or data.dataset_name "
            f"(a saved or hub HF dataset); got {got}"
        )
    CaptionBuilder(cfg)  # refuse a broken caption_template now, before any model loads
    dataset = None
    if cfg.train_data_dir is not None:
        key, where = "data.train_data_dir", Path(cfg.train_data_dir).expanduser()
        if not where.is_dir():
            found = "a file, not a folder" if where.exists() else "folder not found"
            raise DataError(f"data.train_data_dir: {found}: {where}")
        if any(next(where.rglob(name), None) for name in METADATA_FILES):
            records, skipped, kind = _scan_imagefolder(where, cfg)
        else:
            records, skipped, kind = _scan_folder(where, cfg)
    else:
        key, where = "data.dataset_name", cfg.dataset_name
        records, skipped, kind, dataset = _scan_hf(cfg)
    if not records:
        reasons = "; ".join(f"{Path(s.file).name}: {s.reason}" for s in skipped[:3]) or (
            f"no files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
        raise DataError(f"{key}: no usable images in {where} ({len(skipped)} skipped: {reasons})")
    return DatasetScan(records=records, skipped=skipped, kind=kind, dataset=dataset)


# -- pixels ---------------------------------------------------------------------------------------------------------


def load_image(record: ImageRecord, cfg: DataConfig, dataset=None, column: str | None = None) -> Image.Image:
    """The source image of a record, EXIF-rotated, RGB (transparency composited on white), at its source size.

    Args:
        record: a record from `scan_dataset`.
        cfg: the `data` section (its image_column names the column of an HF row).
        dataset: for HF rows, the dataset (`scan.dataset`).
        column: another image column of the same row (e.g. ControlNet's conditioning image).
    """
    if record.path is not None:
        return open_rgb(record.path)
    if dataset is None:
        raise ValueError(f"load_image: record is row {record.index} of an HF dataset; pass dataset=scan.dataset")
    value = dataset[record.index][column or cfg.image_column]
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(_row_bytes(value)))
    return to_rgb(ImageOps.exif_transpose(image))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resizes `image` to cover `bucket` and center-crops it to exactly that size.

    Shrinking uses a box reduce by an integer factor and then Lanczos (PIL's `reducing_gap`): antialiased like an
    area filter, much faster than Lanczos over a large factor, and visually the same.
    """
    (width, height), (left, top) = cover_crop(image.width, image.height, bucket)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def load_pixels(record: ImageRecord, cfg: DataConfig, dataset=None) -> torch.Tensor:
    """The training pixels of a record: float tensor [3, bucket_h, bucket_w] in [-1, 1].

    EXIF-rotated, RGB with transparency on white, resized to cover the bucket and center-cropped. Never flipped:
    `random_flip` is applied by the trainer to the cached latents, so one cache entry serves both orientations.
    """
    image = fit_to_bucket(load_image(record, cfg, dataset), record.bucket)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# -- batches --------------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one bucket each, over the "expanded" list where every record appears `repeats` times.

    Args:
        records: the scan's records.
        batch_size: images per batch; a bucket's last batch may be smaller (kept, unless `drop_last`).
        seed: with the epoch (`set_epoch`, as DistributedSampler), the only input of the order.
        drop_last: drop each bucket's incomplete last batch.

    An epoch: 1) shuffle the positions within each bucket, 2) cut them into batches, 3) shuffle the batches, so
    consecutive steps mix buckets. The same (seed, epoch) always gives the same batches (exact resume).
    """

    def __init__(self, records: list[ImageRecord], batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last, self.epoch = batch_size, seed, drop_last, 0
        self._expanded = [i for i, record in enumerate(records) for _ in range(record.repeats)]
        self._by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for position, index in enumerate(self._expanded):
            self._by_bucket[records[index].bucket].append(position)

    def expanded(self) -> list[int]:
        """Expanded position -> record index."""
        return list(self._expanded)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(positions) / self.batch_size) for positions in self._by_bucket.values())

    def __iter__(self):
        rng = random.Random(f"sdtune-buckets:{self.seed}:{self.epoch}")  # str seeds are hashed stably (sha512)
        batches = []
        for bucket in sorted(self._by_bucket):
            positions = list(self._by_bucket[bucket])
            rng.shuffle(positions)
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        yield from batches


# -- preflight ------------------------------------------------------------------------------------------------------


def format_preflight(scan: DatasetScan, resolution: int) -> str:
    """The data part of the summary printed before any model loads; the trainer appends its estimates.

    Lists the image count (unique and with repeats), the layout, each source folder, the buckets with how many
    images (with repeats) each trains per epoch, and every skipped file with its reason (the first 20 and a count).
    """
    unique = len(scan.records)
    with_repeats = sum(record.repeats for record in scan.records)
    lines = [f"data: {unique} images ({with_repeats} per epoch with repeats), layout {scan.kind}"]
    dirs = scan.dataset_dirs()
    if len(dirs) > 1 or scan.kind == "kohya":
        lines += [f"  {label}: {d['img_count']} images x {d['n_repeats']} repeats" for label, d in dirs.items()]
    lines.append(f"buckets (area <= {resolution}x{resolution}; images per epoch):")
    lines += [f"  {w}x{h} (aspect {w / h:.2f}): {count}" for (w, h), count in scan.bucket_counts().items()]
    if scan.skipped:
        lines.append(f"skipped {len(scan.skipped)} files:")
        lines += [f"  {s.file}: {s.reason}" for s in scan.skipped[:PREFLIGHT_MAX_SKIPPED]]
        if len(scan.skipped) > PREFLIGHT_MAX_SKIPPED:
            lines.append(f"  ... and {len(scan.skipped) - PREFLIGHT_MAX_SKIPPED} more")
    return "\n".join(lines)


# -- ControlNet: image + conditioning image + caption ---------------------------------------------------------------

IMAGES_FOLDER, CONDITIONING_FOLDER = "images", "conditioning"
CONDITIONING_FILE_KEY = "conditioning_image_file_name"  # the imagefolder column diffusers' example reads
ASPECT_TOLERANCE = 0.01  # |log(aspect_condition / aspect_image)|: about 1%


@dataclass(frozen=True)
class ConditionRecord:
    """The conditioning image of one `ImageRecord`: a file, or a column of the same HF row."""

    path: str | None
    index: int | None
    content_hash: str
    width: int
    height: int


@dataclass
class PairScan(DatasetScan):
    """A `DatasetScan` whose every record has a checked conditioning image (`conditions[i]` goes with `records[i]`).

    `conditions` is None when the condition is computed from the image itself (`method.conditioning: canny`).
    """

    conditions: list[ConditionRecord] | None = None
    conditioning_column: str | None = None

    def fingerprint(self) -> str:
        """The images' fingerprint, extended by each pair's condition: new conditions are new training data."""
        if self.conditions is None:
            return super().fingerprint()
        pairs = sorted(f"{r.content_hash}:{c.content_hash}" for r, c in zip(self.records, self.conditions))
        return hashlib.sha256(json.dumps([super().fingerprint(), pairs]).encode()).hexdigest()


def _check_condition(data: bytes, where: str, record: ImageRecord, **fields) -> ConditionRecord | str:
    """A `ConditionRecord` for encoded bytes, or why this pair cannot train (unreadable, other aspect, too small)."""
    probed = _probe(data, 1)
    if isinstance(probed, str):
        return f"{where}: {probed}"
    width, height = probed
    if abs(math.log((width / height) / (record.width / record.height))) > ASPECT_TOLERANCE:
        return (
            f"{where}: condition is {width}x{height} (aspect {width / height:.2f}) but its image is "
            f"{record.width}x{record.height} (aspect {record.width / record.height:.2f}); they must show the same "
            "frame"
        )
    if width < record.bucket[0] or height < record.bucket[1]:
        return (
            f"{where}: condition is {width}x{height}, smaller than its image's training size "
            f"{record.bucket[0]}x{record.bucket[1]} (it would be upscaled); make it the image's size"
        )
    return ConditionRecord(width=width, height=height, content_hash=hashlib.sha256(data).hexdigest(), **fields)


def _condition_file(folder: Path, relative: Path) -> Path | None:
    """`conditioning/<same relative path and stem>.<any image extension>`, or None."""
    for extension in IMAGE_EXTENSIONS:
        candidate = folder / relative.with_suffix(extension)
        if candidate.is_file():
            return candidate
    return None


def _pair_folder(root: Path, scan: DatasetScan) -> tuple[list, list[str]]:
    """Folder convention: `images/a.png` (+ `images/a.txt`) goes with `conditioning/a.<ext>`."""
    images, conditions = root / IMAGES_FOLDER, root / CONDITIONING_FOLDER
    found, problems = [], []
    for record in scan.records:
        relative = Path(record.path).relative_to(images)
        partner = _condition_file(conditions, relative)
        if partner is None:
            problems.append(f"{record.path}: no conditioning image (looked for {conditions / relative.stem}.*)")
            found.append(None)
            continue
        found.append(_check_condition(partner.read_bytes(), str(partner), record, path=str(partner), index=None))
    stems = {path.relative_to(images).with_suffix("") for path in image_files(images)}
    for path in image_files(conditions):
        if path.relative_to(conditions).with_suffix("") not in stems:
            problems.append(f"{path}: no image with this name in {images}")
    return found, problems


def _conditions_in_metadata(root: Path) -> dict[Path, tuple[Path, str | None]]:
    """Imagefolder: resolved image path -> (its metadata file's folder, its `conditioning_image_file_name`)."""
    named = {}
    for metadata in sorted(p for name in METADATA_FILES for p in root.rglob(name)):
        for row in _metadata_rows(metadata):
            image_name = row.get("file_name") or row.get("image_file_name")
            if isinstance(image_name, str):
                named[(metadata.parent / image_name).resolve()] = (metadata.parent, row.get(CONDITIONING_FILE_KEY))
    return named


def _pair_imagefolder(root: Path, scan: DatasetScan) -> tuple[list, list[str]]:
    named = _conditions_in_metadata(root)
    found, problems, used = [], [], set()
    for record in scan.records:
        folder, name = named.get(Path(record.path).resolve(), (None, None))
        partner = folder / name if isinstance(name, str) and name else None  # relative to the metadata file
        if partner is None or not partner.is_file():
            detail = (
                f"{CONDITIONING_FILE_KEY} {name!r} not found" if name else f"its row has no {CONDITIONING_FILE_KEY}"
            )
            problems.append(f"{record.path}: {detail}")
            found.append(None)
            continue
        used.add(partner.resolve())
        found.append(_check_condition(partner.read_bytes(), str(partner), record, path=str(partner), index=None))
    # conditioning images are listed in the metadata, as a column: they are not unlisted training images
    scan.skipped = [s for s in scan.skipped if Path(s.file).resolve() not in used]
    return found, problems


def _pair_hf(scan: DatasetScan, column: str) -> tuple[list, list[str]]:
    import datasets

    if column not in scan.dataset.column_names:
        columns = ", ".join(scan.dataset.column_names)
        raise DataError(
            f"method.conditioning_image_column: column {column!r} is not in dataset {scan.records[0].source} "
            f"(columns: {columns})"
        )
    if isinstance(scan.dataset.features[column], datasets.Image):  # encoded bytes: hashed, then decoded by us
        scan.dataset = scan.dataset.cast_column(column, datasets.Image(decode=False))
    dataset = scan.dataset
    found = []
    for record in scan.records:
        where = f"{record.source}[{record.index}].{column}"
        try:
            data = _row_bytes(dataset[record.index][column])
        except (TypeError, OSError) as exc:
            found.append(f"{where}: not a readable image ({exc})")
            continue
        found.append(_check_condition(data, where, record, path=None, index=record.index))
    return found, []


def scan_pairs(cfg: DataConfig, conditioning_column: str = "conditioning_image", computed: bool = False) -> PairScan:
    """ControlNet data: every training image with its conditioning image, checked as a pair before any model loads.

    Layouts (the first that applies): an HF dataset (`data.dataset_name`) with a `conditioning_column`; a folder
    with `images/` and `conditioning/` (same relative path and stem, captions beside the images); an imagefolder
    whose `metadata.jsonl` names a `conditioning_image_file_name` per row.

    Every pair is checked: the condition exists and decodes, has the image's aspect ratio (it goes through the
    same resize and crop into the same bucket) and is not smaller than the image's bucket. A condition without an
    image is a problem too. All problems are raised together in one `DataError`, each naming its file.

    Args:
        cfg: the recipe's `data` section.
        conditioning_column: HF dataset column of the conditioning images.
        computed: the condition is computed from each image (canny): no partner files are looked for.
    """
    root = Path(cfg.train_data_dir).expanduser() if cfg.train_data_dir is not None else None
    paired_folder = root is not None and (root / IMAGES_FOLDER).is_dir() and (root / CONDITIONING_FOLDER).is_dir()
    if paired_folder:
        scan = scan_dataset(cfg.model_copy(update={"train_data_dir": str(root / IMAGES_FOLDER)}))
    else:
        scan = scan_dataset(cfg)
    pair_scan = PairScan(**{f.name: getattr(scan, f.name) for f in dataclasses.fields(DatasetScan)})
    if computed:
        return pair_scan
    if scan.dataset is not None:
        found, problems = _pair_hf(pair_scan, conditioning_column)
    elif paired_folder:
        found, problems = _pair_folder(root, scan)
    elif scan.kind == "imagefolder":
        found, problems = _pair_imagefolder(root, pair_scan)
    else:
        raise DataError(
            f"data.train_data_dir: {root} has no conditioning images: put them in {CONDITIONING_FOLDER}/ beside an "
            f"{IMAGES_FOLDER}/ folder (same file names), name them in metadata.jsonl as {CONDITIONING_FILE_KEY}, or "
            "compute them with method.conditioning: canny"
        )
    problems = [p for p in found if isinstance(p, str)] + problems
    if problems:
        key = "data.dataset_name" if scan.dataset is not None else "data.train_data_dir"
        raise DataError(f"{key}: {len(problems)} image/condition pairs do not match: {'; '.join(problems)}")
    pair_scan.conditions, pair_scan.conditioning_column = found, conditioning_column
    return pair_scan


def load_condition(scan: PairScan, index: int, cfg: DataConfig) -> Image.Image:
    """The conditioning image of `scan.records[index]`, RGB, fitted to the record's bucket with the image's crop."""
    record, condition = scan.records[index], scan.conditions[index]
    if condition.path is not None:
        image = open_rgb(condition.path)
    else:
        image = load_image(record, cfg, scan.dataset, column=scan.conditioning_column)
    return fit_to_bucket(image, record.bucket)


def condition_tensor(image: Image.Image) -> torch.Tensor:
    """A conditioning image as the ControlNet takes it: float [3, H, W] in [0, 1] (not [-1, 1], as diffusers)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
