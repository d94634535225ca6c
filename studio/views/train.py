"""Train page: a method and a recipe template, a form for the common knobs, the YAML validated live against the
recipe schema (the CLI's messages), the preflight estimate, and Launch, which queues a job."""

from __future__ import annotations

import streamlit as st

from sdtune.studio import api
from sdtune.studio.views.common import shown_errors

METHODS = ("lora", "dreambooth", "controlnet")
TEMPLATE_DATA = "(the template's own data)"


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
    base = api.validate_recipe(api.recipe_text(template))["recipe"]
    datasets = [TEMPLATE_DATA] + [d["name"] for d in api.list_datasets() if d["images"]]
    dataset = st.selectbox("Dataset (frozen as a version at launch)", datasets, key="train-dataset")
    knobs = _knobs(method, template, base)
    with st.expander("Advanced: the recipe YAML", expanded=False):
        text = st.text_area("Recipe", api.recipe_text(template), height=400, key=f"yaml-{template}")
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
            if work:
                version = api.freeze_dataset(dataset)
                overrides = [_data_override(method, version["path"]), *knobs]
                st.info(f"dataset {dataset} {version['version']} (fingerprint {version['fingerprint'][:12]})")
            job = api.submit_job(text, overrides)
            st.session_state["jobs-selected"] = job["id"]
            st.success(f"job {job['id']} queued: {job['name']} ({job['method']}). Follow it on the Jobs page.")


def _data_override(method: str, root: str) -> str:
    """A dataset folder as `data.train_data_dir`: images/ for LoRA and DreamBooth, the paired folder for ControlNet."""
    return f"data.train_data_dir={root}" if method == "controlnet" else f"data.train_data_dir={root}/images"


def _knobs(method: str, template: str, base: dict) -> list[str]:
    """The common knobs as `section.key=value` overrides (only those changed from the template)."""
    train, data, output = base["train"], base["data"], base["output"]
    with st.form(f"knobs-{template}"):
        c1, c2, c3 = st.columns(3)
        values = {
            "output.name": c1.text_input("Name", output["name"]),
            "train.max_train_steps": c2.number_input("Steps", 1, 1_000_000, train["max_train_steps"]),
            "train.learning_rate": c3.number_input(
                "Learning rate", 0.0, 1.0, float(train["learning_rate"]), format="%.6f"
            ),
            "train.train_batch_size": c1.number_input("Batch size", 1, 256, train["train_batch_size"]),
            "data.resolution": c2.number_input("Resolution", 8, 2048, data["resolution"], step=8),
            "data.trigger_word": c3.text_input("Trigger word", data["trigger_word"] or ""),
            "train.checkpointing_steps": c1.number_input(
                "Checkpoint every", 1, 1_000_000, train["checkpointing_steps"]
            ),
            "validation.validation_steps": c2.number_input(
                "Validation grid every", 0, 1_000_000, base["validation"]["validation_steps"]
            ),
        }
        if method != "controlnet":
            values["method.rank"] = c3.number_input("LoRA rank", 1, 1024, base["method"].get("rank") or 16)
        st.form_submit_button("Apply")
    current = {
        "output.name": output["name"],
        "train.max_train_steps": train["max_train_steps"],
        "train.learning_rate": float(train["learning_rate"]),
        "train.train_batch_size": train["train_batch_size"],
        "data.resolution": data["resolution"],
        "data.trigger_word": data["trigger_word"] or "",
        "train.checkpointing_steps": train["checkpointing_steps"],
        "validation.validation_steps": base["validation"]["validation_steps"],
        "method.rank": base["method"].get("rank") or 16,
    }
    return [f"{key}={value}" for key, value in values.items() if value != current[key]]
