"""Train a LoRA on a frozen Stable Diffusion v1-5 base, from one YAML recipe.

Usage:
    accelerate launch trainers/lora.py recipes/quickstart.yaml                  # toy base, CPU, ~3 minutes
    python trainers/lora.py recipes/sd15-lora-default.yaml train.lr=1e-4 output.dir=runs/mine
    accelerate launch --multi_gpu --num_processes 4 trainers/lora.py recipe.yaml  # DDP (or any `accelerate config`)
    python trainers/lora.py recipe.yaml train.resume=latest                     # continue a stopped run

What happens, in order:
    1. the recipe is validated; the data is scanned and a preflight is printed before any model loads;
    2. the base loads frozen (fp16/bf16 under mixed precision); VAE latents and, when captions are fixed and the
       text encoder frozen, text embeddings are computed once and cached, so a step runs the UNet alone;
    3. peft LoRA layers (fp32) go into the UNet (and the text encoder if asked);
    4. the loop: noise the latents, predict, MSE (min-SNR optional), step; log, checkpoint, validate;
    5. the adapter is written as diffusers/PEFT and kohya/A1111 files, both reloaded and compared (export check),
       and `adapter.json` records recipe, data fingerprint, loss, grids and measured scores.
Ctrl-C saves a checkpoint and stops; `train.resume=latest` continues it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from sdtune.adapters import sampling
from sdtune.adapters.base import (
    BaseLoadError,
    BaseSource,
    base_hash,
    load_pipeline,
    recommended_guidance,
)
from sdtune.adapters.manifest import BaseRef
from sdtune.trainers.core import export
from sdtune.trainers.core.batches import make_batches
from sdtune.trainers.core.cache import text_states
from sdtune.trainers.core.checkpointing import (
    TrainState,
    register_trainable_state_hooks,
    restore_checkpoint,
)
from sdtune.trainers.core.data import DataError, DatasetScan, scan_dataset
from sdtune.trainers.core.diffusion import batch_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.recipe import Recipe, RecipeError
from sdtune.trainers.core.runtime import (
    SAVE_DTYPES,
    load_frozen_base,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    scaled_lr,
    start_run,
    tracker_config,
)
from sdtune.trainers.core.validation import Validator


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/).")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 output.dir=runs/x")
    return parser.parse_args(argv)


def param_groups(unet, text_encoder, recipe: Recipe, lr: float) -> list[dict]:
    """UNet LoRA at the run's lr; text-encoder LoRA at `method.text_encoder_lr` (kohya's split) if set."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr}]
    if recipe.method.train_text_encoder:
        te_lr = recipe.method.text_encoder_lr or lr
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": te_lr})
    return groups


@dataclass
class AdapterWriter:
    """What saving the adapter needs, gathered once: every checkpoint and the final save go through `save`."""

    recipe: Recipe
    scan: DatasetScan
    base: BaseSource
    started_at: float
    accelerator: Accelerator
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    lora_configs: tuple  # peft LoraConfig of the UNet and of the text encoder (None when it is not trained)
    trainable: list[torch.nn.Parameter]
    validator: Validator
    checker: export.ExportChecker

    def save(self, out_dir: Path, step: int) -> tuple[dict, export.ExportCheck | None]:
        """Writes both LoRA formats into `out_dir` and, if asked, runs the export check on them."""
        recipe = self.recipe
        metadata = kohya_metadata(recipe, self.scan, self.base, step, self.started_at)
        dtype = SAVE_DTYPES[recipe.output.save_precision]
        unet_config, te_config = self.lora_configs
        files = export.save_lora_files(
            out_dir,
            recipe.output.name,
            self.unet,
            self.text_encoder,
            unet_config,
            te_config,
            dtype,
            metadata,
            write_kohya=recipe.output.export_kohya,
        )
        if not recipe.output.export_check:
            return files, None
        with export.rounded_to(self.trainable, dtype):  # the reference: the adapter as just saved
            trained = self.validator.render_one(self.checker.settings)
        report = self.checker.check(files, trained, out_dir)
        self.accelerator.print(report.summary())
        if not report.ok:
            raise export.ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
        return files, report


