"""Train presets: the shipped `recipes/*.yaml` (read-only) and the user's own, saved from the Train form as
`$SDTUNE_HOME/presets/NAME.yaml`.

A saved preset is the recipe as the form showed it: the YAML with the form's changes applied, checked against the
recipe schema first, written atomically. Loading one is choosing it on the Train page. Torch-free.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdtune.adapters.atomic import atomic_path
from sdtune.studio import api, confine, jobs
from sdtune.trainers.core.recipe import apply_overrides, read_yaml

SAVED = "saved:"  # the id prefix of a saved preset; a shipped one's id is its file name
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Preset:
    id: str  # "quickstart.yaml" (shipped) or "saved:NAME"
    method: str | None  # method.type; None when the file is not a readable recipe (shown for every method)
    path: Path
    read_only: bool

    @property
    def label(self) -> str:
        return f"{self.path.name} (shipped)" if self.read_only else f"{self.id.removeprefix(SAVED)} (saved)"


def presets_dir() -> Path:
    return jobs.sdtune_home() / "presets"


def list_presets(method: str | None = None) -> list[Preset]:
    """The shipped presets, then the saved ones (by name); only `method`'s if given."""
    shipped = [Preset(name, kind, api.RECIPES_DIR / name, True) for name, kind in api.recipe_templates().items()]
    saved = [
        Preset(SAVED + path.stem, _method_of(path), path, False)
        for path in sorted(presets_dir().glob("*.yaml"))
        if NAME.fullmatch(path.stem)
    ]
    return [p for p in shipped + saved if method is None or p.method in (method, None)]


def preset_text(preset_id: str) -> str:
    """The YAML of a preset, by id."""
    if not preset_id.startswith(SAVED):
        return api.recipe_text(preset_id)
    path = presets_dir() / f"{_checked(preset_id.removeprefix(SAVED))}.yaml"
    if not path.is_file():
        raise api.StudioError(f"preset {preset_id.removeprefix(SAVED)!r} not found in {presets_dir()}")
    return path.read_text(encoding="utf-8")


def save_preset(name: str, text: str, overrides: list[str], *, replace: bool = False) -> Preset:
    """Saves recipe YAML with the form's `section.key=value` changes applied as preset `name`.

    Refused with one line: a bad name, a recipe the schema refuses, or an existing preset unless `replace`.
    """
    name = _checked(name.strip())
    checked = api.validate_recipe(text, overrides)
    if not checked["ok"]:
        raise api.StudioError(f"preset {name}: {checked['error']}")
    path = presets_dir() / f"{name}.yaml"
    if path.exists() and not replace:
        raise api.StudioError(f"preset {name} already exists: tick 'Replace' to overwrite it, or choose another name")
    data = apply_overrides(read_yaml(text) or {}, list(overrides))
    header = f"# sdtune preset {name}, saved from the studio's Train form on {time.strftime('%Y-%m-%d %H:%M')}.\n"
    with atomic_path(path, suffix=".yaml") as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Preset(SAVED + name, checked["recipe"]["method"]["type"], path, False)


def delete_preset(name: str) -> None:
    path = presets_dir() / f"{_checked(name)}.yaml"
    if not path.is_file():
        raise api.StudioError(f"preset {name!r} not found in {presets_dir()}")
    path.unlink()


def _checked(name: str) -> str:
    if not NAME.fullmatch(name):
        raise api.StudioError(
            f"preset name {name!r}: use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(e.g. my-lora-fast)"
        )
    return name


def _method_of(path: Path) -> str | None:
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    method = data.get("method") or {}  # no method section: the recipe's default, LoRA
    return method.get("type", "lora") if isinstance(method, dict) else None


def import_kohya(
    name: str, config: tuple[str, bytes], dataset: tuple[str, bytes] | None = None, *, replace: bool = False
) -> tuple[Preset, list[str]]:
    """An uploaded kohya config ((file name, bytes): sd-scripts .toml, .sh/.txt flags or a kohya_ss .json, and an
    optional dataset config), translated as `sdtune recipe from-kohya` does and saved, comments and all, as preset
    `name`. Returns the preset and the importer's report lines; a refusal is one line naming the upload and key."""
    from sdtune.trainers.tools.kohya_import import KohyaImportError
    from sdtune.trainers.tools.kohya_import import import_kohya as translate_file

    name = _checked(name.strip())
    path = presets_dir() / f"{name}.yaml"
    if path.exists() and not replace:
        raise api.StudioError(f"preset {name} already exists: tick 'Replace' to overwrite it, or choose another name")
    uploads = [config] + ([dataset] if dataset else [])
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / str(i) / Path(upload_name).name for i, (upload_name, _) in enumerate(uploads)]
        for file, (_, data) in zip(files, uploads, strict=True):
            file.parent.mkdir()
            file.write_bytes(data)
        try:
            # the folders it names are read (kohya folder names, class images) only where the studio may read
            report = translate_file(files[0], path, files[1] if dataset else None, [n for n, _ in uploads],
                                    lambda folder: confine.check_path(folder, f"{config[0]}: a path it names"))  # fmt: skip
        except KohyaImportError as exc:
            message = str(exc)
            for file in files:
                message = message.replace(str(file), file.name)
            raise api.StudioError(message) from None
    return Preset(SAVED + name, _method_of(path), path, False), report
