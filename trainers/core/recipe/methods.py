"""The recipe's `method` section: which training method, with its settings, and the script that trains it.

`method.type` picks the class (a discriminated union, `Method`); a recipe without a type is a LoRA. A new method is
a class here and a line in `TRAINERS` (docs/architecture.md, "Where new things go").
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from sdtune.adapters.base import LocalPath, PathText

from .sections import AS_TEXT, COMMON, Section


class EmaParams(Section):
    """An exponential moving average of the trained weights, as diffusers' `EMAModel` (every method has it)."""

    use_ema: bool = Field(
        False, description="Keep an EMA of the trained weights; the EMA is what gets saved (and shown, see below)."
    )
    ema_decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="EMA decay per optimizer step (the largest one, with ema_warmup)."
    )
    ema_warmup: bool = Field(
        False,
        description="Grow the decay as 1 - (1 + step/ema_inv_gamma)^-ema_power up to ema_decay, so the EMA follows "
        "the early steps closely (diffusers' use_ema_warmup).",
    )
    ema_inv_gamma: float = Field(1.0, gt=0.0, description="ema_warmup: inverse multiplicative factor of the steps.")
    ema_power: float = Field(
        2 / 3, gt=0.0, description="ema_warmup: its power (2/3 for long runs, 3/4 for short ones, as diffusers)."
    )
    ema_update_after_step: int = Field(0, ge=0, description="The EMA copies the weights until this step.")
    ema_validation: bool = Field(
        True, description="use_ema: validation grids render from the EMA weights (what is saved); false: the trained."
    )


