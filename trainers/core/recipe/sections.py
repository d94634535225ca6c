"""The recipe's sections other than `method`: data, train, output, and what they all share.

Every section is a `Section`: unknown keys are refused, values are checked on assignment too, and every field carries
one help string (`description=`), which the studio's Train form shows. `base` is `adapters.base.BaseModelConfig`,
with base loading; `method` is in `methods.py`, `validation` in `samples.py`; the whole recipe, with its checks
across sections, in `schema.py`.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from sdtune.adapters.base import LocalPath, PathText
from sdtune.adapters.errors import SdtuneError


class RecipeError(SdtuneError, ValueError):
    """A recipe that cannot run; the message is one line naming the file, key path and what to do."""


class Section(BaseModel):
    """A recipe section: strict (unknown keys and bad values refused, on assignment too), no inf or NaN."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)


# Hints for the studio's Train form (studio/recipe_form.py), kept on the fields so that a new key reaches the form by
# itself: a COMMON key is shown open, every other one is folded under its section's "more settings"; an AS_TEXT float
# is typed as text, since a number box would show a learning rate of 5e-7 as 0.
COMMON = {"common": True}
AS_TEXT = {"as_text": True}

# -- data -----------------------------------------------------------------------------------------------------------


class SubsetConfig(Section):
    """One folder of a dataset of several concepts: a `[[datasets.subsets]]` of sd-scripts' dataset config, under
    its names. A caption setting left unset takes the `data` section's."""

    image_dir: PathText = Field(..., description="The subset's folder of images, captions beside them.")
    num_repeats: int = Field(1, ge=1, description="Times each of its images is seen per epoch.")
    caption_extension: str | None = Field(None, description="Its caption files' extension (default: data's).")
    class_tokens: str | None = Field(
        None, description="Caption of its images that have no caption file, e.g. 'sks dog' (kohya's class_tokens)."
    )
    trigger_word: str | None = Field(None, description="Its {trigger} in data.caption_template (default: data's).")
    shuffle_caption: bool | None = Field(None, description="Shuffle its captions' tags (default: data's).")
    keep_tokens: int | None = Field(None, ge=0, description="With shuffle_caption: leading tags kept in place.")
    caption_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="Probability of an empty caption for its images (default: data's)."
    )
    is_reg: bool = Field(
        False,
        description="Regularization images (kohya's meaning: images of the class): each training image is paired "
        "with one of them, whose loss counts at method.prior_loss_weight.",
    )

    def caption_keys(self) -> dict:
        """The caption settings this subset sets, under the `data` section's names."""
        keys = ("caption_extension", "trigger_word", "shuffle_caption", "keep_tokens", "caption_dropout_rate")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


