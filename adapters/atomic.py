"""Atomic file writes: a temp file beside the target, renamed over it, so a reader (the studio, another tool, a run
resumed after a crash) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        replace_readable(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
