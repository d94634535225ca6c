"""The local adapter registry: one folder per adapter under `SDTUNE_HOME`, and a SQLite index to list and search.

Layout (`SDTUNE_HOME`, default `~/.sdtune`):

    index.sqlite              WAL-mode index: one row per adapter, its tags and trigger words (listing, search)
    adapters/<name>/          adapter.json (the typed manifest), the weight files, the grids, registry.json (tags)
    .staging/<pid>-<uuid>/    an add in progress; never read by anything else

Every add goes the same way, so a crash at any point leaves nothing half-written:
    1. the files are copied into a private staging folder and its `adapter.json` is written there;
    2. under the index's write lock (`BEGIN IMMEDIATE`, so concurrent adders queue instead of failing), the final
       name is chosen, the staging folder is renamed into `adapters/` (atomic on one filesystem), and the index rows
       are inserted in the same transaction.
A crash during 1 leaves a staging folder of a dead process; a crash between the rename and the commit leaves a
complete folder the index does not know. `Registry.check` reports both (and folders whose `adapter.json` disagrees
with the index), and `check(repair=True)` removes the first and (re)indexes the others: folders are the truth, the
index is rebuilt from them.

The registry imports no torch: listing and tagging are cheap enough for the studio's pages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.adapters.atomic import copy_atomic
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.manifest import (
    MANIFEST_NAME,
    METHOD_KINDS,
    AdapterManifest,
    ManifestError,
    read_manifest,
    write_json_atomic,
)
from sdtune.adapters.workspace import open_db, sdtune_home

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REGISTRY_SIDECAR = "registry.json"  # registry-only data kept in the folder too: tags, when it was registered
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    base TEXT NOT NULL,
    base_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    origin TEXT NOT NULL,
    manifest_mtime_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (name TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (name, tag));
CREATE TABLE IF NOT EXISTS trigger_words (name TEXT NOT NULL, word TEXT NOT NULL, PRIMARY KEY (name, word));
"""


class RegistryError(SdtuneError, ValueError):
    """A registry operation that cannot be done (unknown name, name clash, bad name); the message is one line."""


@dataclass
class Entry:
    """One registered adapter as the index lists it; `folder` holds its files and `adapter.json`."""

    name: str
    method: str
    base: str
    base_hash: str
    created_at: str
    registered_at: str
    origin: str  # trained, imported, merged, baked
    trigger_words: list[str]
    tags: list[str]
    folder: Path

    @property
    def kind(self) -> str:
        """What the adapter is to a user, from its method alone: lora, embedding (a textual inversion), controlnet,
        dreambooth. The studio's list reads the manifest for more (loha, lokr: `manifest.adapter_kind`)."""
        return METHOD_KINDS.get(self.method, self.method)

    def to_dict(self) -> dict:
        return {**self.__dict__, "folder": str(self.folder), "kind": self.kind}


