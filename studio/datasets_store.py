"""The studio's dataset workspace: uploads checked before anything is written, captions, and frozen versions.

Layout under `$SDTUNE_HOME/datasets/<name>/`:

    work/images/           the editable copy: images and same-name `.txt` captions (the folder format of
                           datasets/README.md), in subfolders where the upload had them: kohya's `10_concept/`
                           folders are subsets the trainers repeat 10 times
    work/conditioning/     ControlNet conditioning images made by `sdtune annotate` (same stems): with images/
                           beside it, the paired-folder layout the ControlNet trainer reads
    work/masks/            masked loss's masks (same relative paths and stems, .png), made on the Datasets page:
                           `data.mask_dir: .../versions/v3/masks` beside `.../versions/v3/images`
    versions/vN/           frozen snapshots of work/: a job trains on one of these, never on work/, so it records
                           exactly what it trained on (`data.train_data_dir: .../versions/v3/images`, or
                           `.../versions/v3` for ControlNet)
    dataset.json           the versions with their fingerprints, written atomically

Uploads are checked in full before anything is written (`dataset_uploads.check_upload`: sizes, zip-slip and zip
bombs, image headers before decoding, names), and only files that pass are written (temp + rename). On top of those
checks, the workspace refuses a second file at the same path in one upload, and a second image of the same name
(`a.jpg` beside `a.png`, which would share the caption `a.txt`), each named in the report.

Every listing goes through `sdtune.adapters.images` (hidden files skipped, `a.TXT` captions, BOMs dropped), as the
trainers' does: what the page counts is what a version freezes and a job trains on.

Imports no torch: PIL, numpy and the standard library only (tests/test_layout.py holds that).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.images import (
    IMAGE_EXTENSIONS,
    caption_file,
    image_files,
    is_hidden,
    is_image_name,
    kohya_folder,
    open_rgb,
    read_caption,
)
from sdtune.adapters.workspace import sdtune_home
from sdtune.studio.dataset_uploads import (  # the upload checks and their names, as importers know them from here
    DatasetError,
    Rejected,
    UploadReport,
    check_image,
    check_upload,
    safe_member,
)

THUMBNAIL_SIDE = 384  # pixels: the Datasets grid shows six across
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WORK, VERSIONS, INDEX = "work", "versions", "dataset.json"
IMAGES, CONDITIONING = "images", "conditioning"  # the ControlNet trainer's paired-folder names
MASKS = "masks"  # the masks of masked loss (data.mask_dir), by the images' relative paths


# -- paths ----------------------------------------------------------------------------------------------------------


def datasets_root(home: str | Path | None = None) -> Path:
    return sdtune_home(home) / "datasets"


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise DatasetError(
            f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a folder name), e.g. purple"
        )
    return name


def dataset_dir(name: str, home=None) -> Path:
    return datasets_root(home) / check_name(name)


def work_dir(name: str, home=None) -> Path:
    """The dataset's editable copy (`images/` and `conditioning/` inside)."""
    folder = dataset_dir(name, home) / WORK
    if not (folder / IMAGES).is_dir():
        raise DatasetError(f"dataset {name!r}: no such dataset (create it on the Datasets page or with an upload)")
    return folder


def _write_atomic(path: Path, data: bytes):
    with atomic_path(path) as tmp:  # a hidden temp name: no listing ever counts a half-written file
        Path(tmp).write_bytes(data)


def _write_json(path: Path, data: dict):
    _write_atomic(path, json.dumps(data, indent=2).encode())


# -- the workspace --------------------------------------------------------------------------------------------------


def create(name: str, home=None) -> Path:
    folder = dataset_dir(name, home)
    (folder / WORK / IMAGES).mkdir(parents=True, exist_ok=True)
    if not (folder / INDEX).is_file():
        _write_json(folder / INDEX, {"name": name, "created_at": time.time(), "versions": []})
    return folder


def _stem_key(relative: str | PurePosixPath) -> tuple[str, str]:
    """(folder, stem): images with the same key would share one caption file."""
    path = PurePosixPath(relative)
    return path.parent.as_posix(), path.stem