def main(argv=None) -> int:
    args = parse_args(argv)

    # 1) Recipe and preflight: everything that can be wrong with the inputs fails here, before a model loads.
    run = start_run(args.recipe, args.overrides, "lora")
    recipe, base, resume_from, started_at = run.recipe, run.base, run.resume_from, run.started_at
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    scan = scan_dataset(recipe.data)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The frozen base. Under mixed precision its weights sit in fp16/bf16; only the LoRA will be fp32.
    frozen = load_frozen_base(recipe, accelerator)
    pipe, dtype, noise_scheduler = frozen.pipe, frozen.dtype, frozen.noise_scheduler
    unet, text_encoder, tokenizer = frozen.unet, frozen.text_encoder, frozen.tokenizer

    # 3) Caches: the VAE runs once per image (ever, thanks to the disk cache), the text encoder once per caption.
    batches, text_cache = make_batches(
        scan, recipe.data, train, accelerator, frozen.vae, tokenizer, text_encoder, not method.train_text_encoder
    )

    # 4) LoRA layers (their random init is seeded: same seed, same starting LoRA), optimizer, schedule.
    set_seed(train.seed)
    unet_config, te_config = add_lora(unet, text_encoder, method)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if method.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    lr = scaled_lr(train, accelerator.num_processes)
    optimizer = make_optimizer(param_groups(unet, text_encoder, recipe, lr), train)
    lr_scheduler = make_lr_scheduler(optimizer, train, accelerator.num_processes)
    trained_unet = torch.compile(unet) if train.torch_compile else unet
    if method.train_text_encoder:
        trained_unet, text_encoder_t, optimizer, lr_scheduler = accelerator.prepare(
            trained_unet, text_encoder, optimizer, lr_scheduler
        )
    else:
        trained_unet, optimizer, lr_scheduler = accelerator.prepare(trained_unet, optimizer, lr_scheduler)
        text_encoder_t = text_encoder
    trained_models = [trained_unet, text_encoder_t] if method.train_text_encoder else [trained_unet]
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    # 5) Checkpoints hold the LoRA tensors, optimizer, scheduler and where the loop stands; resume restores them.
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    register_trainable_state_hooks(accelerator, [unet, text_encoder] if method.train_text_encoder else [unet])
    restore_checkpoint(accelerator, resume_from, train.resume, out_dir, state)

    validator = Validator(recipe, pipe, accelerator, out_dir, base.name)
    checker = export.ExportChecker(
        lambda: load_pipeline(recipe.base, torch_dtype=dtype), device, check_settings(recipe), accelerator.autocast
    )
    writer = AdapterWriter(
        recipe=recipe,
        scan=scan,
        base=base,
        started_at=started_at,
        accelerator=accelerator,
        unet=unet,
        text_encoder=text_encoder,
        lora_configs=(unet_config, te_config),
        trainable=trainable,
        validator=validator,
        checker=checker,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-lora", config=tracker_config(recipe))

    # 6) The loop. A step = gradient_accumulation_steps micro-batches; each draws its noise from its own seed.
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator)
    for batch in loop.micro_batches():
        with accelerator.accumulate(*trained_models), accelerator.autocast():
            states = text_states(text_cache, tokenizer, text_encoder_t, batch.captions, device)
            # noise the latents at random timesteps, predict the noise (or v), MSE with optional min-SNR weights
            loss = batch_loss(trained_unet, noise_scheduler, batch, states, train, dtype)
            optimizer_step(accelerator, loss, trainable, optimizer, lr_scheduler, train.max_grad_norm)
        loop.after_micro_batch(loss, lr_scheduler.get_last_lr()[0])

    # 7) Final adapter: both formats, the export check, the A/B grid, the scores, the manifest (130 instead, if
    # Ctrl-C stopped the run: its checkpoint is saved).
    return loop.finish(trainable, lambda speed: write_final_outputs(writer, state, speed))


def write_final_outputs(writer: AdapterWriter, state, speed: dict):
    recipe = writer.recipe
    files, report = writer.save(Path(recipe.output.dir), state.step)
    export.finish_run(
        recipe,
        method="lora",
        base=BaseRef(recipe.base.pretrained_model_name_or_path, writer.base.kind, base_hash(recipe.base)),
        scan=writer.scan,
        state=state,
        files=files,
        validator=writer.validator,
        export_check=report,
        started_at=writer.started_at,
        speed=speed,
        log=writer.accelerator.print,
    )


def check_settings(recipe: Recipe) -> sampling.SampleSettings:
    """The one image the export check renders per format: the first validation prompt, seed 0."""
    v = recipe.validation
    prompt = v.prompts[0] if v.prompts else (recipe.data.trigger_word or "a photo")
    return sampling.SampleSettings(
        prompt=prompt,
        seed=0,
        negative_prompt=v.negative_prompt,
        steps=v.num_inference_steps,
        guidance=v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base),
        scheduler=v.scheduler,
    )


def kohya_metadata(recipe: Recipe, scan, base, step: int, started_at: float) -> dict[str, str]:
    from sdtune.adapters.kohya import kohya_metadata as build

    method, train = recipe.method, recipe.train
    res = recipe.data.resolution
    base_model_name, new_hash, legacy_hash = base_metadata(recipe, base)
    return build(
        base_model_name=base_model_name,
        base_model_hash=new_hash,
        base_model_legacy_hash=legacy_hash,
        bucket_counts=scan.bucket_counts(),
        trigger_words=[recipe.data.trigger_word] if recipe.data.trigger_word else [],
        resolution=(res, res),
        steps=step,
        max_train_steps=train.max_train_steps,
        epochs=max(
            1,
            math.ceil(
                step
                * train.train_batch_size
                * train.gradient_accumulation_steps
                / max(sum(r.repeats for r in scan.records), 1)
            ),
        ),
        rank=method.rank,
        alpha=method.alpha,
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


def base_metadata(recipe: Recipe, base) -> tuple[str, str | None, str | None]:
    """`ss_sd_model_name`, `ss_new_sd_model_hash`, `ss_sd_model_hash` of the base, never a local path.

    A single file gets A1111's own hashes (sha256 of the file, and the old 8-hex hash); a diffusers folder (and the
    toy base) gets sdtune's sha256 over its weight files, and its first 8 hex as the short form; a hub id is its
    name, and its hashes are unknown without the files.
    """
    from sdtune.adapters.kohya import legacy_model_hash

    if base.kind == "hub":
        return base.location, None, None
    digest = base_hash(recipe.base)
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


def cli(argv=None) -> int:
    """Entry point with one-line errors for bad input (no traceback for what the user can fix)."""
    try:
        return main(argv)
    except (RecipeError, DataError, BaseLoadError, FileNotFoundError, export.ExportCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
