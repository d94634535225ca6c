"""The key table of `sdtune recipe from-kohya`: every sd-scripts argument and kohya_ss GUI field it knows, and what
each becomes in an sdtune recipe. Torch-free; `kohya_import.py` reads the files and applies the table.

A rule is one of three kinds:
    Map(("train.learning_rate",), float)   the sdtune key(s) it means, first one the recipe schema has wins, and a
                                           converter when the value changes form; a key the schema lacks (a feature
                                           still to land) is reported "not supported" until it exists
    Ignore("why")                           no effect in sdtune (attention kernels, data-loader workers, ...)
    Unsupported("why")                      changes training, and sdtune cannot do it (yet)

Names are sd-scripts' (`library/train_util.py`, `train_network.py`, `train_db.py`, `library/config_util.py`) and
kohya_ss's GUI presets (`presets/lora/*.json`), read from their repositories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Skip(Exception):  # noqa: N818 - an outcome, not an error: the key goes to a report list
    """Raised by a converter: this value is not mapped. `kind` is "ignored" or "not supported"."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


@dataclass(frozen=True)
class Map:
    to: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None
    note: str = ""  # why the value changes form, written beside the key in the recipe


@dataclass(frozen=True)
class Ignore:
    why: str


@dataclass(frozen=True)
class Unsupported:
    why: str


Rule = Map | Ignore | Unsupported


# -- value converters: GUI presets hold numbers as strings ("0.0001", "1234"); a bad one names itself --------------


def to_bool(value):
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def to_int(value):
    number = float(value)
    if number != int(number):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(number)


def to_float(value):
    return float(value)


def first_float(value):
    """sd-scripts takes `text_encoder_lr` as a list (one per text encoder); SD v1-5 has one."""
    if isinstance(value, list):
        if len(value) != 1:
            raise Skip("not supported", "one learning rate per text encoder; SD v1-5 has one")
        value = value[0]
    return float(value)


def resolution(value):
    """`512`, `"512"`, `"512,512"` or `[512, 512]`: sdtune trains at one square area (buckets of ~resolution^2)."""
    parts = value if isinstance(value, list) else str(value).replace("x", ",").split(",")
    sides = [to_int(p) for p in parts if str(p).strip()]
    if len(set(sides)) != 1:
        raise Skip("not supported", f"{value!r} is not square; sdtune trains at one size: set data.resolution")
    return sides[0]


def precision(value):
    names = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    if str(value) not in names:
        raise ValueError(f"expected float, fp16 or bf16, got {value!r}")
    return names[str(value)]


def mixed_precision(value):
    if str(value) not in ("no", "fp16", "bf16"):
        raise Skip("not supported", f"{value!r}: sdtune takes no, fp16 or bf16")
    return str(value)


# sd-scripts' optimizer_type names (case-insensitive there) -> sdtune's train.optimizer values. A value sdtune does
# not have yet fails the schema check and is reported "not supported" until it lands.
OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "adafactor": "adafactor",
    "lion": "lion",
    "prodigy": "prodigy",
    "adamwschedulefree": "schedulefree_adamw",
    "schedulefree_adamw": "schedulefree_adamw",
}


def optimizer(value):
    name = str(value).strip()
    if name.lower() in OPTIMIZERS:
        return OPTIMIZERS[name.lower()]
    if "." in name:  # sd-scripts' free form, `module.ClassName`
        return name
    raise Skip("not supported", f"optimizer {name!r}: sdtune has {', '.join(sorted(set(OPTIMIZERS.values())))}")


def sampler(value):
    names = {"ddim": "ddim", "euler": "euler", "euler_a": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a",
             "pndm": "pndm", "dpmsolver++": "dpm++2m", "k_dpm_2": None}  # fmt: skip
    if names.get(str(value).lower()) is None:
        raise Skip("not supported", f"sampler {value!r}: sdtune samples with ddim, euler, euler_a, dpm++2m or pndm")
    return names[str(value).lower()]


def report_to(value):
    if str(value) not in ("tensorboard", "wandb"):
        raise Skip("not supported", f"{value!r}: sdtune reports to tensorboard or wandb")
    return str(value)


