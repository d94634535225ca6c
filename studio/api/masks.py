"""Masks for masked loss in a workspace dataset: made from threshold and fill controls (adapters/mask_edit.py),
previewed as an overlay, written into the dataset's work/masks/ through the datasets store (a frozen version keeps
its own). A version's masks/ folder is the recipe's `data.mask_dir`.
"""

from __future__ import annotations

import io

from sdtune.studio.api.errors import translated


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _mask_of(name: str, file: str, threshold: float, flood: bool, grow: int, invert: bool):
    """(the image as the trainers see it, its mask under the controls)."""
    from sdtune.adapters.images import open_rgb
    from sdtune.adapters.mask_edit import MaskOptions, make_mask
    from sdtune.studio import datasets_store

    options = MaskOptions(threshold, flood, grow, invert)  # checked before the image is read
    path = next((i["path"] for i in datasets_store.images(name) if i["file"] == file), None)
    if path is None:
        raise datasets_store.DatasetError(f"{file}: not an image of dataset {name!r}")
    try:
        image = open_rgb(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise datasets_store.DatasetError(f"{file}: unreadable image ({type(exc).__name__}: {exc})") from None
    return image, make_mask(image, options)


@translated()
def mask_preview(
    name: str, file: str, *, threshold: float = 0.18, flood: bool = True, grow: int = 0, invert: bool = False
) -> dict:
    """The mask the controls make for one image of the dataset, not written: {"overlay": PNG bytes (what is
    ignored dimmed red), "mask": PNG bytes, "coverage": the share learned, "current": the mask already saved as PNG
    bytes or None}."""
    from sdtune.adapters.mask_edit import coverage, overlay
    from sdtune.studio import datasets_store

    image, mask = _mask_of(name, file, threshold, flood, grow, invert)
    saved = datasets_store.mask_path(name, file)
    return {
        "overlay": _png(overlay(image, mask)),
        "mask": _png(mask),
        "coverage": coverage(mask),
        "current": saved.read_bytes() if saved.is_file() else None,
    }


@translated()
def save_masks(
    name: str,
    files: list[str] | None = None,
    *,
    threshold: float = 0.18,
    flood: bool = True,
    grow: int = 0,
    invert: bool = False,
) -> dict:
    """Writes the mask the controls make for each of `files` (None: every image of the dataset) into work/masks/.
    Returns {"written": [files], "skipped": [{"file", "reason"}], "mask_dir": the folder}. An unreadable image is
    skipped with its reason."""
    from sdtune.studio import datasets_store

    names = files if files is not None else [i["file"] for i in datasets_store.images(name)]
    written, skipped = [], []
    for file in names:
        try:
            _, mask = _mask_of(name, file, threshold, flood, grow, invert)
        except datasets_store.DatasetError as exc:
            skipped.append({"file": file, "reason": str(exc)})
            continue
        datasets_store.set_mask(name, file, _png(mask))
        written.append(file)
    return {
        "written": written,
        "skipped": skipped,
        "mask_dir": str(datasets_store.work_dir(name) / datasets_store.MASKS),
    }
