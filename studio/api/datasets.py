"""Datasets in the workspace (studio/datasets_store.py, torch-free) and ControlNet conditioning images for them."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated


@translated()
def list_datasets() -> list[dict]:
    """Datasets under $SDTUNE_HOME/datasets: name, image and caption counts, fingerprint, versions."""
    from sdtune.studio import datasets_store

    return datasets_store.list_datasets()


@translated()
def create_dataset(name: str) -> dict:
    from sdtune.studio import datasets_store

    datasets_store.create(name)
    return datasets_store.info(name)


@translated()
def dataset_info(name: str) -> dict:
    from sdtune.studio import datasets_store

    return datasets_store.info(name)


@translated()
def dataset_images(name: str) -> list[dict]:
    """Every image of a dataset's work copy: file (relative path), folder, path, caption, caption_error,
    conditioning image (or None)."""
    from sdtune.studio import datasets_store

    return datasets_store.images(name)


@translated()
def dataset_thumbnail(path: str | Path) -> bytes:
    """A JPEG thumbnail of an image as the trainers see it (any PIL mode, 16-bit grey included); StudioError with
    the reason when it cannot be shown."""
    from sdtune.studio import datasets_store

    return datasets_store.thumbnail(path)


@translated()
def upload_to_dataset(name: str, files: list[tuple[str, bytes]]) -> dict:
    """Checks (size limits, zip-slip, zip bombs, PIL header checks, a full decode, name clashes) and writes an upload
    of images, `.txt` captions and zips of them (folders kept); returns {"written", "captions", "replaced",
    "rejected": [{"file", "reason"}]}, by path relative to the dataset's images/."""
    from sdtune.studio import datasets_store

    return datasets_store.add_files(name, files).to_dict()


@translated()
def set_caption(name: str, file: str, caption: str) -> None:
    from sdtune.studio import datasets_store

    datasets_store.set_caption(name, file, caption)


@translated()
def bulk_captions(name: str, *, trigger: str = "", find: str = "", replace: str = "", template: str = "") -> int:
    """Template ({caption} {trigger} {name}), then find/replace, then the trigger word; returns captions changed."""
    from sdtune.studio import datasets_store

    return datasets_store.bulk_captions(name, trigger=trigger, find=find, replace=replace, template=template)


@translated()
def remove_dataset_image(name: str, file: str) -> None:
    from sdtune.studio import datasets_store

    datasets_store.remove_image(name, file)


@translated()
def freeze_dataset(name: str) -> dict:
    """The dataset's current content as a frozen version (a new one only if it changed): {"version", "path",
    "fingerprint", "images"}. Jobs train on these paths."""
    from sdtune.studio import datasets_store

    return datasets_store.snapshot(name)


@translated()
def annotation_kinds() -> dict[str, list[str]]:
    """Kinds `annotate` knows: those that run as they are, and those that need a local weights file."""
    from sdtune.adapters import annotate

    return {"no_weights": list(annotate.KINDS), "need_weights": list(annotate.WEIGHTED_KINDS)}


@translated()
def annotate_images(
    kind: str,
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    low_threshold: int = 100,
    high_threshold: int = 200,
    mask_threshold: float = 0.18,
    weights: str | None = None,
) -> list[Path]:
    """Makes `kind` conditioning images (canny, softedge, scribble, mask; midas/hed with `weights`) for every image
    in `in_dir`, written to `out_dir` with the same relative names as PNG; returns the files written."""
    from sdtune.adapters import annotate

    if not 0 <= low_threshold <= high_threshold <= 255:
        raise StudioError(f"thresholds: need 0 <= low ({low_threshold}) <= high ({high_threshold}) <= 255")
    options = annotate.AnnotateOptions(low_threshold, high_threshold, mask_threshold, weights)
    return annotate.annotate_folder(in_dir, out_dir, kind, options)


@translated()
def annotate_dataset(name: str, kind: str, **options) -> list[Path]:
    """ControlNet conditioning images for every image of the dataset (`annotate_images` into work/conditioning)."""
    from sdtune.studio import datasets_store

    folder = datasets_store.work_dir(name)
    return annotate_images(kind, folder / datasets_store.IMAGES, folder / datasets_store.CONDITIONING, **options)


@translated()
def dataset_subsets(name: str, reg_folders: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """A dataset's folders as `data.subsets` entries (sd-scripts' dataset config): each folder with its repeats (a
    kohya `N_concept` folder's N, else 1), the caption of its uncaptioned images (the concept) and `is_reg` for
    those named in `reg_folders`. Images at the top of images/ belong to no subset."""
    from sdtune.studio import datasets_store

    info = datasets_store.info(name)
    folders = [row for row in info["folders"] if row["folder"]]
    unknown = sorted(set(reg_folders) - {row["folder"] for row in folders})
    if unknown:
        raise StudioError(f"reg_folders: {', '.join(unknown)} is not a folder of dataset {name}")
    root = Path(info["work_dir"]) / datasets_store.IMAGES
    return [
        {
            "image_dir": str(root / row["folder"]),
            "num_repeats": row["repeats"] or 1,
            "class_tokens": row["concept"] or None,
            "is_reg": row["folder"] in reg_folders,
        }
        for row in folders
    ]
