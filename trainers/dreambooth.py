"""DreamBooth: teach a Stable Diffusion v1-5 base one subject from a few images, as a full fine-tune or a LoRA.

Usage:
    accelerate launch trainers/dreambooth.py recipes/toy-dreambooth.yaml             # toy base, CPU, a few minutes
    python trainers/dreambooth.py recipes/sd15-dreambooth-default.yaml data.train_data_dir=photos/my-dog
    python trainers/dreambooth.py recipe.yaml method.lora=true                      # DreamBooth-LoRA
    python trainers/dreambooth.py recipe.yaml train.resume=latest                   # continue a stopped run

DreamBooth (Ruiz et al. 2023, https://arxiv.org/abs/2208.12242) binds a subject to a rare identifier inside its
class: every instance image trains on "a photo of sks dog". Alone, that teaches the model that every dog is this
dog ("language drift"). Prior preservation pairs each instance batch with as many images the base itself drew for
"a photo of dog" and adds their loss, weighted by `prior_loss_weight`, so the class keeps its look.

What happens, in order:
    1. the recipe is validated; instance and class folders are scanned and a preflight is printed before any model
       loads;
    2. the base loads; missing class images are generated from it (cached on disk, resumable);
    3. VAE latents of instance and class images are cached, and text embeddings when the text encoder is frozen;
    4. full mode: the UNet (and the text encoder, for its first `text_encoder_steps`) trains in fp32; LoRA mode:
       the same peft LoRA layers as trainers/lora.py; an optional EMA of the trained weights is kept;
    5. the loop: noise, predict, instance loss + prior_loss_weight x class loss, step; log, checkpoint, validate;
    6. full mode writes a diffusers folder, a single-file checkpoint and an SVD-extracted LoRA; LoRA mode the PEFT
       and kohya files; both run the export check and write `adapter.json` (trigger: the instance prompt).
Ctrl-C saves a checkpoint and stops; `train.resume=latest` continues it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler

from sdtune.adapters import quiet_libraries
from sdtune.adapters.base import BaseLoadError, load_pipeline, resolve_base
from sdtune.trainers.core import class_images, export
from sdtune.trainers.core.batches import BatchBuilder, PriorPairedBatches, prepare_latents
from sdtune.trainers.core.cache import text_conditioner
from sdtune.trainers.core.checkpointing import resolve_resume, start_or_resume
from sdtune.trainers.core.data import DataError, DatasetScan, scan_dataset
from sdtune.trainers.core.diffusion import denoising_step_loss, prior_preservation_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.full_model import FullModelWriter
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.outputs import AdapterWriter, finish_run, tracker_config, validation_and_check
from sdtune.trainers.core.recipe import DreamBoothMethod, Recipe, RecipeError, load_recipe, trainer_for
from sdtune.trainers.core.runtime import (
    check_replicas_agree,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    param_groups,
    prepare_models,
    scaled_lr,
    weight_dtype,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe with method.type: dreambooth (see recipes/).")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. method.lora=true output.dir=runs/x")
    return parser.parse_args(argv)


def instance_images(recipe: Recipe) -> DatasetScan:
    """The subject's images, each captioned with the instance prompt (or, with `use_captions`, its own caption)."""
    method: DreamBoothMethod = recipe.method
    scan = scan_dataset(recipe.data)
    scan.records = [
        replace(r, caption=r.caption if method.use_captions and r.caption else method.instance_prompt)
        for r in scan.records
    ]
    return scan


def setup_trainable(unet, text_encoder, method: DreamBoothMethod) -> tuple:
    """LoRA mode: peft LoRA layers, as trainers/lora.py. Full mode: the UNet itself (and the text encoder if asked),
    in fp32 even when the frozen parts sit in half precision, so that small updates are not rounded away."""
    if method.lora:
        return add_lora(unet, text_encoder, method)
    for model, trained in ((unet, True), (text_encoder, method.train_text_encoder)):
        model.requires_grad_(trained)
        if trained:
            model.to(torch.float32)
    return None, None


def text_encoder_active(method: DreamBoothMethod, step: int) -> bool:
    """The text encoder trains for its first `text_encoder_steps` steps (all of them if unset), then is frozen."""
    return method.train_text_encoder and (method.text_encoder_steps is None or step < method.text_encoder_steps)


def make_ema(method: DreamBoothMethod, params):
    """An exponential moving average of the trained weights (what gets saved when on), or None."""
    if not method.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=method.ema_decay)


