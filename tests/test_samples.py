"""Validation samples with their own settings (YAML objects and sd-scripts' prompt files) and `report_to: wandb`.

sd-scripts' prompt-file lines are read to the letter (golden lines) and every line sdtune cannot read is one error
naming the file, the line and the option; a toy run renders each prompt at its own size, seed, steps, guidance and
negative prompt into sample files that `sdtune sample` reproduces pixel for pixel; a toy run reporting to wandb
offline keeps its wandb run in the run folder, with the logged loss, and says where it is.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import QUICKSTART, run_trainer
from PIL import Image

from sdtune.trainers.core.recipe import (
    RecipeError,
    SamplePrompt,
    parse_prompt_line,
    read_prompts_file,
    recipe_from_dict,
)

SMALL = [
    "train.max_train_steps=2",
    "train.train_batch_size=2",
    "train.lr_warmup_steps=0",
    "train.checkpointing_steps=100",
    "output.save_precision=fp32",  # the sample files come from the fp32 weights; so must `sdtune sample`'s
    "output.export_check=false",
    "output.register=false",
    "validation.toy_score=[]",
    "validation.validation_steps=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# -- sd-scripts' prompt-file syntax ---------------------------------------------------------------------------------

GOLDEN_LINES = [
    ("a purple circle", {"prompt": "a purple circle"}),
    (
        "masterpiece, a purple circle --n lowres, blurry --w 512 --h 768 --d 1234 --l 7.5 --s 28",
        {
            "prompt": "masterpiece, a purple circle",
            "negative_prompt": "lowres, blurry",
            "width": 512,
            "height": 768,
            "seed": 1234,
            "guidance_scale": 7.5,
            "steps": 28,
        },
    ),
    ("a cat --S 20 --N ugly", {"prompt": "a cat", "steps": 20, "negative_prompt": "ugly"}),  # letters in any case
    ("  a cat   --d 0   ", {"prompt": "a cat", "seed": 0}),  # spaces around prompt and values dropped
    ("a cat --l 3", {"prompt": "a cat", "guidance_scale": 3.0}),
    ("a cat --n a-b, c--d", {"prompt": "a cat", "negative_prompt": "a-b, c--d"}),  # only " --" starts an option
]


@pytest.mark.parametrize("line, keys", GOLDEN_LINES)
def test_a_prompt_file_line_reads_as_sd_scripts_reads_it(line, keys):
    assert parse_prompt_line(line) == keys


def test_a_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# samples for the purple LoRA\n\na purple circle --d 3\n   \na purple square --w 32 --h 40\n")
    assert read_prompts_file(path) == [
        SamplePrompt(prompt="a purple circle", seed=3),
        SamplePrompt(prompt="a purple square", width=32, height=40),
    ]


def test_sd_scripts_json_and_toml_prompt_files_read_as_their_text_lines(tmp_path):
    """sd-scripts' other two prompt files (its load_prompts): a JSON list of texts or settings objects (its keys
    `scale`, `sample_steps`), and a TOML [prompt] table of shared settings with a [[prompt.subset]] a prompt; both
    read as the text file saying the same."""
    text = tmp_path / "prompts.txt"
    text.write_text("a purple circle --n blurry --w 32 --h 40 --d 3 --l 2 --s 9\na red square --n blurry --d 4\n")
    as_json = tmp_path / "prompts.json"
    as_json.write_text(
        json.dumps(
            [
                {
                    "prompt": "a purple circle",
                    "negative_prompt": "blurry",
                    "width": 32,
                    "height": 40,
                    "seed": 3,
                    "scale": 2,
                    "sample_steps": 9,
                },
                "a red square --n blurry --d 4",
            ]
        )  # fmt: skip
    )
    as_toml = tmp_path / "prompts.toml"
    as_toml.write_text(
        '[prompt]\nnegative_prompt = "blurry"\n\n[[prompt.subset]]\nprompt = "a purple circle"\nwidth = 32\n'
        'height = 40\nseed = 3\nscale = 2.0\nsample_steps = 9\n\n[[prompt.subset]]\nprompt = "a red square"\nseed = 4\n'
    )
    expected = read_prompts_file(text)
    assert expected[0] == SamplePrompt(
        prompt="a purple circle", negative_prompt="blurry", width=32, height=40, seed=3, guidance_scale=2, steps=9
    )
    assert read_prompts_file(as_json) == expected and read_prompts_file(as_toml) == expected


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"prompt": "a cat", "sample_sampler": "euler_a"}, "sample_sampler: not read by sdtune (a per-prompt sampler"),
        ({"prompt": "a cat", "width": 500}, "width: must be a multiple of 8"),
        ({"prompt": "a cat", "colour": "red"}, "colour: Extra inputs are not permitted"),
        (3, "expected a prompt text or a table of its settings"),
    ],
)
def test_a_bad_json_prompt_is_one_line_naming_the_file_and_prompt(tmp_path, entry, message):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a good prompt", entry]))
    with pytest.raises(RecipeError) as error:
        read_prompts_file(path)
    assert str(error.value).startswith(f"{path}: prompt 2: {message}")


BAD_LINES = [
    ("a cat --w 500", "--w 500: must be a multiple of 8 (the VAE works on 8x8 pixel blocks)"),
    ("a cat --h 36", "--h 36: must be a multiple of 8 (the VAE works on 8x8 pixel blocks)"),
    ("a cat --x 3", "--x: unknown option; sdtune reads --n, --w, --h, --d, --l and --s"),
    ("a cat --d seven", "--d seven: not an integer"),
    ("a cat --l high", "--l high: not a number"),
    ("a cat --s 0", "--s 0: Input should be greater than or equal to 1"),
    ("a cat --w", "--w: needs a value"),
    ("a cat --w 64 --w 72", "--w: given twice"),
    (" --w 64", "no prompt before its options"),
    (
        "a cat --ss euler_a",
        "--ss: not read by sdtune (a per-prompt sampler; set validation.scheduler for all prompts)",
    ),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_prompt_file_line_is_one_line_naming_the_file_line_and_option(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# line 1 is a comment\na good prompt --d 1\n{line}\n")
    with pytest.raises(RecipeError) as error:
        read_prompts_file(path)
    assert str(error.value) == f"{path}: line 3: {message}"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.txt", None, "file not found"),
        (
            "prompts.toml",
            "[prompt]\n",
            "a TOML prompt file has a [prompt] table and [[prompt.subset]] tables, one a prompt",
        ),
        ("prompts.json", '{"prompt": "a cat"}', "a JSON prompt file is a list of prompts, as sd-scripts reads it"),
        ("bad.json", "[", "not valid JSON (Expecting value: line 1 column 2 (char 1))"),
        ("empty.txt", "# only a comment\n", "no prompt in it (one a line; lines starting with # are comments)"),
    ],
)
def test_a_prompts_file_that_cannot_be_used_is_named(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"validation": {"prompts_file": str(path)}}).validation.sample_prompts()
    assert str(error.value) == f"validation.prompts_file: {path}: {message}"


def test_a_trainer_refuses_a_bad_prompts_file_before_any_model_loads(tmp_path, cache):
    path = tmp_path / "prompts.txt"
    path.write_text("a purple circle --w 50\n")
    proc = run_trainer([str(QUICKSTART), f"output.dir={tmp_path / 'run'}", f"validation.prompts_file={path}"], cache)
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1] == f"error: {path}: line 1: --w 50: must be a multiple of 8 (the VAE "
        "works on 8x8 pixel blocks)"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- YAML objects ---------------------------------------------------------------------------------------------------


def test_yaml_prompts_take_the_section_settings_they_leave_out():
    from sdtune.trainers.core.validation import prompt_settings

    recipe = recipe_from_dict(
        {
            "validation": {
                "prompts": ["a cat", {"prompt": "a dog", "width": 48, "seed": 7, "sample_steps": 3, "scale": 2}],
                "negative_prompt": "blurry",
                "seeds": [0, 1],
                "num_inference_steps": 9,
            }
        }
    )
    v = recipe.validation
    rows = [prompt_settings(p, v, 5.0, False) for p in v.sample_prompts()]
    plain, own = rows
    assert [(s.prompt, s.seed, s.width, s.height, s.steps, s.guidance, s.negative_prompt) for s in plain] == [
        ("a cat", 0, None, None, 9, 5.0, "blurry"),
        ("a cat", 1, None, None, 9, 5.0, "blurry"),
    ]
    assert [(s.prompt, s.seed, s.width, s.height, s.steps, s.guidance, s.negative_prompt) for s in own] == [
        ("a dog", 7, 48, None, 3, 2.0, "blurry")  # sd-scripts' JSON names (sample_steps, scale) read too
    ]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"prompt": "a dog", "width": 50}, "validation.prompts.0.width: must be a multiple of 8"),
        ({"prompt": "a dog", "size": 64}, "validation.prompts.0.size: unknown key"),
        ({"width": 64}, "validation.prompts.0.prompt: required key is missing"),
    ],
)
def test_a_bad_yaml_prompt_names_its_key(prompt, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"validation": {"prompts": [prompt]}}, "r.yaml")
    assert str(error.value).startswith(f"r.yaml: {message}")


# -- a real run -----------------------------------------------------------------------------------------------------


def test_a_toy_run_samples_each_prompt_with_its_own_settings_as_sdtune_sample_does(tmp_path, cache):
    from sdtune.studio import api

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# sd-scripts' syntax\na purple square --w 32 --h 40 --d 3 --n blurry --l 2 --s 2\n")
    out = tmp_path / "run"
    own = "{prompt: a red circle, width: 48, height: 64, seed: 7, steps: 3}"
    proc = run_trainer(
        [
            str(QUICKSTART),
            f"output.dir={out}",
            *SMALL,
            f"validation.prompts=[a purple circle, {own}]",
            f"validation.prompts_file={prompts_file}",
            "validation.seeds=[0]",
            "validation.num_inference_steps=2",
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = out / "samples" / "step-000002"
    files = sorted(samples.glob("*.png"))
    assert [(p.name, Image.open(p).size) for p in files] == [
        ("0000-seed0.png", (64, 64)),  # the toy base's native size
        ("0001-seed7.png", (48, 64)),
        ("0002-seed3.png", (32, 40)),
    ]
    parameters = Image.open(files[2]).text["parameters"]
    assert parameters.startswith("a purple square\nNegative prompt: blurry\nSteps: 2, ")
    assert "CFG scale: 2.0, Seed: 3, Size: 32x40" in parameters
    assert Image.open(out / "ab_grid.png").size[0] > 0  # the grid composes the three sizes
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in events if e.get("event") == "validation"] == ["samples/step-000002"]
    # the same seed and settings through `sdtune sample` with the run's LoRA: the same image
    [again] = api.sample_images(
        ["a red circle"], tmp_path / "again", seeds=[7], adapters=[str(out)], steps=3, guidance=3.0, width=48,
        height=64, device="cpu",
    )  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(files[1])))
    # the prompts file itself through `sdtune sample --prompts-file`: its line's image again (its size, seed, CFG...)
    from sdtune.studio import cli

    args = ["--prompts-file", str(prompts_file), "--adapter", str(out), "--device", "cpu"]
    assert cli.main(["sample", *args, "--out", str(tmp_path / "from-file")]) == 0
    again = Image.open(tmp_path / "from-file" / "0000-seed3.png")
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(files[2])))


# -- wandb ----------------------------------------------------------------------------------------------------------


def test_report_to_wandb_offline_keeps_its_run_with_the_loss_in_the_run_folder(tmp_path, cache):
    out = tmp_path / "run"
    env_free = ["validation.prompts=[]", "output.report_to=wandb"]
    proc = run_trainer([str(QUICKSTART), f"output.dir={out}", *SMALL, *env_free], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = (out / "logs" / "wandb").glob("offline-run-*")
    assert f"wandb: offline run in {folder}; upload it with: wandb sync {folder}" in proc.stdout
    [run_file] = folder.glob("run-*.wandb")
    history = [row for row in wandb_history(run_file) if "loss" in row]
    assert [row["_step"] for row in history] == [1, 2] and all(np.isfinite(row["loss"]) for row in history)


def wandb_history(path) -> list[dict]:
    """The `history` rows (what `accelerator.log` sent) of a wandb run file, which is what `wandb sync` uploads: a
    7-byte header, then LevelDB log blocks (32 KiB; each record a 7-byte header of crc, length and kind: full, or
    first/middle/last pieces) of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.HasField("history"):
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_report_to_wandb_without_wandb_is_one_line_at_the_recipe_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: `import wandb` fails
    for report_to in ("wandb", "all"):
        with pytest.raises(RecipeError) as error:
            recipe_from_dict({"output": {"report_to": report_to}}, "r.yaml")
        assert str(error.value) == (
            f"r.yaml: output.report_to: wandb is not installed: pip install 'sdtune[wandb]', got '{report_to}'"
        )
    assert recipe_from_dict({"output": {"report_to": "tensorboard"}}).output.report_to == "tensorboard"


