"""ControlNet data: every training image with its conditioning image (and caption), checked as a pair before any
model loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.adapters.images import IMAGE_EXTENSIONS, image_files, open_rgb
from sdtune.trainers.core.recipe import DataConfig

from .buckets import fit_to_bucket
from .records import DataError, DatasetScan, ImageRecord
from .sources import METADATA_FILES, load_image, metadata_rows, probe_image, row_bytes, scan_dataset

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
    probed = probe_image(data, 1)
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
        for row in metadata_rows(metadata):
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
            data = row_bytes(dataset[record.index][column])
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
