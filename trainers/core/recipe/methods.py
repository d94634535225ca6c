"""The recipe's `method` section: which training method, with its settings, and the script that trains it.

`method.type` picks the class (a discriminated union, `Method`); a recipe without a type is a LoRA. A new method is
a class here and a line in `TRAINERS` (docs/architecture.md, "Where new things go").
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, model_validator

from sdtune.adapters.base import LocalPath, PathText

from .sections import AS_TEXT, COMMON, Section


class LoraParams(Section):
    """LoRA settings shared by the LoRA trainer and LoRA DreamBooth (peft `LoraConfig` names)."""

    rank: int = Field(16, ge=1, description="LoRA rank r: the width of the low-rank update.", json_schema_extra=COMMON)
    lora_alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA scale numerator: the update is scaled by lora_alpha / rank. Default: rank.",
        json_schema_extra=COMMON,
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    preset: Literal["attn", "attn+ff", "locon"] = Field(
        "attn",
        description="UNet layers to adapt: attn = to_q/k/v/out.0; attn+ff adds the feed-forward; locon adds convs.",
        json_schema_extra=COMMON,
    )
    target_modules: list[str] | None = Field(None, description="Explicit peft target_modules; overrides preset.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) through peft's use_dora.")
    train_text_encoder: bool = Field(
        False, description="Also train a LoRA on the text encoder's attention.", json_schema_extra=COMMON
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, description="Learning rate of the text-encoder LoRA.", json_schema_extra={**COMMON, **AS_TEXT}
    )

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)


class LoraMethod(LoraParams):
    """LoRA over a frozen base (trainers/lora.py)."""

    type: Literal["lora"] = Field("lora", description="lora: a LoRA over the frozen base (trainers/lora.py).")


class DreamBoothMethod(LoraParams):
    """DreamBooth: teach one subject from a few images, as a full fine-tune or a LoRA (trainers/dreambooth.py).

    The subject is bound to a rare identifier inside its class ("a photo of sks dog"); prior preservation trains on
    the base's own images of the class ("a photo of dog") at the same time, so the class keeps its look.
    """

    type: Literal["dreambooth"] = Field(
        "dreambooth", description="dreambooth: one subject, as a full fine-tune or a LoRA (trainers/dreambooth.py)."
    )
    identifier: str = Field(
        "sks",
        pattern=r"^\S+$",
        description="The rare token that names the subject; must appear in instance_prompt.",
        json_schema_extra=COMMON,
    )
    instance_prompt: str = Field(
        ..., description="Prompt with the identifier and class, e.g. 'a photo of sks dog'.", json_schema_extra=COMMON
    )
    use_captions: bool = Field(
        False,
        description="Train each instance image on its own caption (same-name .txt, or a kohya `N_sks dog` folder "
        "name) where it has one; images without one use instance_prompt.",
    )
    class_prompt: str | None = Field(
        None, description="Prompt of the subject's class, e.g. 'a photo of dog'.", json_schema_extra=COMMON
    )
    class_data_dir: PathText | None = Field(
        None, description="Folder of class images, all used, never modified; the shortfall is generated and cached."
    )
    with_prior_preservation: bool = Field(
        False, description="Add the class-image loss that keeps the class intact.", json_schema_extra=COMMON
    )
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="Weight of the prior-preservation loss.", json_schema_extra=COMMON
    )
    num_class_images: int = Field(
        100, ge=1, description="Class images to train with (generated if fewer exist).", json_schema_extra=COMMON
    )
    class_inference_steps: int = Field(25, ge=1, description="Sampling steps of each generated class image.")
    class_guidance_scale: float | None = Field(
        None, ge=0, description="Guidance of generated class images; default: the base's recommended scale."
    )
    class_negative_prompt: str = Field("", description="Negative prompt of generated class images.")
    lora: bool = Field(
        False,
        validation_alias=AliasChoices("lora", "use_lora"),
        description="true: train a LoRA (DreamBooth-LoRA); false: fine-tune the whole UNet (alias use_lora).",
        json_schema_extra=COMMON,
    )
    text_encoder_steps: int | None = Field(
        None, ge=1, description="With train_text_encoder: train it for the first N steps only (default: all)."
    )
    use_ema: bool = Field(False, description="Keep an EMA of the trained weights; the EMA is what gets saved.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per optimizer step.")
    extract_lora_rank: int | None = Field(
        32, ge=1, description="Full mode: also write a LoRA of this rank, extracted from the weight delta by SVD."
    )
    save_single_file: bool = Field(True, description="Full mode: also write <name>.safetensors (original SD layout).")

    @model_validator(mode="after")
    def _check(self):
        if self.identifier not in self.instance_prompt.split():
            raise ValueError(
                f"instance_prompt {self.instance_prompt!r} does not contain the identifier {self.identifier!r}; "
                f"write e.g. 'a photo of {self.identifier} dog', or set method.identifier"
            )
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError("with_prior_preservation needs class_prompt, e.g. class_prompt: 'a photo of dog'")
        if self.text_encoder_steps is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_steps needs train_text_encoder: true")
        return self


class ControlNetMethod(Section):
    """ControlNet: a trainable copy of the UNet encoder that follows a conditioning image (trainers/controlnet.py).

    Where the conditioning images come from (`conditioning: image`), by data layout: `train_data_dir/images/` with
    `train_data_dir/conditioning/` (same file stem) and captions beside the images; an imagefolder `metadata.jsonl`
    with a `conditioning_image_file_name` per row; or the `conditioning_image_column` of an HF dataset.
    """

    type: Literal["controlnet"] = Field(
        "controlnet",
        description="controlnet: a ControlNet that follows a conditioning image (trainers/controlnet.py).",
    )
    controlnet_model_name_or_path: PathText | None = Field(
        None,
        description="ControlNet to continue: a diffusers folder or a single .safetensors file (diffusers or original "
        "control_model.* keys). Default: initialise from the base UNet's encoder (ControlNetModel.from_unet).",
        json_schema_extra=COMMON,
    )
    conditioning: Literal["image", "canny"] = Field(
        "image",
        description="image: given conditioning images (see the layouts above); canny: edges computed from each "
        "training image with OpenCV (sdtune annotate --kind canny does the same offline).",
        json_schema_extra=COMMON,
    )
    conditioning_image_column: str = Field(
        "conditioning_image", description="Column of the conditioning images in an HF dataset (diffusers' name)."
    )
    canny_low_threshold: int = Field(100, ge=0, le=255, description="conditioning: canny: hysteresis low threshold.")
    canny_high_threshold: int = Field(200, ge=0, le=255, description="conditioning: canny: hysteresis high threshold.")
    proportion_empty_prompts: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of captions replaced by '' (diffusers' name; kohya calls it data.caption_dropout_rate): "
        "the ControlNet learns to follow the condition without a prompt, which guess mode needs.",
        json_schema_extra=COMMON,
    )
    conditioning_scale: float = Field(
        1.0,
        ge=0.0,
        description="ControlNet strength in validation images (controlnet_conditioning_scale).",
        json_schema_extra=COMMON,
    )
    validation_image: list[Annotated[str, LocalPath()]] = Field(
        default_factory=list,
        description="Conditioning images for validation, paired with validation.prompts as in diffusers (one each, "
        "or one image for every prompt). Default: the conditions of the first training pairs.",
        json_schema_extra=COMMON,
    )

    @model_validator(mode="after")
    def _check(self):
        if self.canny_low_threshold > self.canny_high_threshold:
            raise ValueError("canny_low_threshold must not exceed canny_high_threshold")
        return self


Method = Annotated[LoraMethod | DreamBoothMethod | ControlNetMethod, Field(discriminator="type")]

# method.type -> the script that trains it: every method of `Method` has one (tests/test_recipe.py checks), so the
# worker, the jobs and `sdtune doctor` look a recipe's trainer up without a fallback.
TRAINERS = {
    "lora": "trainers/lora.py",
    "dreambooth": "trainers/dreambooth.py",
    "controlnet": "trainers/controlnet.py",
}


def trainer_for(method_type: str) -> str:
    """Where a method trains, as the end of a one-line message: `run trainers/lora.py`."""
    return f"run {TRAINERS[method_type]}"