# -- the kohya importer ---------------------------------------------------------------------------------------------


def test_sd_scripts_sample_prompts_file_maps_to_validation_prompts_file(tmp_path):
    from sdtune.trainers.tools.kohya_import import read_config, translate

    config = tmp_path / "lora.toml"
    config.write_text(
        '[training]\nnetwork_module = "networks.lora"\nsample_prompts = "prompts.txt"\nsample_every_n_steps = 100\nlog_with = "wandb"\n'
    )
    tr = translate(read_config(config))
    assert tr.recipe["validation"]["prompts_file"] == "prompts.txt"
    assert tr.recipe["output"]["report_to"] == "wandb"
    assert not [line for line in tr.unsupported if line.startswith(("sample_prompts", "log_with"))]


def test_a_gui_sample_prompt_line_sdtune_cannot_read_is_listed_not_dropped(tmp_path):
    from sdtune.trainers.tools.kohya_import import read_config, translate

    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"LoRA_type": "Standard", "sample_prompts": "a cat --w 64\na dog --ss euler_a"}))
    tr = translate(read_config(preset))
    assert "validation" not in tr.recipe or "prompts" not in tr.recipe["validation"]
    assert (
        "sample_prompts (line 2: --ss: not read by sdtune (a per-prompt sampler; set validation.scheduler for "
        "all prompts))" in tr.unsupported
    )


def test_the_studio_confines_the_prompts_file_as_every_path_it_reads():
    from sdtune.studio import confine

    assert confine.path_keys()["validation.prompts_file"] is False  # read, never written