def block_weights(value):
    """`down_lr_weight`: one number or a comma list (one per block), as sd-scripts' LoRA network args."""
    numbers = [float(p) for p in str(value).split(",") if p.strip()]
    return numbers[0] if len(numbers) == 1 else numbers


def only_off(why: str):
    """A flag sdtune cannot honour when on; off it changes nothing."""

    def convert(value):
        if to_bool(value):
            raise Skip("not supported", why)
        raise Skip("ignored", "off, as in sdtune")

    return convert


def only_if(expected, why: str):
    """A setting whose one value (kohya's default) is what sdtune always does; any other is not supported."""

    def convert(value):
        if str(value) == str(expected):
            raise Skip("ignored", f"{expected} is what sdtune does")
        raise Skip("not supported", why)

    return convert


_ATTENTION = Ignore("sdtune always uses PyTorch's scaled-dot-product attention")
_LOADER = Ignore("sdtune encodes every image and caption once and trains from memory: no data-loader workers")
_NOT_SD15 = Ignore("an SD3/FLUX/SDXL setting; SD v1-5 has no such part")
_EPOCHS = "sdtune counts optimizer steps, not epochs: set train.max_train_steps"
_HUB = Ignore("sdtune publishes after the run (`sdtune publish`), never from the trainer")
_LOG_NAMES = Ignore("sdtune logs into the run folder's logs/ and names runs after output.name")

# -- sd-scripts arguments (train_network.py, train_db.py and library/train_util.py) --------------------------------