@dataclass
class CheckReport:
    """What `Registry.check` found: each list names adapters (or staging folders) and is empty when all agree."""

    not_indexed: list[str] = field(default_factory=list)  # a folder the index does not list
    missing_folder: list[str] = field(default_factory=list)  # an index row whose folder is gone
    out_of_date: list[str] = field(default_factory=list)  # adapter.json changed since it was indexed
    unreadable: list[str] = field(default_factory=list)  # a folder whose adapter.json cannot be read
    stale_staging: list[str] = field(default_factory=list)  # an add that died before it finished
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not (
            self.not_indexed or self.missing_folder or self.out_of_date or self.unreadable or self.stale_staging
        )

    def summary(self) -> str:
        if self.ok:
            return "registry ok: index and folders agree"
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("folder not in the index", self.not_indexed),
                ("indexed but folder missing", self.missing_folder),
                ("adapter.json changed since indexed", self.out_of_date),
                ("unreadable adapter.json", self.unreadable),
                ("unfinished adds", self.stale_staging),
            )
            if names
        ]
        verb = "repaired" if self.repaired else "found (run `sdtune adapters check --repair`)"
        return f"registry {verb}: " + "; ".join(parts)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise RegistryError(
            f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a folder name), e.g. toy-purple"
        )
    return name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """The registry at `home` (default `sdtune_home()`); cheap to create, safe to use from several processes."""

    def __init__(self, home: str | Path | None = None):
        self.home = sdtune_home(home)
        self.adapters_dir = self.home / "adapters"
        self.staging_dir = self.home / ".staging"
        self.index_path = self.home / "index.sqlite"

    # -- the index ------------------------------------------------------------------------------------------------

    def _db(self, write: bool = False):
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        return open_db(self.index_path, _SCHEMA, write)

    def _index_folder(self, db, folder: Path) -> None:
        """(Re)writes the index rows of one adapter folder from its adapter.json and registry.json."""
        manifest = read_manifest(folder)
        side = self._sidecar(folder)
        name = folder.name
        db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        db.execute("DELETE FROM tags WHERE name = ?", (name,))
        db.execute("DELETE FROM trigger_words WHERE name = ?", (name,))
        db.execute(
            "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                manifest.method,
                manifest.base.name_or_path,
                manifest.base.hash,
                manifest.created_at,
                side.get("registered_at", _now()),
                (manifest.origin or {}).get("kind", "trained"),
                (folder / MANIFEST_NAME).stat().st_mtime_ns,
            ),
        )
        db.executemany("INSERT INTO tags VALUES (?, ?)", [(name, t) for t in side.get("tags", [])])
        words = {w.strip() for w in manifest.trigger_words if w.strip()}
        db.executemany("INSERT INTO trigger_words VALUES (?, ?)", [(name, w) for w in sorted(words)])

    @staticmethod
    def _sidecar(folder: Path) -> dict:
        path = folder / REGISTRY_SIDECAR
        return json.loads(path.read_text()) if path.is_file() else {}

    def _entry(self, db, row) -> Entry:
        name = row[0]
        tags = [t for (t,) in db.execute("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (name,))]
        words = [w for (w,) in db.execute("SELECT word FROM trigger_words WHERE name = ? ORDER BY word", (name,))]
        return Entry(*row[:7], trigger_words=words, tags=tags, folder=self.adapters_dir / name)

    # -- adding -----------------------------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        fill: Callable[[Path], AdapterManifest],
        *,
        unique: bool = False,
        tags: Iterable[str] = (),
    ) -> Entry:
        """Adds one adapter atomically and returns its entry.

        Args:
            name: the wanted name (also the folder name).
            fill: writes the adapter's files into the staging folder it is given and returns its manifest; the
                registry writes `adapter.json` from it (with the final name).
            unique: on a name clash take the first free `name-2`, `name-3`...; otherwise a clash is an error.
            tags: initial tags.

        Raises:
            RegistryError: the name is taken (and `unique` is off) or not a valid folder name.
        """
        check_name(name)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staging = self.staging_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            manifest = fill(staging)
            write_json_atomic(staging / REGISTRY_SIDECAR, {"tags": sorted(set(tags)), "registered_at": _now()})
            with self._db(write=True) as db:  # the write lock: names are chosen and taken one process at a time
                final = self._free_name(db, name, unique)
                _name_files_after(staging, manifest, final)
                manifest.name = final
                write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
                target = self.adapters_dir / final
                os.rename(staging, target)
                try:
                    self._index_folder(db, target)
                except BaseException:
                    os.rename(target, staging)  # keep folders and index in agreement
                    raise
                return self._entry(db, db.execute(_SELECT + " WHERE name = ?", (final,)).fetchone())
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _free_name(self, db, name: str, unique: bool) -> str:
        def taken(candidate: str) -> bool:
            row = db.execute("SELECT 1 FROM adapters WHERE name = ?", (candidate,)).fetchone()
            return row is not None or (self.adapters_dir / candidate).exists()

        if not taken(name):
            return name
        if not unique:
            raise RegistryError(
                f"name clash: an adapter named {name!r} is already registered; choose another name "
                f"(--name) or remove it first (sdtune adapters rm {name})"
            )
        n = 2
        while taken(f"{name}-{n}"):
            n += 1
        return f"{name}-{n}"

    def register_run(self, run_dir: str | Path, *, name: str | None = None, unique: bool = True) -> Entry:
        """Registers a training run folder: its manifest, weight files, grids and export-check strip (no checkpoints).

        The trainers call this at the end of a run (unless `output.register: false`); a second run with the same
        `output.name` becomes `name-2` rather than replacing the first.
        """
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        names = [*manifest.files.values(), *manifest.samples.values()]
        names += list(((manifest.export_check or {}).get("images") or {}).values())

        def fill(staging: Path) -> AdapterManifest:
            for file_name in dict.fromkeys(names):
                copy_into(run_dir / file_name, staging / file_name)
            manifest.origin = {**(manifest.origin or {"kind": "trained"}), "run_dir": str(run_dir.resolve())}
            return manifest

        return self.add(name or manifest.name, fill, unique=unique)

    def find_run(self, run_dir: str | Path) -> Entry | None:
        """The adapter registered from the finished run in `run_dir` (that folder, that run's `created_at`), or None.
        A job worker asks before registering a run whose trainer was stopped near its end: never twice."""
        run_dir = Path(run_dir).resolve()
        created_at = read_manifest(run_dir).created_at
        with self._db() as db:
            rows = db.execute(_SELECT + " WHERE created_at = ?", (created_at,)).fetchall()
            candidates = [self._entry(db, row) for row in rows]
        for entry in candidates:
            try:
                origin = read_manifest(entry.folder).origin or {}
            except ManifestError:
                continue
            if origin.get("run_dir") == str(run_dir) and "selected_by" not in origin:  # not a checkpoint A/B picked
                return entry
        return None

    # -- reading ----------------------------------------------------------------------------------------------------

    def list(
        self,
        *,
        base: str | None = None,
        method: str | None = None,
        tag: str | None = None,
        trigger: str | None = None,
    ) -> list[Entry]:
        """Registered adapters, newest first, filtered by base (name, path or hash prefix), method, tag, trigger."""
        where, args = [], []
        if base:
            where.append("(base = ? OR base_hash LIKE ? OR base LIKE ?)")
            args += [base, f"{base}%", f"%/{base}"]
        if method:
            where.append("method = ?")
            args.append(method)
        if tag:
            where.append("name IN (SELECT name FROM tags WHERE tag = ?)")
            args.append(tag)
        if trigger:
            where.append("name IN (SELECT name FROM trigger_words WHERE lower(word) = lower(?))")
            args.append(trigger)
        query = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY registered_at DESC, name"
        with self._db() as db:
            return [self._entry(db, row) for row in db.execute(query, args).fetchall()]

    def get(self, name: str) -> Entry:
        with self._db() as db:
            row = db.execute(_SELECT + " WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"no adapter named {name!r} in {self.home} (see `sdtune adapters list`)")
            return self._entry(db, row)

    def __contains__(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def manifest(self, name: str) -> AdapterManifest:
        return read_manifest(self.get(name).folder)

    def file(self, name: str, fmt: str) -> Path:
        """The path of one of an adapter's files by format (`peft`, `kohya`, `controlnet`, `single_file`...)."""
        manifest = self.manifest(name)
        if fmt not in manifest.files:
            raise RegistryError(f"adapter {name!r} has no {fmt!r} file (it has: {', '.join(manifest.files)})")
        return self.adapters_dir / name / manifest.files[fmt]

    # -- changing ---------------------------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Unindexes then deletes the folder (moved aside first, so a crash cannot leave a half-deleted adapter)."""
        folder = self.get(name).folder
        trash = self.staging_dir / f"{os.getpid()}-rm-{uuid.uuid4().hex}"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        with self._db(write=True) as db:
            os.rename(folder, trash)
            for table in ("adapters", "tags", "trigger_words"):
                db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))  # noqa: S608 - fixed table names
        shutil.rmtree(trash, ignore_errors=True)

    def tag(self, name: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        """Adds and removes tags; returns the adapter's tags. Kept in the folder's registry.json and the index."""
        bad = [t for t in [*add, *remove] if not t or "," in t or t != t.strip()]
        if bad:
            raise RegistryError(f"tag {bad[0]!r}: tags are non-empty words without commas or outer spaces")
        folder = self.get(name).folder
        with self._db(write=True) as db:
            side = self._sidecar(folder)
            tags = sorted((set(side.get("tags", [])) | set(add)) - set(remove))
            write_json_atomic(folder / REGISTRY_SIDECAR, {**side, "tags": tags})
            self._index_folder(db, folder)
        return tags

    def sidecar(self, name: str) -> dict:
        """The adapter's registry-only data (registry.json): tags, registered_at, and notes such as `published`."""
        return self._sidecar(self.get(name).folder)

    def annotate(self, name: str, key: str, value) -> None:
        """Sets one registry-only note (not tags) in the adapter's registry.json, atomically, under the write lock."""
        if key in ("tags", "registered_at"):
            raise RegistryError(f"annotate: {key!r} is managed by the registry")
        folder = self.get(name).folder
        with self._db(write=True):
            write_json_atomic(folder / REGISTRY_SIDECAR, {**self._sidecar(folder), key: value})

    def export(self, name: str, dest: str | Path, fmt: str | None = None, overwrite: bool = False) -> list[Path]:
        """Copies an adapter's files out: one format's file to `dest` (a file, or a folder: an existing one or a path
        ending in "/"), or the whole folder. An existing file is replaced only with `overwrite`."""
        entry = self.get(name)
        into_folder = str(dest).endswith(("/", os.sep))
        dest = Path(dest)
        if fmt is not None:
            source = self.file(name, fmt)
            target = dest / source.name if dest.is_dir() or into_folder else dest
            if target.exists() and not overwrite:
                raise RegistryError(f"export: {target} already exists; choose another path or pass --overwrite")
            copy_into(source, target)
            return [target]
        if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
            raise RegistryError(f"export: {dest} exists and is not an empty folder; choose a new folder")
        if dest.is_dir():
            dest.rmdir()
        copy_into(entry.folder, dest)
        return sorted(p for p in dest.rglob("*") if p.is_file())

    # -- agreement between index and folders ------------------------------------------------------------------------

    def check(self, repair: bool = False) -> CheckReport:
        """Compares the index with the folders (see the module docstring); with `repair`, makes them agree."""
        report = CheckReport()
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        with self._db(write=True) as db:
            indexed = dict(db.execute("SELECT name, manifest_mtime_ns FROM adapters").fetchall())
            folders = {p.name: p for p in self.adapters_dir.iterdir() if p.is_dir()}
            for name, folder in sorted(folders.items()):
                manifest_file = folder / MANIFEST_NAME
                try:
                    read_manifest(folder)
                except ManifestError:
                    report.unreadable.append(name)
                    continue
                if name not in indexed:
                    report.not_indexed.append(name)
                elif manifest_file.stat().st_mtime_ns != indexed[name]:
                    report.out_of_date.append(name)
            report.missing_folder = sorted(set(indexed) - set(folders))
            report.stale_staging = sorted(
                p.name for p in self.staging_dir.iterdir() if not _pid_alive(int(p.name.split("-", 1)[0]))
            )
            if repair and not report.ok:
                for name in report.not_indexed + report.out_of_date:
                    self._index_folder(db, folders[name])
                for name in report.missing_folder:
                    for table in ("adapters", "tags", "trigger_words"):
                        db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))  # noqa: S608
                for name in report.stale_staging:
                    shutil.rmtree(self.staging_dir / name, ignore_errors=True)
                report.repaired = True
        return report


