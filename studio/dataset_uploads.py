"""Checking a dataset upload before anything is written: sizes, zips, image headers and names.

The studio's dataset workspace (`datasets_store.py`) writes only what `check_upload` passes:

    1. size limits per file and per upload;
    2. zips: a member with an absolute path or a `..` part (zip-slip) refuses the whole zip; so does one whose
       declared size is over MAX_ZIP_RATIO times its compressed size or the total over the limit (zip-bomb); a
       member that inflates past its declared size fails zipfile's size and CRC checks while it is read;
    3. images: PIL reads the header only first, so a PNG that claims 20000x20000 is refused without decoding;
       then `verify()` checks the structure and the image is decoded (a truncated JPEG fails here). Anything else is
       rejected with its reason;
    4. names: zip members keep their folders (a folder wrapping the whole zip is dropped); hidden names and
       kohya folders of 0 repeats are refused, each named in the report.

Imports no torch: PIL and the standard library only.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError

from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.images import IMAGE_EXTENSIONS, decode_caption, is_hidden, kohya_folder

CAPTION_EXTENSION = ".txt"
MAX_FILE_BYTES = 25 * 1024**2  # one image
MAX_UPLOAD_BYTES = 500 * 1024**2  # everything in one upload, zips expanded
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_RATIO = 100  # declared size / compressed size; real images compress far less than this
MAX_SIDE = 8192  # pixels, either side
MAX_PIXELS = 40_000_000


class DatasetError(SdtuneError, ValueError):
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


def check_image(data: bytes) -> str | None:
    """None if `data` is an image the trainers can use, else the reason. The header is read before any decoding;
    only an image within the limits is then decoded, as the trainers' preflight does."""
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
        with Image.open(io.BytesIO(data)) as image:  # verify() leaves its image unusable: decode a fresh one
            if image.format == "JPEG":  # decoded at 1/8 scale: every byte is still read, so truncation shows
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify it)"
    except Image.DecompressionBombError as exc:  # PIL's own header check, past 2x its pixel limit
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        return f"header claims {claimed}, over the {MAX_PIXELS // 10**6} MP limit (refused without decoding)"
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... for broken files
        return f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    return None


def safe_member(name: str) -> PurePosixPath | None:
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
            if safe_member(info.filename) is None:
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
        return [(safe_member(i.filename).as_posix(), _read_member(archive, filename, i)) for i in infos]


def _unwrap(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Drops a folder that holds the whole zip (zipping a folder makes one), so `set/10_cat/a.png` lands as
    `10_cat/a.png`, where the trainers read the repeats from. A kohya folder is never dropped: it is a subset."""
    while members and all(len(PurePosixPath(n).parts) > 1 for n, _ in members):
        tops = {PurePosixPath(n).parts[0] for n, _ in members}
        if len(tops) > 1 or kohya_folder(next(iter(tops))):
            break
        members = [(PurePosixPath(*PurePosixPath(n).parts[1:]).as_posix(), d) for n, d in members]
    return members


def _expand(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """(relative path, bytes) per uploaded file: a loose file by its base name, a zip member with its folders."""
    out = []
    for name, data in files:
        if name.lower().endswith(".zip"):
            out += _unwrap([(n, d) for n, d in _zip_members(name, data) if not _ignored(n)])
        else:
            out.append((PurePosixPath(name.replace("\\", "/")).name, data))
    return out


def _ignored(name: str) -> bool:
    """Zip tool litter that is neither data nor worth a rejection line (macOS resource forks, .DS_Store)."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or parts[-1] in (".DS_Store", "Thumbs.db") or parts[-1].startswith("._")


def _name_problem(relative: str) -> str | None:
    """Why a path cannot go into the dataset as it is named, or None."""
    path = PurePosixPath(relative)
    if is_hidden(path):
        return "hidden name (starts with '.'): the trainers skip hidden files and folders; rename it to keep it"
    if any(ord(c) < 32 for c in relative) or any(len(part.encode()) > 255 for part in path.parts):
        return "file or folder name with control characters or over 255 bytes: rename it"
    subset = kohya_folder(path.parts[0]) if len(path.parts) > 1 else None
    if subset is not None and subset[0] == 0:
        return f"kohya folder {path.parts[0]!r} asks for 0 repeats: the trainers skip its images"
    return None


def check_upload(
    files: list[tuple[str, bytes]],
) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]], UploadReport]:
    """Splits an upload into (images, captions) that pass, by relative path, and a report of what was refused.
    Raises `DatasetError` when the upload as a whole is refused (an unsafe zip, over the size limit)."""
    total = sum(len(data) for _, data in files)
    if total > MAX_UPLOAD_BYTES:
        raise DatasetError(
            f"upload of {total / 1024**2:.0f} MB is over the {MAX_UPLOAD_BYTES // 1024**2} MB limit; nothing written"
        )
    images, captions, report = [], [], UploadReport()
    for name, data in _expand(files):
        suffix = PurePosixPath(name).suffix.lower()
        reason = _name_problem(name)
        if reason is None and suffix == CAPTION_EXTENSION:
            try:
                captions.append((name, decode_caption(data).strip()))
            except UnicodeDecodeError:
                reason = "caption file is not UTF-8 text"
        elif reason is None and suffix in IMAGE_EXTENSIONS:
            reason = check_image(data)
            if reason is None:
                images.append((name, data))
        elif reason is None:
            reason = f"not an image: use {' '.join(IMAGE_EXTENSIONS)} (captions: same-name .txt)"
        if reason:
            report.rejected.append(Rejected(name, reason))
    return images, captions, report
