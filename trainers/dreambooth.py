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
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sdtune.trainers.core import class_images, lora_layers, runtime
from sdtune.trainers.core.batches import idle_during_steps, make_batches
from sdtune.trainers.core.cache import text_states
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.data import DatasetScan, scan_dataset
from sdtune.trainers.core.diffusion import batch_loss, prior_preservation_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.export import LoraWriter
from sdtune.trainers.core.full_model import full_model_writer
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.outputs import RunOutputs, Writer
from sdtune.trainers.core.recipe import DreamBoothMethod, Recipe
from sdtune.trainers.core.validation import Validator


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


def prior_class_images(recipe: Recipe, pipe, user: DatasetScan | None, accelerator) -> DatasetScan:
    """The class images of prior preservation: the user's own, then as many generated by the (still untrained) base
    as `num_class_images` asks beyond them, cached on disk so a second run (or a resumed one) reuses them."""
    shortfall = max(0, recipe.method.num_class_images - (len(user.records) if user else 0))
    generated = None
    if shortfall:
        log, main_process = accelerator.print, accelerator.is_main_process
        generated = class_images.generate_class_images(recipe, pipe, shortfall, log, main_process)
        accelerator.wait_for_everyone()  # the other processes read the folder the main one filled
    return class_images.class_image_scan(recipe, user, generated, shortfall)


def instance_and_class_batches(
    recipe: Recipe, scan: DatasetScan, class_scan: DatasetScan | None, accelerator, frozen: runtime.FrozenBase
):
    """The batches of instance images; with prior preservation every micro-batch is followed by as many class
    images (their own noise: seed + 1). Returns the batches and the text cache (see `make_batches`)."""
    class_data = None
    if class_scan is not None:
        class_data = (class_scan, class_images.class_data_config(recipe, recipe.method.class_data_dir or "."))
    frozen_text = not recipe.method.train_text_encoder
    return make_batches(
        scan,
        recipe.data,
        recipe.train,
        accelerator,
        frozen.vae,
        frozen.tokenizer,
        frozen.text_encoder,
        frozen_text,
        None,
        class_data,
    )


def run_facts(method: DreamBoothMethod, class_scan: DatasetScan | None) -> dict:
    """DreamBooth's own settings, for the manifest's `training`."""
    return {
        "mode": "lora" if method.lora else "full",
        "instance_prompt": method.instance_prompt,
        "class_prompt": method.class_prompt,
        "with_prior_preservation": method.with_prior_preservation,
        "prior_loss_weight": method.prior_loss_weight,
        "num_class_images": len(class_scan.records) if class_scan else 0,
    }


def main(argv=None) -> int:
    args = runtime.parse_args(__doc__, argv)

    # 1) Recipe, instance and class folders, preflight: bad input fails here, before a model loads or a file is
    # written.
    run = runtime.start_run(args.recipe, args.overrides, "dreambooth")
    recipe, base = run.recipe, run.base
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    scan = instance_images(recipe)
    user_class_images = class_images.scan_user_class_images(recipe)
    accelerator = runtime.make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The base, frozen in fp16/bf16 under mixed precision. Class images come from it before anything trains.
    frozen = runtime.load_frozen_base(recipe, accelerator)
    pipe, dtype, unet, text_encoder = frozen.pipe, frozen.dtype, frozen.unet, frozen.text_encoder
    class_scan = None
    if method.with_prior_preservation:
        class_scan = prior_class_images(recipe, pipe, user_class_images, accelerator)

    # 3) Caches: the VAE runs once per instance and class image, the text encoder once per prompt if it is frozen.
    batches, text_cache = instance_and_class_batches(recipe, scan, class_scan, accelerator, frozen)

    # 4) What trains (seeded: same seed, same start), the optimizer and schedule; a full fine-tune overwrites the
    # base's own weights, so the base's grids and scores are taken first.
    validator = Validator(recipe, pipe, accelerator, out_dir, base.name)
    if not method.lora:
        validator.capture_base()
    set_seed(train.seed)
    lora_configs = setup_trainable(unet, text_encoder, method)
    opt = runtime.prepare_optimization(runtime.unet_and_text_encoder(unet, text_encoder, method), recipe, accelerator)
    ema = make_ema(method, opt.trainable)

    # 5) Checkpoints hold the trained tensors (the whole UNet in full mode), optimizer, schedule, EMA, position.
    state = start_or_resume(accelerator, opt.originals, run.resume_from, train.resume, out_dir, [ema] if ema else [])
    if ema is not None:  # Accelerate restores custom state on the CPU; the EMA steps against the device's weights
        ema.to(device=accelerator.device)
    outputs = RunOutputs.for_run(run, scan, accelerator, validator, dtype, facts=run_facts(method, class_scan))
    writer: Writer = (
        LoraWriter(outputs, unet, text_encoder, lora_configs, opt.trainable)
        if method.lora
        else full_model_writer(outputs, pipe, base_folder=Path(base.location))
    )

    def save(path: Path, step: int):
        with ema_weights(ema, opt.trainable):
            return writer.save(path, step)

    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-dreambooth", config=runtime.tracker_config(recipe))

    # 6) The loop. Each micro-batch: instance images, then (prior preservation) as many class images. A full model
    # is written once, at the end; a LoRA at every checkpoint too.
    idle = idle_during_steps(recipe.data, text_cache, frozen.vae, text_encoder)  # on the CPU while it steps
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, save if method.lora else None, validator, idle)
    for batch in loop.micro_batches():
        grad_to_text = text_encoder_active(method, state.step)
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            with contextlib.nullcontext() if grad_to_text else torch.no_grad():
                states = text_states(text_cache, frozen.tokenizer, opt.prepared(text_encoder), batch.captions, device)
            # noise at random timesteps, predict the noise (or v); per-image MSE, so instance and class weigh apart
            per_image = batch_loss(opt.model, frozen.noise_scheduler, batch, states, train, dtype, per_sample=True)
            loss = prior_preservation_loss(per_image, batch.num_prior, method.prior_loss_weight)
            step_args = (opt.trainable, opt.optimizer, opt.lr_scheduler, train.max_grad_norm)
            runtime.optimizer_step(accelerator, loss, *step_args)
        if ema is not None and accelerator.sync_gradients:
            ema.step(opt.trainable)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])

    # 7) The mode's outputs, the export check, A/B grid, scores and manifest; with EMA on, the EMA is what is
    # saved, shown and scored (130 instead, if Ctrl-C stopped the run: its checkpoint is saved).
    if ema is not None:
        ema.copy_to(opt.trainable)
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))


def cli(argv=None) -> int:
    """Entry point: bad input ends in one `error:` line and exit status 2."""
    return runtime.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