# One block weight for each of the 12 input (down) or output (up) blocks of SD v1-5's original layout, as sd-scripts'
# down_lr_weight/up_lr_weight; its names make a curve over the 12 (`name+base` adds base to each).
BLOCKS_PER_SIDE = 12
BLOCK_WEIGHT_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_weights(value):
    """down_lr_weight/up_lr_weight as one number or 12: kohya writes '1,1,0.5,...' (empty = 0) or a curve name."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return read_flow(text)
    name, _, base = text.partition("+")
    if name in BLOCK_WEIGHT_CURVES:
        return weight_curve(name, float(base or 0))
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [float(part) if part else 0.0 for part in parts]
    except ValueError:
        raise ValueError(
            f"{value!r}: give one number, 12 numbers, or a curve: {', '.join(BLOCK_WEIGHT_CURVES)} (name+0.5 adds 0.5)"
        ) from None
    return numbers[0] if len(numbers) == 1 else numbers


def weight_curve(name: str, base: float) -> list[float]:
    """sd-scripts' named block-weight curves over the 12 blocks, from the input (or output) side's first block."""
    import math

    ramp = [i / (BLOCKS_PER_SIDE - 1) for i in range(BLOCKS_PER_SIDE)]
    curve = {
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * BLOCKS_PER_SIDE,
    }[name]
    return [w + base for w in curve]


def read_flow(text: str):
    import yaml

    return yaml.safe_load(text)


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
    # LyCORIS's algorithms (its `algo` network arg): the same layers (preset), another factorization of the update.
    algo: Literal["lora", "loha", "lokr"] = Field(
        "lora",
        description="The update's form (LyCORIS's algo): lora = B @ A; loha = (A1 @ B1) * (A2 @ B2), a Hadamard "
        "product of two rank-r pairs (rank up to r^2 for the parameters of 2r); lokr = kron(W1, W2), a Kronecker "
        "product (few parameters, full rank). Written in the LyCORIS layout A1111, ComfyUI and Forge load.",
        json_schema_extra=COMMON,
    )
    factor: int = Field(
        -1,
        description="lokr: the size of the Kronecker product's small factor (W1 is factor x factor where the layer's "
        "width divides); -1 splits each side near its square root (LyCORIS's default).",
    )
    decompose_both: bool = Field(
        False, description="lokr: also write the small factor W1 as a rank-r product, not only W2 (LyCORIS's name)."
    )
    train_text_encoder: bool = Field(
        False, description="Also train a LoRA on the text encoder's attention.", json_schema_extra=COMMON
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, description="Learning rate of the text-encoder LoRA.", json_schema_extra={**COMMON, **AS_TEXT}
    )
    # Block-wise learning rates (sd-scripts' LoRA network args): a block's lr is unet_lr x its weight; 0 freezes it.
    # Blocks as SD v1-5's original layout counts them: 12 input blocks (the first, conv_in, holds no LoRA), the
    # middle one, 12 output blocks. A weight for a block the UNet does not have (the toy base) does nothing.
    unet_lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the UNet (kohya's name). Default: train.learning_rate.",
        json_schema_extra=AS_TEXT,
    )
    down_lr_weight: float | list[float] | None = Field(
        None,
        description="lr weight of the UNet's 12 input blocks: one number for all, 12 numbers, or a curve (cosine, "
        "sine, linear, reverse_linear, zeros; name+0.5 adds 0.5); 0 freezes a block.",
    )
    mid_lr_weight: float | None = Field(None, ge=0, description="lr weight of the UNet's middle block; 0 freezes it.")
    up_lr_weight: float | list[float] | None = Field(
        None, description="lr weight of the UNet's 12 output blocks, as down_lr_weight."
    )

    @field_validator("down_lr_weight", "up_lr_weight", mode="before")
    @classmethod
    def _block_weights(cls, value):
        return block_weights(value)

    @field_validator("down_lr_weight", "up_lr_weight")
    @classmethod
    def _twelve_blocks(cls, value):
        weights = value if isinstance(value, list) else [value] if value is not None else []
        if isinstance(value, list) and len(value) != BLOCKS_PER_SIDE:
            raise ValueError(
                f"{len(value)} weights given: give one number for every block, or exactly {BLOCKS_PER_SIDE}"
            )
        if any(w < 0 for w in weights):
            raise ValueError("a block's lr weight must be 0 (frozen) or more")
        return value

    @model_validator(mode="after")
    def _check_algo(self):
        if self.algo != "lora" and self.use_dora:
            raise ValueError(f"use_dora is a LoRA form (algo: lora); algo {self.algo} has no DoRA")
        if self.algo != "lora" and self.lora_dropout:
            raise ValueError(f"lora_dropout is LoRA's dropout (algo: lora); algo {self.algo} trains without it")
        if self.algo != "lokr" and (self.factor != -1 or self.decompose_both):
            raise ValueError("factor and decompose_both are LoKr settings; set algo: lokr, or leave them out")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor {self.factor}: give a positive size, or -1 (split near the square root)")
        return self

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)


class TokenParams(Section):
    """A new token for the text encoder (diffusers' names): textual inversion's, and pivotal tuning's."""

    placeholder_token: str = Field(
        "<sks>",
        pattern=r"^\S+$",
        description="The new token the vectors stand for, e.g. <zq>; a caption (or data.caption_template) holds it. "
        "It must not be a word the tokenizer already knows.",
        json_schema_extra=COMMON,
    )
    initializer_token: str = Field(
        "object",
        pattern=r"^\S(.*\S)?$",
        description="Existing word(s) the new vectors start from: vector i takes the vector of its token i mod n "
        "(sd-scripts' init_word rule). One word near the concept seeds them all; the rare word a LoRA would use (<ps> "
        "is 3 tokens, for num_vectors: 3) starts the new token where that word stood.",
        json_schema_extra=COMMON,
    )
    num_vectors: int = Field(
        1,
        ge=1,
        le=75,
        description="Vectors for the placeholder: more can hold more, but fit fewer words in a prompt.",
        json_schema_extra=COMMON,
    )


class PivotalParams(TokenParams):
    """Pivotal tuning on a LoRA (trainers/core/pivotal.py): a new token's vectors train with the LoRA."""

    pivotal: bool = Field(
        False,
        description="Also learn new token vectors for placeholder_token with the LoRA (pivotal tuning, diffusers' "
        "train_text_encoder_ti); the captions (or data.caption_template) hold the token, the files carry it.",
        json_schema_extra=COMMON,
    )
    embedding_lr: float | None = Field(
        None,
        gt=0,
        description="pivotal: learning rate of the token vectors (default: train.learning_rate).",
        json_schema_extra=AS_TEXT,
    )
    embedding_only_steps: int = Field(
        0, ge=0, description="pivotal: train the vectors alone (the LoRA off) for the first N steps, then both."
    )

    @model_validator(mode="after")
    def _pivotal_keys(self):
        if self.embedding_only_steps and not self.pivotal:
            raise ValueError("embedding_only_steps needs pivotal: true")
        return self


class LoraMethod(LoraParams, PivotalParams, EmaParams):
    """LoRA over a frozen base (trainers/lora.py)."""

    type: Literal["lora"] = Field("lora", description="lora: a LoRA over the frozen base (trainers/lora.py).")
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="Weight of the loss of the regularization images (data.subsets with is_reg)."
    )


