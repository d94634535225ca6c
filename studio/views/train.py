"""Train page: a method and a recipe template, a form for the common knobs, the YAML validated live against the
recipe schema (the CLI's messages), the preflight estimate, and Launch, which queues a job."""

from __future__ import annotations

import hashlib
import uuid

import streamlit as st

from sdtune.studio import api, jobs
from sdtune.studio.views.common import shown_errors

METHODS = ("lora", "dreambooth", "controlnet")
TEMPLATE_DATA = "(the template's own data)"
ACTIVE = ("queued", "running")


# The form's knobs: (recipe key, label, widget, shown for which recipes). The form shows the values of the YAML below
# it; a knob set to anything else becomes a `key=value` override, which wins over the YAML.
KNOBS = (
    ("output.name", "Name", "text", "any"),
    ("train.max_train_steps", "Steps", "int", "any"),
    ("train.learning_rate", "Learning rate", "float", "any"),
    ("train.train_batch_size", "Batch size", "int", "any"),
    ("data.resolution", "Resolution", "int", "any"),
    ("data.trigger_word", "Trigger word", "text", "any"),
    ("train.checkpointing_steps", "Checkpoint every", "int", "any"),
    ("validation.validation_steps", "Validation grid every", "int", "any"),
    ("method.rank", "LoRA rank", "int", "lora"),
    ("method.instance_prompt", "Instance prompt", "text", "dreambooth"),
    ("method.class_prompt", "Class prompt", "text", "dreambooth"),
    ("method.with_prior_preservation", "Prior preservation (class images)", "bool", "dreambooth"),
    ("method.lora", "DreamBooth-LoRA (off: the whole UNet)", "bool", "dreambooth"),
)
INT_LIMITS = {"data.resolution": (8, 2048, 8), "validation.validation_steps": (0, 1_000_000, 1)}


def render():
    st.title("Train")
    left, right = st.columns(2)
    method = left.selectbox("Method", METHODS, key="train-method")
    templates = list(api.recipe_templates(method))
    if not templates:
        st.error(f"no recipe template for {method} in recipes/")
        return
    default = "quickstart.yaml" if "quickstart.yaml" in templates else templates[0]
    template = right.selectbox("Recipe template", templates, index=templates.index(default), key="train-template")
    datasets = [TEMPLATE_DATA] + [d["name"] for d in api.list_datasets() if d["images"]]
    dataset = st.selectbox("Dataset (frozen as a version at launch)", datasets, key="train-dataset")
    # The YAML as edited below (kept across pages); the form above it shows its values.
    yaml_key = f"yaml-{template}"
    text = st.session_state.get(yaml_key) or st.session_state.get(f"kept-{yaml_key}") or api.recipe_text(template)
    shown = api.validate_recipe(text)
    knobs = _knobs(
        template, shown["recipe"] if shown["ok"] else api.validate_recipe(api.recipe_text(template))["recipe"]
    )
    with st.expander("Advanced: the recipe YAML", expanded=False):
        text = st.text_area("Recipe", text, height=400, key=yaml_key)
    st.session_state[f"kept-{yaml_key}"] = text
    # Checked and previewed on the editable copy; Launch freezes a version and trains on that.
    work = None if dataset == TEMPLATE_DATA else api.dataset_info(dataset)["work_dir"]
    overrides = ([_data_override(method, work)] if work else []) + knobs
    checked = api.validate_recipe(text, overrides)
    if checked["ok"]:
        st.success(f"recipe valid: {method} '{checked['recipe']['output']['name']}'")
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


def _launch(text: str, overrides: list[str], knobs: list[str], method: str, dataset: str, work: str | None):
    """Checks the data (a recipe whose images all fail is refused here, not after queueing), refuses a second click
    on the same recipe while its job waits or runs, freezes the dataset version and queues the job."""
    launched = st.session_state.get("train-launched")
    if launched and launched["recipe"] == (text, overrides) and jobs.get(launched["id"]).state in ACTIVE:
        raise api.StudioError(f"this recipe is already job {launched['id']}: change something, or cancel that job")
    api.check_data(text, overrides)
    if work:
        version = api.freeze_dataset(dataset)
        overrides_frozen = [_data_override(method, version["path"]), *knobs]
        st.info(f"dataset {dataset} {version['version']} (fingerprint {version['fingerprint'][:12]})")
    key = _submission_key((text, overrides, dataset))
    job = api.submit_job(text, overrides_frozen if work else overrides, submission_key=key)
    st.session_state["jobs-selected"] = job["id"]
    st.session_state["train-launched"] = {"recipe": (text, overrides), "id": job["id"], "key": key}
    st.success(f"job {job['id']} queued: {job['name']} ({job['method']}). Follow it on the Jobs page.")


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


def _knobs(template: str, recipe: dict) -> list[str]:
    """The form of common knobs, showing `recipe`'s values; returns the changed ones as `section.key=value`."""
    method = recipe["method"]
    lora = method["type"] == "lora" or bool(method.get("lora"))
    shown = [k for k in KNOBS if k[3] == "any" or k[3] == method["type"] or (k[3] == "lora" and lora)]
    overrides = []
    with st.form(f"knobs-{template}"):
        columns = st.columns(3)
        for i, (key, label, kind, _) in enumerate(shown):
            section, name = key.split(".")
            current = recipe[section].get(name)
            value = _knob_widget(columns[i % 3], key, label, kind, current)
            if value != _knob_text(kind, current):
                overrides.append(f"{key}={value}")
        st.form_submit_button("Apply")
    return overrides


def _knob_widget(column, key: str, label: str, kind: str, current):
    """One knob, returning its value as override text (learning rates as text: 5e-7 would show as 0.000000)."""
    if kind == "int":
        low, high, step = INT_LIMITS.get(key, (1, 1_000_000, 1))
        return str(int(column.number_input(label, low, high, int(current), step=step)))
    if kind == "bool":
        return str(column.checkbox(label, bool(current))).lower()
    return column.text_input(label, _knob_text(kind, current))


def _knob_text(kind: str, value) -> str:
    if kind == "float":
        return f"{float(value):g}"
    if kind == "bool":
        return str(bool(value)).lower()
    return "" if value is None else str(value)