def add_files(name: str, files: list[tuple[str, bytes]], home=None) -> UploadReport:
    """Checks an upload (images, .txt captions, zips of them with their folders) and writes what passes into the
    dataset's work copy, each under its relative path.

    Refused with the reason, and named in the report: a second file at the same path in one upload, an image whose
    name differs from another's in that folder only by extension (in this upload or already in the dataset), and a
    caption without an image of the same name.
    """
    images, captions, report = check_upload(files)
    if not images and not captions:
        detail = "; ".join(f"{r.file}: {r.reason}" for r in report.rejected[:3]) or "no files"
        raise DatasetError(f"nothing usable in the upload ({detail}); nothing written")
    folder = create(name, home) / WORK / IMAGES
    owners = _write_images(folder, images, report)
    _write_captions(folder, captions, owners, report)
    return report


def _write_images(folder: Path, images: list[tuple[str, bytes]], report: UploadReport) -> dict:
    """Writes the images that clash with nothing; returns (folder, stem) -> the image that owns that caption name,
    for the images already there and those written."""
    owners = {_stem_key(p.relative_to(folder)): p.relative_to(folder).as_posix() for p in image_files(folder)}
    written = set()
    for filename, data in images:
        owner = owners.setdefault(_stem_key(filename), filename)
        if filename in written:
            report.rejected.append(
                Rejected(filename, "a second file at the same path in this upload (kept the first)")
            )
        elif owner != filename:
            stem = PurePosixPath(filename).stem
            reason = f"{owner} has the same name: the two would share one caption {stem}.txt; rename one of them"
            report.rejected.append(Rejected(filename, reason))
        elif _write_new_version(folder, filename, data, report):
            written.add(filename)
            report.written.append(filename)
        else:
            del owners[_stem_key(filename)]  # not written: its caption has no image
    return owners


def _write_captions(folder: Path, captions: list[tuple[str, str]], owners: dict, report: UploadReport):
    """Writes each caption into its image's caption file (an `a.TXT` already there stays that file)."""
    refused = {_stem_key(r.file) for r in report.rejected if is_image_name(r.file)}
    for filename, text in captions:
        owner = owners.get(_stem_key(filename))
        if owner is None:
            reason = "its image (refused)" if _stem_key(filename) in refused else "an image of the same name"
            report.rejected.append(Rejected(filename, f"caption without {reason}"))
            continue
        existing = caption_file(folder / owner)
        target = (existing if existing.is_file() else folder / filename).relative_to(folder).as_posix()
        if target in report.captions:
            report.rejected.append(Rejected(filename, f"a second caption for {owner} in this upload (kept the first)"))
        elif _write_new_version(folder, target, text.encode(), report):
            report.captions.append(target)


def _write_new_version(folder: Path, relative: str, data: bytes, report: UploadReport) -> bool:
    """Writes `folder/relative`, noting in `report` when it replaces different content (an edited caption, another
    image), or why it could not be written (a file where the path needs a folder, a full disk)."""
    path = folder / relative
    try:
        differs = path.is_file() and path.read_bytes() != data
        _write_atomic(path, data)
    except OSError as exc:
        report.rejected.append(Rejected(relative, f"cannot be written ({exc.strerror or exc})"))
        return False
    if differs:
        report.replaced.append(relative)
    return True


def list_datasets(home=None) -> list[dict]:
    root = datasets_root(home)
    if not root.is_dir():
        return []
    return [info(p.name, home) for p in sorted(root.iterdir()) if (p / WORK / IMAGES).is_dir()]


def info(name: str, home=None) -> dict:
    """Name, folder, image count, captioned count, the folders (subsets), the work copy's fingerprint and the
    versions."""
    folder = work_dir(name, home)
    items = images(name, home)
    index = json.loads((folder.parent / INDEX).read_text()) if (folder.parent / INDEX).is_file() else {}
    return {
        "name": name,
        "work_dir": str(folder),
        "images": len(items),
        "captioned": sum(1 for item in items if item["caption"]),
        "folders": folders(items),
        "conditioning": len(image_files(folder / CONDITIONING)),
        "latest": index.get("versions", [None])[-1] if index.get("versions") else None,
        "fingerprint": fingerprint(folder),
        "versions": index.get("versions", []),
    }


def folders(items: list[dict]) -> list[dict]:
    """Per top folder of `images(...)` ("" = images at the top): image and caption counts, and what the trainers
    make of it: a kohya `N_concept` folder is repeated N times per epoch and "concept" captions its uncaptioned
    images; any other folder takes `data.repeats` from the recipe (repeats None)."""
    rows = {}
    for item in items:
        row = rows.setdefault(item["folder"], {"folder": item["folder"], "images": 0, "captioned": 0})
        row["images"] += 1
        row["captioned"] += bool(item["caption"])
    for row in rows.values():
        repeats, concept = kohya_folder(row["folder"]) or (None, "")
        row.update(repeats=repeats, concept=concept)
    return [rows[key] for key in sorted(rows)]


