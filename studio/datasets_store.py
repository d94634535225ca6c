"""The studio's dataset workspace: uploads checked before anything is written, captions, and frozen versions.

Layout under `$SDTUNE_HOME/datasets/<name>/`:

    work/images/           the editable copy: images and same-name `.txt` captions (the folder format of
                           datasets/README.md)
    work/conditioning/     ControlNet conditioning images made by `sdtune annotate` (same stems): with images/
                           beside it, the paired-folder layout the ControlNet trainer reads
    versions/vN/           frozen snapshots of work/: a job trains on one of these, never on work/, so it records
                           exactly what it trained on (`data.train_data_dir: .../versions/v3/images`, or
                           `.../versions/v3` for ControlNet)
    dataset.json           the versions with their fingerprints, written atomically

Uploads are checked in full before anything is written, and only files that pass are written (temp + rename):

    1. size limits per file and per upload;
    2. zips: a member with an absolute path or a `..` part (zip-slip) refuses the whole zip; so does one whose
       declared size is over MAX_ZIP_RATIO times its compressed size or the total over the limit (zip-bomb); a
       member that inflates past its declared size fails zipfile's size and CRC checks while it is read;
    3. images: PIL reads the header only first, so a PNG that claims 20000x20000 is refused without decoding;
       then `verify()` checks the structure. Anything else is rejected with its reason.

Imports no torch: PIL and the standard library only (tests/test_layout.py holds that).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
MAX_FILE_BYTES = 25 * 1024**2  # one image
MAX_UPLOAD_BYTES = 500 * 1024**2  # everything in one upload, zips expanded
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_RATIO = 100  # declared size / compressed size; real images compress far less than this
MAX_SIDE = 8192  # pixels, either side
MAX_PIXELS = 40_000_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WORK, VERSIONS, INDEX = "work", "versions", "dataset.json"
IMAGES, CONDITIONING = "images", "conditioning"  # the ControlNet trainer's paired-folder names


class DatasetError(ValueError):
    """A request the workspace refuses (bad name, unsafe zip, nothing usable); the message is one line."""


@dataclass
class Rejected:
    file: str
    reason: str


@dataclass
class UploadReport:
    """What an upload wrote (relative names), which of those replaced a different file of the same name, and what
    it refused, each with its reason."""

    written: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -- paths ----------------------------------------------------------------------------------------------------------


def datasets_root(home: str | Path | None = None) -> Path:
    root = home or os.environ.get("SDTUNE_HOME") or Path.home() / ".sdtune"
    return Path(root).expanduser().absolute() / "datasets"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict):
    _write_atomic(path, json.dumps(data, indent=2).encode())


# -- checking uploads -----------------------------------------------------------------------------------------------


def check_image(data: bytes) -> str | None:
    """None if `data` is an image the trainers can use, else the reason. The header is read before any decoding."""
    if not data:
        return "empty file (0 bytes)"
    if len(data) > MAX_FILE_BYTES:
        return f"{len(data) / 1024**2:.1f} MB is over the {MAX_FILE_BYTES // 1024**2} MB limit per image"
    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header only
            width, height = image.size
            if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                return (
                    f"header claims {width}x{height} pixels, over the {MAX_SIDE} px / {MAX_PIXELS // 10**6} MP limit "
                    "(refused without decoding)"
                )
            image.verify()
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except Image.DecompressionBombError as exc:  # PIL's own header check, past 2x its pixel limit
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        return f"header claims {claimed}, over the {MAX_PIXELS // 10**6} MP limit (refused without decoding)"
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... for broken files
        return f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    return None


def _safe_member(name: str) -> PurePosixPath | None:
    """The member's relative path, or None when it would land outside the folder (zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        return None
    return path


