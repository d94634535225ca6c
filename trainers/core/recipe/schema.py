"""The whole recipe: its six sections together, and the checks that span two of them.

A recipe has six sections: `base`, `data`, `method`, `train`, `validation` and `output`; each defaults to sensible
values, and `method` to LoRA. `loader.py` turns YAML and overrides into one.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from sdtune.adapters.base import BaseModelConfig

from .methods import LoraMethod, Method
from .samples import ValidationConfig
from .sections import DataConfig, OutputConfig, Section, TrainConfig


class Recipe(Section):
    """A whole run. Sections default to sensible values; `method` defaults to LoRA."""

    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Method = Field(default_factory=LoraMethod)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _default_type(cls, value):
        if isinstance(value, dict) and "type" not in value:
            return {"type": "lora", **value}
        return value

    @model_validator(mode="after")
    def _one_empty_prompt_rate(self):
        # Two names for one thing (diffusers' and kohya's): a recipe that sets both would not say which wins.
        if (
            self.method.type == "controlnet"
            and self.method.proportion_empty_prompts
            and self.data.caption_dropout_rate
        ):
            raise ValueError(
                "method.proportion_empty_prompts: set it or data.caption_dropout_rate, not both (the same setting)"
            )
        return self

    @model_validator(mode="after")
    def _subsets_for_the_method(self):
        # ControlNet reads image + conditioning pairs from one folder; DreamBooth's class images are its regularization
        if self.data.subsets and self.method.type == "controlnet":
            raise ValueError("data.subsets: ControlNet reads image and conditioning pairs; use data.train_data_dir")
        has_reg = any(subset.is_reg for subset in self.data.subsets)
        if has_reg and self.method.type == "dreambooth" and self.method.with_prior_preservation:
            raise ValueError(
                "data.subsets: is_reg subsets and method.with_prior_preservation are two sources of class images; "
                "use one (method.class_data_dir takes a folder of them)"
            )
        return self

    @model_validator(mode="after")
    def _controlnet_prompts_in_the_recipe(self):
        # A ControlNet's prompts are paired with its validation images, in the run and again from its manifest
        # (publishing renders the same pairs), which keeps the recipe, not a file beside it.
        if self.method.type == "controlnet" and self.validation.prompts_file:
            raise ValueError(
                "validation.prompts_file: a ControlNet pairs validation.prompts with method.validation_image; "
                "list its prompts in validation.prompts"
            )
        return self

    def to_dict(self) -> dict:
        """The fully resolved recipe (every default filled in), as plain YAML-able data."""
        return self.model_dump(mode="json")
