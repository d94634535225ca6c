"""Train page: a method and a preset (a shipped `recipes/*.yaml`, or one saved here), the base model, a form with every
recipe key, the YAML validated live against the recipe schema (the CLI's messages), the preflight estimate, and
Launch, which queues a job.

The form is generated from the schema (studio/recipe_form.py): a tab per section, the common keys open and the rest
folded, each key's description as its help. It shows the values of the YAML it trains; a widget changed in it
becomes a `section.key=value` override, which wins over the YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from itertools import cycle

import streamlit as st

from sdtune.studio import api, jobs, presets, recipe_form
from sdtune.studio.views.common import flash, show_flash, shown_errors
from sdtune.trainers.core.recipe import override_text

METHODS = tuple(recipe_form.method_models())
TEMPLATE_DATA = "(the preset's own data)"
ACTIVE = ("queued", "running")
BASE_KEY = "base.pretrained_model_name_or_path"
TABS = ("data", "method", "train", "validation", "output", "base")  # base last: its main key is the picker above
PICKED = (BASE_KEY, "method.type")  # drawn above the form: the base picker and the Method selectbox
OTHER_BASE = "(another hub id or path)"
SUBSETS = "data.subsets"  # drawn as its own editor (`_subsets`), not as one YAML line per subset
TRI_STATE = ("none", "true", "false")  # an optional yes/no: none = the data section's setting


def render():
    st.title("Train")
    show_flash()
    if "train-method-next" in st.session_state:  # an imported preset of another method: switch to it
        st.session_state["train-method"] = st.session_state.pop("train-method-next")
    if "train-template-next" in st.session_state:  # a preset was just saved: open it
        st.session_state["train-template"] = st.session_state.pop("train-template-next")
    left, right = st.columns(2)
    method = left.selectbox("Method", METHODS, key="train-method", help=_method_help())
    preset = _choose_preset(right, method)
    if preset is None:
        return
    template = preset.id
    datasets = [TEMPLATE_DATA] + [d["name"] for d in api.list_datasets() if d["images"]]
    dataset = st.selectbox("Dataset (frozen as a version at launch)", datasets, key="train-dataset")
    # The YAML as edited below (kept across pages); the form shows its values, or the preset's while it is invalid.
    yaml_key = f"yaml-{template}"
    text = st.session_state.get(yaml_key) or st.session_state.get(f"kept-{yaml_key}") or _preset_text(template)
    shown = api.validate_recipe(text)
    recipe = (shown if shown["ok"] else api.validate_recipe(_preset_text(template))).get("recipe")
    knobs = []
    if recipe:
        fields = recipe_form.form_fields(recipe["method"]["type"])
        knobs = [*_base_picker(recipe["base"], fields), *_form(template, recipe, fields)]
    with st.expander("The recipe YAML", expanded=False):
        text = st.text_area("Recipe", text, height=400, key=yaml_key)
    st.session_state[f"kept-{yaml_key}"] = text
    # Checked and previewed on the editable copy; Launch freezes a version and trains on that.
    work = None if dataset == TEMPLATE_DATA else api.dataset_info(dataset)["work_dir"]
    overrides = ([_data_override(method, work)] if work else []) + knobs
    checked = api.validate_recipe(text, overrides)
    if checked["ok"]:
        st.success(f"recipe valid: {checked['recipe']['method']['type']} '{checked['recipe']['output']['name']}'")
        if overrides:
            st.code(" ".join(overrides), language=None, wrap_lines=True)
    else:
        st.error(checked["error"])
    col_a, col_b = st.columns(2)
    if col_a.button("Preflight: data, time and memory", key="train-preflight", disabled=not checked["ok"]):
        with shown_errors(), st.spinner("scanning the data and estimating ..."):
            st.code(api.preflight(text, overrides)["report"], language=None)
    if col_b.button("Launch", type="primary", key="train-launch", disabled=not checked["ok"]):
        with shown_errors():
            _launch(text, overrides, knobs, method, dataset, work)
    if checked["ok"]:
        _sweep_form(text, overrides, knobs, method, dataset, work)
    _presets(preset, text, knobs)
    _import_kohya()


def _choose_preset(column, method: str) -> presets.Preset | None:
    """The preset selectbox: `method`'s shipped and saved presets, quickstart.yaml first where it is one of them."""
    choices = {preset.id: preset for preset in presets.list_presets(method)}
    if not choices:
        st.error(f"no preset for {method} in recipes/ or {presets.presets_dir()}")
        return None
    if st.session_state.get("train-template") not in choices:
        st.session_state["train-template"] = "quickstart.yaml" if "quickstart.yaml" in choices else next(iter(choices))
    chosen = column.selectbox(
        "Recipe preset", list(choices), key="train-template", format_func=lambda i: choices[i].label
    )
    return choices[chosen]