def images(name: str, home=None) -> list[dict]:
    """Every image of the work copy: file (its path relative to images/), folder (its top folder, "" at the top),
    path, caption, caption_error (a caption file that cannot be read) and its conditioning image when one exists."""
    folder = work_dir(name, home)
    conditions = {
        p.relative_to(folder / CONDITIONING).with_suffix("").as_posix(): p for p in image_files(folder / CONDITIONING)
    }
    out = []
    for path in image_files(folder / IMAGES):
        relative = path.relative_to(folder / IMAGES)
        caption, error = _caption(path)
        condition = conditions.get(relative.with_suffix("").as_posix())
        out.append(
            {
                "file": relative.as_posix(),
                "folder": relative.parts[0] if len(relative.parts) > 1 else "",
                "path": str(path),
                "caption": caption,
                "caption_error": error,
                "conditioning": str(condition) if condition else None,
            }
        )
    return out


def _caption(image: Path) -> tuple[str, str | None]:
    """(caption text, None), or ("", reason) when the caption file cannot be read: one bad file must not take the
    page down."""
    path = caption_file(image)
    try:
        return (read_caption(path).strip() if path.is_file() else ""), None
    except UnicodeDecodeError:
        return "", f"caption file {path.name} is not UTF-8 text (the trainers skip this image)"
    except OSError as exc:
        return "", f"caption file {path.name} is unreadable ({exc.strerror or exc})"


def _image_path(name: str, filename: str, home=None) -> Path:
    """The image `filename` (relative to images/) of the dataset; never a path outside it."""
    root = work_dir(name, home) / IMAGES
    relative = safe_member(filename or "")
    if relative is None or is_hidden(relative) or not is_image_name(relative.name) or not (root / relative).is_file():
        raise DatasetError(f"{filename}: not an image of dataset {name!r}")
    return root / relative


