"""The inputs of `sdtune recipe from-kohya`, read as sd-scripts reads them: a `--config_file` TOML, a command line,
a kohya_ss GUI JSON preset, and a `--dataset_config` TOML with its subsets. Torch-free."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from sdtune.adapters.errors import SdtuneError


class KohyaImportError(SdtuneError, ValueError):
    """An input the importer cannot read; one line naming the file and the key."""


# -- reading the inputs ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input, as sd-scripts would see it: a flat dict of argument names (GUI presets keep their field names)."""

    file: Path
    kind: str  # "toml" | "flags" | "gui"
    args: dict[str, Any]
    script: str | None = None  # the training script a command line names


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise KohyaImportError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KohyaImportError(f"{path}: not UTF-8 text") from None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise KohyaImportError(f"{path}: not valid TOML ({exc})") from None


def parse_flags(text: str, file: Path) -> tuple[str | None, dict[str, Any]]:
    """(script, args) of an sd-scripts command line: `--key=value`, `--key value`, `--key v1 v2` (a list), `--flag`;
    `\\` and `^` line continuations; everything before the `.py` script (accelerate's own flags) is not its args."""
    text = text.replace("\\\r\n", " ").replace("\\\n", " ").replace("^\r\n", " ").replace("^\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:
        raise KohyaImportError(f"{file}: cannot split the command line ({exc})") from None
    scripts = [i for i, token in enumerate(tokens) if token.endswith(".py")]
    script = Path(tokens[scripts[0]]).name if scripts else None
    args: dict[str, Any] = {}
    key = None
    for token in tokens[scripts[0] + 1 if scripts else 0 :]:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            args[key] = value if value else True
        elif key is None:
            raise KohyaImportError(f"{file}: {token!r}: expected --key value arguments")
        elif args[key] is True:
            args[key] = token
        else:
            args[key] = [*(args[key] if isinstance(args[key], list) else [args[key]]), token]
    return script, args


def read_config(path: str | Path) -> Source:
    """An sd-scripts TOML, a command line in a .sh/.txt/.bat/.ps1 file, or a kohya_ss GUI JSON preset."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = _read_toml(path)
        if "datasets" in data or "general" in data:
            raise KohyaImportError(
                f"{path}: a dataset config ([general], [[datasets]]): pass it with --dataset-config"
            )
        flat = {}  # sd-scripts flattens the sections of a config file into one namespace
        for key, value in data.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        return Source(path, "toml", flat)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise KohyaImportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise KohyaImportError(f"{path}: a kohya_ss preset is a JSON object of settings")
        return Source(path, "gui", data)
    if suffix in (".sh", ".txt", ".bat", ".ps1", ".cmd"):
        script, args = parse_flags(_read_text(path), path)
        # --config_file: its keys under the flags (the command line wins, as in sd-scripts)
        if isinstance(args.get("config_file"), str):
            named = Path(args["config_file"]).expanduser()
            named = named if named.is_absolute() else path.parent / named
            args = {**read_config(named.with_suffix(".toml")).args, **args}
        return Source(path, "flags", args, script)
    raise KohyaImportError(f"{path}: expected an sd-scripts .toml, a command line (.sh/.txt) or a kohya_ss .json")


# -- the dataset config: [general], [[datasets]], [[datasets.subsets]] ----------------------------------------------

# Keys of a [[datasets]] entry that apply to the whole dataset (sd-scripts' DATASET_ASCENDABLE_SCHEMA); every other
# key of [general] or [[datasets]] is inherited by each subset.
DATASET_KEYS = {
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "network_multiplier",
    "validation_seed",
    "validation_split",
    "resize_interpolation",
    "prior_loss_weight",
    "debug_dataset",
    "max_token_length",
}


@dataclass
class Subset:
    """One [[datasets.subsets]] entry with what it inherits: {key: (value, label)}, label naming where it was set."""

    keys: dict[str, tuple[Any, str]]

    def get(self, key: str, default=None):
        return self.keys.get(key, (default, None))[0]

    def own(self) -> list[tuple[Any, str]]:
        """(value, label) of the keys set in the subset itself; inherited ones are reported with the first subset."""
        return [(value, label) for value, label in self.keys.values() if ".subsets[" in label]

    @property
    def is_reg(self) -> bool:
        return bool(self.get("is_reg", False))


def read_dataset_config(path: str | Path) -> tuple[dict, list[Subset], list[str], list[str]]:
    """(dataset-wide keys, subsets with their inherited keys, labels of what sdtune cannot read (further datasets),
    labels of [general]/[[datasets]] keys that every subset sets for itself)."""
    path = Path(path)
    data = _read_toml(path)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise KohyaImportError(f"{path}: datasets: expected at least one [[datasets]] table")
    general = {k: (v, f"general.{k}") for k, v in data.get("general", {}).items()}
    first = {k: (v, f"datasets[0].{k}") for k, v in datasets[0].items() if k != "subsets"}
    unknown = [f"{key}" for key in data if key not in ("general", "datasets")]
    unknown += [f"datasets[{i}]" for i in range(1, len(datasets))]
    inherited = {**general, **first}
    wide = {k: v for k, v in inherited.items() if k in DATASET_KEYS}
    subsets = []
    for i, entry in enumerate(datasets[0].get("subsets", [])):
        own = {k: (v, f"datasets[0].subsets[{i}].{k}") for k, v in entry.items()}
        subsets.append(Subset({**{k: v for k, v in inherited.items() if k not in DATASET_KEYS}, **own}))
        if "image_dir" not in entry:
            raise KohyaImportError(f"{path}: datasets[0].subsets[{i}].image_dir: required (the subset's folder)")
    if not subsets:
        raise KohyaImportError(f"{path}: datasets[0].subsets: expected at least one [[datasets.subsets]] table")
    used = {label for subset in subsets for _, label in subset.keys.values()}
    shadowed = [label for key, (_, label) in inherited.items() if key not in DATASET_KEYS and label not in used]
    return wide, subsets, unknown, shadowed