def _launch(text: str, overrides: list[str], knobs: list[str], method: str, dataset: str, work: str | None):
    """Checks the data (a recipe whose images all fail is refused here, not after queueing), refuses a second click
    on the same recipe while its job waits or runs, freezes the dataset version and queues the job."""
    launched = st.session_state.get("train-launched")
    if launched and launched["recipe"] == (text, overrides) and jobs.get(launched["id"]).state in ACTIVE:
        raise api.StudioError(f"this recipe is already job {launched['id']}: change something, or cancel that job")
    api.check_data(text, overrides)
    key = _submission_key((text, overrides, dataset))
    job = api.submit_job(text, _frozen(overrides, knobs, method, dataset, work), submission_key=key)
    st.session_state["jobs-selected"] = job["id"]
    st.session_state["train-launched"] = {"recipe": (text, overrides), "id": job["id"], "key": key}
    st.success(f"job {job['id']} queued: {job['name']} ({job['method']}). Follow it on the Jobs page.")


def _frozen(overrides: list[str], knobs: list[str], method: str, dataset: str, work: str | None) -> list[str]:
    """The overrides a job trains with: a chosen dataset is frozen as a version now, and the job reads that."""
    if not work:
        return overrides
    version = api.freeze_dataset(dataset)
    st.info(f"dataset {dataset} {version['version']} (fingerprint {version['fingerprint'][:12]})")
    return [_data_override(method, version["path"]), *knobs]


def _sweep_form(text: str, overrides: list[str], knobs: list[str], method: str, dataset: str, work: str | None):
    """This recipe over a grid of settings, queued as one sweep (the `sdtune jobs sweep` command); its leaderboard is
    the Sweeps page."""
    with st.expander("Sweep: queue this recipe over a grid of settings"):
        with st.form("train-sweep"):
            axes_text = st.text_area(
                "Axes, one per line: section.key=value1,value2",
                placeholder="train.learning_rate=1e-4,3e-4\nmethod.rank=8,16",
                help="The recipe's key paths (as in the YAML); every combination is one run.",
            )
            seeds_text = st.text_input("Seeds (optional): train.seed over these", placeholder="0,1")
            name = st.text_input("Sweep name (optional)", help="Default: the recipe's name and the time.")
            queued = st.form_submit_button("Queue sweep")
        if not queued:
            return
        with shown_errors():
            axes = [line.strip() for line in axes_text.splitlines() if line.strip()]
            try:
                seeds = [int(part) for part in seeds_text.split(",") if part.strip()]
            except ValueError:
                raise api.StudioError(f"seeds {seeds_text!r}: integers separated by commas, e.g. 0,1") from None
            api.check_data(text, overrides)
            result = api.submit_sweep(
                text, _frozen(overrides, knobs, method, dataset, work), axes, seeds, name or None
            )
            sweep, runs = result["sweep"], result["jobs"]
            st.session_state["sweeps-selected"] = sweep["name"]
            st.success(f"sweep {sweep['name']}: {len(runs)} runs queued (jobs {runs[0]['id']}-{runs[-1]['id']}); "
                       "its leaderboard is on the Sweeps page.")  # fmt: skip


def _submission_key(form: tuple) -> str:
    """One key per submission of this form state, so that the queue, not the page, makes Launch idempotent: a second
    click that lands while the first is still checking the data carries the same key and gets the first click's job
    (`jobs.submit`). Once that job has ended, launching the same form again is a new submission (a new key)."""
    digest = hashlib.sha256(repr(form).encode()).hexdigest()[:16]
    nonce = st.session_state.setdefault("train-submission-nonce", uuid.uuid4().hex)
    launched = st.session_state.get("train-launched") or {}
    if launched.get("key") == f"{nonce}-{digest}" and jobs.get(launched["id"]).state not in ACTIVE:
        nonce = st.session_state["train-submission-nonce"] = uuid.uuid4().hex
    return f"{nonce}-{digest}"


def _data_override(method: str, root: str) -> str:
    """A dataset folder as `data.train_data_dir`: images/ for LoRA and DreamBooth, the paired folder for ControlNet."""
    return f"data.train_data_dir={root}" if method == "controlnet" else f"data.train_data_dir={root}/images"


