"""The recipe being built by `sdtune recipe from-kohya`: the schema check of each key (which recipe keys exist
today), where each value came from, and the report lists; one input key through its rule (`apply_rule`). Torch-free.
"""

from __future__ import annotations

import json
import shlex
import typing
from dataclasses import dataclass, field
from typing import Annotated

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from sdtune.trainers.core.recipe import Recipe
from sdtune.trainers.tools.kohya_inputs import KohyaImportError
from sdtune.trainers.tools.kohya_rules import Ignore, Skip, Unsupported

# -- the schema: which recipe keys exist today ----------------------------------------------------------------------


def _models(annotation) -> list[type[BaseModel]]:
    """The model classes an annotation may hold (through Optional, Union, Annotated, list)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _models(args[0])
    if args:
        return [model for arg in args for model in _models(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def method_types() -> dict[str, type[BaseModel]]:
    """method.type -> its recipe class, as the schema has them now."""
    return {model.model_fields["type"].default: model for model in _models(Recipe.model_fields["method"].annotation)}


def schema_field(dotted: str, method_type: str):
    """The pydantic field at `section.key` (`data.subsets.image_dir` looks inside the list's items), or None."""
    model: type[BaseModel] = Recipe
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(parts) - 1:
            return info
        found = [method_types()[method_type]] if part == "method" else _models(info.annotation)
        if not found:
            return None
        model = found[0]
    return None


def check_value(dotted: str, method_type: str, value):
    """The value as the schema takes it; raises Skip naming what sdtune lacks."""
    info = schema_field(dotted, method_type)
    if info is None:
        raise Skip("not supported", f"sdtune has no {dotted} yet")
    try:
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"]
        raise Skip("not supported", f"sdtune's {dotted} refuses {value!r}: {message}") from None


def subsets_in_schema() -> bool:
    """True when the recipe has `data.subsets`: each kohya subset becomes one entry (else one image folder)."""
    return schema_field("data.subsets.image_dir", "lora") is not None


# -- translating ----------------------------------------------------------------------------------------------------


@dataclass
class Translation:
    """The recipe, where each of its keys came from, and the three report lists."""

    recipe: dict = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # "data.resolution" -> "resolution = 512 (note)"
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (input key, recipe key)
    unsupported: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    method_type: str = "lora"

    def reported(self) -> set[str]:
        """Every input key that got a word (its first word is the key)."""
        return {key for key, _ in self.mapped} | {line.split(" ", 1)[0] for line in self.unsupported + self.ignored}

    def drop(self, dotted: str, why: str, kind: str = "ignored"):
        """Takes a mapped key back out of the recipe and lists what set it as `kind` ("ignored": no effect here)."""
        section, key = dotted.split(".")
        self.recipe.get(section, {}).pop(key, None)
        self.origin.pop(dotted, None)
        for label in [k for k, d in self.mapped if d == dotted]:
            self.mapped.remove((label, dotted))
            self.skip(label, kind, why)

    def skip(self, key: str, kind: str, why: str):
        (self.ignored if kind == "ignored" else self.unsupported).append(f"{key} ({why})")

    def put(self, key: str, dotted: str, value, source: str, note: str = "", shown=None, record: bool = True):
        """Sets `dotted` (after the schema check) and records where it came from; a failed check is a report line.
        A later key for the same recipe key wins (a dataset config over the command line, as in sd-scripts), and the
        earlier one is listed as ignored."""
        try:
            value = check_value(dotted, self.method_type, value)
        except Skip as skip:
            return self.skip(key, skip.kind, skip.why)
        for earlier in [k for k, d in self.mapped if d == dotted and k != key]:
            self.mapped.remove((earlier, dotted))
            self.skip(earlier, "ignored", f"{key} sets {dotted} and wins, as in sd-scripts")
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, list):  # validation.prompts: a prompt with its own settings keeps only those it sets
            value = [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v for v in value]
        node = self.recipe
        *sections, last = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
        shown = value if shown is None else shown
        self.origin[dotted] = f"{source}: {key} = {json.dumps(shown, default=str)}" + (f" ({note})" if note else "")
        if record:
            self.mapped.append((key, dotted))


def is_empty(value) -> bool:
    """None, "" or []: a key the config names without a value (a GUI preset writes every field)."""
    return value is None or value == "" or value == []


def apply_rule(tr: Translation, key: str, value, rule, source: str, label: str | None = None):
    """One key through its rule into the recipe or a report list."""
    label = label or key
    if rule is None:
        return tr.skip(label, "not supported", "unknown to sdtune's importer")
    if is_empty(value):
        return tr.skip(label, "ignored", "empty: left unset")
    if isinstance(rule, Ignore):
        return tr.skip(label, "ignored", rule.why)
    if isinstance(rule, Unsupported):
        return tr.skip(label, "not supported", rule.why)
    try:
        converted = rule.convert(value) if rule.convert else value
    except Skip as skip:
        return tr.skip(label, skip.kind, skip.why)
    except (TypeError, ValueError) as exc:
        raise KohyaImportError(f"{source}: {label}: {value!r} is not valid here ({exc})") from None
    if not rule.to:
        return tr.skip(label, "ignored", "no effect in sdtune")
    targets = [t for t in rule.to if schema_field(t, tr.method_type) is not None] or [rule.to[0]]
    tr.put(label, targets[0], converted, source, rule.note, shown=value)


def key_value_list(value, source: str, key: str) -> list[tuple[str, str]]:
    """sd-scripts' `network_args` / `optimizer_args`: `["conv_dim=4", ...]` or one space-separated string."""
    items = value if isinstance(value, list) else shlex.split(str(value))
    pairs = []
    for item in items:
        name, sep, text = str(item).partition("=")
        if not sep:
            raise KohyaImportError(f"{source}: {key}: {item!r} is not key=value")
        pairs.append((name.strip(), text.strip().strip("\"'")))
    return pairs


def literal(text: str):
    """A `key=value` arg's text as the value it spells (`4` -> 4, `true` -> True), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
