"""The Train form generated from the recipe schema, its presets and base picker, the Jobs page's loss/lr chart and the
Registry page's score tables, driven through `streamlit.testing.v1.AppTest` on a temporary SDTUNE_HOME."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
import test_studio_pages
import yaml
from test_studio_pages import ROOT, button, page, registered_fake, texts

from sdtune.adapters.registry import Registry
from sdtune.studio import api, jobs, recipe_form
from sdtune.studio.views.charts import per_step, smoothed
from sdtune.studio.views.registry import score_tables
from sdtune.trainers.core import recipe as schema

home = test_studio_pages.home  # the same temporary SDTUNE_HOME fixture
APPLY = "FormSubmitter:form-{}-Apply"
PRESET_OF = {"lora": "quickstart.yaml", "dreambooth": "toy-dreambooth.yaml", "controlnet": "controlnet-toy.yaml"}


def widgets(at) -> list:
    return [*at.number_input, *at.text_input, *at.text_area, *at.checkbox, *at.selectbox]


def widget(at, label: str):
    [found] = [w for w in widgets(at) if w.label == label]
    return found


def opened(at, method: str):
    """The page with `method`'s toy preset open."""
    at.selectbox(key="train-method").set_value(method)
    at = at.run()
    at.selectbox(key="train-template").set_value(PRESET_OF[method])
    return at.run()


def schema_keys(method: str) -> list[tuple[str, str]]:
    """(section.key, description) of every recipe key of a `method` recipe, read from the pydantic models here (not
    through recipe_form), so a key the form leaves out fails the test below."""
    models = {name: field.annotation for name, field in schema.Recipe.model_fields.items()}
    union = typing.get_args(typing.get_args(schema.Method)[0])
    models["method"] = next(m for m in union if m.model_fields["type"].default == method)
    return [
        (f"{section}.{name}", field.description)
        for section, model in models.items()
        for name, field in model.model_fields.items()
    ]


@pytest.mark.parametrize("method", ["lora", "dreambooth", "controlnet"])
def test_every_recipe_key_of_each_method_is_on_the_form_with_its_description(home, method):
    at = opened(page("train"), method)
    assert not at.exception and not texts(at, "error")
    helps = [w.help or "" for w in widgets(at)]
    keys = schema_keys(method)
    assert len(keys) > 70
    for path, description in keys:
        assert description, f"{path} has no description in the recipe schema"
        shown = [h for h in helps if f"`{path}`" in h]
        assert shown, f"{path} is not on the {method} form"
        assert any(description in h for h in shown), f"{path}: its help does not give its description"
    # keys marked common are open, the others folded in their section's expander
    folded = {w.label for e in at.expander if e.label.startswith("More ") for w in widgets(e)}
    assert {"Adam beta1", "Cache latents", "Export kohya"} <= folded
    assert not {"Max train steps", "Learning rate", "Resolution", "Name"} & folded


@pytest.mark.parametrize("method", ["lora", "dreambooth", "controlnet"])
def test_optimizer_ema_and_block_lr_keys_sit_where_kohya_users_look(home, method):
    """The optimizer with the training settings (its name open, its arguments folded); the EMA and, for the LoRA
    methods, the UNet / text-encoder lrs and the block weights with the method's settings, folded."""
    at = opened(page("train"), method)
    folded = {e.label.split(" ")[1]: {w.label for w in widgets(e)} for e in at.expander if e.label.startswith("More ")}
    assert "Optimizer type" in {w.label for w in widgets(at)} - folded["train"]
    assert "Optimizer args" in folded["train"]
    ema = {"Use EMA", "EMA decay", "EMA warmup", "EMA inv gamma", "EMA power", "EMA update after step"}
    assert ema | {"EMA validation"} <= folded["method"]
    lrs = {"UNet LR", "Down LR weight", "Mid LR weight", "Up LR weight"}
    assert lrs <= folded["method"] if method != "controlnet" else not lrs & {w.label for w in widgets(at)}


