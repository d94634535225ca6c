"""The adapter registry: listing, importing, exporting, tagging and checking adapters; merging, resizing, baking."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import translated


def open_registry():
    """The registry under $SDTUNE_HOME, opened at call time (a test or the studio may have changed the home)."""
    from sdtune.adapters.registry import Registry

    return Registry()


@translated()
def list_adapters(
    *, base: str | None = None, method: str | None = None, tag: str | None = None, trigger: str | None = None
) -> list[dict]:
    """Registered adapters (newest first) as dicts: name, method, kind, base, trigger_words, tags, origin, folder...
    `kind` is what the files hold (lora, loha, lokr; else the method), read from each manifest."""
    registry = open_registry()
    return [
        {**e.to_dict(), "kind": _kind(registry, e)}
        for e in registry.list(base=base, method=method, tag=tag, trigger=trigger)
    ]


def _kind(registry, entry) -> str:
    from sdtune.adapters.manifest import ManifestError, adapter_kind

    try:
        return adapter_kind(registry.manifest(entry.name))
    except (ManifestError, OSError):  # a damaged entry still lists (`sdtune adapters check` names it)
        return entry.method


@translated()
def show_adapter(name: str) -> dict:
    """One adapter: its index entry and its whole manifest."""
    registry = open_registry()
    entry = registry.get(name)
    return {**entry.to_dict(), "manifest": registry.manifest(name).to_dict()}


@translated()
def import_adapter(
    path: str | Path,
    *,
    base: str = "toy",
    name: str | None = None,
    allow_pickle: bool = False,
    tags: list[str] | None = None,
    dry_run: bool = False,
    confined: bool = False,
) -> dict:
    """Detects, validates against `base` and registers a LoRA / ControlNet / full model; returns the check report
    (and the entry unless `dry_run`). `confined` (the studio): `path` must lie in the folders studio/confine.py
    allows, checked before anything reads it."""
    from sdtune.adapters import importer

    if confined:
        from sdtune.studio import confine

        confine.check_path(path, "path")
    if dry_run:
        return {"report": importer.inspect(path, base=base, allow_pickle=allow_pickle).to_dict()}
    entry, report = importer.import_adapter(
        path, base=base, name=name, allow_pickle=allow_pickle, tags=tags or [], registry=open_registry()
    )
    return {"entry": entry.to_dict(), "report": report.to_dict()}


@translated()
def export_adapter(name: str, dest: str | Path, fmt: str | None = None, overwrite: bool = False) -> list[Path]:
    """Copies one format's file (`peft`, `kohya`...) or the whole adapter folder out of the registry; an existing
    file is replaced only with `overwrite`."""
    return open_registry().export(name, dest, fmt, overwrite)


@translated()
def remove_adapter(name: str) -> None:
    open_registry().remove(name)


@translated()
def tag_adapter(name: str, add: list[str] | None = None, remove: list[str] | None = None) -> list[str]:
    return open_registry().tag(name, add or [], remove or [])


@translated()
def check_registry(repair: bool = False) -> dict:
    """Compares the index with the adapter folders; `repair` makes them agree. Returns the findings."""
    report = open_registry().check(repair=repair)
    return {**report.__dict__, "ok": report.ok, "summary": report.summary()}


@translated()
def merge_adapters(
    name: str,
    parents: list[str],
    weights: list[float] | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    conv_rank: int | None = None,
    base: str = "toy",
    prompt: str = "a photo",
) -> dict:
    """Merges registered LoRAs (or files) into a new registered LoRA (linear, concat or svd); returns its entry."""
    from sdtune.adapters import merge

    weights = weights or [1.0] * len(parents)
    entry = merge.merge_into_registry(
        name, parents, weights, method, base=base, rank=rank, conv_rank=conv_rank, prompt=prompt,
        registry=open_registry(),
    )  # fmt: skip
    return entry.to_dict()


@translated()
def resize_adapter(name: str, parent: str, max_rank: int, **options) -> dict:
    """Resizes a LoRA's rank into a new registered LoRA; `options` as `adapters.merge.resize_into_registry`
    (`dynamic`: sv_ratio / sv_fro / sv_cumulative with `param`, `base`, `prompt`)."""
    from sdtune.adapters import merge

    return merge.resize_into_registry(name, parent, max_rank, registry=open_registry(), **options).to_dict()


@translated()
def lycoris_to_lora(name: str, parent: str, rank: int, **options) -> dict:
    """A LoHa/LoKr as a new registered LoRA of rank `rank` (SVD); `options`: `base`, `prompt`. Its manifest's
    origin params hold the kept share of the norm (`fro_kept`)."""
    from sdtune.adapters import merge

    return merge.lycoris_to_lora_into_registry(name, parent, rank, registry=open_registry(), **options).to_dict()


@translated()
def bake_model(
    out_folder: str | Path, *, base: str = "toy", adapters: list[str], single_file: str | Path | None = None
) -> list[Path]:
    """Base + adapters (`NAME_OR_PATH[:WEIGHT]`) -> a diffusers folder (+ a single-file checkpoint)."""
    from sdtune.adapters import compose, merge

    uses = [compose.AdapterUse.parse(a) for a in adapters]
    return merge.bake(base, uses, out_folder, single_file)
