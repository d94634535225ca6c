"""Recipes: every shipped recipe loads; every kind of bad input is one line naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.trainers.core.recipe import RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_folder_has_every_method_and_preset():
    names = {p.name for p in RECIPES}
    for method in ("lora", "dreambooth", "controlnet"):
        for preset in ("low-vram", "default", "fast"):
            assert f"sd15-{method}-{preset}.yaml" in names
    assert "quickstart.yaml" in names


def test_every_method_has_its_trainer_script():
    """Every `method.type` the schema accepts has a trainer in TRAINERS whose script exists: the jobs, the worker and
    `sdtune doctor` look it up with no fallback, so a method added without a trainer fails here."""
    import typing

    from sdtune.trainers.core.recipe import TRAINERS, Method, trainer_for

    union = typing.get_args(Method)[0]
    types = {cls.model_fields["type"].default for cls in typing.get_args(union)}
    assert types == set(TRAINERS)
    root = Path(__file__).resolve().parents[1]
    for method, script in TRAINERS.items():
        assert (root / script).is_file() and trainer_for(method) == f"run {script}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_every_key_has_its_own_comment(path):
    recipe = load_recipe(path)
    named_by = {recipe.method.type, getattr(recipe.method, "algo", recipe.method.type)}  # loha.yaml: a LoRA's algo
    assert any(name in path.name for name in named_by) or path.name == "quickstart.yaml"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_section = not line.startswith(" ") and stripped.endswith(":")
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped or is_section:
            continue
        assert lines[i - 1].strip().startswith("#"), f"{path.name}:{i + 1}: key without its own comment: {stripped}"


def test_sd15_recipes_target_512px_sd15():
    for path in RECIPES:
        if path.name.startswith("sd15-"):
            recipe = load_recipe(path)
            assert recipe.data.resolution == 512
            assert recipe.base.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_defaults_and_upstream_names():
    recipe = recipe_from_dict({"method": {"rank": 8, "lora_alpha": 16}, "train": {"learning_rate": 3e-4}})
    assert recipe.method.type == "lora" and recipe.method.alpha == 16.0
    assert recipe.train.learning_rate == 3e-4
    assert recipe.base.pretrained_model_name_or_path == "toy"


def test_overrides_set_nested_keys_with_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: toy\ntrain:\n  max_train_steps: 10\n")
    recipe = load_recipe(
        path,
        [
            "train.lr=1e-4",
            "output.dir=/tmp/x",
            "method.preset=locon",
            "train.snr_gamma=5",
            "validation.seeds=[3, 4]",
            "base.allow_pickle=true",
        ],
    )
    assert recipe.train.learning_rate == 1e-4 and recipe.output.dir == "/tmp/x"
    assert recipe.method.preset == "locon" and recipe.train.snr_gamma == 5.0
    assert recipe.validation.seeds == [3, 4] and recipe.base.allow_pickle is True
    assert recipe.train.max_train_steps == 10


def test_override_alias_replaces_the_files_key_and_no_stays_a_string(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  learning_rate: 3.0e-4\n  mixed_precision: no\noutput:\n  output_dir: runs/a\n")
    assert load_recipe(path).train.mixed_precision == "no"  # YAML 1.1 would have read False
    recipe = load_recipe(path, ["train.lr=1e-4", "output.dir=runs/b", "train.mixed_precision=no"])
    assert recipe.train.learning_rate == 1e-4 and recipe.output.dir == "runs/b"
    assert recipe.train.mixed_precision == "no"


BAD = [
    ({"train": {"lerning_rate": 1e-4}}, "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    ({"method": {"rnk": 4}}, "method.rnk: unknown key (did you mean 'rank'?)"),
    # batches come from cached latents in this process: worker processes are refused, not silently ignored
    ({"data": {"dataloader_num_workers": 4}}, "data.dataloader_num_workers: unknown key"),
    ({"validation": {"scheduler": "lms"}}, "validation.scheduler: Input should be 'default', 'ddim'"),
    (
        {"method": {"type": "dreambooth", "instance_prompt": "x", "prior_los_weight": 1}},
        "method.prior_los_weight: unknown key (did you mean 'prior_loss_weight'?)",
    ),
    ({"train": {"max_train_steps": "many"}}, "train.max_train_steps: Input should be a valid integer"),
    ({"train": {"max_train_steps": 0}}, "train.max_train_steps: Input should be greater than or equal to 1, got 0"),
    (
        {"train": {"optimizer": "sgd"}},
        "train.optimizer: expected one of adamw, adamw8bit, adafactor, prodigy, schedulefree_adamw, lion or a "
        "module.ClassName (e.g. torch.optim.SGD), got 'sgd'",
    ),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"),
    ({"data": {"caption_dropout_rate": 1.5}}, "data.caption_dropout_rate: Input should be less than or equal to 1"),
    ({"data": {"keep_tokens": 2}}, "data: keep_tokens only applies with shuffle_caption: true"),
    ({"method": {"type": "dreambooth"}}, "method.instance_prompt: required key is missing"),
    ({"method": {"type": "lokr"}}, "method: Input tag 'lokr' found using 'type' does not match"),
    (
        {"method": {"preset": "attn+conv"}},
        "method.preset: Input should be 'attn', 'attn+ff' or 'locon', got 'attn+conv'",
    ),
    (
        {"validation": {"toy_score": [{"prompt": "x", "colr": "red"}]}},
        "validation.toy_score.0.colr: unknown key (did you mean 'color'?)",
    ),
    (
        {"train": {"optimizer": "adamw8bit", "fused_optimizer": True}},
        "train: fused_optimizer is torch's fused AdamW: set optimizer_type: adamw (not adamw8bit)",
    ),
    (
        {"train": {"torch_compile_mode": "reduce-overhead"}},
        "train: torch_compile_mode applies only with torch_compile: true",
    ),
    ({"output": {"name": "my lora/x"}}, "output.name: String should match pattern"),
    ({"base": 3}, "base: Input should be a valid dictionary"),
    ("not a mapping", "a recipe is a YAML mapping of sections"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_recipe_is_one_line_naming_the_key(data, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, "r.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("r.yaml: ")
    assert message in text


@pytest.mark.parametrize(
    "content,overrides,message",
    [
        ("train:\n  lr: [1\n", [], "not valid YAML"),
        ("train: {}\n", ["train.lr"], "expected section.key=value"),
        ("train: {}\n", ["train.lr=abc"], "train.lr: Input should be a valid number"),
        ("train: {}\n", ["trian.lr=1"], "trian: unknown key (did you mean 'train'?)"),
        ("train: 3\n", ["train.lr=1"], "train is not a section"),
    ],
)
def test_bad_file_or_override(tmp_path, content, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="a folder, not a recipe file"):
        load_recipe(tmp_path)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  trigger_word: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml: not UTF-8 text; save the recipe as UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize(
    "argv", [["sample", "--prompt", "x", "--steps", "0"], ["sample", "--prompt", "x", "--width", "0"]]
)
def test_cli_counts_and_sizes_must_be_positive(argv, capsys):
    from sdtune.studio import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value",
    ["purple", "123", "1e5", "", " padded", "yes", 'say "hi"', "a: b", None, True, 0.0002, 1e-8, 16, [7, 8], ["a, b"]],
)
def test_override_text_reads_back_as_the_value(value):
    """The studio's form writes its changes with override_text; a typed "123" stays the string "123" (quoted)."""
    from sdtune.trainers.core.recipe import apply_overrides, override_text

    assert apply_overrides({}, [override_text("data.trigger_word", value)]) == {"data": {"trigger_word": value}}


def test_a_quoted_override_stays_a_string():
    recipe = load_recipe(None, ['output.name="123"', "train.lr=2e-4", 'data.trigger_word="1e5"'])
    assert (recipe.output.name, recipe.train.learning_rate, recipe.data.trigger_word) == ("123", 2e-4, "1e5")