SD_SCRIPTS: dict[str, Rule] = {
    # the base model
    "pretrained_model_name_or_path": Map(("base.pretrained_model_name_or_path",), str),
    "v2": Map((), only_off("SD 2.x: sdtune trains SD v1-5")),
    "v_parameterization": Ignore("sdtune reads the prediction type from the base's scheduler config"),
    "vae": Map(("base.vae",), str),
    "tokenizer_cache_dir": Ignore("the tokenizer comes with the base"),
    "clip_skip": Map(("train.clip_skip",), to_int),
    "max_token_length": Map((), only_if(75, "longer prompts than CLIP's 77 tokens")),
    "no_half_vae": Ignore("sdtune encodes latents once with the VAE in full precision"),
    # the optimizer and its schedule
    "optimizer_type": Map(("train.optimizer_type",), optimizer),
    "use_8bit_adam": Map(("train.optimizer_type",), lambda v: "adamw8bit" if to_bool(v) else _off()),
    "use_lion_optimizer": Map(("train.optimizer_type",), lambda v: "lion" if to_bool(v) else _off()),
    "learning_rate": Map(("train.learning_rate",), to_float),
    # unet_lr: its own key where the schema has one, else the learning rate (which in sdtune is the U-Net's)
    "unet_lr": Map(("method.unet_lr", "train.unet_lr", "train.learning_rate"), to_float, "the U-Net's lr"),
    "text_encoder_lr": Map(("method.text_encoder_lr", "train.text_encoder_lr"), first_float),
    "learning_rate_te": Map(("method.text_encoder_lr", "train.text_encoder_lr"), to_float),
    "max_grad_norm": Map(("train.max_grad_norm",), to_float),
    "optimizer_args": Map(("train.optimizer_args",)),  # expanded key by key in kohya_import
    "lr_scheduler": Map(("train.lr_scheduler",), str),
    "lr_scheduler_type": Unsupported("a custom scheduler class; sdtune has the diffusers schedules"),
    "lr_scheduler_args": Unsupported("arguments of a custom scheduler"),
    "lr_warmup_steps": Map(("train.lr_warmup_steps",), to_float),  # a ratio below 1: resolved in kohya_import
    "lr_decay_steps": Unsupported("a warmup-stable-decay schedule"),
    "lr_scheduler_num_cycles": Map(("train.lr_num_cycles",), to_int),
    "lr_scheduler_power": Map(("train.lr_power",), to_float),
    "lr_scheduler_timescale": Unsupported("an inverse-square-root schedule"),
    "lr_scheduler_min_lr_ratio": Unsupported("a floor under the cosine schedule"),
    "fused_backward_pass": Map((), only_off("the optimizer step inside backward (Adafactor)")),
    # steps, batches, precision
    "max_train_steps": Map(("train.max_train_steps",), to_int),
    "max_train_epochs": Unsupported(_EPOCHS),
    "train_batch_size": Map(("train.train_batch_size",), to_int),
    "gradient_accumulation_steps": Map(("train.gradient_accumulation_steps",), to_int),
    "gradient_checkpointing": Map(("train.gradient_checkpointing",), to_bool),
    "mixed_precision": Map(("train.mixed_precision",), mixed_precision),
    "full_fp16": Map((), only_off("fp16 trained weights without an fp32 copy")),
    "full_bf16": Map((), only_off("bf16 trained weights without an fp32 copy")),
    "fp8_base": Map((), only_off("an fp8 base")),
    "seed": Map(("train.seed",), to_int),
    "torch_compile": Map(("train.torch_compile",), to_bool),
    "dynamo_backend": Map((), only_if("inductor", "sdtune compiles with torch's default backend (inductor)")),
    "mem_eff_attn": _ATTENTION,
    "xformers": _ATTENTION,
    "sdpa": _ATTENTION,
    "lowram": Ignore("sdtune loads the base once, straight to the device"),
    "highvram": Ignore("sdtune keeps the cached latents in memory either way"),
    "ddp_timeout": Ignore("multi-GPU settings live in the accelerate config"),
    "ddp_gradient_as_bucket_view": Ignore("multi-GPU settings live in the accelerate config"),
    "ddp_static_graph": Ignore("multi-GPU settings live in the accelerate config"),
    "deepspeed": Map((), only_off("DeepSpeed")),
    "zero_stage": Ignore("a DeepSpeed setting"),
    "max_data_loader_n_workers": _LOADER,
    "persistent_data_loader_workers": _LOADER,
    # losses and noise (trainers/core/diffusion.py)
    "min_snr_gamma": Map(("train.snr_gamma",), to_float),
    "noise_offset": Map(("train.noise_offset",), to_float),
    "noise_offset_random_strength": Map(("train.noise_offset_random_strength",), to_bool),
    "adaptive_noise_scale": Map(("train.adaptive_noise_scale",), to_float),
    "multires_noise_iterations": Map(("train.multires_noise_iterations",), to_int),
    "multires_noise_discount": Map(("train.multires_noise_discount",), to_float),
    "ip_noise_gamma": Map(("train.ip_noise_gamma",), to_float),
    "ip_noise_gamma_random_strength": Map(("train.ip_noise_gamma_random_strength",), to_bool),
    "zero_terminal_snr": Map(("train.zero_terminal_snr",), to_bool),
    "min_timestep": Map(("train.min_timestep",), to_int),
    "max_timestep": Map(("train.max_timestep",), to_int),
    "loss_type": Map(("train.loss_type",), str),
    "huber_schedule": Map(("train.huber_schedule",), str),
    "huber_c": Map(("train.huber_c",), to_float),
    "huber_scale": Map(("train.huber_scale",), to_float),
    "debiased_estimation_loss": Map(("train.debiased_estimation_loss",), to_bool),
    "scale_v_pred_loss_like_noise_pred": Map((), only_off("v-prediction loss rescaling")),
    "v_pred_like_loss": Map(("train.v_pred_like_loss",), to_float),
    "weighted_captions": Map((), only_off("prompt weighting `(word:1.2)` in training captions")),
    "masked_loss": Map(("data.masked_loss", "train.masked_loss"), to_bool),
    "alpha_mask": Map(("data.alpha_mask",), to_bool),
    "conditioning_data_dir": Map(("data.mask_dir",), str, "with masked_loss: the folder of masks"),
    # checkpoints, output, logs
    "output_dir": Map(("output.dir",), str),
    "output_name": Map(("output.name",), str),
    "save_precision": Map(("output.save_precision",), precision),
    "save_model_as": Map((), only_if("safetensors", "sdtune writes .safetensors only")),
    "use_safetensors": Ignore("sdtune writes .safetensors only"),
    "save_every_n_steps": Map(("train.checkpointing_steps",), to_int),
    "save_every_n_epochs": Unsupported(_EPOCHS + " and train.checkpointing_steps"),
    "save_n_epoch_ratio": Unsupported(_EPOCHS),
    "save_last_n_epochs": Unsupported(_EPOCHS),
    "save_last_n_epochs_state": Unsupported(_EPOCHS),
    "save_last_n_steps": Unsupported("sdtune keeps the last K checkpoints: train.checkpoints_total_limit"),
    "save_last_n_steps_state": Unsupported("sdtune keeps the last K checkpoints: train.checkpoints_total_limit"),
    "save_state": Ignore("every sdtune checkpoint is a resumable state (train.checkpointing_steps)"),
    "save_state_on_train_end": Ignore("every sdtune checkpoint is a resumable state (train.checkpointing_steps)"),
    "resume": Unsupported("a kohya state folder is not an sdtune checkpoint; resume sdtune runs with train.resume"),
    "no_metadata": Map((), only_off("a LoRA file without metadata")),
    "training_comment": Ignore("sdtune writes the recipe and its scores into adapter.json instead"),
    "logging_dir": _LOG_NAMES,
    "log_prefix": _LOG_NAMES,
    "log_tracker_name": _LOG_NAMES,
    "wandb_run_name": _LOG_NAMES,
    "log_tracker_config": _LOG_NAMES,
    "log_config": Ignore("sdtune keeps the resolved recipe in the run folder"),
    "log_with": Map(("output.report_to",), report_to),
    "wandb_api_key": Ignore("a secret: not copied into a recipe; log in with `wandb login`"),
    "huggingface_repo_id": _HUB,
    "huggingface_repo_type": _HUB,
    "huggingface_path_in_repo": _HUB,
    "huggingface_token": Ignore("a secret: not copied into a recipe; `sdtune publish` reads HF_TOKEN"),
    "huggingface_repo_visibility": _HUB,
    "save_state_to_huggingface": _HUB,
    "resume_from_huggingface": _HUB,
    "async_upload": _HUB,
    # samples during training
    "sample_every_n_steps": Map(("validation.validation_steps",), to_int),
    "sample_every_n_epochs": Unsupported(_EPOCHS + " and validation.validation_steps"),
    "sample_at_first": Ignore("sdtune renders the base beside the adapter in every grid"),
    "sample_prompts": Map(("validation.prompts_file",), str),
    "sample_sampler": Map(("validation.scheduler",), sampler),
    # files sd-scripts reads beside this one
    "config_file": Map(()),  # a command line's: its keys are read with the flags (kohya_import.read_config)
    "output_config": Ignore("a command of sd-scripts, not a setting"),
    "dataset_config": Map(()),  # read as the dataset config unless --dataset-config names another (kohya_import)
    # the dataset (also the keys of a dataset config's [general], [[datasets]] and [[datasets.subsets]])
    "train_data_dir": Map(("data.train_data_dir",), str),
    "reg_data_dir": Map(("method.class_data_dir",), str),
    "prior_loss_weight": Map(
        ("method.prior_loss_weight", "data.prior_loss_weight", "train.prior_loss_weight"), to_float
    ),
    "in_json": Unsupported("sd-scripts' fine-tuning metadata; use captions beside the images or metadata.jsonl"),
    "dataset_repeats": Map(("data.repeats",), to_int),
    "resolution": Map(("data.resolution",), resolution),
    "enable_bucket": Map(("data.enable_bucket",), to_bool),
    "min_bucket_reso": Map(("data.min_bucket_reso",), to_int),
    "max_bucket_reso": Map(("data.max_bucket_reso",), to_int),
    "bucket_reso_steps": Map(("data.bucket_reso_steps",), to_int),
    "bucket_no_upscale": Map(("data.bucket_no_upscale",), to_bool),
    "batch_size": Map(("train.train_batch_size",), to_int),
    "cache_latents": Map(("data.cache_latents",), to_bool),
    "cache_latents_to_disk": Ignore("sdtune's latent cache is on disk (data.cache_dir) and reused across runs"),
    "vae_batch_size": Ignore("sdtune encodes latents one batch at a time, once"),
    "skip_cache_check": Ignore("sdtune's cache is keyed by file contents"),
    "cache_info": Ignore("sdtune's cache is keyed by file contents"),
    "cache_text_encoder_outputs": Ignore("sdtune encodes a frozen text encoder's captions once anyway"),
    "cache_text_encoder_outputs_to_disk": Ignore("sdtune encodes a frozen text encoder's captions once anyway"),
    "text_encoder_batch_size": Ignore("sdtune encodes a frozen text encoder's captions once anyway"),
    "disable_mmap_load_safetensors": Ignore("a loading detail of sd-scripts"),
    "debug_dataset": Ignore("sdtune's preflight prints the dataset before any model loads"),
    "network_multiplier": Map((), only_if(1.0, "a LoRA applied at another strength while training")),
    "image_dir": Map(("data.train_data_dir",), str),
    "num_repeats": Map(("data.repeats",), to_int),
    "is_reg": Map(("data.subsets.is_reg",), to_bool),
    "class_tokens": Map(("data.subsets.class_tokens",), str),
    "caption_extension": Map(("data.caption_extension",), str),
    "caption_extention": Map(("data.caption_extension",), str),
    "shuffle_caption": Map(("data.shuffle_caption",), to_bool),
    "keep_tokens": Map(("data.keep_tokens",), to_int),
    "caption_dropout_rate": Map(("data.caption_dropout_rate",), to_float),
    "caption_dropout_every_n_epochs": Map(("data.caption_dropout_every_n_epochs",), to_int),
    "caption_tag_dropout_rate": Map(("data.caption_tag_dropout_rate",), to_float),
    "caption_separator": Map((), only_if(",", "tags separated by something other than commas")),
    "keep_tokens_separator": Map(("data.keep_tokens_separator",), str),
    "secondary_separator": Map(("data.secondary_separator",), str),
    "enable_wildcard": Map((), only_off("{a|b} wildcards in captions")),
    "caption_prefix": Map(("data.caption_prefix",), str),
    "caption_suffix": Map(("data.caption_suffix",), str),
    "token_warmup_min": Map((), only_if(1, "a caption-length warmup")),
    "token_warmup_step": Map((), only_if(0, "a caption-length warmup")),
    "flip_aug": Map(("data.random_flip",), to_bool),
    "color_aug": Map((), only_off("hue jitter of the images (sdtune caches latents)")),
    "random_crop": Map(("data.random_crop",), to_bool),
    "face_crop_aug_range": Unsupported("face crops"),
    "resize_interpolation": Map(("data.resize_interpolation",), str),
    "dataset_class": Unsupported("a custom dataset class"),
    "custom_attributes": Unsupported("custom subset attributes"),
    "validation_seed": Ignore("sdtune validates on fixed prompts and seeds (validation.seeds), not a held-out split"),
    "validation_split": Unsupported("a held-out validation split of the images"),
    "validate_every_n_steps": Unsupported("a validation loss on held-out images"),
    "validate_every_n_epochs": Unsupported("a validation loss on held-out images"),
    "max_validation_steps": Unsupported("a validation loss on held-out images"),
    "metadata_file": Unsupported("sd-scripts' fine-tuning metadata; use captions beside the images or metadata.jsonl"),
    # the network (train_network.py); network_module, network_args and the LoRA type are read in kohya_import
    "network_module": Map(("method.type",)),
    "network_args": Map(("method",)),
    "network_dim": Map(("method.rank",), to_int),
    "network_alpha": Map(("method.lora_alpha",), to_float),
    "network_dropout": Map(
        ("method.lora_dropout",),
        to_float,
        "kohya drops the down projection's outputs, peft "
        "the LoRA's inputs: the same regularizer at a slightly different place",
    ),
    "network_weights": Unsupported("training on from an existing LoRA file"),
    "dim_from_weights": Map((), only_off("training on from an existing LoRA file")),
    "base_weights": Unsupported("LoRAs merged into the base before training (bake them with `sdtune bake`)"),
    "base_weights_multiplier": Unsupported("LoRAs merged into the base before training"),
    "network_train_unet_only": Map(("method.train_text_encoder",), lambda v: not to_bool(v)),
    "network_train_text_encoder_only": Map((), only_off("a LoRA on the text encoder alone")),
    "scale_weight_norms": Map(("method.scale_weight_norms",), to_float),
    "skip_until_initial_step": Ignore("sdtune resumes from its own checkpoints (train.resume)"),
    "initial_epoch": Ignore("sdtune resumes from its own checkpoints (train.resume)"),
    "initial_step": Ignore("sdtune resumes from its own checkpoints (train.resume)"),
    "cpu_offload_checkpointing": _NOT_SD15,
    "fp8_base_unet": _NOT_SD15,
    "weighting_scheme": _NOT_SD15,
    "logit_mean": _NOT_SD15,
    "logit_std": _NOT_SD15,
    "mode_scale": _NOT_SD15,
    "blocks_to_swap": _NOT_SD15,
    # DreamBooth (train_db.py)
    "stop_text_encoder_training": Map(("method.text_encoder_steps",), to_int),
    "no_token_padding": Map((), only_off("captions without padding to 77 tokens")),
}