class DreamBoothMethod(LoraParams, PivotalParams, EmaParams):
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
    extract_lora_rank: int | None = Field(
        32, ge=1, description="Full mode: also write a LoRA of this rank, extracted from the weight delta by SVD."
    )
    save_single_file: bool = Field(True, description="Full mode: also write <name>.safetensors (original SD layout).")

    @model_validator(mode="after")
    def _check(self):
        if not self.pivotal and self.identifier not in self.instance_prompt.split():  # pivotal: the new token is it
            raise ValueError(
                f"instance_prompt {self.instance_prompt!r} does not contain the identifier {self.identifier!r}; "
                f"write e.g. 'a photo of {self.identifier} dog', or set method.identifier"
            )
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError("with_prior_preservation needs class_prompt, e.g. class_prompt: 'a photo of dog'")
        if self.text_encoder_steps is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_steps needs train_text_encoder: true")
        if self.algo != "lora" and not self.lora:
            raise ValueError(f"algo {self.algo} is an adapter form: set lora: true (DreamBooth-LoRA), or algo: lora")
        if self.pivotal and (not self.lora or self.placeholder_token not in self.instance_prompt.split()):
            raise ValueError(
                f"pivotal needs lora: true and the placeholder_token {self.placeholder_token!r} in instance_prompt, "
                f"e.g. 'a photo of {self.placeholder_token} dog'"
            )
        return self


class ControlNetMethod(EmaParams):
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


class TextualInversionMethod(TokenParams, EmaParams):
    """Textual inversion: new token vectors learned over a frozen base (trainers/textual_inversion.py).

    `num_vectors` rows are added to the text encoder's token embeddings for `placeholder_token` (diffusers' names:
    `<zq>`, `<zq>_1`, ...), each starting as `initializer_token`'s vector; only they train, so the result is a few
    kilobytes that A1111 (`embeddings/`), ComfyUI (`embedding:name`) and diffusers (`load_textual_inversion`) load.
    """

    type: Literal["textual_inversion"] = Field(
        "textual_inversion",
        description="textual_inversion: new token vectors over the frozen base (trainers/textual_inversion.py).",
    )


class PreferenceMethod(LoraParams, EmaParams):
    """Preference tuning from A/B votes with the Diffusion-DPO loss (trainers/preference.py).

    A new LoRA learns, over a frozen reference (the base with `reference`'s adapters merged in), to denoise the
    voted winners better and the losers worse than the reference does; `beta` ties it to the reference.
    """

    type: Literal["preference"] = Field(
        "preference", description="preference: a LoRA from A/B votes, Diffusion-DPO (trainers/preference.py)."
    )
    comparisons: list[str] = Field(
        default_factory=list,
        description="A/B comparison ids whose votes train (sdtune ab list); several are pooled. Each voted pair is "
        "a (prompt, winner, loser) triple; ties and unvoted pairs are left out.",
        json_schema_extra=COMMON,
    )
    reference: str = Field(
        "toy",
        description="The reference SPEC, BASE[+ADAPTER[:WEIGHT]]... as in sdtune ab: frozen, merged into the base; "
        "the new LoRA goes on top of it. Its base must be the recipe's base and the comparisons' base.",
        json_schema_extra=COMMON,
    )
    beta: float = Field(
        5000.0,
        gt=0,
        description="DPO's beta: how far the tuned model may move from the reference (larger: less). The loss is "
        "-log sigmoid(-beta/2 x (model's winner-minus-loser error - the reference's)), the authors' code; 5000 is "
        "their SD1.5 setting (diffusers' DPO example's default 2500 is the same loss at half the beta).",
        json_schema_extra=COMMON,
    )
    min_pairs: int = Field(8, ge=1, description="Fewest decisive votes (pairs with a winner) a run accepts.")

    @field_validator("train_text_encoder")
    @classmethod
    def _unet_only(cls, value):
        # the reference's text states would need the text encoder's LoRA switched off too: the UNet's alone trains
        if value:
            raise ValueError("preference tuning trains the UNet's LoRA only; set it false")
        return value


Method = Annotated[
    LoraMethod | DreamBoothMethod | ControlNetMethod | TextualInversionMethod | PreferenceMethod,
    Field(discriminator="type"),
]

# method.type -> the script that trains it: every method of `Method` has one (tests/test_recipe.py checks), so the
# worker, the jobs and `sdtune doctor` look a recipe's trainer up without a fallback.
TRAINERS = {
    "lora": "trainers/lora.py",
    "dreambooth": "trainers/dreambooth.py",
    "controlnet": "trainers/controlnet.py",
    "textual_inversion": "trainers/textual_inversion.py",
    "preference": "trainers/preference.py",
}


def trainer_for(method_type: str) -> str:
    """Where a method trains, as the end of a one-line message: `run trainers/lora.py`."""
    return f"run {TRAINERS[method_type]}"
