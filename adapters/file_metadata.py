"""What a weight file's header says, built from one typed object of facts: kohya's `ss_*` and the SAI `modelspec.*`.

Every file sdtune writes names what it is in its safetensors header, the way sd-scripts writes it, so A1111's Lora
tab, the civitai uploader and metadata viewers read it as they read a kohya-made file:

    LoRA (trained, merged, resized, extracted, imported)   `kohya_metadata(LoraFacts)`: ss_* + modelspec.*
    single-file checkpoint                                  `checkpoint_metadata(ModelFacts)`: modelspec.*
    ControlNet (original layout and diffusers folder)       `controlnet_metadata(ModelFacts, original)`: modelspec.*

The facts every file carries (`ModelFacts`: title, resolution, prediction type, date; for a LoRA also `BaseFacts`:
the base's name and hashes) are what a merged or resized LoRA inherits from its parents (`inherited_facts`), as
sd-scripts' resize_lora keeps its parent's metadata. Pure dict functions and no torch: the studio reads headers too.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.adapters.errors import SdtuneError

if TYPE_CHECKING:
    from sdtune.adapters.base import BaseSource

SAI_MODEL_SPEC_VERSION = "1.0.1"  # the current SAI model spec, as sd-scripts writes it since Aug 2025 (1.0.0 before).
ARCHITECTURE = "stable-diffusion-v1"  # sd-scripts' ARCH_SD_V1; adapters add "/lora", "/controlnet"
# sd-scripts' implementations: a LoRA of SD v1 is "diffusers"; an original-layout (CompVis) checkpoint is SAI's.
IMPLEMENTATION_DIFFUSERS = "diffusers"
IMPLEMENTATION_ORIGINAL = "https://github.com/Stability-AI/generative-models"
PREDICTION_TYPES = ("epsilon", "v_prediction", "v")  # diffusers' names; "v" is modelspec's
MIXED_PRECISIONS = ("no", "fp16", "bf16")


class MetadataError(SdtuneError, ValueError):
    """Facts that no header can say (a resolution of one side, an unknown prediction type...); one line."""


# -- the facts --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the SAI model spec says of any SD v1 file: a LoRA, a checkpoint, a ControlNet."""

    title: str  # modelspec.title (and a LoRA's ss_output_name unless given)
    resolution: tuple[int, int] = (512, 512)  # (width, height) it was trained at -> "512x512"
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction" (diffusers' name; "v" accepted)
    date: float = field(default_factory=time.time)  # unix time of the save -> modelspec.date
    trigger_words: tuple[str, ...] = ()  # -> modelspec.trigger_phrase, comma-joined
    clip_skip: int | None = None  # -> modelspec.encoder_layer
    author: str | None = None
    description: str | None = None
    license: str | None = None

    def __post_init__(self):
        if len(self.resolution) != 2 or any(int(side) <= 0 for side in self.resolution):
            raise MetadataError(f"resolution must be (width, height), got {self.resolution!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise MetadataError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        object.__setattr__(self, "trigger_words", tuple(self.trigger_words))

    @property
    def v_param(self) -> bool:
        return self.prediction_type != "epsilon"


@dataclass(frozen=True)
class BaseFacts:
    """The base a LoRA was made on, never a local path: `ss_sd_model_name`, `ss_new_sd_model_hash` (sha256) and
    `ss_sd_model_hash` (A1111's old 8-hex hash); a hash is None when unknown (a hub id without its files)."""

    name: str
    hash: str | None = None
    legacy_hash: str | None = None


@dataclass(frozen=True)
class TrainingFacts:
    """sd-scripts' `train_network.py` settings of a LoRA trained here (a merged or imported one has none)."""

    steps: int  # optimizer steps done at save time
    epochs: int
    learning_rate: float
    text_encoder_lr: float | None
    unet_lr: float | None
    seed: int
    mixed_precision: str  # no, fp16, bf16
    optimizer: str  # as sd-scripts writes it, e.g. "torch.optim.adamw.AdamW"
    lr_scheduler: str
    batch_size: int
    num_train_images: int  # images x repeats (sd-scripts counts repeats)
    dataset_dirs: Mapping[str, dict]  # {folder name: {"n_repeats": int, "img_count": int}}
    tag_frequency: Mapping[str, dict[str, int]]  # {folder name: {tag: count}} of the captions
    started_at: float  # unix times
    finished_at: float
    max_train_steps: int | None = None  # planned steps; default: steps
    gradient_accumulation_steps: int = 1
    num_reg_images: int = 0
    bucket_counts: Mapping[tuple[int, int], int] | None = None  # {(width, height): images} of the buckets
    network_dropout: float | None = None

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise MetadataError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")


@dataclass(frozen=True)
class LoraFacts:
    """Everything a kohya LoRA file's header says: `kohya_metadata(facts)` writes it."""

    model: ModelFacts
    base: BaseFacts
    rank: int  # ss_network_dim (the commonest rank of a resized LoRA)
    alpha: float  # ss_network_alpha: the TRUE alpha
    network_module: str = "networks.lora"
    network_args: Mapping[str, Any] | None = None  # ss_network_args, e.g. {"conv_dim": 4} or {"dynamic_ranks": ..}
    output_name: str | None = None  # ss_output_name, A1111's alias; default: the title
    training: TrainingFacts | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # further ss_* keys, e.g. {"ss_merge": "svd"}

    def __post_init__(self):
        bad = [key for key in self.extra if not key.startswith("ss_")]
        if bad:
            raise MetadataError(f"extra key {bad[0]!r} must start with 'ss_' (modelspec keys are built from facts)")

    @classmethod
    def summary(
        cls, ranks: Iterable[int], alphas: Iterable[float], model: ModelFacts, base: BaseFacts, extra=None
    ) -> LoraFacts:
        """A LoRA not trained here (merged, resized, extracted, imported), from its modules' ranks and alphas: the
        commonest of each, and the spread of ranks when they differ (sd-scripts' resize_lora writes it)."""
        ranks, alphas = Counter(ranks), Counter(alphas)
        args = {"dynamic_ranks": f"{min(ranks)}-{max(ranks)}"} if len(ranks) > 1 else None
        rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        return cls(model, base, rank, float(alpha), network_args=args, extra=dict(extra or {}))


# -- headers from facts -----------------------------------------------------------------------------------------------


def kohya_metadata(facts: LoraFacts) -> dict[str, str]:
    """The header of a kohya LoRA file: sd-scripts' `ss_*` keys plus the SAI model spec, all values strings
    formatted as sd-scripts formats them (`str()` of the Python value, JSON for nested data).

    Every file gets the same core keys (network, base name and hashes when known, resolution, prediction type,
    modelspec); a trained one adds its training settings."""
    model, base = facts.model, facts.base
    width, height = model.resolution
    metadata: dict[str, Any] = _training_keys(facts.training, model) if facts.training else {}
    metadata |= {
        "ss_output_name": facts.output_name if facts.output_name is not None else model.title,
        "ss_network_module": facts.network_module,
        "ss_network_dim": int(facts.rank),
        "ss_network_alpha": float(facts.alpha),  # sd-scripts' --network_alpha is a float: "8.0"
        "ss_v2": False,
        "ss_base_model_version": "sd_v1_v" if model.v_param else "sd_v1",
        "ss_resolution": (int(width), int(height)),  # str((512, 512)) == "(512, 512)", as sd-scripts writes it
        "ss_sd_model_name": base.name,
    }
    if facts.network_args:
        metadata["ss_network_args"] = json.dumps({key: str(value) for key, value in facts.network_args.items()})
    if base.hash is not None:
        metadata["ss_new_sd_model_hash"] = base.hash
    if base.legacy_hash is not None:
        metadata["ss_sd_model_hash"] = base.legacy_hash
    metadata |= dict(facts.extra)
    metadata = {key: str(value) for key, value in metadata.items()}
    return metadata | model_spec(model, f"{ARCHITECTURE}/lora", IMPLEMENTATION_DIFFUSERS)


def _training_keys(training: TrainingFacts, model: ModelFacts) -> dict[str, Any]:
    """sd-scripts' `train_network.py` keys of one save."""
    keys = {
        "ss_training_started_at": training.started_at,
        "ss_training_finished_at": training.finished_at,
        "ss_learning_rate": training.learning_rate,
        "ss_text_encoder_lr": training.text_encoder_lr,
        "ss_unet_lr": training.unet_lr,
        "ss_num_train_images": training.num_train_images,
        "ss_num_reg_images": training.num_reg_images,
        "ss_num_epochs": training.epochs,
        "ss_epoch": training.epochs,
        "ss_steps": training.steps,
        "ss_max_train_steps": training.max_train_steps if training.max_train_steps is not None else training.steps,
        "ss_gradient_accumulation_steps": training.gradient_accumulation_steps,
        "ss_lr_scheduler": training.lr_scheduler,
        "ss_network_dropout": training.network_dropout,
        "ss_mixed_precision": training.mixed_precision,
        "ss_clip_skip": model.clip_skip,
        "ss_seed": training.seed,
        "ss_optimizer": training.optimizer,
        "ss_batch_size_per_device": training.batch_size,
        "ss_total_batch_size": training.batch_size * training.gradient_accumulation_steps,
        "ss_dataset_dirs": json.dumps(training.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(training.tag_frequency),
    }
    if training.bucket_counts:  # A1111's Lora tab shows the training resolutions from it
        buckets = training.bucket_counts.items()
        info = {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(buckets)}
        keys["ss_bucket_info"] = json.dumps({"buckets": info})
    return keys


def model_spec(model: ModelFacts, architecture: str, implementation: str) -> dict[str, str]:
    """The `modelspec.*` keys of sd-scripts' `library/sai_model_spec.build_metadata` for an SD v1 file; the date is
    the local ISO-8601 time of the save without microseconds."""
    width, height = model.resolution
    spec = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": model.title,
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(model.date)).isoformat(),
        "modelspec.prediction_type": "v" if model.v_param else "epsilon",
    }
    if model.trigger_words:
        spec["modelspec.trigger_phrase"] = ", ".join(model.trigger_words)
    if model.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(model.clip_skip)
    for key in ("author", "description", "license"):
        if getattr(model, key) is not None:
            spec[f"modelspec.{key}"] = str(getattr(model, key))
    return spec