# `network_args` entries ("key=value" strings) of networks.lora and lycoris.kohya.
NETWORK_ARGS: dict[str, Rule] = {
    "down_lr_weight": Map(("method.down_lr_weight", "train.down_lr_weight"), block_weights),
    "mid_lr_weight": Map(("method.mid_lr_weight", "train.mid_lr_weight"), block_weights),
    "up_lr_weight": Map(("method.up_lr_weight", "train.up_lr_weight"), block_weights),
    "block_lr_zero_threshold": Unsupported("blocks below a learning-rate weight left out of the LoRA"),
    "block_dims": Unsupported("a rank per block"),
    "block_alphas": Unsupported("an alpha per block"),
    "conv_block_dims": Unsupported("a conv rank per block"),
    "conv_block_alphas": Unsupported("a conv alpha per block"),
    "rank_dropout": Unsupported("dropout of whole LoRA ranks"),
    "module_dropout": Unsupported("dropout of whole LoRA modules"),
    "dropout": Map(("method.lora_dropout",), to_float),
    "loraplus_lr_ratio": Map(("method.loraplus_lr_ratio",), to_float),
    "loraplus_unet_lr_ratio": Map(("method.loraplus_lr_ratio",), to_float),
    "loraplus_text_encoder_lr_ratio": Unsupported("a separate LoRA+ ratio for the text encoder"),
    "preset": Map((), only_if("full", "LyCORIS's module presets other than full")),
    "train_norm": Map((), only_off("LyCORIS on the norm layers")),
}