def _read_member(archive: zipfile.ZipFile, filename: str, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes. zipfile stops inflating at the declared size and checks the CRC, so a member that lies
    about its size (declares little, inflates to more) fails here instead of filling memory."""
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DatasetError(
            f"{filename}: member {info.filename!r} is corrupt or not what its header declares ({exc}); nothing written"
        ) from None


def _zip_members(filename: str, data: bytes) -> list[tuple[str, bytes]]:
    """(relative name, bytes) of every file in a zip, after the whole zip passed the safety checks."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{filename}: not a valid zip ({exc}); nothing written") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            raise DatasetError(f"{filename}: {len(infos)} files, over the {MAX_ZIP_MEMBERS} limit; nothing written")
        total = 0
        for info in infos:
            if _safe_member(info.filename) is None:
                raise DatasetError(
                    f"{filename}: member {info.filename!r} points outside the dataset (zip-slip); nothing written"
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_ZIP_RATIO:
                raise DatasetError(
                    f"{filename}: member {info.filename!r} expands {ratio:.0f}x (limit {MAX_ZIP_RATIO}x, zip bomb?); "
                    "nothing written"
                )
            total += info.file_size
        if total > MAX_UPLOAD_BYTES:
            raise DatasetError(
                f"{filename}: expands to {total / 1024**2:.0f} MB, over the {MAX_UPLOAD_BYTES // 1024**2} MB limit; "
                "nothing written"
            )
        return [(str(_safe_member(i.filename)), _read_member(archive, filename, i)) for i in infos]


def _flatten(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Uploads and zip members keep only their base name (no folders are created from user input)."""
    out = []
    for name, data in files:
        if name.lower().endswith(".zip"):
            out += [(PurePosixPath(n).name, d) for n, d in _zip_members(name, data) if not _ignored(n)]
        else:
            out.append((PurePosixPath(name.replace("\\", "/")).name, data))
    return out


def _ignored(name: str) -> bool:
    """Zip tool litter that is neither data nor worth a rejection line (macOS resource forks, .DS_Store)."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or parts[-1] in (".DS_Store", "Thumbs.db")


def check_upload(
    files: list[tuple[str, bytes]],
) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]], UploadReport]:
    """Splits an upload into (images, captions) that pass and a report of what was refused. Raises `DatasetError`
    when the upload as a whole is refused (an unsafe zip, over the size limit)."""
    total = sum(len(data) for _, data in files)
    if total > MAX_UPLOAD_BYTES:
        raise DatasetError(
            f"upload of {total / 1024**2:.0f} MB is over the {MAX_UPLOAD_BYTES // 1024**2} MB limit; nothing written"
        )
    images, captions, report = [], [], UploadReport()
    for name, data in _flatten(files):
        suffix = Path(name).suffix.lower()
        if suffix == CAPTION_EXTENSION:
            try:
                captions.append((name, data.decode("utf-8").strip()))
            except UnicodeDecodeError:
                report.rejected.append(Rejected(name, "caption file is not UTF-8 text"))
        elif suffix in IMAGE_EXTENSIONS:
            reason = check_image(data)
            if reason:
                report.rejected.append(Rejected(name, reason))
            else:
                images.append((name, data))
        else:
            report.rejected.append(
                Rejected(name, f"not an image: use {' '.join(IMAGE_EXTENSIONS)} (captions: same-name .txt)")
            )
    return images, captions, report


# -- the workspace --------------------------------------------------------------------------------------------------


def create(name: str, home=None) -> Path:
    folder = dataset_dir(name, home)
    (folder / WORK / IMAGES).mkdir(parents=True, exist_ok=True)
    if not (folder / INDEX).is_file():
        _write_json(folder / INDEX, {"name": name, "created_at": time.time(), "versions": []})
    return folder


def add_files(name: str, files: list[tuple[str, bytes]], home=None) -> UploadReport:
    """Checks an upload (images, .txt captions, zips of them) and writes what passes into the dataset's work copy.

    A caption uploaded without its image (in this upload or already in the dataset) is refused.
    """
    images, captions, report = check_upload(files)
    if not images and not captions:
        detail = "; ".join(f"{r.file}: {r.reason}" for r in report.rejected[:3]) or "no files"
        raise DatasetError(f"nothing usable in the upload ({detail}); nothing written")
    folder = create(name, home) / WORK / IMAGES
    stems = {Path(n).stem for n, _ in images} | {p.stem for p in list_image_files(folder)}
    for filename, data in images:
        _write_new_version(folder / filename, data, report)
        report.written.append(filename)
    for filename, text in captions:
        if Path(filename).stem not in stems:
            report.rejected.append(Rejected(filename, "caption without an image of the same name"))
            continue
        _write_new_version(folder / filename, text.encode(), report)
        report.captions.append(filename)
    return report