def _preset_text(preset_id: str) -> str:
    try:
        return presets.preset_text(preset_id)
    except api.StudioError as exc:  # removed behind the page's back: an empty recipe, and why
        st.error(str(exc))
        return ""


def _method_help() -> str:
    models = recipe_form.method_models().values()
    lines = [model.model_fields["type"].description for model in models]
    return "\n\n".join([*lines, "Recipe key: `method.type`"])


def _help(field: recipe_form.FormField) -> str:
    return f"{field.help}\n\nRecipe key: `{field.path}`"


# -- the base picker --------------------------------------------------------------------------------------------------


def _base_picker(base: dict, fields: list[recipe_form.FormField]) -> list[str]:
    """The base as a choice among the toy base, the registry's full models and the local Hub cache, or a typed hub
    id or path; returns the override when it differs from the YAML's. (No widget keys: a widget's identity includes
    the value it shows, so editing the YAML resets it to the new value.)"""
    current = base["pretrained_model_name_or_path"]
    known = {found["value"]: found["label"] for found in api.base_models()}
    options = [*known, OTHER_BASE]
    field = next(f for f in fields if f.path == BASE_KEY)
    index = options.index(current) if current in known else len(options) - 1
    left, right = st.columns(2)
    pick = left.selectbox("Base model", options, index, format_func=lambda v: known.get(v, v), help=_help(field))
    chosen = pick
    if pick == OTHER_BASE:
        typed = right.text_input(
            "Hub id, diffusers folder or .safetensors file", "" if current in known else current, help=_help(field)
        )
        chosen = typed.strip()
    return [override_text(BASE_KEY, chosen)] if chosen and chosen != current else []


# -- the form -----------------------------------------------------------------------------------------------------


def _form(template: str, recipe: dict, fields: list[recipe_form.FormField]) -> list[str]:
    """Every recipe key of the recipe's method as a widget, a tab per section with the rarely changed keys folded;
    returns the changed ones as `section.key=value` overrides."""
    method = recipe["method"]["type"]
    fields = [f for f in fields if f.path not in PICKED]
    overrides = []
    with st.form(f"form-{template}"):
        titles = [f"Method: {method}" if s == "method" else s.capitalize() for s in TABS]
        for tab, section in zip(st.tabs(titles), TABS):
            mine = [f for f in fields if f.section == section]
            more = [f for f in mine if not f.common]
            with tab:
                overrides += _widgets([f for f in mine if f.common], recipe[section])
                if more:
                    with st.expander(f"More {section} settings ({len(more)})"):
                        overrides += _widgets([f for f in more if f.path != SUBSETS], recipe[section])
                        if section == "data":
                            overrides += _subsets([f for f in more if f.path == SUBSETS][0], template, recipe["data"])
        st.form_submit_button("Apply")
    return overrides


def _widgets(fields: list[recipe_form.FormField], values: dict) -> list[str]:
    changed = []
    for column, field in zip(cycle(st.columns(3)), fields):
        value = field.read(_widget(column, field, field.shown(values[field.name])))
        if value != values[field.name]:
            changed.append(override_text(field.path, value))
    return changed


def _widget(column, field: recipe_form.FormField, shown, key: str | None = None):
    """The widget of one field, showing `shown`; returns its content."""
    label, tip = field.label, _help(field)
    if field.widget == "checkbox":
        return column.checkbox(label, bool(shown), help=tip, key=key)
    if field.widget == "select":
        return column.selectbox(label, field.options, field.options.index(shown), help=tip, key=key)
    if field.widget == "int":
        return column.number_input(label, field.low, field.high, shown, step=1, help=tip, key=key)
    if field.widget == "float":
        return column.number_input(label, field.low, field.high, shown, format="%g", help=tip, key=key)
    if field.widget == "list":
        return column.text_area(label, shown, height=100, help=f"{tip} One per line.", key=key)
    return column.text_input(label, shown, help=tip, key=key)


# -- the subsets editor ---------------------------------------------------------------------------------------------


