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

from sdtune.adapters.export_check import PIXEL_TOLERANCE, ExportCheck, ExportChecker, ExportCheckError
from sdtune.adapters.file_metadata import LoraFacts, TrainingFacts, base_facts
from sdtune.adapters.lora_files import save_lora
from sdtune.adapters.lycoris import NETWORK_MODULE, config_algo, network_args
from sdtune.trainers.core.lora_layers import lora_state_dicts
from sdtune.trainers.core.outputs import RunOutputs, model_facts
from sdtune.trainers.core.runtime import SAVE_DTYPES

if TYPE_CHECKING:
    from peft import LoraConfig

    from sdtune.adapters.sampling import Sample

__all__ = [
    "PIXEL_TOLERANCE",
    "ExportCheck",
    "ExportCheckError",
    "ExportChecker",
    "LoraWriter",
    "lora_facts",
    "save_checked_lora",
]


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
    facts = lora_facts(outputs, step, configs[0]) if recipe.output.export_kohya else None
    files = save_lora(out_dir, name or recipe.output.name, unet_sd, te_sd, configs, dtype, facts)
    if not recipe.output.export_check:
        return files, None
    report = outputs.checker.check(files, reference(), out_dir)
    outputs.accelerator.print(report.summary())
    if not report.ok:
        raise ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
    return files, report


def lora_facts(outputs: RunOutputs, step: int, unet_config: LoraConfig) -> LoraFacts:
    """The facts of this run's LoRA at `step` (the LoRA `unet_config` describes), for its kohya header."""
    recipe, scan, now = outputs.recipe, outputs.scan, time.time()
    method, train = recipe.method, recipe.train
    images = max(sum(r.repeats for r in scan.records), 1)
    training = TrainingFacts(
        steps=step,
        epochs=max(1, math.ceil(step * train.train_batch_size * train.gradient_accumulation_steps / images)),
        learning_rate=train.learning_rate,
        text_encoder_lr=(method.text_encoder_lr or train.learning_rate) if method.train_text_encoder else None,
        unet_lr=train.learning_rate,
        seed=train.seed,
        mixed_precision=train.mixed_precision,
        optimizer=train.optimizer_type,
        lr_scheduler=train.lr_scheduler,
        batch_size=train.train_batch_size,
        num_train_images=len(scan.records),
        dataset_dirs=scan.dataset_dirs(),
        tag_frequency=scan.tag_frequency(),
        started_at=outputs.started_at,
        finished_at=now,
        max_train_steps=train.max_train_steps,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        bucket_counts=scan.bucket_counts(),
        network_dropout=method.lora_dropout,
    )
    network = {}
    if config_algo(unet_config) != "lora":  # LoHa / LoKr: LyCORIS's network module and args, as sd-scripts writes
        network = {"network_module": NETWORK_MODULE, "network_args": network_args(method)}
    return LoraFacts(
        model=model_facts(recipe, date=now),
        base=base_facts(outputs.base, outputs.base_ref.hash),
        rank=unet_config.r,
        alpha=float(getattr(unet_config, "lora_alpha", None) or unet_config.alpha),
        output_name=recipe.output.name,
        training=training,
        **network,
    )


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
