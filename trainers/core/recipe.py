"""Recipes: one YAML file says everything about a run; it becomes one typed, validated `Recipe`.

A recipe has six sections: `base`, `data`, `method`, `train`, `validation` and `output`. Keys take the upstream
names (diffusers examples, peft, kohya) where one exists. Anything unknown or mistyped is refused with one line
that names the key path, the bad value, and for a typo the closest valid key:

    recipe.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)

Command-line overrides use the same paths: `trainers/lora.py recipe.yaml train.lr=1e-4 output.dir=/tmp/x`.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdtune.adapters.base import BaseModelConfig, LocalPath, PathText
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.schedulers import SchedulerName


class RecipeError(SdtuneError, ValueError):
    """A recipe that cannot run; the message is one line naming the file, key path and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)


# Hints for the studio's Train form (studio/recipe_form.py), kept on the fields so that a new key reaches the form by
# itself: a COMMON key is shown open, every other one is folded under its section's "more settings"; an AS_TEXT float
# is typed as text, since a number box would show a learning rate of 5e-7 as 0.
COMMON = {"common": True}
AS_TEXT = {"as_text": True}


# -- base: `BaseModelConfig`, imported above, lives with base loading in sdtune.adapters.base --------------------


# -- data -----------------------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Where the training images and captions come from, and how they are prepared."""

    train_data_dir: PathText | None = Field(
        None,
        description="A folder of images with same-name caption files, kohya `N_concept` folders, or an HF "
        "imagefolder with metadata.jsonl.",
        json_schema_extra=COMMON,
    )
    dataset_name: PathText | None = Field(
        None, description="A saved HF dataset folder (save_to_disk) or a hub dataset id."
    )
    image_column: str = Field("image", description="Image column of an HF dataset.")
    caption_column: str = Field("text", description="Caption column of an HF dataset / metadata.jsonl.")
    caption_extension: str = Field(".txt", description="Extension of the caption file beside each image.")
    trigger_word: str | None = Field(
        None, description="Word that calls up the trained concept, e.g. 'sks'.", json_schema_extra=COMMON
    )
    caption_template: str = Field(
        "{caption}",
        description="How a training caption is built; placeholders {caption} and {trigger}.",
        json_schema_extra=COMMON,
    )
    shuffle_caption: bool = Field(
        False, description="Shuffle comma-separated tags each time a caption is used.", json_schema_extra=COMMON
    )
    keep_tokens: int = Field(
        0, ge=0, description="With shuffle_caption: leading tags that stay in place.", json_schema_extra=COMMON
    )
    caption_dropout_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability of training on an empty caption (helps guidance).",
        json_schema_extra=COMMON,
    )
    resolution: int = Field(
        512, ge=8, description="Training resolution: buckets hold about resolution^2 pixels.", json_schema_extra=COMMON
    )
    enable_bucket: bool = Field(
        True, description="Aspect-ratio bucketing by pixel area instead of a square crop.", json_schema_extra=COMMON
    )
    min_bucket_reso: int = Field(256, ge=8, description="Smallest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=8, description="Largest bucket side in pixels.")
    bucket_reso_steps: int = Field(64, ge=8, description="Bucket sides are multiples of this (64 for SD v1-5).")
    min_image_size: int | None = Field(
        None, ge=1, description="Images whose shorter side is smaller are skipped. Default: resolution / 2."
    )
    random_flip: bool = Field(False, description="Randomly mirror images left-right.", json_schema_extra=COMMON)
    repeats: int = Field(
        1,
        ge=1,
        description="Times each image is seen per epoch (kohya folders set their own).",
        json_schema_extra=COMMON,
    )
    cache_latents: bool = Field(True, description="Encode each image with the VAE once and cache the latents.")
    latent_sampling: Literal["sample", "mean"] = Field(
        "sample",
        description="sample: a fresh draw from the VAE posterior each step (diffusers, kohya); mean: its mean, for a "
        "base pretrained on means (the toy base: its VAE's posterior std is ~0.3, SD v1-5's ~0.01).",
    )
    cache_dir: Annotated[str | None, LocalPath(writes=True)] = Field(
        None,
        description="On-disk cache of VAE latents (text embeddings are computed once per run and kept in memory). "
        "Default: $SDTUNE_CACHE or ~/.cache/sdtune.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("min_bucket_reso must not exceed max_bucket_reso")
        if self.keep_tokens and not self.shuffle_caption:
            raise ValueError("keep_tokens only applies with shuffle_caption: true")
        return self


# -- method ---------------------------------------------------------------------------------------------------------


class LoraParams(_Section):
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


class ControlNetMethod(_Section):
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

# method.type -> the script that trains it. DreamBooth recipes already validate (and `sdtune doctor` estimates them)
# so the presets can be reviewed; its trainer lands in a later issue.
TRAINERS = {
    "lora": "trainers/lora.py",
    "dreambooth": "trainers/dreambooth.py",
    "controlnet": "trainers/controlnet.py",
}


def trainer_for(method_type: str) -> str:
    """Where a method trains, as the end of a one-line message, or that it has no trainer yet."""
    if method_type in TRAINERS:
        return f"run {TRAINERS[method_type]}"
    available = ", ".join(f"{name} ({script})" for name, script in TRAINERS.items())
    return f"its trainer does not exist yet (trainers today: {available})"


# -- train ----------------------------------------------------------------------------------------------------------


class TrainConfig(_Section):
    """The optimisation: steps, batch, learning rate and schedule, optimizer, precision, checkpoints."""

    max_train_steps: int = Field(1000, ge=1, description="Optimizer steps to train for.", json_schema_extra=COMMON)
    train_batch_size: int = Field(1, ge=1, description="Images per device per forward pass.", json_schema_extra=COMMON)
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes per optimizer step.", json_schema_extra=COMMON
    )
    learning_rate: float = Field(
        1e-4,
        gt=0,
        validation_alias=AliasChoices("learning_rate", "lr"),
        description="Peak learning rate (alias lr).",
        json_schema_extra={**COMMON, **AS_TEXT},
    )
    scale_lr: bool = Field(False, description="Multiply the lr by batch size x accumulation x processes.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="A diffusers learning-rate schedule.", json_schema_extra=COMMON)
    lr_warmup_steps: int = Field(
        0, ge=0, description="Steps of linear warmup from 0 to the lr.", json_schema_extra=COMMON
    )
    lr_num_cycles: int = Field(1, ge=1, description="Hard restarts for cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field(
        "adamw",
        description="adamw (torch), adamw8bit (bitsandbytes: 4x smaller states), adafactor (transformers).",
        json_schema_extra=COMMON,
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.", json_schema_extra=AS_TEXT)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no",
        description="no = fp32; fp16 (with grad scaling) or bf16 hold the frozen base in half precision.",
        json_schema_extra=COMMON,
    )
    seed: int = Field(
        42, description="Seed of everything random: the same seed gives the same adapter.", json_schema_extra=COMMON
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, slower.", json_schema_extra=COMMON
    )
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma loss weighting (5.0 is usual); off if unset.",
        json_schema_extra=COMMON,
    )
    noise_offset: float = Field(
        0.0,
        ge=0,
        description="Offset-noise strength (0.05-0.1 helps very dark/bright images).",
        json_schema_extra=COMMON,
    )
    timestep_sampling: Literal["uniform", "cubic"] = Field(
        "uniform",
        description="uniform over [0, T); cubic: t = (1 - u^3) T, mostly high noise, where layout is decided "
        "(diffusers' T2I-Adapter example; speeds up structure-following adapters such as ControlNets).",
    )
    # Losses and noise, under sd-scripts' names (trainers/core/diffusion.py has the math). Every default leaves the
    # step as it was: plain noise, every timestep, the MSE.
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2",
        description="l2: MSE; l1; huber: pseudo-Huber 2c(sqrt(d^2 + c^2) - c), MSE-like below c and L1-like above, "
        "robust to outlier images; smooth_l1: the same divided by c.",
    )
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr",
        description="huber/smooth_l1: how c varies with the timestep: constant huber_c; exponential from huber_scale "
        "at t=0 down to huber_c x huber_scale at t=T; snr (sd-scripts' default) from 1 at low noise to huber_c.",
    )
    huber_c: float = Field(0.1, gt=0, description="huber/smooth_l1: the threshold c (see huber_schedule).")
    huber_scale: float = Field(1.0, gt=0, description="huber/smooth_l1: multiplies c (constant and exponential).")
    debiased_estimation_loss: bool = Field(
        False,
        description="Weigh each timestep's loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) (v-prediction), as sd-scripts "
        "(Yu et al. 2024); composes with snr_gamma.",
    )
    multires_noise_iterations: int = Field(
        0, ge=0, description="Multi-resolution (pyramid) noise with this many levels (6-10 usual); 0 = off."
    )
    multires_noise_discount: float = Field(
        0.3, gt=0, le=1, description="Multires noise: level i is weighted discount^i (sd-scripts' default 0.3)."
    )
    ip_noise_gamma: float = Field(
        0.0, ge=0, description="Input-perturbation noise (Ning et al. 2023): extra noise on the input only; ~0.1."
    )
    ip_noise_gamma_random_strength: bool = Field(
        False, description="Input perturbation at a random strength in [0, ip_noise_gamma) each step."
    )
    min_timestep: int = Field(0, ge=0, le=999, description="Train on timesteps from this one (0 = the least noise).")
    max_timestep: int | None = Field(
        None, ge=1, le=1000, description="Train on timesteps below this one (exclusive); default: all (1000)."
    )
    zero_terminal_snr: bool = Field(
        False,
        description="Rescale the noise schedule so its last step is pure noise (Lin et al. 2024); validation samples "
        "with the same schedule. Needs a v-prediction base: with epsilon the last step has nothing to learn.",
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the trained model: the UNet (LoRA, DreamBooth) or the ControlNet (slow first "
        "step, faster after).",
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode: reduce-overhead also captures CUDA graphs (needs fixed shapes: one bucket, "
        "no gradient accumulation remainder); max-autotune searches kernels (minutes of compiling).",
    )
    channels_last: bool = Field(
        False,
        description="Hold the UNet (and ControlNet) in channels_last memory format: faster convolutions on "
        "tensor-core GPUs.",
    )
    fused_optimizer: bool = Field(
        False, description="optimizer adamw only: torch's fused AdamW, one kernel updating every tensor at once."
    )
    allow_tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere+ GPUs.")
    checkpointing_steps: int = Field(
        500, ge=1, description="Save a resumable checkpoint every N steps.", json_schema_extra=COMMON
    )
    checkpoints_total_limit: int | None = Field(3, ge=1, description="Keep only the last K checkpoints.")
    resume: Annotated[str | None, LocalPath()] = Field(
        None, description="'latest' or a checkpoint folder to resume from."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.fused_optimizer and self.optimizer != "adamw":
            raise ValueError(f"fused_optimizer is torch's fused AdamW: set optimizer: adamw (not {self.optimizer})")
        if self.torch_compile_mode != "default" and not self.torch_compile:
            raise ValueError("torch_compile_mode applies only with torch_compile: true")
        return self

    @model_validator(mode="after")
    def _check_loss_and_noise(self):
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(
                f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep}): timesteps are "
                "drawn from [min_timestep, max_timestep)"
            )
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise ValueError("ip_noise_gamma_random_strength needs ip_noise_gamma > 0 (its largest strength)")
        return self


# -- validation -----------------------------------------------------------------------------------------------------


class ToyTarget(_Section):
    """What the toy-world scorer should find for a prompt (toy base only): used to measure that a fine-tune learned."""

    prompt: str = Field(..., description="A prompt to render with the scorer's fixed seeds, e.g. 'a purple circle'.")
    color: str | None = Field(None, description="The colour its images must show (unchecked if unset).")
    shape: str | None = Field(None, description="The shape its images must show: circle, square or triangle.")


class ValidationConfig(_Section):
    """Fixed prompts x fixed seeds, base vs adapter, rendered with the same code as `sdtune sample`."""

    prompts: list[str] = Field(default_factory=list, description="Validation prompts.", json_schema_extra=COMMON)
    negative_prompt: str = Field("", description="Negative prompt for validation images.", json_schema_extra=COMMON)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1], description="One image per prompt and seed.", json_schema_extra=COMMON
    )
    num_inference_steps: int = Field(25, ge=1, description="Sampling steps.")
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance; default: the base's recommended (7.5 SD v1-5, 3 toy).",
        json_schema_extra=COMMON,
    )
    scheduler: SchedulerName = Field("default", description="Sampler; default = the base's own scheduler.")
    validation_steps: int = Field(
        0, ge=0, description="Render a grid every N steps (0 = only at the end).", json_schema_extra=COMMON
    )
    toy_score: list[ToyTarget] = Field(
        default_factory=list, description="Toy base only: prompts whose samples the toy-world scorer checks."
    )


