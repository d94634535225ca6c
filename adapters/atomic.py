"""Atomic writes: a temp file or folder beside the target, renamed over it, so a reader (the studio, another tool, a
run resumed after a crash) never sees half a file, and a crash leaves the previous version or none.

Every temp-then-rename write of sdtune goes through here:
    atomic_path(path)                 a temp file to write (by a library that wants a path); renamed over `path`
    write_bytes_atomic / write_text_atomic   small files in one call
    atomic_folder(path)               a temp folder to fill; swapped in for `path`
    replace_readable(written, path)   a file a library wrote in its own temp folder, renamed over `path`
    replace_folder(written, path)     a folder written elsewhere (a DDP checkpoint), swapped in for `path`
    copy_atomic(source, target)       a file or folder copied whole
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[str]:
    """A temp path beside `path` to write; renamed over `path` when the block succeeds, removed when it fails.

    The file ends with the mode a plain `open()` would give it: mkstemp's 0600 would keep other accounts (an
    A1111 or ComfyUI running as another user, a web server) from reading the weights and images.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        replace_readable(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """`path.write_bytes(data)`, atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path, Path(path).suffix) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically (see `atomic_path`); returns `path`."""
    return write_bytes_atomic(path, text.encode())


def replace_readable(written: str | Path, path: str | Path):
    """Renames a finished temp file over `path` with the mode a plain `open()` gives (see `atomic_path`); for files a
    library wrote into a temp folder (diffusers' `save_lora_weights` writes 0600)."""
    os.chmod(written, 0o666 & ~UMASK)
    os.replace(written, path)


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Writes a secret (the studio's token) that only its owner can read: mkstemp's 0600 is kept, so no moment
    exists where another account could open it. With `replace=False` an existing `path` is left as it is and False
    is returned: two processes that both found no file agree on the one written first (a hard link never replaces).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; swapped in for `path` (an earlier folder there is replaced, see
    `replace_folder`) when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp's 0700, as mkstemp's 0600, would hide the folder from other accounts
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(written: Path, path: Path):
    """Puts the finished folder `written` at `path`. An earlier folder there is renamed aside, the new one renamed
    in, then the old one removed: `path` is never a half-written folder, and if the second rename fails the old
    folder is put back."""
    written, path = Path(written), Path(path)
    if not path.exists():
        os.replace(written, path)
        return
    old = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(written, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def copy_atomic(source: Path, target: Path) -> Path:
    """Copies a file or folder to `target` (replacing what is there), whole or not at all; returns `target`."""
    source, target = Path(source), Path(target)
    if source.is_dir():
        with atomic_folder(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    else:
        with atomic_path(target, target.suffix) as tmp:
            shutil.copy2(source, tmp)
    return target