def checkpoint_metadata(model: ModelFacts) -> dict[str, str]:
    """The header of an original-layout SD v1 checkpoint (sd-scripts: a Stable Diffusion ckpt, SAI's
    implementation); "format": "pt" is what diffusers and safetensors' own writers put there."""
    return {"format": "pt", **model_spec(model, ARCHITECTURE, IMPLEMENTATION_ORIGINAL)}


def controlnet_metadata(model: ModelFacts, original: bool) -> dict[str, str]:
    """The header of a ControlNet file: the original `control_model.*` layout (`original`), or the diffusers one."""
    implementation = IMPLEMENTATION_ORIGINAL if original else IMPLEMENTATION_DIFFUSERS
    return {"format": "pt", **model_spec(model, f"{ARCHITECTURE}/controlnet", implementation)}


# -- facts from what is on disk ---------------------------------------------------------------------------------------


def base_facts(source: BaseSource, digest: str) -> BaseFacts:
    """The base's facts from where it comes from and its `base_hash`.

    A single file gets A1111's own hashes (sha256 of the file, and the old 8-hex hash); a diffusers folder (and the
    toy base) gets sdtune's sha256 over its weight files, and its first 8 hex as the short form; a hub id is its
    name, and its hashes are unknown without the files.
    """
    if source.kind == "hub":
        return BaseFacts(source.location)
    if source.kind == "single_file":
        return BaseFacts(Path(source.location).name, digest, legacy_model_hash(source.location))
    return BaseFacts(source.name, digest, digest[:8])


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-hex model hash (`ss_sd_model_hash`): sha256 of the 64 KiB at offset 1 MiB of the file."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def prediction_type(folder: str | Path) -> str:
    """What a diffusers folder's scheduler predicts, as the model spec can say it: "v_prediction", else "epsilon"
    (also when the folder does not say; SD v1 models predict the noise)."""
    try:
        config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    except OSError:
        return "epsilon"
    return "v_prediction" if config.get("prediction_type") == "v_prediction" else "epsilon"