def _write_new_version(path: Path, data: bytes, report: UploadReport):
    """Writes `path`, noting in `report` when it replaces different content (an edited caption, another image)."""
    if path.is_file() and path.read_bytes() != data:
        report.replaced.append(path.name)
    _write_atomic(path, data)


def list_image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_datasets(home=None) -> list[dict]:
    root = datasets_root(home)
    if not root.is_dir():
        return []
    return [info(p.name, home) for p in sorted(root.iterdir()) if (p / WORK / IMAGES).is_dir()]


def info(name: str, home=None) -> dict:
    """Name, folder, image count, captioned count, the work copy's fingerprint and the versions."""
    folder = work_dir(name, home)
    items = images(name, home)
    index = json.loads((folder.parent / INDEX).read_text()) if (folder.parent / INDEX).is_file() else {}
    return {
        "name": name,
        "work_dir": str(folder),
        "images": len(items),
        "captioned": sum(1 for item in items if item["caption"]),
        "conditioning": len(list_image_files(folder / CONDITIONING)),
        "latest": index.get("versions", [None])[-1] if index.get("versions") else None,
        "fingerprint": fingerprint(folder),
        "versions": index.get("versions", []),
    }


def images(name: str, home=None) -> list[dict]:
    """Every image of the work copy: file name, path, caption, and its conditioning image when one exists."""
    folder = work_dir(name, home)
    conditions = {c.stem: c for c in list_image_files(folder / CONDITIONING)}
    out = []
    for path in list_image_files(folder / IMAGES):
        caption_file = path.with_suffix(CAPTION_EXTENSION)
        condition = conditions.get(path.stem)
        out.append(
            {
                "file": path.name,
                "path": str(path),
                "caption": caption_file.read_text().strip() if caption_file.is_file() else "",
                "conditioning": str(condition) if condition else None,
            }
        )
    return out


def remove_image(name: str, filename: str, home=None) -> None:
    folder = work_dir(name, home)
    path = folder / IMAGES / PurePosixPath(filename).name
    if not path.is_file():
        raise DatasetError(f"{filename}: not in dataset {name!r}")
    for extra in (path.with_suffix(CAPTION_EXTENSION), *list_image_files(folder / CONDITIONING)):
        if extra.stem == path.stem and extra.is_file():
            extra.unlink()
    path.unlink()


# -- captions -------------------------------------------------------------------------------------------------------


def set_caption(name: str, filename: str, caption: str, home=None) -> None:
    image = work_dir(name, home) / IMAGES / PurePosixPath(filename).name
    if not image.is_file():
        raise DatasetError(f"{filename}: not in dataset {name!r}")
    _write_atomic(image.with_suffix(CAPTION_EXTENSION), caption.strip().encode())


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
    captions changed (each written atomically)."""
    if template:
        apply_template("", template, "x", trigger)  # a bad template fails before any caption changes
    changed = 0
    for item in images(name, home):
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


# -- fingerprints and versions --------------------------------------------------------------------------------------


def fingerprint(folder: Path) -> str:
    """sha256 over the sorted (relative path, content sha256) of every file in `folder`: images, captions and
    conditioning images. Changing a byte, a caption or a name changes it."""
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rows.append((path.relative_to(folder).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def snapshot(name: str, home=None) -> dict:
    """Freezes the work copy as the next version (or returns the latest one if nothing changed since).

    Files are hard-linked where the filesystem allows (the work copy only ever replaces files by rename, so a link
    never sees a later edit), else copied. Returns {"version", "path", "fingerprint", "images", "created_at"}.
    """
    folder = work_dir(name, home)
    if not list_image_files(folder / IMAGES):
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
        "images": len(list_image_files(target / IMAGES)),
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
