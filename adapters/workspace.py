"""The workspace every front end shares, `$SDTUNE_HOME` (default `~/.sdtune`), and the WAL-mode SQLite files in it.

The registry (`index.sqlite`), the A/B store (`ab.sqlite`), the studio's job queue (`jobs.db`), datasets, presets and
the studio's token all live there. `sdtune_home` is the one place that says where. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path


def sdtune_home(home: str | Path | None = None) -> Path:
    """The workspace as an absolute path: `home` if given, else `$SDTUNE_HOME`, else `~/.sdtune`.

    `~` is expanded and a relative path is taken from the current directory now, so the worker, the trainers it
    starts in other directories and the paths the registry records all name the same folder.
    """
    return Path(home or os.environ.get("SDTUNE_HOME") or Path.home() / ".sdtune").expanduser().absolute()


def default_cache_dir(configured: str | None) -> Path:
    """The cache of latents and class images: `data.cache_dir` if set, else `$SDTUNE_CACHE`, else ~/.cache/sdtune.
    Its entries are keyed by content, so every run (a sweep's too) that points at it shares them."""
    return Path(configured or os.environ.get("SDTUNE_CACHE") or Path.home() / ".cache" / "sdtune").expanduser()


def enable_wal(db, seconds: float = 60.0):
    """Switching a new index to WAL needs a moment of exclusive access, and sqlite answers "database is locked" at
    once (no busy wait) when another process holds the file just then: retry until it is free."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def open_db(path: Path, schema: str, write: bool = False):
    """A WAL-mode SQLite connection with `schema` in place; with `write`, one IMMEDIATE transaction (the write lock,
    so concurrent writers queue instead of failing) committed on success and rolled back on any error."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        enable_wal(db)
        db.execute("PRAGMA busy_timeout=60000")
        db.executescript(schema)
        if not write:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()
