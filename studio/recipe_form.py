"""The Train form, described from the recipe schema (trainers/core/recipe/), so it never lists knobs by hand.

Every key of every section becomes one `FormField`: its label from the key's name, its help from the field's
description, its widget from its type (bool -> checkbox, Literal -> select, int/float -> number, a float marked
`AS_TEXT` such as a learning rate -> text, str and paths -> text, lists -> one item per line), and `common` from the
field's `COMMON` marker (the rest is folded). A number that may be unset is a text box: empty means unset. A key added to the schema appears on the form by itself.

The page (studio/views/train.py) draws the widgets; this module says what they show (`shown`) and what a widget's
value means for the recipe (`read`). It imports no torch and no Streamlit.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sdtune.trainers.core import recipe as schema

SECTIONS = ("base", "data", "method", "train", "validation", "output")
# Word -> how a label spells it; everything else is the key's own words ("max_train_steps" -> "Max train steps").
SPELLING = {
    "lr": "LR",
    "lora": "LoRA",
    "dora": "DoRA",
    "snr": "SNR",
    "ema": "EMA",
    "unet": "UNet",
    "tf32": "TF32",
    "dir": "folder",
}


@dataclass(frozen=True)
class FormField:
    """One recipe key as a form widget.

    Attributes:
        path: the key as overrides write it, `section.name` (e.g. `train.learning_rate`).
        widget: checkbox, select, int, float, text or list.
        options: the choices of a select.
        optional: None is a valid value (an empty text or number box means "unset").
        low, high: the number box's bounds, from the field's ge/gt/le/lt.
        item: a list's item kind: str, number or mapping (one YAML line each), or text_or_mapping (a line in braces
            is a YAML mapping, any other is text); a text's: str, number, or yaml (a mapping, or a key that takes one
            number or a list: written and read as one YAML line).
        common: shown open; otherwise folded under the section's "more settings".
    """

    path: str
    label: str
    help: str
    widget: str
    options: tuple[str, ...] = ()
    optional: bool = False
    low: float | None = None
    high: float | None = None
    item: str = "str"
    common: bool = False

    @property
    def section(self) -> str:
        return self.path.split(".")[0]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[1]

    def shown(self, value: Any):
        """What the widget shows for the recipe's `value`: text for text and list widgets, else the value."""
        if self.widget == "text":
            if value is None:
                return ""
            if self.item == "yaml" and isinstance(value, (dict, list)):
                return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
            return value if isinstance(value, str) else repr(value)  # repr: the shortest text that reads back exact
        if self.widget == "list":
            return "\n".join(self._line(item) for item in value or [])
        return value

    def read(self, shown: Any) -> Any:
        """The recipe value a widget's content stands for (the inverse of `shown`); a text that is not what the key
        takes is passed on as typed, so the schema names the key and the problem."""
        if self.widget == "text":
            if shown == "" and self.optional:
                return None
            if self.item == "yaml":
                return _yaml_line(shown)
            return _number(shown) if self.item == "number" else shown
        if self.widget == "list":
            lines = [line.strip() for line in shown.splitlines() if line.strip()]
            if not lines and self.optional:
                return None
            if self.item == "text_or_mapping":  # a line in braces is a mapping; any other is text, as typed
                return [_yaml_line(line) if line.startswith("{") else line for line in lines]
            return lines if self.item == "str" else [_yaml_line(line) for line in lines]
        return shown

    def _line(self, item: Any) -> str:
        if self.item == "mapping" or isinstance(item, dict):  # flow style on one line, nulls kept so that it reads
            return yaml.safe_dump(item, default_flow_style=True, sort_keys=False, width=10**6).strip()  # back equal
        return str(item)


def method_models() -> dict[str, type[BaseModel]]:
    """method.type -> its section model, from the recipe's discriminated union."""
    union = typing.get_args(schema.Method)[0]
    return {model.model_fields["type"].default: model for model in typing.get_args(union)}