def _subsets(field: recipe_form.FormField, template: str, data: dict) -> list[str]:
    """`data.subsets` as a small editor: a bordered row per subset (its folder, repeats, is_reg, caption settings)
    with a remove box, and an empty row last, which adds a subset once its folder is filled in; returns the override.
    Its widgets are keyed by the YAML's subsets, so the rows added here stay until the YAML changes them."""
    st.markdown(f"**{field.label}**", help=_help(field))
    st.caption("Fill in the last row's folder to add a subset; tick a row's remove box to drop it.")
    subsets = data["subsets"]
    prefix = f"subset-{template}-{hashlib.sha256(repr(subsets).encode()).hexdigest()[:8]}"
    count = len(subsets)
    while str(st.session_state.get(f"{prefix}-{count}-image_dir", "")).strip():  # rows added on the form
        count += 1
    rows = [_subset_row(f"{prefix}-{i}", i, field, subsets[i] if i < len(subsets) else None) for i in range(count + 1)]
    edited = [row for row in rows if row is not None]
    return [override_text(SUBSETS, edited)] if edited != subsets else []


def _subset_row(key: str, index: int, field: recipe_form.FormField, subset: dict | None) -> dict | None:
    """One subset's widgets (described from the subset schema, so a new subset key appears by itself); returns the
    subset as the recipe holds it, or None when it is removed or has no folder."""
    values = subset or recipe_form.subset_defaults()
    read = {}
    with st.container(border=True):
        columns = cycle(st.columns(5))
        for sub in recipe_form.subset_fields():
            name, shown = sub.name, sub.shown(values[sub.name])
            label = f"Subset {index + 1}: {sub.label[:1].lower()}{sub.label[1:]}"
            if name == "image_dir":  # the subset's first widget also says what the list is
                sub = dataclasses.replace(sub, path=SUBSETS, help=f"{field.help}\n\n{sub.help}")
            sub = dataclasses.replace(sub, label=label)
            if sub.widget == "checkbox" and sub.optional:  # unset takes the data section's: a three-way choice
                pick = next(columns).selectbox(
                    label, TRI_STATE, TRI_STATE.index(str(shown).lower()), help=_help(sub), key=f"{key}-{name}"
                )
                read[name] = {"true": True, "false": False}.get(pick)
            else:
                read[name] = sub.read(_widget(next(columns), sub, shown, key=f"{key}-{name}"))
        read["image_dir"] = read["image_dir"].strip()  # no folder, no subset
        removed = next(columns).checkbox(f"Subset {index + 1}: remove", key=f"{key}-remove", help="Drop this subset.")
    return None if removed or not read["image_dir"] else read


# -- presets --------------------------------------------------------------------------------------------------------


def _presets(preset: presets.Preset, text: str, knobs: list[str]):
    """Save the form as a named preset (the YAML with the form's changes applied); delete the open saved one."""
    with st.expander("Save as preset"):
        with st.form("preset-save"):
            name = st.text_input("Preset name", key="preset-name", placeholder="my-lora-fast")
            replace = st.checkbox("Replace a saved preset of that name", key="preset-replace")
            if st.form_submit_button("Save preset"):
                with shown_errors():
                    saved = presets.save_preset(name, text, knobs, replace=replace)
                    st.session_state["train-template-next"] = saved.id
                    flash(f"saved preset {saved.label}: {saved.path}")
                    st.rerun()
        if not preset.read_only and st.button(f"Delete preset {preset.label}", key="preset-delete"):
            with shown_errors():
                presets.delete_preset(preset.id.removeprefix(presets.SAVED))
                flash(f"deleted preset {preset.label}")
                st.rerun()


def _import_kohya():
    """An sd-scripts / kohya_ss config becomes a saved preset (as `sdtune recipe from-kohya`), opened in the form."""
    with st.expander("Import a kohya config"):
        if report := st.session_state.get("train-kohya-report"):
            st.code("\n".join(report), language=None, wrap_lines=True)
        with st.form("kohya-import", clear_on_submit=True):
            config = st.file_uploader(
                "sd-scripts .toml, its command line (.sh/.txt) or a kohya_ss .json preset",
                type=["toml", "json", "sh", "txt"],
                key="kohya-config",
            )
            dataset = st.file_uploader("Dataset config (.toml, optional)", type=["toml"], key="kohya-dataset")
            name = st.text_input("Preset name", key="kohya-name", placeholder="my-kohya-lora")
            replace = st.checkbox("Replace a saved preset of that name", key="kohya-replace")
            if st.form_submit_button("Import") and config is not None:
                with shown_errors():
                    upload = (dataset.name, dataset.getvalue()) if dataset is not None else None
                    saved, report = presets.import_kohya(
                        name, (config.name, config.getvalue()), upload, replace=replace
                    )
                    st.session_state["train-kohya-report"] = report
                    st.session_state["train-method-next"] = saved.method
                    st.session_state["train-template-next"] = saved.id
                    flash(f"imported {config.name} as preset {saved.label}: {saved.path}")
                    st.rerun()