def test_a_new_schema_key_reaches_the_form_by_itself():
    """No hand-made knob list: a field added to a section is described with its type's widget and its marker."""
    from pydantic import Field

    class Train(schema.TrainConfig):
        ema_warmup: bool = Field(False, description="Warm the EMA up.", json_schema_extra=schema.COMMON)
        beta3: float = Field(0.5, ge=0, le=1, description="A third beta.")

    fields = {
        f"train.{name}": recipe_form.describe(f"train.{name}", info) for name, info in Train.model_fields.items()
    }
    assert (fields["train.ema_warmup"].widget, fields["train.ema_warmup"].common) == ("checkbox", True)
    beta3 = fields["train.beta3"]
    assert (beta3.widget, beta3.low, beta3.high, beta3.common, beta3.help) == (
        "float",
        0.0,
        1.0,
        False,
        "A third beta.",
    )


@pytest.mark.parametrize("preset", list(api.recipe_templates()))
def test_each_shipped_preset_shows_its_values_and_reads_back_unchanged(home, preset):
    """The form shows each value of the YAML and an untouched form changes nothing (no override appears)."""
    at = page("train")
    at.selectbox(key="train-method").set_value(api.recipe_templates()[preset])
    at = at.run()
    at.selectbox(key="train-template").set_value(preset)
    at = at.run().button(key=APPLY.format(preset)).click().run()
    assert not at.exception and not texts(at, "error")
    assert [c.value for c in at.code] == []  # no override
    resolved = api.validate_recipe(api.recipe_text(preset))["recipe"]
    assert widget(at, "Max train steps").value == resolved["train"]["max_train_steps"]
    assert widget(at, "Mixed precision").value == resolved["train"]["mixed_precision"]
    assert widget(at, "Prompts").value.splitlines() == resolved["validation"]["prompts"]


def test_the_form_shows_what_the_yaml_says(home):
    at = page("train")
    box = at.text_area(key="yaml-quickstart.yaml")
    edited = box.value.replace("optimizer_type: adamw", "optimizer_type: adafactor").replace(
        "random_flip: true", "random_flip: false"
    )
    edited = edited.replace("seeds: [0, 1]", "seeds: [3, 4, 5]").replace("snr_gamma: 5.0", "snr_gamma: 2.5")
    box.set_value(edited.replace('{prompt: "a purple circle", color: purple, ', '{prompt: "a purple circle", '))
    at = at.run()
    assert widget(at, "Optimizer type").value == "adafactor" and widget(at, "Random flip").value is False
    assert widget(at, "Seeds").value == "3\n4\n5" and widget(at, "SNR gamma").value == "2.5"
    assert widget(at, "Toy score").value.splitlines()[0] == "{prompt: a purple circle, color: null, shape: circle}"
    assert [c.value for c in at.code] == []


RED_SQUARE = {"prompt": "a red square", "color": None, "shape": "square"}
# Each widget kind, changed on the form: (label, new content, recipe key, the value the job's recipe holds).
CHANGES = [
    ("Noise offset", 0.1, "train.noise_offset", 0.1),
    ("Optimizer type", "Lion", "train.optimizer_type", "lion"),  # kohya's spelling, read as sdtune's name
    ("Optimizer args", "{weight_decay: 0.1}", "train.optimizer_args", {"weight_decay": 0.1}),
    ("Use EMA", True, "method.use_ema", True),
    ("UNet LR", "3e-4", "method.unet_lr", 3e-4),
    ("Down LR weight", "zeros+0.5", "method.down_lr_weight", [0.5] * 12),  # a curve of sd-scripts'
    ("Mid LR weight", "0", "method.mid_lr_weight", 0.0),
    ("Random flip", False, "data.random_flip", False),
    ("Learning rate", "2e-4", "train.learning_rate", 2e-4),
    ("Trigger word", "123", "data.trigger_word", "123"),  # typed text stays text, though YAML reads 123 as a number
    ("Checkpoints total limit", "", "train.checkpoints_total_limit", None),  # empty: unset
    ("SNR gamma", "1.5", "train.snr_gamma", 1.5),
    ("Prompts", "a red square\n\n a purple circle ", "validation.prompts", ["a red square", "a purple circle"]),
    ("Seeds", "7\n8", "validation.seeds", [7, 8]),
    ("Toy score", "{prompt: a red square, shape: square}", "validation.toy_score", [RED_SQUARE]),
    ("Loss split", "0.25", "validation.loss_split", 0.25),  # the held-out validation loss
]