# -- output ---------------------------------------------------------------------------------------------------------


# `register` is the natural key name, and it shadows only ABCMeta.register (unused on recipe sections): pydantic's
# notice about it says nothing to a user, so it is silenced for this one class.
warnings.filterwarnings("ignore", message='Field name "register" in "OutputConfig" shadows', category=UserWarning)


class OutputConfig(_Section):
    """Where the run writes, and what."""

    dir: Annotated[PathText, LocalPath(writes=True)] = Field(
        "output",
        validation_alias=AliasChoices("dir", "output_dir"),
        description="Run folder (alias output_dir).",
        json_schema_extra=COMMON,
    )
    name: str = Field(
        "sdtune-lora",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Adapter name, used for file names.",
        json_schema_extra=COMMON,
    )
    report_to: Literal["tensorboard", "none"] = Field("tensorboard", description="Where to log loss, lr and images.")
    save_precision: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="dtype of the saved adapter files.")
    export_kohya: bool = Field(True, description="Also write <name>.safetensors in kohya/A1111 format.")
    export_check: bool = Field(True, description="After each save, reload every format and compare images.")
    register: bool = Field(
        True, description="At the end, add the adapter to the registry ($SDTUNE_HOME, `sdtune adapters list`)."
    )
    overwrite: bool = Field(
        False,
        description="Start afresh in a dir that holds an earlier run, removing its checkpoints, samples, logs and "
        "manifest (otherwise refused, so two runs never mix; train.resume continues one instead).",
    )