@contextlib.contextmanager
def ema_weights(ema, params):
    """Puts the EMA weights into the model for a save, then the training weights back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def main(argv=None) -> int:
    args = parse_args(argv)
    started_at = time.time()
    quiet_libraries()

    # 1) Recipe, instance and class folders, preflight: bad input fails here, before a model loads or a file is
    # written.
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.method.type != "dreambooth":
        raise RecipeError(f"{args.recipe}: method.type is {recipe.method.type!r}: {trainer_for(recipe.method.type)}")
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    base = resolve_base(recipe.base)
    resume_from = resolve_resume(out_dir, train.resume)
    scan = instance_images(recipe)
    user_class_images = class_images.scan_user_class_images(recipe)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The base, frozen in fp16/bf16 under mixed precision. Class images come from it before anything trains.
    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(recipe.base, torch_dtype=dtype).to(device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # keeps the base's prediction_type
    pipe.set_progress_bar_config(disable=True)
    class_scan = None
    if method.with_prior_preservation:
        shortfall = method.num_class_images - (len(user_class_images.records) if user_class_images else 0)
        generated = None
        if shortfall:
            generated = class_images.generate_class_images(
                recipe, pipe, shortfall, accelerator.print, accelerator.is_main_process
            )
            accelerator.wait_for_everyone()
        class_scan = class_images.class_image_scan(recipe, user_class_images, generated, shortfall)

    # 3) Caches: the VAE runs once per instance and class image, the text encoder once per prompt if it is frozen.
    def batch_builder(images: DatasetScan, cfg, seed: int) -> BatchBuilder:
        latents = prepare_latents(images, cfg, vae, log=accelerator.print)
        return BatchBuilder(
            images,
            cfg,
            latents,
            vae,
            train.train_batch_size,
            seed,
            accelerator.process_index,
            accelerator.num_processes,
        )

    batches = batch_builder(scan, recipe.data, train.seed)
    if class_scan is not None:  # class images draw their own latent noise: seed + 1
        class_cfg = class_images.class_data_config(recipe, method.class_data_dir or ".")
        batches = PriorPairedBatches(batches, batch_builder(class_scan, class_cfg, train.seed + 1))

    # 4) What trains (seeded: same seed, same start), the optimizer and schedule; validation needs the base first.
    validator, checker = validation_and_check(recipe, pipe, accelerator, base, dtype)
    if not method.lora:
        validator.capture_base()  # a full fine-tune overwrites the base's own weights
    set_seed(train.seed)
    lora_configs = setup_trainable(unet, text_encoder, method)
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if method.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    lr = scaled_lr(train, accelerator.num_processes)
    optimizer = make_optimizer(param_groups(unet, text_encoder, method, lr), train)
    lr_scheduler = make_lr_scheduler(optimizer, train, accelerator.num_processes)
    trained_unet, text_encoder_t, optimizer, lr_scheduler, trained_models = prepare_models(
        accelerator, unet, text_encoder, method.train_text_encoder, optimizer, lr_scheduler, train.torch_compile
    )
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    ema = make_ema(method, trainable)
    captions = None if method.train_text_encoder else batches.possible_captions()
    text_states = text_conditioner(tokenizer, text_encoder_t, captions, device)

    # 5) Checkpoints hold the trained tensors (the whole UNet in full mode), optimizer, schedule, EMA, position.
    models = [unet, text_encoder] if method.train_text_encoder else [unet]
    state = start_or_resume(accelerator, models, resume_from, train.resume, out_dir, [ema] if ema else [])
    lora_writer = AdapterWriter(
        recipe=recipe,
        scan=scan,
        base=base,
        started_at=started_at,
        accelerator=accelerator,
        validator=validator,
        checker=checker,
        unet=unet,
        text_encoder=text_encoder,
        lora_configs=lora_configs,
        trainable=trainable,
    )
    writer = lora_writer if method.lora else FullModelWriter(pipe, lora_writer, base_folder=Path(base.location))

    def save(path: Path, step: int):
        with ema_weights(ema, trainable):
            return writer.save(path, step)

    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-dreambooth", config=tracker_config(recipe))

    # 6) The loop. Each micro-batch: instance images, then (prior preservation) as many class images.
    loop = RunLoop(
        accelerator,
        train,
        state,
        batches,
        out_dir,
        on_checkpoint=save if method.lora else None,  # a full model is written once, at the end
        on_validation=lambda step: validator.grid(step, out_dir / "samples" / f"step-{step:06d}.png"),
        validation_steps=recipe.validation.validation_steps,
    )
    for batch in loop.micro_batches():
        grad_to_text = text_encoder_active(method, state.step)
        with accelerator.accumulate(*trained_models), accelerator.autocast():
            with contextlib.nullcontext() if grad_to_text else torch.no_grad():
                states = text_states(batch.captions).to(dtype)
            # noise at random timesteps, predict the noise (or v); per-image MSE, so instance and class weigh apart
            per_image = denoising_step_loss(
                trained_unet,
                noise_scheduler,
                batch.latents.to(device, dtype),
                states,
                noise_offset=train.noise_offset,
                snr_gamma=train.snr_gamma,
                generator=batch.generator,
                per_sample=True,
            )
            loss = prior_preservation_loss(per_image, batch.num_prior, method.prior_loss_weight)
            optimizer_step(accelerator, loss, trainable, optimizer, lr_scheduler, train.max_grad_norm)
        if ema is not None and accelerator.sync_gradients:
            ema.step(trainable)
        loop.after_micro_batch(loss, lr_scheduler.get_last_lr()[0])
    if loop.stopped_early:
        accelerator.end_training()
        return 130

    # 7) The outputs of the mode, the export check, A/B grid, scores and manifest; with EMA on, the EMA is saved.
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, trainable)
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trainable)
        prior = {
            "mode": "lora" if method.lora else "full",
            "class_prompt": method.class_prompt,
            "with_prior_preservation": method.with_prior_preservation,
            "prior_loss_weight": method.prior_loss_weight,
            "num_class_images": len(class_scan.records) if class_scan else 0,
        }
        finish_run(
            recipe=recipe,
            base=base,
            scan=scan,
            accelerator=accelerator,
            validator=validator,
            save=writer.save,
            steps=state.step,
            final_loss=state.last_loss,
            started_at=started_at,
            training=loop.speed_and_memory() | prior,
        )
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """Entry point with one-line errors for bad input (no traceback for what the user can fix)."""
    try:
        return main(argv)
    except (RecipeError, DataError, BaseLoadError, FileNotFoundError, export.ExportCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