def test_changed_widgets_change_the_submitted_recipe(home):
    at = page("train")
    for label, value, _, _ in CHANGES:
        widget(at, label).set_value(value)
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    at = button(at, "Launch").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [job] = jobs.list_jobs()
    submitted = yaml.safe_load(job.recipe.read_text())
    for label, _, path, expected in CHANGES:
        section, key = path.split(".")
        got = submitted[section][key]
        assert got == expected, f"{label}: {path} is {got!r}"


def test_masks_and_subsets_are_data_settings_and_subsets_have_their_own_editor(home):
    """kohya_ss keeps masked loss and the dataset's subsets with the data: so does the form (folded, as few recipes
    use them). Subsets are rows of their own widgets: filling in the last, empty row's folder adds a subset (and a
    new empty row), a row's remove box drops it, and the job's recipe holds what the rows say."""
    at = page("train")
    data_tab = next(t for t in at.tabs if t.label.lower().startswith("data"))
    folded = {w.label for e in data_tab.expander if e.label.startswith("More ") for w in widgets(e)}
    assert {"Masked loss", "Alpha mask", "Mask folder", "Subset 1: image folder", "Subset 1: is reg"} <= folded
    assert "Subset 2: image folder" not in folded  # the recipe has none: one empty row
    assert widget(at, "Subset 1: image folder").help.startswith("Instead of train_data_dir")
    widget(at, "Train data folder").set_value("")
    widget(at, "Subset 1: image folder").set_value("datasets/quickstart-purple")
    widget(at, "Subset 1: num repeats").set_value(3)
    widget(at, "Subset 1: class tokens").set_value("purple thing")
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    widget(at, "Subset 2: image folder").set_value("datasets/quickstart-purple")  # the row that appeared
    widget(at, "Subset 2: is reg").set_value(True)
    widget(at, "Subset 2: shuffle caption").set_value("false")  # unset (none) would take data.shuffle_caption
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    widget(at, "Subset 3: image folder").set_value("datasets/quickstart-purple")
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    widget(at, "Subset 3: remove").set_value(True)
    widget(at, "Masked loss").set_value(True)
    widget(at, "Alpha mask").set_value(True)
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    assert widget(at, "Subset 4: image folder").value == ""
    at = button(at, "Launch").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [job] = jobs.list_jobs()
    data = yaml.safe_load(job.recipe.read_text())["data"]
    assert data["train_data_dir"] is None and data["masked_loss"] is True and data["alpha_mask"] is True
    assert [(s["num_repeats"], s["class_tokens"], s["is_reg"], s["shuffle_caption"]) for s in data["subsets"]] == [
        (3, "purple thing", False, None),
        (1, None, True, False),
    ]


def test_a_recipe_with_subsets_shows_a_row_each_and_reads_back_unchanged(home):
    at = page("train")
    box = at.text_area(key="yaml-quickstart.yaml")
    subsets = (
        "  subsets: [{image_dir: datasets/quickstart-purple, num_repeats: 2, keep_tokens: 1, shuffle_caption: true}]"
    )
    box.set_value(box.value.replace("  train_data_dir: datasets/quickstart-purple", subsets))
    at = at.run().button(key=APPLY.format("quickstart.yaml")).click().run()
    assert not texts(at, "error"), texts(at, "error")
    assert [c.value for c in at.code] == []  # an untouched editor changes nothing
    assert (widget(at, "Subset 1: num repeats").value, widget(at, "Subset 1: keep tokens").value) == (2, "1")
    assert widget(at, "Subset 1: shuffle caption").value == "true"
    assert widget(at, "Subset 2: image folder").value == ""