# -- recipe ---------------------------------------------------------------------------------------------------------


class Recipe(_Section):
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

    def to_dict(self) -> dict:
        """The fully resolved recipe (every default filled in), as plain YAML-able data."""
        return self.model_dump(mode="json")


# -- loading, overrides and one-line errors -------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. Under YAML 1.1 `mixed_precision: no` would be False, not "no"."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    path, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    # YAML 1.1 reads "1e-4" as a string; a number the user meant is a number (unless quoted: `name="123"`).
    if isinstance(value, str) and not raw.strip().startswith(("'", '"')):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Sets `section.key=value` strings into the raw recipe dict (values parsed as YAML)."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if isinstance(child, str) and key == "base":  # `base: toy` shorthand, now addressed by key
                child = {"pretrained_model_name_or_path": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(keys[:-1])} is not a section")
            node[key] = child
            node = child
        for other in _other_spellings(keys):  # `train.lr=` replaces the file's `learning_rate:`
            node.pop(other, None)
        node[keys[-1]] = value
    return data


def override_text(path: str, value: Any) -> str:
    """`path=value` that `apply_overrides` reads back as exactly `value` (the studio's form writes its changes so):
    JSON for numbers, lists, null and booleans, and a string as typed unless YAML would read it as something else
    (`123`, `yes: no`, ` padded`), then quoted."""
    if isinstance(value, str) and _parse_override(f"{path}={value}")[1] == value:
        return f"{path}={value}"
    return f"{path}={json.dumps(value, ensure_ascii=False)}"