def folder_facts(folder: str | Path, title: str) -> ModelFacts:
    """The facts of a diffusers SD v1 folder: its native resolution (UNet sample size x the VAE's downscale) and
    its scheduler's prediction type."""
    folder = Path(folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    side = int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return ModelFacts(title, (side, side), prediction_type(folder))


def facts_of_base(spec, title: str) -> tuple[ModelFacts, BaseFacts]:
    """The facts of a file made on the base `spec` (a recipe's `base:`): the base's native resolution and prediction
    type (a single file or hub id: SD v1-5's, whose configs describe it), its name and hashes."""
    from sdtune.adapters.base import SD15_CONFIG, base_hash, resolve_base

    source = resolve_base(spec)
    folder = Path(source.location) if source.kind in ("toy", "folder") else SD15_CONFIG
    return folder_facts(folder, title), base_facts(source, base_hash(spec))


def inherited_facts(headers: Iterable[Mapping[str, str]], model: ModelFacts, base: BaseFacts):
    """The (ModelFacts, BaseFacts) of a LoRA made from parents (merged, resized), as sd-scripts' resize keeps its
    parent's metadata: the first parent whose kohya header says any of them gives the resolution, the prediction
    type and the base (its name with the hashes it gives: a name is never paired with another base's hashes).
    `model` (whose title, date and trigger words are kept) and `base` fill what that parent does not say."""
    for header in headers:
        resolution = _resolution(header)
        predicts = header.get("modelspec.prediction_type") or header.get("ss_base_model_version")
        named = "ss_sd_model_name" in header
        if resolution is None and predicts is None and not named:
            continue
        v_param = predicts in ("v", "v_prediction") or (predicts or "").endswith("_v")
        inherited = replace(
            model,
            resolution=resolution or model.resolution,
            prediction_type=model.prediction_type if predicts is None else ("v_prediction" if v_param else "epsilon"),
        )
        if named:
            base = BaseFacts(
                header["ss_sd_model_name"], header.get("ss_new_sd_model_hash"), header.get("ss_sd_model_hash")
            )
        return inherited, base
    return model, base


def _resolution(header: Mapping[str, str]) -> tuple[int, int] | None:
    """(width, height) from `modelspec.resolution` ("512x512") or `ss_resolution` ("(512, 512)" or "512")."""
    for key, pattern in (("modelspec.resolution", r"(\d+)x(\d+)"), ("ss_resolution", r"\(?(\d+)(?:,\s*(\d+))?\)?")):
        match = re.fullmatch(pattern, header.get(key, "").strip())
        if match:
            width = int(match.group(1))
            return width, int(match.group(2) or width)
    return None


__all__ = [
    "BaseFacts",
    "LoraFacts",
    "MetadataError",
    "ModelFacts",
    "TrainingFacts",
    "base_facts",
    "checkpoint_metadata",
    "controlnet_metadata",
    "facts_of_base",
    "folder_facts",
    "inherited_facts",
    "kohya_metadata",
    "legacy_model_hash",
    "model_spec",
    "prediction_type",
]