_SELECT = "SELECT name, method, base, base_hash, created_at, registered_at, origin FROM adapters"


def _name_files_after(folder: Path, manifest: AdapterManifest, name: str) -> None:
    """Weight files named after the run (its kohya LoRA `ui-run-1.safetensors`, a full model's single file) take the
    registered name: `ui-run-1-2.safetensors` for `ui-run-1-2`. A1111 and ComfyUI list LoRAs by file name, so two
    registered copies of one run would otherwise collide in their models/Lora folder. Files with fixed names
    (`pytorch_lora_weights.safetensors`) stay as they are."""
    old = manifest.name
    if not old or old == name:
        return
    for fmt, file_name in manifest.files.items():
        stem = Path(file_name).stem
        if Path(file_name).name != file_name or not (stem == old or stem.startswith(f"{old}-")):
            continue
        renamed = name + file_name[len(old) :]
        if not (folder / renamed).exists():
            os.rename(folder / file_name, folder / renamed)
        manifest.files[fmt] = renamed


def copy_into(source: Path, target: Path) -> Path:
    """Copies a file or folder to `target` through a temp name in the same folder (readers never see half)."""
    if not source.exists():
        raise RegistryError(f"{source}: not found (listed in its adapter.json)")
    return copy_atomic(source, target)


__all__ = [
    "CheckReport", "Entry", "Registry", "RegistryError", "check_name", "copy_into", "open_db", "sdtune_home"
]  # fmt: skip
