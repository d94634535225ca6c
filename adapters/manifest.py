"""`adapter.json`: the manifest every trainer writes beside its adapter files, and the registry and studio read.

It is the contract between the two sides: a trainer fills an `AdapterManifest` and writes it with
`write_manifest`; anything that later lists, loads or compares adapters reads it back with `read_manifest`, which
refuses a file with missing or unknown keys instead of guessing. The nested sections (`dataset`, `training`,
`scores`, `export_check`, `recipe`) stay plain JSON data: their shape belongs to the method that wrote them.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.errors import SdtuneError

MANIFEST_NAME = "adapter.json"


class ManifestError(SdtuneError, ValueError):
    """An `adapter.json` that cannot be read; the message names the file and the key."""


@dataclass
class BaseRef:
    """The base an adapter was trained on: what the recipe named, which kind of source it was, its weights' hash."""

    name_or_path: str
    kind: str  # toy, folder, single_file or hub
    hash: str  # sha256 of the weights, or "hub:<repo id>"


@dataclass
class AdapterManifest:
    """What was trained, from what, how, and what it measurably does. Field order is the file's key order."""

    name: str
    method: str  # the recipe's method.type: lora, dreambooth, controlnet
    created_at: str
    base: BaseRef
    trigger_words: list[str]
    dataset: dict[str, Any]  # fingerprint, kind, image counts, skipped files, buckets
    training: dict[str, Any]  # steps, final_loss, seconds (+ speed and memory figures)
    files: dict[str, str]  # format (peft, kohya) -> file name in the run folder
    samples: dict[str, str]  # grid name -> file name in the run folder
    scores: dict[str, Any] | None  # toy-world scores of base and adapter, when measured
    export_check: dict[str, Any] | None  # the reload-and-compare result, None when the check was off
    recipe: dict[str, Any]  # the fully resolved recipe
    # Where it came from, when not trained here: {"kind": "imported", "source", "hashes", "metadata", "check"} or
    # {"kind": "merged", "parents", "weights", "merge_method"...}; trained runs get {"kind": "trained", "run_dir"}
    # when registered. Optional, so manifests written before it existed still read.
    origin: dict[str, Any] | None = None
    # Preference tuning from votes (trainers/preference.py): pairs used, ties and skips, the winner share, the
    # implicit reward accuracy on the training pairs before and after. Optional like `origin`.
    preference: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = MANIFEST_NAME) -> AdapterManifest:
        """Checks the top-level keys exactly: a manifest from another tool or version fails here, by name."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object")
        _check_keys(data, cls, source)
        _check_keys(data["base"], BaseRef, f"{source}: base")
        return cls(**{**data, "base": BaseRef(**data["base"])})


LYCORIS_KINDS = {"loha": "LoHa", "lokr": "LoKr"}  # adapters/lycoris.py: LyCORIS's algorithms sdtune trains and loads
# method -> what a user calls the adapter, where the two differ (a preference run's result is a LoRA over its reference)
METHOD_KINDS = {"textual_inversion": "embedding", "preference": "lora"}


def adapter_kind(manifest: AdapterManifest) -> str:
    """What the adapter's files hold: lora, loha or lokr for an adapter applied over a base (the recipe's
    `method.algo`, or an imported file's format), else what the method makes (dreambooth, controlnet, embedding)."""
    method = manifest.recipe.get("method") or {}
    for candidate in (method.get("algo"), (manifest.origin or {}).get("format")):
        if candidate in LYCORIS_KINDS:
            return candidate
    if manifest.method == "lora" or (manifest.method == "dreambooth" and method.get("lora")):
        return "lora"
    return METHOD_KINDS.get(manifest.method, manifest.method)


def _check_keys(data, cls, where: str):
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    names = [f.name for f in fields(cls)]
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
    unknown = sorted(set(data) - set(names))
    if missing:
        raise ManifestError(f"{where}: missing key {missing[0]!r}")
    if unknown:
        raise ManifestError(f"{where}: unknown key {unknown[0]!r}")


CONDITION_SAMPLE = "condition-"  # samples named condition-N: a ControlNet's validation conditions, in order


def condition_file(index: int) -> str:
    """Where a ControlNet run keeps its validation condition `index`, relative to the run folder (and the
    manifest's sample of that name, `condition-<index>`)."""
    return f"samples/conditions/{CONDITION_SAMPLE}{index}.png"


def pair_prompts(prompts: list[str], images: list[str]) -> list[tuple[str, str]]:
    """diffusers' pairing of validation prompts and images: one each, one image for every prompt, or one prompt
    for every image."""
    if len(prompts) == len(images):
        return list(zip(prompts, images))
    if len(images) == 1:
        return [(p, images[0]) for p in prompts]
    if len(prompts) == 1:
        return [(prompts[0], i) for i in images]
    raise ManifestError(
        f"method.validation_image: {len(images)} images for {len(prompts)} validation.prompts; give one image "
        "per prompt, one image, or one prompt"
    )


def control_pairs(manifest: AdapterManifest) -> list[tuple[str, str]]:
    """A ControlNet's validation pairs (prompt, condition file relative to its folder), paired as its grids were:
    `validation.prompts` with the `condition-N` samples in order. Empty for other adapters, or without either."""
    names = [k for k in manifest.samples if k.startswith(CONDITION_SAMPLE)]
    names.sort(key=lambda k: int(k[len(CONDITION_SAMPLE) :]))
    prompts = validation_prompts(manifest.recipe)
    if not names or not prompts:
        return []
    return pair_prompts(prompts, [manifest.samples[k] for k in names])


def validation_prompts(recipe: dict) -> list[str]:
    """The texts of a run's `validation.prompts` (an entry with its own settings is a mapping with its `prompt`)."""
    prompts = (recipe.get("validation") or {}).get("prompts") or []
    return [p["prompt"] if isinstance(p, dict) else p for p in prompts]


def manifest_path(run_or_file: str | Path) -> Path:
    """A run folder means its `adapter.json`; a file path is taken as is."""
    path = Path(run_or_file)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(run_or_file: str | Path) -> AdapterManifest:
    """Reads a run folder's (or a file's) manifest. Raises `ManifestError` with one line for a bad or missing file."""
    path = manifest_path(run_or_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return AdapterManifest.from_dict(data, str(path))


def write_json_atomic(path: Path, data: dict):
    """Readers never see half a file: written beside the target, then renamed over it."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")


def write_manifest(run_dir: str | Path, manifest: AdapterManifest) -> Path:
    """Writes `manifest` as `run_dir/adapter.json` (atomically); returns its path."""
    path = Path(run_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path
