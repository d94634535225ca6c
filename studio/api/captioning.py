"""Captioning and tagging a dataset (studio/captioning.py) with a captioner (adapters/captioners.py): a workspace
dataset by name, through the datasets store (a frozen version never changes), or a plain folder (`.txt` beside each
image). The `sdtune caption` command and the Datasets page's Caption button call these.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated


def _result(run) -> dict:
    return {
        "changes": [{"file": file, "old": old, "new": new} for file, old, new in run.changes],
        "skipped": [{"file": file, "reason": reason} for file, reason in run.skipped],
        "unchanged": run.unchanged,
        "kept": run.kept,
        "dry_run": run.dry_run,
        "lines": run.lines(),
    }


def _caption(
    items,
    model: str,
    write: Callable[[str, str], None],
    *,
    mode: str = "missing",
    trigger: str = "",
    dry_run: bool = False,
    batch_size: int = 8,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
    blacklist: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Captions `items` with `model` ("toy", a folder or a Hub id), writing each changed caption with `write(file,
    text)` unless `dry_run`; `progress(done, total)` after each batch of `batch_size`. The WD14 options are its
    thresholds and the tags never written."""
    from sdtune.adapters.captioners import TaggerOptions, load_captioner
    from sdtune.studio import captioning

    captioning.check_mode(mode, trigger)  # a bad mode fails before a model loads
    captioner = load_captioner(model or "toy", TaggerOptions(general_threshold, character_threshold, blacklist or ()))
    run = captioning.caption_items(
        items,
        captioner,
        mode=mode,
        trigger=trigger,
        batch_size=batch_size,
        write=None if dry_run else write,
        progress=progress,
    )
    return _result(run)


@translated()
def caption_dataset(name: str, model: str = "toy", **options) -> dict:
    """Captions the images of a workspace dataset's work copy; each caption is written through the datasets store
    (atomic, so a frozen version keeps its own). `options`: mode, trigger, dry_run, batch_size, general_threshold,
    character_threshold, blacklist, progress (`_caption`). Returns {"changes": [{"file", "old", "new"}], "skipped":
    [{"file", "reason"}], "unchanged", "kept", "dry_run", "lines"}."""
    from sdtune.studio import captioning, datasets_store

    items = [
        captioning.Item(i["file"], i["path"], i["caption"], i["caption_error"]) for i in datasets_store.images(name)
    ]
    return _caption(items, model, lambda file, text: datasets_store.set_caption(name, file, text), **options)


@translated()
def caption_folder(folder: str | Path, model: str = "toy", **options) -> dict:
    """`caption_dataset` over a plain folder (subfolders too): each caption a `.txt` beside its image (an existing
    `a.TXT` stays that file), written atomically."""
    from sdtune.adapters.atomic import write_text_atomic
    from sdtune.adapters.images import caption_file, image_files

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise StudioError(f"{folder}: {'not a folder' if root.exists() else 'no such dataset or folder'}")
    items = [_folder_item(root, path) for path in image_files(root)]
    return _caption(items, model, lambda file, text: write_text_atomic(caption_file(root / file), text), **options)


def _folder_item(root: Path, path: Path):
    from sdtune.adapters.images import caption_file, read_caption
    from sdtune.studio import captioning

    item = captioning.Item(path.relative_to(root).as_posix(), str(path))
    caption = caption_file(path)
    try:
        item.caption = read_caption(caption).strip() if caption.is_file() else ""
    except (UnicodeDecodeError, OSError) as exc:
        item.caption_error = f"caption file {caption.name} cannot be read ({type(exc).__name__}); fix or delete it"
    return item


@translated()
def captioner_families() -> list[dict]:
    """The captioner families, for the page: name, what `--model` takes, whether it can run here."""
    from sdtune.adapters.captioners import TAGGERS_EXTRA, taggers_installed

    ready = taggers_installed()
    return [
        {"family": "toy", "model": "toy", "ready": True, "note": "the toy-world scorer: colour and shape"},
        {
            "family": "blip",
            "model": "Salesforce/blip-image-captioning-base, or a folder",
            "ready": True,
            "note": "BLIP captions (transformers)",
        },
        {"family": "blip2", "model": "Salesforce/blip2-opt-2.7b, or a folder", "ready": True, "note": "BLIP-2"},
        {
            "family": "florence2",
            "model": "a Florence-2 in transformers' format (model_type florence2, no remote code), or a folder",
            "ready": True,
            "note": "Florence-2, task <CAPTION>",
        },
        {
            "family": "wd14",
            "model": "SmilingWolf/wd-vit-tagger-v3, or a folder with model.onnx + selected_tags.csv",
            "ready": ready,
            "note": "Danbooru tags (onnxruntime)" if ready else f"needs onnxruntime: {TAGGERS_EXTRA}",
        },
    ]
