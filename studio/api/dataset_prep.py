"""Preparing a dataset: its tag table and tag edits, a training caption preview, duplicate groups and the dataset
report, for a workspace dataset (by name) or any folder (the `sdtune dataset` command).

Edits go through `studio/datasets_store.py` (`set_caption`, `remove_image`), as the page's own edits do: every write
is atomic and a frozen version never sees it.
"""

from __future__ import annotations

import random
from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated


def _store():
    from sdtune.studio import datasets_store

    return datasets_store


# -- tags -----------------------------------------------------------------------------------------------------------


@translated()
def dataset_tags(name: str) -> dict:
    """The dataset's tag (or word) table: {"kind": "tags" | "words", "captions": n, "rows": [{"tag", "captions",
    "share"}]}, most frequent first."""
    from sdtune.adapters.caption_tags import tag_frequency

    table = tag_frequency([item["caption"] for item in _store().images(name) if not item["caption_error"]])
    return {"kind": table.kind, "captions": table.captions, "rows": table.rows()}


@translated()
def rename_tag(name: str, old: str, new: str = "") -> int:
    """Renames the tag (or word) `old` to `new` in every caption of the dataset, or removes it when `new` is empty;
    returns how many captions changed. A caption file that cannot be read is left as it is."""
    from sdtune.adapters import caption_tags

    if not old.strip():
        raise StudioError("tag: name the tag to rename or remove")
    items = [item for item in _store().images(name) if not item["caption_error"]]
    as_tags = caption_tags.reads_as_tags([item["caption"] for item in items])
    changed = 0
    for item in items:
        text = caption_tags.rename_tag(item["caption"], old, new, as_tags)
        if text != item["caption"]:
            _store().set_caption(name, item["file"], text)
            changed += 1
    return changed


@translated()
def caption_preview(
    caption: str,
    *,
    shuffle_caption: bool = False,
    keep_tokens: int = 0,
    caption_template: str = "{caption}",
    trigger_word: str = "",
    samples: int = 3,
    seed: int = 0,
) -> list[str]:
    """What a training step sees for `caption`, `samples` times (the trainer's `CaptionBuilder`: template, then the
    tag shuffle that keeps the first `keep_tokens` tags in place); the draws are seeded, so a preview is stable."""
    from sdtune.trainers.core.data.captions import CaptionBuilder
    from sdtune.trainers.core.recipe import DataConfig, RecipeError

    try:
        cfg = DataConfig(
            shuffle_caption=shuffle_caption,
            keep_tokens=keep_tokens,
            caption_template=caption_template,
            trigger_word=trigger_word or None,
        )
    except ValueError as exc:  # pydantic's ValidationError: a negative keep_tokens, keep_tokens without shuffle
        words = "; ".join(".".join(map(str, e["loc"])) + ": " * bool(e["loc"]) + e["msg"] for e in exc.errors())
        raise RecipeError(f"caption preview: {words}") from None
    builder = CaptionBuilder(cfg)
    return [builder(caption, random.Random(f"sdtune-preview:{seed}:{i}")) for i in range(samples)]


# -- duplicates -----------------------------------------------------------------------------------------------------


def _duplicates_dict(duplicates, root: Path) -> dict:
    return {
        "groups": [
            {"files": g.files, "paths": [str(root / f) for f in g.files], "exact": g.exact, "distance": g.distance}
            for g in duplicates.groups
        ],
        "unreadable": [{"file": file, "reason": reason} for file, reason in duplicates.unreadable],
        "lines": duplicates.lines(),
    }


@translated()
def folder_duplicates(folder: str | Path, threshold: int | None = None) -> dict:
    """Exact and near-duplicate groups among the images under `folder` (subfolders too): {"groups": [{"files"
    (relative), "paths", "exact", "distance"}], "unreadable": [{"file", "reason"}], "lines": the text}."""
    from sdtune.adapters.duplicates import PHASH_THRESHOLD, find_duplicates
    from sdtune.adapters.images import image_files

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise StudioError(f"{folder}: {'not a folder' if root.exists() else 'folder not found'}")
    if threshold is not None and not 0 <= threshold <= 64:
        raise StudioError(f"--threshold {threshold}: a pHash distance is 0 to 64 bits")
    found = find_duplicates(
        image_files(root),
        PHASH_THRESHOLD if threshold is None else threshold,
        names=lambda path: Path(path).relative_to(root).as_posix(),
    )
    return _duplicates_dict(found, root)


@translated()
def dataset_duplicates(name: str, threshold: int | None = None) -> dict:
    """`folder_duplicates` over a workspace dataset's images (files relative to its images/)."""
    store = _store()
    return folder_duplicates(store.work_dir(name) / store.IMAGES, threshold)


@translated()
def drop_duplicates(name: str, keep: str, files: list[str]) -> list[str]:
    """Removes every file of a duplicate group but `keep` from the dataset (with its caption and conditioning image,
    as the page's Remove does); returns the files removed."""
    if keep not in files:
        raise StudioError(f"{keep}: not in the group ({', '.join(files)})")
    dropped = [file for file in files if file != keep]
    for file in dropped:
        _store().remove_image(name, file)
    return dropped


# -- the report -----------------------------------------------------------------------------------------------------


@translated()
def folder_report(folder: str | Path, resolution: int = 512, mask_dir: str | Path | None = None) -> dict:
    """The dataset report of a folder (studio/dataset_report.py): {"text", "png" (bytes), "images", "skipped"}.
    Loads torch (the trainer's scan)."""
    from sdtune.studio.dataset_report import build_report
    from sdtune.studio.report_picture import render_report

    if resolution < 8:
        raise StudioError(f"--resolution {resolution}: at least 8 pixels")
    report = build_report(folder, resolution, mask_dir)
    return {
        "text": report.text(),
        "png": render_report(report),
        "images": len(report.sizes),
        "skipped": [{"file": file, "reason": reason} for file, reason in report.skipped],
    }


@translated()
def dataset_report(name: str, resolution: int = 512) -> dict:
    """`folder_report` over a workspace dataset's images (its work/masks/ folder as the masks, when there is one)."""
    folder = _store().work_dir(name)
    masks = folder / _store().MASKS
    return folder_report(folder / _store().IMAGES, resolution, masks if masks.is_dir() else None)
