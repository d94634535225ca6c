"""Recipes: one YAML file says everything about a run; it becomes one typed, validated `Recipe`.

A recipe has six sections: `base`, `data`, `method`, `train`, `validation` and `output`. Keys take the upstream
names (diffusers examples, peft, kohya) where one exists. Anything unknown or mistyped is refused with one line
that names the key path, the bad value, and for a typo the closest valid key:

    recipe.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)

Command-line overrides use the same paths: `trainers/lora.py recipe.yaml train.lr=1e-4 output.dir=/tmp/x`.

The schema is `sections.py` (data, train, output), `samples.py` (validation and its prompts), `methods.py` (the `method` section and the script of
each method) and `schema.py` (the whole `Recipe`); `loader.py` reads YAML, applies overrides and words the errors.
Import every name from here: `from sdtune.trainers.core.recipe import Recipe, load_recipe`.
"""

from .loader import apply_overrides, load_recipe, override_text, read_yaml, recipe_from_dict
from .methods import (
    TRAINERS,
    ControlNetMethod,
    DreamBoothMethod,
    LoraMethod,
    LoraParams,
    Method,
    PreferenceMethod,
    TextualInversionMethod,
    trainer_for,
)
from .samples import SamplePrompt, ToyTarget, ValidationConfig, parse_prompt_line, read_prompts_file
from .schema import Recipe
from .sections import (
    AS_TEXT,
    COMMON,
    DataConfig,
    OutputConfig,
    RecipeError,
    Section,
    SubsetConfig,
    TrainConfig,
)

__all__ = [
    "AS_TEXT",
    "COMMON",
    "TRAINERS",
    "ControlNetMethod",
    "DataConfig",
    "DreamBoothMethod",
    "LoraMethod",
    "LoraParams",
    "Method",
    "PreferenceMethod",
    "OutputConfig",
    "Recipe",
    "RecipeError",
    "SamplePrompt",
    "Section",
    "SubsetConfig",
    "TextualInversionMethod",
    "ToyTarget",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_recipe",
    "override_text",
    "parse_prompt_line",
    "read_prompts_file",
    "read_yaml",
    "recipe_from_dict",
    "trainer_for",
]