class DataConfig(Section):
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
    subsets: list[SubsetConfig] = Field(
        default_factory=list,
        description="Instead of train_data_dir: several folders, each with its repeats and caption settings, some "
        "maybe regularization (is_reg), as sd-scripts' dataset config. One per line: {image_dir: FOLDER, "
        "num_repeats: 2, class_tokens: sks dog}.",
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

    # Masked loss, under kohya's names: the loss of each latent pixel is weighted by a mask (white = learn, black =
    # ignore), so a subject can be taught without what stands around it (data/masks.py).
    masked_loss: bool = Field(
        False,
        description="Weigh the loss per pixel by a mask (white = learn, black = ignore, grey = partial): the alpha "
        "channel (alpha_mask) or a same-name file in mask_dir. `sdtune annotate --kind mask` makes masks.",
    )
    alpha_mask: bool = Field(
        False, description="masked_loss: the mask is each image's alpha channel (an image without one learns whole)."
    )
    mask_dir: PathText | None = Field(
        None,
        description="masked_loss: a folder with one mask per image, same relative path and stem, any image type, "
        "the image's size.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("min_bucket_reso must not exceed max_bucket_reso")
        if self.keep_tokens and not self.shuffle_caption:
            raise ValueError("keep_tokens only applies with shuffle_caption: true")
        _check_mask_keys(self)
        if self.subsets and (self.train_data_dir is not None or self.dataset_name is not None):
            raise ValueError("subsets replace train_data_dir and dataset_name; set subsets alone")
        if self.subsets and all(subset.is_reg for subset in self.subsets):
            raise ValueError("subsets: every subset is is_reg; at least one must hold the training images")
        return self

    def for_subset(self, index: int) -> DataConfig:
        """This section as it applies to subset `index`: its folder, repeats and caption settings."""
        subset = self.subsets[index]
        update = {"train_data_dir": subset.image_dir, "repeats": subset.num_repeats, "subsets": []}
        return self.model_copy(update={**update, **subset.caption_keys()})


def _check_mask_keys(data: DataConfig) -> None:
    """masked_loss needs exactly one mask source, and a mask source without masked_loss would be silently unused."""
    sources = [key for key in ("alpha_mask", "mask_dir") if getattr(data, key) not in (None, False)]
    if data.masked_loss and len(sources) != 1:
        raise ValueError(
            "masked_loss needs one mask source: alpha_mask: true (the alpha channel) or mask_dir: FOLDER"
            + (" (not both)" if sources else "")
        )
    if sources and not data.masked_loss:
        raise ValueError(f"{sources[0]} is only read with masked_loss: true; set it, or remove {sources[0]}")


# -- train ----------------------------------------------------------------------------------------------------------

# train.optimizer_type: the names sdtune knows (trainers/core/optimizers.py builds them), how kohya spells some of them
# (its optimizer_type is case-insensitive: AdamW8bit, Prodigy, AdamWScheduleFree ...), and the free form.
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "schedulefree_adamw", "lion")
OPTIMIZER_SPELLINGS = {
    **{name: name for name in OPTIMIZERS},
    "adamwschedulefree": "schedulefree_adamw",
    "schedulefree.adamwschedulefree": "schedulefree_adamw",
    "prodigyopt.prodigy": "prodigy",
    "lion_pytorch.lion": "lion",
}
DOTTED_NAME = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+"


def parse_optimizer_args(value):
    """`optimizer_args` as a mapping: YAML gives one; kohya's TOML and command line give ['key=value', ...], each value
    a Python literal ('betas=0.9,0.99' is a tuple) or else a string; the studio's text box gives a YAML flow mapping."""
    if isinstance(value, str):
        import yaml

        value = yaml.safe_load(value) if value.strip() else {}
    if not isinstance(value, list):
        return value
    parsed = {}
    for item in value:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"item {item!r} is not key=value (e.g. 'weight_decay=0.1')")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            parsed[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed[key] = raw
    return parsed


class TrainConfig(Section):
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
    # kohya's names (optimizer_type, optimizer_args); `optimizer` is sdtune's earlier name. Prodigy estimates the
    # step size itself: learning_rate is a multiplier of it (keep 1.0) and a warmup only delays it (keep 0); the
    # preflight warns otherwise. schedulefree_adamw needs no schedule (lr_scheduler: constant; lr_warmup_steps
    # becomes its own warmup); its exported weights are its averaged point (optimizer.eval()), not the last step.
    optimizer_type: str = Field(
        "adamw",
        validation_alias=AliasChoices("optimizer_type", "optimizer"),
        description="adamw (torch), adamw8bit (bitsandbytes: 4x smaller states), adafactor (transformers), prodigy "
        "(prodigyopt: finds its own lr; set lr 1.0, no warmup), schedulefree_adamw (schedulefree: no lr schedule), "
        "lion (lion-pytorch: 1 state, use a 3-10x smaller lr), or any installed class as module.ClassName "
        "(alias optimizer).",
        json_schema_extra=COMMON,
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the optimizer, e.g. {d_coef: 2, use_bias_correction: true}; kohya's list "
        "form ['weight_decay=0.1', 'betas=0.9,0.99'] is read too. They override the adam_* keys.",
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

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _optimizer_name(cls, value):
        if not isinstance(value, str):
            return value
        name = OPTIMIZER_SPELLINGS.get(value.strip().lower(), value.strip())
        if name not in OPTIMIZERS and not re.fullmatch(DOTTED_NAME, name):
            raise ValueError(f"expected one of {', '.join(OPTIMIZERS)} or a module.ClassName (e.g. torch.optim.SGD)")
        return name

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _optimizer_args(cls, value):
        return parse_optimizer_args(value)

    @model_validator(mode="after")
    def _check(self):
        if self.fused_optimizer and self.optimizer_type != "adamw":
            raise ValueError(
                f"fused_optimizer is torch's fused AdamW: set optimizer_type: adamw (not {self.optimizer_type})"
            )
        if self.optimizer_type == "schedulefree_adamw" and self.lr_scheduler != "constant":
            raise ValueError(
                f"optimizer_type schedulefree_adamw needs no lr schedule: set lr_scheduler: constant (not "
                f"{self.lr_scheduler}); lr_warmup_steps becomes the optimizer's own warmup"
            )
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


# -- output ---------------------------------------------------------------------------------------------------------

# `register` is the natural key name, and it shadows only ABCMeta.register (unused on recipe sections): pydantic's
# notice about it says nothing to a user, so it is silenced for this one class.
warnings.filterwarnings("ignore", message='Field name "register" in "OutputConfig" shadows', category=UserWarning)


class OutputConfig(Section):
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
    report_to: Literal["tensorboard", "wandb", "all", "none"] = Field(
        "tensorboard",
        description="Where to log loss, lr and validation grids: tensorboard (<dir>/logs), wandb (Weights & Biases, "
        "an extra: pip install 'sdtune[wandb]'), all (both) or none. metrics.jsonl is always written.",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="report_to wandb: offline keeps the wandb run in <dir>/logs/wandb (no network, no account; "
        "upload it later with `wandb sync FOLDER`, the log says which); online streams it (after `wandb login`).",
    )
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

    @field_validator("report_to")
    @classmethod
    def _wandb_installed(cls, value):
        # wandb is an optional extra: found missing here, at the recipe check, not after the models loaded
        if value in ("wandb", "all") and not wandb_installed():
            raise ValueError("wandb is not installed: pip install 'sdtune[wandb]'")
        return value


def wandb_installed() -> bool:
    """Whether `import wandb` would find the package (without importing it: that takes a second)."""
    import importlib.util

    return importlib.util.find_spec("wandb") is not None