# kohya_ss GUI JSON fields whose name or form differ from sd-scripts (the GUI turns them into arguments).
GUI: dict[str, Rule] = {
    "LoRA_type": Map(("method.type",)),  # read in kohya_import, with conv_dim and the LyCORIS fields
    "max_resolution": Map(("data.resolution",), resolution),
    "optimizer": Map(("train.optimizer_type",), optimizer),
    "lr_warmup": Map(("train.lr_warmup_steps",)),  # a percent of the steps: resolved in kohya_import
    "epoch": Unsupported(_EPOCHS),
    "model_list": Ignore("the GUI's model picker; pretrained_model_name_or_path names the base"),
    "sdxl": Map((), only_off("SDXL: sdtune trains SD v1-5")),
    "flux1_checkbox": Map((), only_off("FLUX: sdtune trains SD v1-5")),
    "sd3_checkbox": Map((), only_off("SD3: sdtune trains SD v1-5")),
    "noise_offset_type": Ignore("read with noise_offset and multires_noise_*: the GUI's switch between them"),
    "additional_parameters": Map(()),  # extra command-line flags: read as flags in kohya_import
    "conv_dim": Map(("method.preset",)),  # read with LoRA_type
    "conv_alpha": Map(("method.preset",)),
    "conv_dims": Unsupported("a conv rank per block"),
    "conv_alphas": Unsupported("a conv alpha per block"),
    "down_lr_weight": NETWORK_ARGS["down_lr_weight"],
    "mid_lr_weight": NETWORK_ARGS["mid_lr_weight"],
    "up_lr_weight": NETWORK_ARGS["up_lr_weight"],
    "block_lr_zero_threshold": NETWORK_ARGS["block_lr_zero_threshold"],
    "block_dims": NETWORK_ARGS["block_dims"],
    "block_alphas": NETWORK_ARGS["block_alphas"],
    "rank_dropout": NETWORK_ARGS["rank_dropout"],
    "module_dropout": NETWORK_ARGS["module_dropout"],
    "loraplus_lr_ratio": NETWORK_ARGS["loraplus_lr_ratio"],
    "loraplus_unet_lr_ratio": NETWORK_ARGS["loraplus_unet_lr_ratio"],
    "loraplus_text_encoder_lr_ratio": NETWORK_ARGS["loraplus_text_encoder_lr_ratio"],
    "LyCORIS_preset": NETWORK_ARGS["preset"],
    "train_norm": NETWORK_ARGS["train_norm"],
    "factor": Ignore("a LoKr setting, read with LoRA_type"),
    "decompose_both": Ignore("a LoKr setting, read with LoRA_type"),
    "use_cp": Ignore("a LyCORIS setting, read with LoRA_type"),
    "use_tucker": Ignore("a LyCORIS setting, read with LoRA_type"),
    "use_scalar": Ignore("a LyCORIS setting, read with LoRA_type"),
    "rank_dropout_scale": Ignore("a LyCORIS setting, read with LoRA_type"),
    "bypass_mode": Ignore("a LyCORIS setting, read with LoRA_type"),
    "dora_wd": Map(("method.use_dora",), to_bool),
    "unit": Ignore("a DyLoRA setting, read with LoRA_type"),
    "num_cpu_threads_per_process": Ignore("the studio's worker sizes the threads"),
    "num_processes": Ignore("an accelerate launch setting"),
    "num_machines": Ignore("an accelerate launch setting"),
    "multi_gpu": Ignore("an accelerate launch setting"),
    "gpu_ids": Ignore("an accelerate launch setting"),
    "main_process_port": Ignore("an accelerate launch setting"),
    "extra_accelerate_launch_args": Ignore("an accelerate launch setting"),
    "dynamo_mode": Ignore("an accelerate launch setting"),
    "dynamo_use_fullgraph": Ignore("an accelerate launch setting"),
    "dynamo_use_dynamic": Ignore("an accelerate launch setting"),
    "sample_prompts": Map(("validation.prompts",)),  # the prompts themselves in a GUI preset: read in kohya_import
    "metadata_author": Ignore("set the model card with `sdtune publish`"),
    "metadata_description": Ignore("set the model card with `sdtune publish`"),
    "metadata_license": Ignore("set the model card with `sdtune publish`"),
    "metadata_tags": Ignore("set the model card with `sdtune publish`"),
    "metadata_title": Ignore("set the model card with `sdtune publish`"),
    "train_inpainting": Map((), only_off("an inpainting base")),
    "train_lora_ggpo": Map((), only_off("GGPO weight perturbation")),
    "ggpo_sigma": Ignore("a GGPO setting"),
    "ggpo_beta": Ignore("a GGPO setting"),
    "lowvram": Ignore("sdtune loads the base once, straight to the device"),
    "save_every_n_epochs": SD_SCRIPTS["save_every_n_epochs"],
    "lora_network_weights": SD_SCRIPTS["network_weights"],
    "conv_block_dims": NETWORK_ARGS["conv_block_dims"],
    "conv_block_alphas": NETWORK_ARGS["conv_block_alphas"],
    "stop_text_encoder_training_pct": Unsupported("a percent of the steps: set method.text_encoder_steps"),
    "train_on_input": Ignore("an iA3 setting, read with LoRA_type"),
    "constrain": Ignore("a Diag-OFT setting, read with LoRA_type"),
    "rescaled": Ignore("a Diag-OFT setting, read with LoRA_type"),
    "save_as_bool": Ignore("the state of the GUI's Save-as button"),
    **dict.fromkeys(
        (
            "sdxl_cache_text_encoder_outputs",
            "sdxl_no_half_vae",
            "ae",
            "clip_l",
            "clip_g",
            "t5xxl",
            "apply_t5_attn_mask",
            "discrete_flow_shift",
            "flux1_cache_text_encoder_outputs",
            "flux1_cache_text_encoder_outputs_to_disk",
            "guidance_scale",
            "mem_eff_save",
            "model_prediction_type",
            "split_mode",
            "t5xxl_max_token_length",
            "timestep_sampling",
            "train_blocks",
        ),
        _NOT_SD15,
    ),  # fmt: skip
}


def _off():
    raise Skip("ignored", "off, as in sdtune")


def rule_for(key: str, gui: bool) -> Rule | None:
    """The rule of one input key (GUI fields first in a GUI preset), or None for a key this table does not know."""
    if gui and key in GUI:
        return GUI[key]
    return SD_SCRIPTS.get(key)
