"""Writing a LoRA in both ecosystem formats and proving both load: `LoraWriter`, the writer of a trained LoRA.

The check itself (reload, render, compare, key coverage) is inference-side and lives in
`sdtune.adapters.export_check`, where merges and resizes use it too; this module gives it the trained reference.

Every save writes:
    pytorch_lora_weights.safetensors   diffusers/PEFT format, with the LoRA adapter metadata (true lora_alpha)
    <name>.safetensors                 kohya/A1111 format: lora_unet_* / lora_te_* keys, true .alpha, ss_* metadata
and then runs the export check: a fresh copy of the base loads each file the way users will (diffusers'
`load_lora_weights` for both; the kohya file goes through diffusers' kohya converter), renders the same image
with each, and compares them with the adapter as it was in training, its tensors rounded to the saved dtype
(`output.save_precision` is the user's choice; the check is about keys, scales and formats). The kohya keys are also replayed through
the key mapping A1111 and ComfyUI use for SD v1 LoRAs. Any unmatched key or a pixel difference over 2/255 fails
the run: a LoRA that loads differently in another tool is the ecosystem's most common complaint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdtune.adapters import kohya
from sdtune.adapters.export_check import PIXEL_TOLERANCE, ExportCheck, ExportChecker, ExportCheckError
from sdtune.trainers.core.lora_layers import lora_state_dicts, save_peft_lora
from sdtune.trainers.core.outputs import RunOutputs, trigger_words
from sdtune.trainers.core.runtime import SAVE_DTYPES

if TYPE_CHECKING:
    from peft import LoraConfig

    from sdtune.adapters.sampling import Sample
    from sdtune.trainers.core.recipe import Recipe

__all__ = [
    "PIXEL_TOLERANCE",
    "ExportCheck",
    "ExportCheckError",
    "ExportChecker",
    "LoraWriter",
    "save_checked_lora",
    "write_lora_files",
]


def kohya_alpha(config) -> float:
    return float(config.lora_alpha)


def write_lora_files(
    out_dir: Path, name: str, unet_sd, te_sd, unet_config, te_config, dtype, metadata, write_kohya: bool = True
) -> dict:
    """Writes peft-named LoRA tensors (trained or extracted) as the PEFT file and, if asked and unless DoRA, the kohya
    file into `out_dir`; returns {format: path}."""
    files = {"peft": save_peft_lora(out_dir, unet_sd, te_sd, unet_config, te_config, dtype)}
    if not write_kohya or unet_config.use_dora:
        return files  # peft's DoRA magnitude has no faithful kohya/A1111 form (see adapters/kohya.py)
    kohya_sd = kohya.peft_to_kohya(
        unet_sd,
        te_sd,
        unet_alpha=kohya_alpha(unet_config),
        text_encoder_alpha=kohya_alpha(te_config) if te_config is not None else None,
    )
    files["kohya"] = kohya.save_kohya_lora(out_dir / f"{name}.safetensors", kohya_sd, metadata, dtype=dtype)
    return files


@dataclass
class LoraWriter:
    """The writer (see trainers/core/outputs.py) of a LoRA trained in `unet` (and `text_encoder`): both formats,
    export-checked against the adapter as it sits in training."""

    outputs: RunOutputs
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    lora_configs: tuple[LoraConfig, LoraConfig | None]  # of the UNet and of the text encoder (None: not trained)
    trainable: list[torch.nn.Parameter]

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        unet_sd, te_sd = lora_state_dicts(self.unet, self.text_encoder, self.lora_configs[1] is not None)
        dtype = SAVE_DTYPES[self.outputs.recipe.output.save_precision]

        def reference():  # the adapter as just saved
            with rounded_to(self.trainable, dtype):
                return self.outputs.validator.render_one(self.outputs.checker.settings)

        return save_checked_lora(self.outputs, out_dir, step, unet_sd, te_sd, self.lora_configs, reference)


def save_checked_lora(
    outputs: RunOutputs,
    out_dir: Path,
    step: int,
    unet_sd: dict[str, torch.Tensor],
    te_sd: dict[str, torch.Tensor] | None,
    configs: tuple[LoraConfig, LoraConfig | None],
    reference: Callable[[], Sample],
    name: str | None = None,
) -> tuple[dict[str, Path], ExportCheck | None]:
    """Writes peft-named LoRA tensors (trained or extracted) as both formats, named `name` (default: the run's),
    then, unless `output.export_check` is off, checks them against `reference()`'s image.

    Raises:
        ExportCheckError: a file does not reproduce the reference.
    """
    recipe = outputs.recipe
    dtype = SAVE_DTYPES[recipe.output.save_precision]
    metadata = kohya_metadata(outputs, step, configs[0])
    name = name or recipe.output.name
    write_kohya = recipe.output.export_kohya
    files = write_lora_files(out_dir, name, unet_sd, te_sd, *configs, dtype, metadata, write_kohya=write_kohya)
    if not recipe.output.export_check:
        return files, None
    report = outputs.checker.check(files, reference(), out_dir)
    outputs.accelerator.print(report.summary())
    if not report.ok:
        raise ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
    return files, report


def kohya_metadata(outputs: RunOutputs, step: int, unet_config: LoraConfig) -> dict[str, str]:
    """sd-scripts' `ss_*` metadata of this run, for the kohya file of the LoRA `unet_config` describes."""
    from sdtune.adapters.kohya import kohya_metadata as build

    recipe, scan = outputs.recipe, outputs.scan
    method, train = recipe.method, recipe.train
    res = recipe.data.resolution
    images = max(sum(r.repeats for r in scan.records), 1)
    base_model_name, new_hash, legacy_hash = base_metadata(outputs)
    return build(
        base_model_name=base_model_name,
        base_model_hash=new_hash,
        base_model_legacy_hash=legacy_hash,
        bucket_counts=scan.bucket_counts(),
        trigger_words=trigger_words(recipe),
        resolution=(res, res),
        steps=step,
        max_train_steps=train.max_train_steps,
        epochs=max(1, math.ceil(step * train.train_batch_size * train.gradient_accumulation_steps / images)),
        rank=unet_config.r,
        alpha=float(unet_config.lora_alpha),
        learning_rate=train.learning_rate,
        text_encoder_lr=(method.text_encoder_lr or train.learning_rate) if method.train_text_encoder else None,
        unet_lr=train.learning_rate,
        seed=train.seed,
        mixed_precision=train.mixed_precision,
        optimizer=train.optimizer_type,
        lr_scheduler=train.lr_scheduler,
        batch_size=train.train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_images=len(scan.records),
        dataset_dirs=scan.dataset_dirs(),
        tag_frequency=scan.tag_frequency(),
        title=recipe.output.name,
        output_name=recipe.output.name,
        network_dropout=method.lora_dropout,
        prediction_type=recipe_prediction_type(recipe),
        training_started_at=outputs.started_at,
        training_finished_at=time.time(),
    )


def base_metadata(outputs: RunOutputs) -> tuple[str, str | None, str | None]:
    """`ss_sd_model_name`, `ss_new_sd_model_hash`, `ss_sd_model_hash` of the base, never a local path.

    A single file gets A1111's own hashes (sha256 of the file, and the old 8-hex hash); a diffusers folder (and the
    toy base) gets sdtune's sha256 over its weight files, and its first 8 hex as the short form; a hub id is its
    name, and its hashes are unknown without the files.
    """
    from sdtune.adapters.kohya import legacy_model_hash

    base = outputs.base
    if base.kind == "hub":
        return base.location, None, None
    digest = outputs.base_ref.hash
    if base.kind == "single_file":
        return Path(base.location).name, digest, legacy_model_hash(base.location)
    return base.name, digest, digest[:8]


def recipe_prediction_type(recipe: Recipe) -> str:
    import json

    from sdtune.trainers.core.estimate import base_config_folder

    try:
        config = json.loads((base_config_folder(recipe) / "scheduler" / "scheduler_config.json").read_text())
        return config.get("prediction_type", "epsilon")
    except OSError:
        return "epsilon"


@contextlib.contextmanager
def rounded_to(params, dtype: torch.dtype):
    """Temporarily rounds trainable tensors to the dtype they are saved in: the export check's reference is the
    adapter as saved (at low precision a double rounding, fp32 -> fp16 -> bf16 compute, can shift a few pixels)."""
    kept = [p.data.clone() for p in params]
    with torch.no_grad():  # in place: the parameters keep their storage (compiled graphs and CUDA graphs hold it)
        for p in params:
            p.data.copy_(p.data.to(dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in zip(params, kept):
                p.data.copy_(data)
