"""What a scan of the training data finds: one `ImageRecord` per usable image, one `Skipped` per refused file, the
`DatasetScan` that holds them (with its fingerprint and kohya's per-folder counts), and its preflight text.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.adapters.duplicates import find_duplicates
from sdtune.adapters.errors import SdtuneError

PREFLIGHT_MAX_SKIPPED = 20
PREFLIGHT_MAX_GROUPS = 5
ALPHA = "alpha"  # `ImageRecord.mask` of an image whose alpha channel is its mask (masked loss)


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
    mask: str | None = None  # masked loss: its mask file, "alpha" (its alpha channel), or None (learns whole)
    mask_hash: str | None = None  # sha256 of the mask file: a changed mask changes what is trained
    subset: int | None = None  # its entry in data.subsets, when the data comes as subsets


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
    mask_source: str | None = None  # masked loss: "alpha" or the mask folder; None when the loss is not masked
    subsets: list = field(default_factory=list)  # data.subsets (SubsetConfig), which records' `subset` indexes
    regularization: DatasetScan | None = None  # the is_reg subsets' images, paired with the training images

    def fingerprint(self) -> str:
        """sha256 over the sorted (content_hash, caption, repeats, bucket) of every record.

        It identifies what is trained on, not where it lives: renaming or moving files keeps it, while changing an
        image's bytes, a caption, a repeat count, the bucketing (resolution, steps) or, with masked loss, a mask
        changes it.
        """
        # the mask only when the loss is masked, so that an unmasked dataset keeps the fingerprint it always had
        masked = self.mask_source is not None
        rows = sorted(
            [r.content_hash, r.caption, r.repeats, list(r.bucket), *([r.mask_hash or r.mask or ""] if masked else [])]
            for r in self.records
        )
        if self.regularization is not None:  # is_reg subsets: what the training images are held against
            rows.append(["regularization", self.regularization.fingerprint()])
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    def _label(self, source: str) -> str:
        # kohya metadata names a folder by its own name ("3_sks dog"); an HF dataset by its name/path.
        return Path(source).name if self.kind in ("folder", "kohya", "imagefolder", "subsets") else source

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


def format_preflight(scan: DatasetScan, resolution: int) -> str:
    """The data part of the summary printed before any model loads; the trainer appends its estimates.

    Lists the image count (unique and with repeats), the layout, each source folder, the buckets with how many
    images (with repeats) each trains per epoch, the groups of near-duplicate images (the first 5 and a count), and
    every skipped file with its reason (the first 20 and a count).
    """
    unique = len(scan.records)
    with_repeats = sum(record.repeats for record in scan.records)
    lines = [f"data: {unique} images ({with_repeats} per epoch with repeats), layout {scan.kind}"]
    dirs = scan.dataset_dirs()
    if scan.subsets:
        lines += _subset_lines(scan)
    elif len(dirs) > 1 or scan.kind == "kohya":
        lines += [f"  {label}: {d['img_count']} images x {d['n_repeats']} repeats" for label, d in dirs.items()]
    if scan.mask_source is not None:
        lines.append(_mask_line(scan.records, scan.mask_source))
    lines.append(f"buckets (area <= {resolution}x{resolution}; images per epoch):")
    lines += [f"  {w}x{h} (aspect {w / h:.2f}): {count}" for (w, h), count in scan.bucket_counts().items()]
    lines += _duplicate_lines(scan.records)
    if scan.skipped:
        lines.append(f"skipped {len(scan.skipped)} files:")
        lines += [f"  {s.file}: {s.reason}" for s in scan.skipped[:PREFLIGHT_MAX_SKIPPED]]
        if len(scan.skipped) > PREFLIGHT_MAX_SKIPPED:
            lines.append(f"  ... and {len(scan.skipped) - PREFLIGHT_MAX_SKIPPED} more")
    return "\n".join(lines)


def _duplicate_lines(records: list[ImageRecord]) -> list[str]:
    """The groups of near-duplicate images among the files (`adapters.duplicates`: hashes cached per file by size and
    mtime, so a second preflight decodes nothing); none for an HF dataset's rows, which have no files."""
    paths = [record.path for record in records if record.path is not None]
    groups = find_duplicates(paths).groups if len(paths) > 1 else []
    if not groups:
        return []
    plural = "s" if len(groups) > 1 else ""
    lines = [f"duplicates: {len(groups)} group{plural} of near-duplicates (`sdtune dataset dupes` shows them):"]
    lines += [f"  {', '.join(_short_names(group.files))}" for group in groups[:PREFLIGHT_MAX_GROUPS]]
    if len(groups) > PREFLIGHT_MAX_GROUPS:
        lines.append(f"  ... and {len(groups) - PREFLIGHT_MAX_GROUPS} more")
    return lines


def _short_names(files) -> list[str]:
    """Each file by its name, or by folder/name where two share a name (one picture in two subsets' folders)."""
    names = [Path(file).name for file in files]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(file).parent.name}/{Path(file).name}" for file in files]


def _mask_line(records: list[ImageRecord], source: str) -> str:
    """The preflight line of masked loss: how many images learn only inside a mask, and where the masks are."""
    masked = sum(record.mask is not None for record in records)
    where = "their alpha channel" if source == ALPHA else f"their mask in {source}"
    rest = len(records) - masked
    whole = f"; {rest} without alpha learn the whole image" if rest else ""
    return f"masked loss: {masked} of {len(records)} images learn only inside {where}{whole}"


def _subset_lines(scan: DatasetScan) -> list[str]:
    """One line per subset: its images, repeats and share of the epoch; regularization subsets by how often they are
    drawn beside the training images (one per training image, among themselves in proportion to their repeats)."""
    per_epoch = sum(record.repeats for record in scan.records)
    reg_records = scan.regularization.records if scan.regularization else []
    reg_weight = sum(record.repeats for record in reg_records)
    lines = ["subsets (share of an epoch):"]
    for index, subset in enumerate(scan.subsets):
        own = [r for r in (reg_records if subset.is_reg else scan.records) if r.subset == index]
        seen = sum(record.repeats for record in own)
        counts = f"{len(own)} images x {subset.num_repeats} repeats"
        if subset.is_reg:
            drawn = per_epoch * seen / max(reg_weight, 1)
            lines.append(
                f"  [{index}] {subset.image_dir} (is_reg): {counts}, ~{drawn:.0f} drawn per epoch beside "
                f"the training images, at method.prior_loss_weight"
            )
        else:
            lines.append(f"  [{index}] {subset.image_dir}: {counts} = {seen} ({seen / max(per_epoch, 1):.0%})")
    return lines
