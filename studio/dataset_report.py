"""The dataset report: what a folder of images and captions gives a training run, as numbers and as a picture.

Everything comes from the trainer's own code, so the report says what a run would do: the scan
(`trainers.core.data.scan_dataset`: which images are usable, which are skipped and why, each one's bucket at the
resolution), the CLIP tokenizer of the bundled toy base (the same vocabulary as SD v1-5's: a caption longer than 75
tokens is cut), the tag table (`adapters.caption_tags`) and the duplicate groups (`adapters.duplicates`). The picture
is drawn by `report_picture.py`.

Usage:
    sdtune dataset report DIR [--resolution 512] [--mask-dir MASKS] [-o report.png]

The scan imports torch (it lives with the trainer's tensors): the studio calls `build_report` only when asked.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.caption_tags import TagTable, tag_frequency
from sdtune.adapters.duplicates import PHASH_THRESHOLD, Duplicates, find_duplicates
from sdtune.adapters.images import caption_file

CLIP_TOKENS = 75  # 77 positions less the start and end tokens: SD v1-5's text encoder sees no more
TOP_TAGS = 15


@dataclass
class Smaller:
    """An image smaller than its bucket: sdtune trains it at its own size, where other trainers would upscale it."""

    file: str
    size: tuple[int, int]
    bucket: tuple[int, int]  # the bucket it would have had
    trained_at: tuple[int, int]


@dataclass
class DatasetReport:
    """What `build_report` finds in a folder (files are relative to it)."""

    folder: str
    resolution: int
    sizes: dict[str, tuple[int, int]]  # usable image -> (width, height)
    buckets: dict[tuple[int, int], int]  # bucket -> images (each once, repeats aside)
    smaller: list[Smaller]
    skipped: list[tuple[str, str]]  # (file, reason)
    tokens: dict[str, int]  # image -> CLIP tokens of its caption
    uncaptioned: list[str]  # images without a caption file
    tags: TagTable
    duplicates: Duplicates
    masks: list[str] | None = None  # one line per image without a usable mask; None: no mask folder asked for
    mask_dir: str | None = None

    @property
    def over_limit(self) -> dict[str, int]:
        return {file: n for file, n in self.tokens.items() if n > CLIP_TOKENS}

    def text(self) -> str:
        """The report as lines of text (what `sdtune dataset report` prints)."""
        lines = [f"dataset report: {self.folder} at resolution {self.resolution}"]
        lines.append(f"images: {len(self.sizes)} usable, {len(self.skipped)} skipped")
        lines += _bucket_lines(self)
        lines += _caption_lines(self)
        lines += _tag_lines(self.tags)
        lines += _duplicate_lines(self.duplicates)
        if self.masks is not None:
            have = len(self.sizes) - len(self.masks)
            lines.append(f"masks: {have} of {len(self.sizes)} images have a usable mask in {self.mask_dir}")
            lines += [f"  {problem}" for problem in self.masks]
        lines += [f"skipped {file}: {reason}" for file, reason in self.skipped]
        return "\n".join(lines)


def _bucket_lines(report: DatasetReport) -> list[str]:
    lines = [f"buckets (images each, area <= {report.resolution}x{report.resolution}):"]
    lines += [f"  {w}x{h}: {n}" for (w, h), n in sorted(report.buckets.items())]
    if report.smaller:
        lines.append(
            f"sizes: {len(report.smaller)} smaller than their bucket; sdtune trains them at their own size (other "
            "trainers would upscale them):"
        )
        lines += [
            f"  {s.file}: {s.size[0]}x{s.size[1]}, bucket {s.bucket[0]}x{s.bucket[1]}, trained at "
            f"{s.trained_at[0]}x{s.trained_at[1]}"
            for s in report.smaller
        ]
    else:
        lines.append("sizes: every usable image covers its bucket (none trains below the resolution)")
    return lines


def _caption_lines(report: DatasetReport) -> list[str]:
    counts = list(report.tokens.values())
    lines = [f"captions: {len(report.sizes) - len(report.uncaptioned)} of {len(report.sizes)} images have one"]
    if report.uncaptioned:
        lines.append(f"  without a caption file: {', '.join(report.uncaptioned)}")
    if counts:
        lines.append(
            f"CLIP tokens per caption: min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)}; "
            f"{len(report.over_limit)} over {CLIP_TOKENS} (cut in training)"
        )
        lines += [f"  {file}: {n} tokens" for file, n in report.over_limit.items()]
    return lines


def _tag_lines(tags: TagTable) -> list[str]:
    if not tags.counts:
        return ["tags: no captions"]
    shown = ", ".join(f"{tag} {n}" for tag, n in tags.counts[:TOP_TAGS])
    return [f"{tags.kind} (captions with each, top {min(TOP_TAGS, len(tags.counts))} of {len(tags.counts)}): {shown}"]


def _duplicate_lines(duplicates: Duplicates) -> list[str]:
    groups = duplicates.groups
    if not groups:
        return ["duplicates: none"]
    exact = sum(group.exact for group in groups)
    head = f"duplicates: {len(groups)} group{'s' if len(groups) > 1 else ''} of near-duplicates ({exact} exact)"
    return [head] + [f"  {line}" for line in Duplicates(groups).lines()]


def build_report(
    folder: str | Path, resolution: int = 512, mask_dir: str | Path | None = None, threshold: int = PHASH_THRESHOLD
) -> DatasetReport:
    """Scans `folder` as a LoRA recipe with `data.train_data_dir: folder` and `data.resolution: resolution` would.

    Raises `DataError` (one line) when the folder is missing or has no usable image.
    """
    from sdtune.trainers.core.data import make_buckets, scan_dataset
    from sdtune.trainers.core.data.buckets import nearest_bucket
    from sdtune.trainers.core.recipe import DataConfig

    root = Path(folder).expanduser()
    cfg = DataConfig(train_data_dir=str(root), resolution=resolution)
    scan = scan_dataset(cfg)
    table = make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    sizes, smaller = {}, []
    for record in scan.records:
        name = _relative(record.path, root)
        sizes[name] = (record.width, record.height)
        nearest = nearest_bucket(record.width, record.height, table)
        if record.bucket != nearest:  # `assign_bucket` fell back to the image's own size
            smaller.append(Smaller(name, (record.width, record.height), nearest, record.bucket))
    duplicates = find_duplicates([r.path for r in scan.records], threshold, names=lambda p: _relative(p, root))
    report = DatasetReport(
        folder=str(root),
        resolution=resolution,
        sizes=sizes,
        buckets=dict(sorted(Counter(record.bucket for record in scan.records).items())),
        smaller=smaller,
        skipped=[(_relative(s.file, root), s.reason) for s in scan.skipped],
        tokens=_token_counts({_relative(r.path, root): r.caption for r in scan.records}),
        uncaptioned=[_relative(r.path, root) for r in scan.records if not caption_file(Path(r.path)).is_file()],
        tags=tag_frequency([record.caption for record in scan.records]),
        duplicates=duplicates,
    )
    if mask_dir is not None:
        from sdtune.trainers.core.data.masks import mask_problems

        report.mask_dir = str(mask_dir)
        report.masks = mask_problems(scan.records, Path(mask_dir).expanduser(), root)
    return report


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _token_counts(captions: dict[str, str]) -> dict[str, int]:
    """CLIP tokens of each caption, without the start and end tokens, uncut."""
    from transformers import CLIPTokenizer

    from sdtune.adapters.base import TOY_BASE

    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_BASE / "tokenizer"))
    tokenizer.model_max_length = 10**6  # counting, not encoding: no "longer than 77" warning for the long ones
    files = list(captions)
    ids = tokenizer([captions[f] for f in files], add_special_tokens=False)["input_ids"] if files else []
    return {file: len(row) for file, row in zip(files, ids)}


__all__ = ["CLIP_TOKENS", "DatasetReport", "Smaller", "build_report"]
