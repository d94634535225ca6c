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

import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sdtune.adapters import quiet_libraries
from sdtune.trainers.core import batches as batching
from sdtune.trainers.core import (
    cache,
    checkpointing,
    class_images,
    diffusion,
    estimate,
    full_model,
    lora_layers,
    outputs,
    runtime,
    session,
)
from sdtune.trainers.core.data import DatasetScan, scan_dataset
from sdtune.trainers.core.recipe import DreamBoothMethod, Recipe


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
        return lora_layers.add_lora(unet, text_encoder, method)
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
    args = session.parse_args(__doc__, argv)
    started_at = time.time()
    quiet_libraries()

    # 1) Recipe, instance and class folders, preflight: bad input fails here, before a model loads or a file is
    # written.
    recipe, base, resume_from = session.load_run_recipe(args, "dreambooth")
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    scan = instance_images(recipe)
    user_class_images = class_images.scan_user_class_images(recipe)
    accelerator = runtime.make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(estimate.preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The base, frozen in fp16/bf16 under mixed precision. Class images come from it before anything trains.
    pipe, dtype, noise_scheduler = session.load_frozen_base(recipe, accelerator)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
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
    def batch_builder(images: DatasetScan, cfg, seed: int) -> batching.BatchBuilder:
        latents = batching.prepare_latents(images, cfg, vae, log=accelerator.print)
        process, world = accelerator.process_index, accelerator.num_processes
        return batching.BatchBuilder(images, cfg, latents, vae, train.train_batch_size, seed, process, world)

    batches = batch_builder(scan, recipe.data, train.seed)
    if class_scan is not None:  # class images draw their own latent noise: seed + 1
        class_cfg = class_images.class_data_config(recipe, method.class_data_dir or ".")
        batches = batching.PriorPairedBatches(batches, batch_builder(class_scan, class_cfg, train.seed + 1))

    # 4) What trains (seeded: same seed, same start), the optimizer and schedule; a full fine-tune overwrites the
    # base's own weights, so the base's grids and scores are taken first.
    run = outputs.run_context(recipe, scan, base, pipe, accelerator, dtype, started_at)
    if not method.lora:
        run.validator.capture_base()
    set_seed(train.seed)
    lora_configs = setup_trainable(unet, text_encoder, method)
    opt = session.prepare_optimization(unet, text_encoder, recipe, accelerator)
    ema = make_ema(method, opt.trainable)
    captions = None if method.train_text_encoder else batches.possible_captions()
    text_states = cache.text_conditioner(tokenizer, opt.text_encoder, captions, device)

    # 5) Checkpoints hold the trained tensors (the whole UNet in full mode), optimizer, schedule, EMA, position.
    models = [unet, text_encoder] if method.train_text_encoder else [unet]
    state = checkpointing.start_or_resume(
        accelerator, models, resume_from, train.resume, out_dir, [ema] if ema else []
    )
    lora_writer = outputs.AdapterWriter(run, unet, text_encoder, lora_configs, opt.trainable)
    writer = (
        lora_writer if method.lora else full_model.FullModelWriter(pipe, lora_writer, base_folder=Path(base.location))
    )

    def save(path: Path, step: int):
        with ema_weights(ema, opt.trainable):
            return writer.save(path, step)

    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-dreambooth", config=outputs.tracker_config(recipe))

    # 6) The loop. Each micro-batch: instance images, then (prior preservation) as many class images. A full model
    # is written once, at the end; a LoRA at every checkpoint too.
    loop = session.make_loop(
        accelerator, recipe, state, batches, run.validator, on_checkpoint=save if method.lora else None
    )
    for batch in loop.micro_batches():
        grad_to_text = text_encoder_active(method, state.step)
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            with contextlib.nullcontext() if grad_to_text else torch.no_grad():
                states = text_states(batch.captions).to(dtype)
            # noise at random timesteps, predict the noise (or v); per-image MSE, so instance and class weigh apart
            per_image = diffusion.denoising_step_loss(
                opt.unet,
                noise_scheduler,
                batch.latents.to(device, dtype),
                states,
                noise_offset=train.noise_offset,
                snr_gamma=train.snr_gamma,
                generator=batch.generator,
                per_sample=True,
            )
            loss = diffusion.prior_preservation_loss(per_image, batch.num_prior, method.prior_loss_weight)
            runtime.optimizer_step(
                accelerator, loss, opt.trainable, opt.optimizer, opt.lr_scheduler, train.max_grad_norm
            )
        if ema is not None and accelerator.sync_gradients:
            ema.step(opt.trainable)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])
    if loop.stopped_early:
        accelerator.end_training()
        return 130

    # 7) The mode's outputs, the export check, A/B grid, scores and manifest; with EMA on, the EMA is saved.
    accelerator.wait_for_everyone()
    runtime.check_replicas_agree(accelerator, opt.trainable)
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(opt.trainable)
        facts = {
            "mode": "lora" if method.lora else "full",
            "class_prompt": method.class_prompt,
            "with_prior_preservation": method.with_prior_preservation,
            "prior_loss_weight": method.prior_loss_weight,
            "num_class_images": len(class_scan.records) if class_scan else 0,
        }
        outputs.finish_run(run, writer.save, state, loop.speed_and_memory() | facts)
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """Entry point: bad input ends in one `error:` line and exit status 2."""
    return session.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