def thumbnail(path: str | Path, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of the image as the trainers see it (`open_rgb`: EXIF-rotated, 16-bit grey scaled, alpha on white),
    at most `max_side` pixels a side. Raises `DatasetError` with the reason when the file cannot be shown."""
    try:
        image = open_rgb(path, max_side)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DatasetError(f"{Path(path).name}: cannot be shown ({type(exc).__name__}: {exc})") from None
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def remove_image(name: str, filename: str, home=None) -> None:
    """Removes an image, its caption (unless another image of the same name still uses it) and its conditioning
    image; a subfolder left empty goes too."""
    path = _image_path(name, filename, home)
    folder = work_dir(name, home)
    relative = path.relative_to(folder / IMAGES)
    sharing = [p for p in path.parent.iterdir() if p != path and p.stem == path.stem and is_image_name(p.name)]
    caption = caption_file(path)
    if caption.is_file() and not sharing:
        caption.unlink()
    for extension in IMAGE_EXTENSIONS:
        (folder / CONDITIONING / relative.with_suffix(extension)).unlink(missing_ok=True)
        (folder / MASKS / relative.with_suffix(extension)).unlink(missing_ok=True)
    path.unlink()
    for parent in relative.parents[:-1]:  # the subfolders, deepest first; images/ itself stays
        with contextlib.suppress(OSError):  # not empty: it still holds files
            (folder / IMAGES / parent).rmdir()


# -- captions -------------------------------------------------------------------------------------------------------


def set_caption(name: str, filename: str, caption: str, home=None) -> None:
    """Writes the image's caption into its caption file (an existing `a.TXT` stays that file)."""
    _write_atomic(caption_file(_image_path(name, filename, home)), caption.strip().encode())


def add_trigger(caption: str, trigger: str) -> str:
    """`trigger, caption`, unless the caption already has the trigger as a word or tag."""
    trigger = trigger.strip()
    if not trigger or re.search(rf"(^|[\s,]){re.escape(trigger)}($|[\s,])", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def apply_template(caption: str, template: str, filename: str, trigger: str = "") -> str:
    """`template` with {caption}, {trigger} and {name} (the file's stem) filled in."""
    try:
        return template.format(caption=caption, trigger=trigger, name=Path(filename).stem).strip()
    except (KeyError, IndexError, ValueError) as exc:
        raise DatasetError(
            f"template {template!r}: use the placeholders {{caption}}, {{trigger}}, {{name}} ({exc})"
        ) from None


def bulk_captions(
    name: str, *, trigger: str = "", find: str = "", replace: str = "", template: str = "", home=None
) -> int:
    """Edits every caption: the template first, then find/replace, then the trigger word. Returns how many
    captions changed (each written atomically). A caption file that cannot be read is left as it is."""
    if template:
        apply_template("", template, "x", trigger)  # a bad template fails before any caption changes
    changed = 0
    for item in images(name, home):
        if item["caption_error"]:
            continue
        text = item["caption"]
        if template:
            text = apply_template(text, template, item["file"], trigger)
        if find:
            text = text.replace(find, replace)
        if trigger and not template:
            text = add_trigger(text, trigger)
        if text != item["caption"]:
            set_caption(name, item["file"], text, home)
            changed += 1
    return changed


# -- masks ----------------------------------------------------------------------------------------------------------


def mask_path(name: str, filename: str, home=None) -> Path:
    """Where the mask of image `filename` lives: work/masks/ + its relative path, as .png (what `data.mask_dir`
    finds for it: trainers/core/data/masks.py)."""
    image = _image_path(name, filename, home)
    folder = work_dir(name, home)
    return folder / MASKS / image.relative_to(folder / IMAGES).with_suffix(".png")


def set_mask(name: str, filename: str, png: bytes, home=None) -> Path:
    """Writes the mask of image `filename` (atomically: a frozen version keeps its own); a mask of the same stem in
    another format goes, so the trainer cannot pick the old one."""
    path = mask_path(name, filename, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, png)
    for extension in IMAGE_EXTENSIONS:
        if extension != ".png":
            path.with_suffix(extension).unlink(missing_ok=True)
    return path


# -- fingerprints and versions --------------------------------------------------------------------------------------


def fingerprint(folder: Path) -> str:
    """sha256 over the sorted (relative path, content sha256) of every file in `folder`: images, captions and
    conditioning images. Changing a byte, a caption or a name changes it. Hidden files and folders are left out,
    as `snapshot` leaves them out of a version and the trainers out of a run."""
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not is_hidden(p.relative_to(folder))):
        rows.append((path.relative_to(folder).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def snapshot(name: str, home=None) -> dict:
    """Freezes the work copy as the next version (or returns the latest one if nothing changed since).

    Files are hard-linked where the filesystem allows (the work copy only ever replaces files by rename, so a link
    never sees a later edit), else copied. Returns {"version", "path", "fingerprint", "images", "created_at"}.
    """
    folder = work_dir(name, home)
    if not image_files(folder / IMAGES):
        raise DatasetError(f"dataset {name!r} has no images yet: upload some first")
    index_path = folder.parent / INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"name": name, "versions": []}
    current = fingerprint(folder)
    if index["versions"] and index["versions"][-1]["fingerprint"] == current:
        return index["versions"][-1]
    number = len(index["versions"]) + 1
    target = folder.parent / VERSIONS / f"v{number}"
    staging = folder.parent / VERSIONS / f".v{number}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".*"))
    if fingerprint(staging) != current:  # edited while copying: refuse rather than record the wrong fingerprint
        shutil.rmtree(staging)
        raise DatasetError(f"dataset {name!r} changed while it was being frozen; try again")
    os.replace(staging, target)
    entry = {
        "version": f"v{number}",
        "path": str(target),
        "fingerprint": current,
        "images": len(image_files(target / IMAGES)),
        "images_path": str(target / IMAGES),
        "created_at": time.time(),
    }
    index["versions"].append(entry)
    _write_json(index_path, index)
    return entry


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = [
    "CONDITIONING",
    "IMAGES",
    "MASKS",
    "DatasetError",
    "Rejected",
    "UploadReport",
    "add_files",
    "add_trigger",
    "apply_template",
    "bulk_captions",
    "check_image",
    "check_name",
    "check_upload",
    "create",
    "dataset_dir",
    "datasets_root",
    "fingerprint",
    "folders",
    "images",
    "info",
    "list_datasets",
    "mask_path",
    "remove_image",
    "set_caption",
    "set_mask",
    "snapshot",
    "thumbnail",
    "work_dir",
]
