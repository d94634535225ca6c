"""How every run ends: the adapter files (each save and the last), the A/B grid, the scores and `adapter.json`.

`finish_run` is the one place a trainer's run ends, whatever the method: it calls the trainer's `save` (which writes
the method's files and runs the export check), renders the A/B grid, measures the toy scores and writes the
manifest. Anything that must happen to every finished run (registering it, say) belongs here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from sdtune.adapters import sampling
from sdtune.adapters.base import BaseSource, base_hash, load_pipeline, recommended_guidance
from sdtune.adapters.manifest import BaseRef, write_manifest
from sdtune.trainers.core import export
from sdtune.trainers.core.data import DatasetScan
from sdtune.trainers.core.lora_layers import lora_state_dicts
from sdtune.trainers.core.recipe import Recipe
from sdtune.trainers.core.runtime import SAVE_DTYPES
from sdtune.trainers.core.validation import Validator

SaveFn = Callable[[Path, int], tuple[dict, "export.ExportCheck | None"]]


def trigger_words(recipe: Recipe) -> list[str]:
    """What calls up the trained concept: DreamBooth's instance prompt, or the LoRA data's trigger word."""
    if recipe.method.type == "dreambooth":
        return [recipe.method.instance_prompt]
    return [recipe.data.trigger_word] if recipe.data.trigger_word else []


@dataclass
class RunContext:
    """What saving and finishing a run need to know about it, gathered once by the trainer."""

    recipe: Recipe
    scan: DatasetScan
    base: BaseSource
    started_at: float
    accelerator: Accelerator
    validator: Validator
    checker: export.ExportChecker


@dataclass
class AdapterWriter:
    """Writes a LoRA: every checkpoint and the final save go through `save`."""

    run: RunContext
    unet: torch.nn.Module | None = None  # the peft-adapted models, for a trained LoRA
    text_encoder: torch.nn.Module | None = None
    lora_configs: tuple = (None, None)  # peft LoraConfig of the UNet and of the text encoder (None: not trained)
    trainable: list[torch.nn.Parameter] | None = None

    def save(self, out_dir: Path, step: int) -> tuple[dict, export.ExportCheck | None]:
        """Writes the trained LoRA in both formats into `out_dir` and, if asked, runs the export check on them."""
        unet_sd, te_sd = lora_state_dicts(self.unet, self.text_encoder, self.lora_configs[1] is not None)
        dtype = SAVE_DTYPES[self.run.recipe.output.save_precision]

        def reference():  # the adapter in training, its tensors rounded as saved
            with export.rounded_to(self.trainable, dtype):
                return self.run.validator.render_one(self.run.checker.settings)

        return self.save_state_dicts(out_dir, step, unet_sd, te_sd, self.lora_configs, reference)

    def save_state_dicts(self, out_dir: Path, step, unet_sd, te_sd, configs, reference, name=None):
        """Writes peft-named LoRA tensors as both formats, then checks them against `reference()`'s image."""
        run, recipe = self.run, self.run.recipe
        dtype = SAVE_DTYPES[recipe.output.save_precision]
        metadata = kohya_metadata(recipe, run.scan, run.base, step, run.started_at, configs[0])
        files = export.write_lora_files(
            out_dir,
            name or recipe.output.name,
            unet_sd,
            te_sd,
            *configs,
            dtype,
            metadata,
            write_kohya=recipe.output.export_kohya,
        )
        if not recipe.output.export_check:
            return files, None
        report = run.checker.check(files, reference(), out_dir)
        run.accelerator.print(report.summary())
        if not report.ok:
            raise export.ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
        return files, report


def run_context(recipe: Recipe, scan, base: BaseSource, pipe, accelerator, dtype, started_at: float) -> RunContext:
    """The run's `Validator` (grids, toy scores; shares `pipe`'s models), its `ExportChecker` (a clean base loaded
    when first needed) and the facts every save records."""
    validator = Validator(recipe, pipe, accelerator, Path(recipe.output.dir), base.name)
    checker = export.ExportChecker(
        lambda: load_pipeline(recipe.base, torch_dtype=dtype),
        accelerator.device,
        check_settings(recipe),
        accelerator.autocast,
    )
    return RunContext(recipe, scan, base, started_at, accelerator, validator, checker)


def finish_run(run: RunContext, save: SaveFn, state, training: dict | None = None) -> Path:
    """The end of every run (main process): the method's files, A/B grid, toy scores, then `adapter.json`.

    Args:
        save: the trainer's writer, `(out_dir, step) -> ({format: path}, export check or None)`.
        state: the loop's `TrainState` (steps done, smoothed loss).
        training: extra facts for the manifest's `training` (speed, memory, the method's own settings).
    """
    recipe, accelerator, validator = run.recipe, run.accelerator, run.validator
    out_dir = Path(recipe.output.dir)
    files, report = save(out_dir, state.step)
    samples = {}
    if validator.enabled:
        validator.grid(state.step, out_dir / "ab_grid.png")
        samples["ab_grid"] = "ab_grid.png"
    scores = validator.toy_scores()
    if scores:
        accelerator.print(f"toy scores: base {scores['base']}  adapter {scores['adapter']}")
    info = export.manifest(
        name=recipe.output.name,
        method=recipe.method.type,
        base=BaseRef(recipe.base.pretrained_model_name_or_path, run.base.kind, base_hash(recipe.base)),
        recipe=recipe,
        scan=run.scan,
        trigger_words=trigger_words(recipe),
        steps=state.step,
        final_loss=state.last_loss,
        files=files,
        samples=samples,
        scores=scores,
        export_check=report,
        started_at=run.started_at,
    )
    info.training.update(training or {})
    manifest_file = write_manifest(out_dir, info)
    written = [*(out_dir / f for f in info.files.values()), manifest_file]
    accelerator.print(f"done: {', '.join(str(p) for p in written)}")
    return manifest_file


def check_settings(recipe: Recipe) -> sampling.SampleSettings:
    """The one image the export check renders per format: the first validation prompt, seed 0."""
    v = recipe.validation
    prompt = v.prompts[0] if v.prompts else (trigger_words(recipe) or ["a photo"])[0]
    return sampling.SampleSettings(
        prompt=prompt,
        seed=0,
        negative_prompt=v.negative_prompt,
        steps=v.num_inference_steps,
        guidance=v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base),
        scheduler=v.scheduler,
    )


def tracker_config(recipe: Recipe) -> dict:
    """TensorBoard hparams want flat scalars."""
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


def kohya_metadata(recipe: Recipe, scan, base, step: int, started_at: float, unet_config) -> dict[str, str]:
    """sd-scripts' `ss_*` metadata of this run, for the kohya file of the LoRA `unet_config` describes."""
    from sdtune.adapters.kohya import kohya_metadata as build

    method, train = recipe.method, recipe.train
    res = recipe.data.resolution
    images = max(sum(r.repeats for r in scan.records), 1)
    return build(
        base_model_name=Path(base.location).name if base.kind == "single_file" else base.location,
        base_model_hash=base_hash(recipe.base) if base.kind == "single_file" else None,
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
        optimizer=train.optimizer,
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
        training_started_at=started_at,
        training_finished_at=time.time(),
    )


def recipe_prediction_type(recipe: Recipe) -> str:
    import json

    from sdtune.trainers.core.estimate import base_config_folder

    try:
        config = json.loads((base_config_folder(recipe) / "scheduler" / "scheduler_config.json").read_text())
        return config.get("prediction_type", "epsilon")
    except OSError:
        return "epsilon"
