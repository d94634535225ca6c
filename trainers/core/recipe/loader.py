"""From YAML text to a `Recipe`: reading, `section.key=value` overrides, and one-line errors.

Anything unknown or mistyped is refused with one line that names the file, the key path, the bad value, and for a
typo the closest valid key:

    recipe.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)

Command-line overrides use the same paths: `trainers/lora.py recipe.yaml train.lr=1e-4 output.dir=/tmp/x`.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError

from .samples import PROMPT_TAGS
from .schema import Recipe
from .sections import RecipeError


class _RecipeLoader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. Under YAML 1.1 `mixed_precision: no` would be False, not "no"."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """YAML text as a recipe reads it (YAML 1.2 booleans: `no` stays the string "no"); the studio's presets too."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    path, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    # YAML 1.1 reads "1e-4" as a string; a number the user meant is a number (unless quoted: `name="123"`).
    if isinstance(value, str) and not raw.strip().startswith(("'", '"')):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Sets `section.key=value` strings into the raw recipe dict (values parsed as YAML)."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if isinstance(child, str) and key == "base":  # `base: toy` shorthand, now addressed by key
                child = {"pretrained_model_name_or_path": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(keys[:-1])} is not a section")
            node[key] = child
            node = child
        for other in _other_spellings(keys):  # `train.lr=` replaces the file's `learning_rate:`
            node.pop(other, None)
        node[keys[-1]] = value
    return data


def override_text(path: str, value: Any) -> str:
    """`path=value` that `apply_overrides` reads back as exactly `value` (the studio's form writes its changes so):
    JSON for numbers, lists, null and booleans, and a string as typed unless YAML would read it as something else
    (`123`, `yes: no`, ` padded`), then quoted."""
    if isinstance(value, str) and _parse_override(f"{path}={value}")[1] == value:
        return f"{path}={value}"
    return f"{path}={json.dumps(value, ensure_ascii=False)}"


def _other_spellings(keys: list[str]) -> set[str]:
    """The other names of the field at `section.key` (its AliasChoices), e.g. {"learning_rate"} for train.lr."""
    if len(keys) != 2 or keys[0] not in Recipe.model_fields:
        return set()
    names = set()
    for model in _unwrap(Recipe.model_fields[keys[0]].annotation):
        for name, field in model.model_fields.items():
            choices = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
            if keys[1] in (name, *choices):
                names |= {name, *(c for c in choices if isinstance(c, str))}
    return names - {keys[1]}


def _unwrap(annotation):
    """The model classes an annotation may hold (through Optional, Union, Annotated, list)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        return [cls for arg in typing.get_args(annotation) for cls in _unwrap(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _keys_at(loc: tuple) -> list[str]:
    """Valid key names of the section at `loc` (for suggestions)."""
    models = [Recipe]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = []
        for model in models:
            if part in model.model_fields:
                nxt.extend(_unwrap(model.model_fields[part].annotation))
            else:  # a discriminated-union tag such as 'lora' in ('method', 'lora', 'rank')
                nxt.extend(m for m in [model] if getattr(model.model_fields.get("type"), "default", None) == part)
        models = nxt or models
    keys = set()
    for model in models:
        for name, field in model.model_fields.items():
            keys.add(name)
            if isinstance(field.validation_alias, AliasChoices):
                keys.update(c for c in field.validation_alias.choices if isinstance(c, str))
    return sorted(keys)


_METHOD_TAGS = {"lora", "dreambooth", "controlnet", "textual_inversion", "preference"}


def _format_error(error: dict, source: str) -> str:
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in _METHOD_TAGS:
        loc = (loc[0],) + loc[2:]
    loc = tuple(part for part in loc if part not in PROMPT_TAGS)  # validation.prompts.0.width, not its union tag
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(_keys_at(loc[:-1]))})"
        return f"{source}: {path}: unknown key{hint}"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return f"{source}: {message}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return f"{source}: {path}: {message}{shown}"


def recipe_from_dict(data: dict | None, source: str = "recipe") -> Recipe:
    """Validates raw recipe data; raises `RecipeError` with one line for the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (base, data, method, train, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(exc.errors()[0], source)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe, applies `section.key=value` overrides, and validates it.

    Args:
        path: the YAML file; None starts from all defaults.
        overrides: strings such as `train.lr=1e-4` or `output.dir=/tmp/run`.
    """
    source = "recipe" if path is None else str(path)
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                f"{path}: " + ("a folder, not a recipe file" if path.is_dir() else "recipe file not found")
            )
        try:
            data = read_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (base, data, method, train, ...)")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source)