def _other_spellings(keys: list[str]) -> set[str]:
    """The other names of the field at `section.key` (its AliasChoices), e.g. {"learning_rate"} for train.lr."""
    if len(keys) != 2 or keys[0] not in Recipe.model_fields:
        return set()
    names = set()
    for model in _unwrap(Recipe.model_fields[keys[0]].annotation):
        for name, field in model.model_fields.items():
            choices = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
            if keys[1] in (name, *choices):
                names |= {name, *(c for c in choices if isinstance(c, str))}
    return names - {keys[1]}


def _unwrap(annotation):
    """The model classes an annotation may hold (through Optional, Union, Annotated, list)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        return [cls for arg in typing.get_args(annotation) for cls in _unwrap(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _keys_at(loc: tuple) -> list[str]:
    """Valid key names of the section at `loc` (for suggestions)."""
    models = [Recipe]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = []
        for model in models:
            if part in model.model_fields:
                nxt.extend(_unwrap(model.model_fields[part].annotation))
            else:  # a discriminated-union tag such as 'lora' in ('method', 'lora', 'rank')
                nxt.extend(m for m in [model] if getattr(model.model_fields.get("type"), "default", None) == part)
        models = nxt or models
    keys = set()
    for model in models:
        for name, field in model.model_fields.items():
            keys.add(name)
            if isinstance(field.validation_alias, AliasChoices):
                keys.update(c for c in field.validation_alias.choices if isinstance(c, str))
    return sorted(keys)


_METHOD_TAGS = {"lora", "dreambooth", "controlnet"}


def _format_error(error: dict, source: str) -> str:
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in _METHOD_TAGS:
        loc = (loc[0],) + loc[2:]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(_keys_at(loc[:-1]))})"
        return f"{source}: {path}: unknown key{hint}"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return f"{source}: {message}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return f"{source}: {path}: {message}{shown}"


def recipe_from_dict(data: dict | None, source: str = "recipe") -> Recipe:
    """Validates raw recipe data; raises `RecipeError` with one line for the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (base, data, method, train, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(exc.errors()[0], source)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe, applies `section.key=value` overrides, and validates it.

    Args:
        path: the YAML file; None starts from all defaults.
        overrides: strings such as `train.lr=1e-4` or `output.dir=/tmp/run`.
    """
    source = "recipe" if path is None else str(path)
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                f"{path}: " + ("a folder, not a recipe file" if path.is_dir() else "recipe file not found")
            )
        try:
            data = _yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (base, data, method, train, ...)")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source)