def section_model(section: str, method: str) -> type[BaseModel]:
    if section == "method":
        return method_models()[method]
    return _strip_none(schema.Recipe.model_fields[section].annotation)[0]


def form_fields(method: str) -> list[FormField]:
    """Every recipe key of a `method` recipe, section by section, in the schema's order."""
    return [
        describe(f"{section}.{name}", info)
        for section in SECTIONS
        for name, info in section_model(section, method).model_fields.items()
    ]


def subset_fields() -> list[FormField]:
    """The keys of one `data.subsets` entry, for the Train form's subsets editor."""
    return [describe(f"data.subsets.{name}", info) for name, info in schema.SubsetConfig.model_fields.items()]


def subset_defaults() -> dict:
    """A new subset as the recipe would hold it: every key at its default, the folder still empty."""
    fields = schema.SubsetConfig.model_fields.items()
    return {name: "" if info.is_required() else info.get_default(call_default_factory=True) for name, info in fields}


def describe(path: str, info: FieldInfo) -> FormField:
    """One schema field as a `FormField`."""
    annotation, optional = _strip_none(info.annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    shared = dict(label=label(path.rsplit(".", 1)[1]), help=info.description or "", optional=optional)
    shared["common"] = bool(extra.get("common"))
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return FormField(path, widget="checkbox", **shared)
    if origin is Literal:
        return FormField(path, widget="select", options=tuple(typing.get_args(annotation)), **shared)
    if annotation in (int, float) and (extra.get("as_text") or optional):  # a number box cannot be emptied to unset
        return FormField(path, widget="text", item="number", **shared)
    if annotation in (int, float):
        low, high = _bounds(info, annotation)
        return FormField(path, widget=annotation.__name__, low=low, high=high, **shared)
    if origin is list:
        (item,) = typing.get_args(annotation)
        kind = "str" if _strip_none(item)[0] is str else "mapping" if _is_model(item) else "number"
        if str in _members(item):
            kind = "text_or_mapping"  # validation.prompts: a plain prompt, or one with its own settings
        return FormField(path, widget="list", item=kind, **shared)
    if origin in (dict, Union, types.UnionType):  # optimizer_args; a block weight: one number or 12
        return FormField(path, widget="text", item="yaml", **shared)
    return FormField(path, widget="text", **shared)


def label(name: str) -> str:
    words = [SPELLING.get(word, word) for word in name.split("_")]
    return " ".join(words)[:1].upper() + " ".join(words)[1:]


def _bounds(info: FieldInfo, kind: type) -> tuple[float | None, float | None]:
    """A number box's bounds from the field's constraints (an exclusive bound of a float is left to the schema)."""
    low = high = None
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Ge):
            low = rule.ge
        elif isinstance(rule, annotated_types.Gt) and kind is int:
            low = rule.gt + 1
        elif isinstance(rule, annotated_types.Le):
            high = rule.le
        elif isinstance(rule, annotated_types.Lt) and kind is int:
            high = rule.lt - 1
    return (None if low is None else kind(low)), (None if high is None else kind(high))


def _strip_none(annotation) -> tuple[Any, bool]:
    """(the annotation without None and Annotated, whether None was allowed)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _strip_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return _strip_none(args[0])[0], optional
        return functools.reduce(operator.or_, args), optional  # float | list[float] | None: both kinds, and unset
    return annotation, False


def _members(annotation) -> list:
    """The types a union may hold, each without its Annotated marks ([] for anything but a union)."""
    annotation = _strip_none(annotation)[0]
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return []
    return [_strip_none(member)[0] for member in typing.get_args(annotation)]


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _number(text: str):
    """A number as the recipe's overrides read it (`1e-4` included), else the text itself."""
    value = _yaml_line(text)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def _yaml_line(text: str):
    """One value as an override reads it; a line that is not YAML stays text for the schema to name."""
    try:
        return schema.apply_overrides({}, [f"v={text}"])["v"]
    except schema.RecipeError:
        return text