def test_a_prompt_with_its_own_settings_is_one_yaml_line_of_the_prompts_box(home):
    at = page("train")
    box = at.text_area(key="yaml-quickstart.yaml")
    own = '{prompt: "a purple circle", width: 48, seed: 7}'
    box.set_value(box.value.replace('prompts: ["a purple circle",', f"prompts: [{own},"))
    at = at.run()
    assert not texts(at, "error"), texts(at, "error")
    lines = widget(at, "Prompts").value.splitlines()
    assert lines[0].startswith("{prompt: a purple circle, negative_prompt: null, width: 48, height: null")
    assert lines[1] == "a purple square"
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    assert [c.value for c in at.code] == []  # shown and read back equal
    widget(at, "Prompts").set_value("a: colon stays text\n{prompt: a red circle, height: 32, steps: 3}")
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    at = button(at, "Launch").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [job] = jobs.list_jobs()
    prompts = yaml.safe_load(job.recipe.read_text())["validation"]["prompts"]
    assert prompts[0] == "a: colon stays text"
    assert {k: v for k, v in prompts[1].items() if v is not None} == {
        "prompt": "a red circle",
        "height": 32,
        "steps": 3,
    }


def test_the_base_picker_lists_the_toy_base_full_models_the_hub_cache_and_takes_a_path(home, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # a diffusers pipeline and a lone LoRA repo in a Hub cache: only the pipeline is a base
    cache = tmp_path / "hub"
    for repo, files in [("models--org--sd-pipe", ["model_index.json"]), ("models--org--a-lora", ["x.safetensors"])]:
        snapshot = cache / repo / "snapshots" / ("a" * 40)
        snapshot.mkdir(parents=True)
        for name in files:
            (snapshot / name).write_text("{}")
        (cache / repo / "refs").mkdir()
        (cache / repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    # a registered full fine-tune (a diffusers folder) beside a LoRA
    registered_fake(home, "toy-purple")
    run = _full_model_run(home.parent / "runs" / "db-full")
    Registry().register_run(run)
    bases = {b["label"]: b["value"] for b in api.base_models()}
    full = str(home / "adapters" / "db-full" / "diffusers")
    assert bases == {
        "toy: the bundled toy base (64 px, CPU)": "toy",
        "registry: db-full": full,
        "Hub cache: org/sd-pipe": "org/sd-pipe",
    }
    at = page("train")
    picker = widget(at, "Base model")
    assert picker.value == "toy" and picker.options[-1] == "(another hub id or path)" and len(picker.options) == 4
    picker.set_value(full)
    at = at.run()
    assert [c.value for c in at.code] == [f"base.pretrained_model_name_or_path={full}"]
    widget(at, "Base model").set_value("(another hub id or path)")
    at = at.run()
    widget(at, "Hub id, diffusers folder or .safetensors file").set_value(
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    at = at.run()
    assert [c.value for c in at.code] == [
        "base.pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5"
    ]


def _full_model_run(folder: Path) -> Path:
    from test_registry import fake_run

    run = fake_run(folder, name="db-full", method="dreambooth")
    (run / "diffusers").mkdir()
    (run / "diffusers" / "model_index.json").write_text("{}")
    manifest = json.loads((run / "adapter.json").read_text())
    manifest["files"] = {"diffusers": "diffusers", "single_file": "db-full.safetensors"}
    (run / "adapter.json").write_text(json.dumps(manifest))
    (run / "db-full.safetensors").write_bytes(b"single")
    return run


def test_presets_save_load_round_trip_and_refuse_a_bad_name(home):
    at = page("train")
    lora_recipes = [p.name for p in sorted((ROOT / "recipes").glob("*.yaml")) if "type: lora" in p.read_text()]
    assert at.selectbox(key="train-template").options == [f"{name} (shipped)" for name in lora_recipes]
    widget(at, "Max train steps").set_value(7)
    widget(at, "Optimizer type").set_value("adafactor")
    at = at.button(key=APPLY.format("quickstart.yaml")).click().run()
    at.text_input(key="preset-name").set_value("my-fast")
    at = at.button(key="FormSubmitter:preset-save-Save preset").click().run()
    assert not texts(at, "error"), texts(at, "error")
    saved = home / "presets" / "my-fast.yaml"
    data = yaml.safe_load(saved.read_text())
    assert data["train"]["max_train_steps"] == 7 and data["train"]["optimizer_type"] == "adafactor"
    assert data["data"]["trigger_word"] == "purple"  # the rest of the YAML kept
    # loaded at once: the saved preset is open, the form shows its values, and nothing is an override any more
    assert at.selectbox(key="train-template").value == "saved:my-fast"
    assert widget(at, "Max train steps").value == 7 and widget(at, "Optimizer type").value == "adafactor"
    assert [c.value for c in at.code] == [] and any("saved preset my-fast" in s for s in texts(at, "success"))
    # loaded later, from a fresh page
    at = page("train")
    at.selectbox(key="train-template").set_value("saved:my-fast")
    at = at.run()
    assert widget(at, "Max train steps").value == 7
    # a second save under that name, and a bad name: one line each, nothing written
    for name, message in [
        ("my-fast", "preset my-fast already exists: tick 'Replace' to overwrite it, or choose another name"),
        ("../x", "preset name '../x': use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ]:
        at.text_input(key="preset-name").set_value(name)
        at = at.button(key="FormSubmitter:preset-save-Save preset").click().run()
        [error] = texts(at, "error")
        assert error.startswith(message) and "\n" not in error
    assert sorted(p.name for p in (home / "presets").iterdir()) == ["my-fast.yaml"]
    at = button(at, "Delete preset my-fast (saved)").click().run()
    assert not saved.exists() and at.selectbox(key="train-template").value == "quickstart.yaml"


def test_smoothing_is_tensorboards_debiased_ema():
    assert smoothed([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert smoothed([4.0, 1.0, 9.0], 0.0) == [4.0, 1.0, 9.0]
    assert smoothed([2.0] * 50, 0.99) == pytest.approx([2.0] * 50)  # debiased: a constant stays itself
    assert all(math.isfinite(v) for v in smoothed([1.0, 5.0], 0.99))


def test_per_step_keeps_a_resumed_steps_latest_values_and_skips_events():
    records = [
        {"step": 1, "loss": 0.5, "lr": 1e-4},
        {"step": 2, "loss": 0.4, "lr": 2e-4},
        {"event": "validation", "step": 2, "grid": "samples/step-2.png"},
        {"step": 2, "loss": 0.3, "lr": 2e-4},  # resumed from step 1
        {"step": 3, "lr": 3e-4},
    ]
    assert per_step(records) == {"step": [1, 2, 3], "loss": [0.5, 0.3, None], "lr": [1e-4, 2e-4, 3e-4]}


def chart_series(chart) -> dict[str, list[float]]:
    """A line chart's data as {series: values}, read back from the Arrow table the page sent."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    [dataset] = chart.proto.datasets
    frame = convert_arrow_bytes_to_pandas_df(dataset.data.data)
    if len(frame.columns) == 2:  # one series: step, value
        return {frame.columns[1]: list(frame[frame.columns[1]])}
    series, values = frame.columns[1], frame.columns[2]  # several, in Streamlit's long format: step, series, value
    return {name: list(group[values]) for name, group in frame.groupby(series, sort=False)}


def test_jobs_page_charts_smoothed_loss_and_lr_with_the_tensorboard_command(home):
    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml")
    (job.run_dir / "logs").mkdir(parents=True)
    lines = [{"step": s, "total_steps": 4, "loss": loss, "lr": s * 1e-4} for s, loss in [(1, 1.0), (2, 2.0), (3, 3.0)]]
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    at = page("jobs")
    assert not at.exception
    at.slider(key=f"job-{job.id}-smoothing").set_value(0.5)
    at = at.run()
    loss, lr = (chart_series(chart) for chart in at.get("vega_lite_chart"))
    assert loss["loss"] == [1.0, 2.0, 3.0] and loss["smoothed"] == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert lr["lr"] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert f"tensorboard --logdir {job.run_dir / 'logs'}" in " ".join(texts(at, "caption"))


SCORES = {  # as trainers/core/validation.py writes them into adapter.json (LoRA/DreamBooth)
    "targets": [
        {"prompt": "a purple circle", "color": "purple", "shape": "circle"},
        {"prompt": "a purple square", "color": "purple", "shape": None},
    ],
    "seeds": [0, 1, 2, 3],
    "base": {"color": 0.0, "shape": 0.75, "both": 0.0, "n": 8},
    "adapter": {"color": 1.0, "shape": 0.875, "both": 0.875, "n": 8},
    "per_prompt": {
        "a purple circle": {"base": 0.0, "adapter": 0.75},
        "a purple square": {"base": 0.0, "adapter": 1.0},
    },
}


def test_score_tables_from_a_manifest():
    prompts, totals = score_tables(SCORES)
    assert prompts == [
        {"prompt": "a purple circle", "asks for": "purple circle", "base": 0.0, "adapter": 0.75},
        {"prompt": "a purple square", "asks for": "purple", "base": 0.0, "adapter": 1.0},
    ]
    assert totals == [
        {"model": "base", "color": 0.0, "shape": 0.75, "both": 0.0, "images": 8},
        {"model": "adapter", "color": 1.0, "shape": 0.875, "both": 0.875, "images": 8},
    ]
    # a ControlNet's scores: no per-prompt shares, a layout IoU per model
    controlnet = {**SCORES, "per_prompt": None, "adapter": {**SCORES["adapter"], "iou": 0.81}}
    prompts, totals = score_tables(controlnet)
    assert prompts == [] and totals[1] == {
        "model": "adapter",
        "color": 1.0,
        "shape": 0.875,
        "both": 0.875,
        "iou": 0.81,
        "images": 8,
    }


def test_registry_page_shows_scores_as_tables(home):
    from PIL import Image
    from test_registry import fake_run

    run = fake_run(home.parent / "runs" / "toy-purple")
    Image.new("RGB", (128, 64), (200, 0, 200)).save(run / "ab_grid.png")
    manifest = json.loads((run / "adapter.json").read_text())
    (run / "adapter.json").write_text(json.dumps({**manifest, "scores": SCORES}))
    Registry().register_run(run)
    at = page("registry")
    assert not at.exception
    per_prompt, totals = (table.value for table in at.dataframe[1:3])
    assert list(per_prompt["prompt"]) == ["a purple circle", "a purple square"]
    assert list(per_prompt["adapter"]) == [0.75, 1.0] and list(totals["both"]) == [0.0, 0.875]
    assert len(at.json) == 1  # the raw JSON only in the manifest's expander


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_the_lycoris_form_of_the_update_is_open_and_its_lokr_knobs_folded(home, method):
    """method.algo (lora / loha / lokr) sits open beside rank and preset; LoKr's factor and decompose_both fold into
    the method's other settings."""
    at = opened(page("train"), method)
    folded = {e.label.split(" ")[1]: {w.label for w in widgets(e)} for e in at.expander if e.label.startswith("More ")}
    algo = [w for w in at.selectbox if "`method.algo`" in (w.help or "")]
    assert [w.options for w in algo] == [["lora", "loha", "lokr"]] and algo[0].label not in folded["method"]
    lokr = [
        w.label
        for w in widgets(at)
        if "`method.factor`" in (w.help or "") or "`method.decompose_both`" in (w.help or "")
    ]
    assert len(lokr) == 2 and set(lokr) <= folded["method"]
