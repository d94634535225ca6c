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

from sdtune.adapters.errors import SdtuneError

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
