"""Where the training images come from: folders (plain, kohya `N_concept`, HF imagefolder) and HF datasets, each
image checked once (decoded, sized, hashed) into an `ImageRecord`; and the pixels of a record, for the trainer.

Where the data can come from (exactly one of `data.train_data_dir` / `data.dataset_name`):

1. a folder of images with same-name caption files (`a.png` + `a.txt`); no caption file -> caption "";
2. kohya folders: `train_data_dir/3_sks dog/*.png`: every image in `N_name` is seen N times per epoch, and the
   folder's name ("sks dog") is the caption of an image without a caption file. Images outside such folders
   follow rule 1;
3. an HF imagefolder: a `metadata.jsonl` (or `metadata.csv`) whose rows name a `file_name` and a caption column;
4. `dataset_name`: a folder written by `datasets.Dataset.save_to_disk`, or a hub dataset id (its "train" split).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from sdtune.adapters.images import (
    IMAGE_EXTENSIONS,
    caption_file,
    decode_caption,
    image_files,
    kohya_folder,
    open_rgb,
    to_rgb,
)
from sdtune.trainers.core.recipe import DataConfig

from . import masks
from .buckets import bucket_for, cover_crop, fit_to_bucket
from .captions import CaptionBuilder
from .records import ALPHA, DataError, DatasetScan, ImageRecord, Skipped

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


# -- checking one image ---------------------------------------------------------------------------------------------


def probe_image(data: bytes, min_size: int) -> tuple[int, int] | str:
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
    probed = probe_image(data, min_size)
    if isinstance(probed, str):
        return probed
    width, height = probed
    bucket = bucket_for(width, height, cfg)
    _, crop = cover_crop(width, height, bucket)
    content_hash = hashlib.sha256(data).hexdigest()
    mask = ALPHA if cfg.masked_loss and cfg.alpha_mask and masks.has_alpha(data) else None
    return ImageRecord(
        width=width, height=height, bucket=bucket, crop=crop, content_hash=content_hash, mask=mask, **fields
    )


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


def _scan_folder(root: Path, cfg: DataConfig, fallback: str = "") -> tuple[list[ImageRecord], list[Skipped], str]:
    """Plain and kohya layouts. Images under an `N_name` subfolder get N repeats and caption fallback "name"; other
    images without a caption file get `fallback` (a subset's class_tokens)."""
    kohya = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and (parsed := kohya_folder(child.name)):
            kohya[child.name] = parsed
    records, skipped, default = [], [], fallback
    for path in image_files(root):
        top = path.relative_to(root).parts[0]
        repeats, fallback, source = cfg.repeats, default, root
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


def metadata_rows(metadata: Path) -> list[dict]:
    """The rows of one imagefolder metadata file (JSON lines or CSV); a line that is not JSON is a `DataError`."""
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
    rows = metadata_rows(metadata)
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


def row_bytes(value) -> bytes:
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
            data = row_bytes(row[cfg.image_column])
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
    if cfg.subsets:
        return _scan_subsets(cfg)
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
        if cfg.mask_dir is not None:
            raise DataError(
                "data.mask_dir: masks are matched to image files, and an HF dataset has none; use "
                "data.train_data_dir, or alpha_mask: true with images that carry an alpha channel"
            )
        records, skipped, kind, dataset = _scan_hf(cfg)
    if not records:
        reasons = "; ".join(f"{Path(s.file).name}: {s.reason}" for s in skipped[:3]) or (
            f"no files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
        raise DataError(f"{key}: no usable images in {where} ({len(skipped)} skipped: {reasons})")
    if cfg.masked_loss and cfg.mask_dir is not None:
        records = masks.attach_mask_files(records, cfg, where)
    return DatasetScan(records=records, skipped=skipped, kind=kind, dataset=dataset, mask_source=_mask_source(cfg))


def _mask_source(cfg: DataConfig) -> str | None:
    """Where the masks come from ("alpha" or the mask folder), None when the loss is not masked."""
    if not cfg.masked_loss:
        return None
    return ALPHA if cfg.alpha_mask else cfg.mask_dir


def _scan_subsets(cfg: DataConfig) -> DatasetScan:
    """`data.subsets`: each folder scanned with its own repeats and caption settings (`for_subset`), its records
    marked with its index; the is_reg subsets' records go to the scan's `regularization`."""
    found: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for index, subset in enumerate(cfg.subsets):
        key, where = f"data.subsets[{index}].image_dir", Path(subset.image_dir).expanduser()
        if not where.is_dir():
            raise DataError(f"{key}: {'a file, not a folder' if where.exists() else 'folder not found'}: {where}")
        sub_cfg = cfg.for_subset(index)
        records, sub_skipped, _ = _scan_folder(where, sub_cfg, fallback=subset.class_tokens or "")
        if not records:
            raise DataError(f"{key}: no usable images in {where} ({len(sub_skipped)} skipped)")
        if cfg.masked_loss and cfg.mask_dir is not None:
            records = masks.attach_mask_files(records, cfg, where)
        found += [dataclasses.replace(record, subset=index) for record in records]
        skipped += sub_skipped
    reg = [r for r in found if cfg.subsets[r.subset].is_reg]
    train = [r for r in found if not cfg.subsets[r.subset].is_reg]
    scan = DatasetScan(train, skipped, "subsets", mask_source=_mask_source(cfg), subsets=cfg.subsets)
    if reg:
        scan.regularization = DatasetScan(records=reg, skipped=[], kind="subsets", subsets=cfg.subsets)
    return scan


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
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(row_bytes(value)))
    return to_rgb(ImageOps.exif_transpose(image))


def load_mask(record: ImageRecord, cfg: DataConfig, dataset=None) -> torch.Tensor | None:
    """The loss mask of a record at its bucket, as `load_pixels` fits the image: float [1, bucket_h, bucket_w] in
    [0, 1] (1 = learn). None when the record has no mask (it learns everywhere). Never flipped, as `load_pixels`."""
    if record.mask is None:
        return None
    if record.mask == ALPHA:
        mask = masks.alpha_channel(_source_image(record, cfg, dataset))
    else:
        mask = masks.open_mask(record.mask)
    return masks.mask_tensor(fit_to_bucket(mask, record.bucket))


def _source_image(record: ImageRecord, cfg: DataConfig, dataset=None) -> Image.Image:
    """A record's image EXIF-rotated but in its own mode (its alpha kept)."""
    if record.path is not None:
        source = Image.open(record.path)
    else:
        source = Image.open(io.BytesIO(row_bytes(dataset[record.index][cfg.image_column])))
    with source:
        image = ImageOps.exif_transpose(source)
        image.load()
    return image


def load_pixels(record: ImageRecord, cfg: DataConfig, dataset=None) -> torch.Tensor:
    """The training pixels of a record: float tensor [3, bucket_h, bucket_w] in [-1, 1].

    EXIF-rotated, RGB with transparency on white, resized to cover the bucket and center-cropped. Never flipped:
    `random_flip` is applied by the trainer to the cached latents, so one cache entry serves both orientations.
    """
    image = fit_to_bucket(load_image(record, cfg, dataset), record.bucket)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
