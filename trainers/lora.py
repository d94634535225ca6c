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
import sys
import time
from pathlib import Path

from accelerate.utils import set_seed
from diffusers import DDPMScheduler

from sdtune.adapters import quiet_libraries
from sdtune.adapters.base import BaseLoadError, load_pipeline, resolve_base
from sdtune.trainers.core import export
from sdtune.trainers.core.batches import BatchBuilder, prepare_latents
from sdtune.trainers.core.cache import text_conditioner
from sdtune.trainers.core.checkpointing import resolve_resume, start_or_resume
from sdtune.trainers.core.data import DataError, scan_dataset
from sdtune.trainers.core.diffusion import denoising_step_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.outputs import AdapterWriter, finish_run, tracker_config, validation_and_check
from sdtune.trainers.core.recipe import RecipeError, load_recipe, trainer_for
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
    parser.add_argument("recipe", help="YAML recipe (see recipes/).")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 output.dir=runs/x")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started_at = time.time()
    quiet_libraries()

    # 1) Recipe and preflight: everything that can be wrong with the inputs fails here, before a model loads.
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.method.type != "lora":
        raise RecipeError(f"{args.recipe}: method.type is {recipe.method.type!r}: {trainer_for(recipe.method.type)}")
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    base = resolve_base(recipe.base)
    resume_from = resolve_resume(out_dir, train.resume)
    scan = scan_dataset(recipe.data)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The frozen base. Under mixed precision its weights sit in fp16/bf16; only the LoRA will be fp32.
    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(recipe.base, torch_dtype=dtype).to(device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # keeps the base's prediction_type

    # 3) Caches: the VAE runs once per image (ever, thanks to the disk cache), the text encoder once per caption.
    latents = prepare_latents(scan, recipe.data, vae, log=accelerator.print)
    batches = BatchBuilder(
        scan,
        recipe.data,
        latents,
        vae,
        train.train_batch_size,
        train.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )

    # 4) LoRA layers (their random init is seeded: same seed, same starting LoRA), optimizer, schedule.
    set_seed(train.seed)
    unet_config, te_config = add_lora(unet, text_encoder, method)
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
    captions = None if method.train_text_encoder else batches.possible_captions()
    text_states = text_conditioner(tokenizer, text_encoder_t, captions, device)

    # 5) Checkpoints hold the LoRA tensors, optimizer, scheduler and where the loop stands; resume restores them.
    models = [unet, text_encoder] if method.train_text_encoder else [unet]
    state = start_or_resume(accelerator, models, resume_from, train.resume, out_dir)
    validator, checker = validation_and_check(recipe, pipe, accelerator, base, dtype)
    writer = AdapterWriter(
        recipe=recipe,
        scan=scan,
        base=base,
        started_at=started_at,
        accelerator=accelerator,
        validator=validator,
        checker=checker,
        unet=unet,
        text_encoder=text_encoder,
        lora_configs=(unet_config, te_config),
        trainable=trainable,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-lora", config=tracker_config(recipe))

    # 6) The loop. A step = gradient_accumulation_steps micro-batches; each draws its noise from its own seed.
    loop = RunLoop(
        accelerator,
        train,
        state,
        batches,
        out_dir,
        on_checkpoint=writer.save,
        on_validation=lambda step: validator.grid(step, out_dir / "samples" / f"step-{step:06d}.png"),
        validation_steps=recipe.validation.validation_steps,
    )
    for batch in loop.micro_batches():
        with accelerator.accumulate(*trained_models), accelerator.autocast():
            # noise the latents at random timesteps, predict the noise (or v), MSE with optional min-SNR weights
            loss = denoising_step_loss(
                trained_unet,
                noise_scheduler,
                batch.latents.to(device, dtype),
                text_states(batch.captions).to(dtype),
                noise_offset=train.noise_offset,
                snr_gamma=train.snr_gamma,
                generator=batch.generator,
            )
            optimizer_step(accelerator, loss, trainable, optimizer, lr_scheduler, train.max_grad_norm)
        loop.after_micro_batch(loss, lr_scheduler.get_last_lr()[0])
    if loop.stopped_early:
        accelerator.end_training()
        return 130

    # 7) Final adapter: both formats, the export check, the A/B grid, the scores, the manifest. Under DDP every
    # process must hold the same weights by now (gradients are all-reduced each step): checked, not assumed.
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, trainable)
    if accelerator.is_main_process:
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
            training=loop.speed_and_memory(),
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
