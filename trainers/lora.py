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

import sys
from pathlib import Path

from accelerate.utils import set_seed

from sdtune.trainers.core import pivotal
from sdtune.trainers.core.batches import idle_during_steps, make_batches
from sdtune.trainers.core.cache import text_states
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.data import scan_dataset
from sdtune.trainers.core.diffusion import batch_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.export import LoraWriter
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.outputs import RunOutputs
from sdtune.trainers.core.runtime import (
    load_frozen_base,
    make_accelerator,
    parse_args,
    prepare_optimization,
    run_cli,
    start_run,
    tracker_config,
    unet_and_text_encoder,
)
from sdtune.trainers.core.val_loss import held_out_images, held_out_loss
from sdtune.trainers.core.validation import Validator


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)

    # 1) Recipe and preflight: everything that can be wrong with the inputs fails here, before a model loads.
    run = start_run(args.recipe, args.overrides, "lora")
    recipe, base = run.recipe, run.base
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    scan, held = held_out_images(recipe, scan_dataset(recipe.data))  # validation.loss_split holds some back
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The frozen base. Under mixed precision its weights sit in fp16/bf16; only the LoRA will be fp32.
    frozen = load_frozen_base(recipe, accelerator)
    pipe, dtype, noise_scheduler = frozen.pipe, frozen.dtype, frozen.noise_scheduler
    unet, text_encoder, tokenizer = frozen.unet, frozen.text_encoder, frozen.tokenizer

    # 3) Caches: the VAE runs once per image (ever, thanks to the disk cache), the text encoder once per caption.
    frozen_text = not (method.train_text_encoder or method.pivotal)  # pivotal: the text's input vectors train
    batches, text_cache = make_batches(
        scan, recipe.data, train, accelerator, frozen.vae, tokenizer, text_encoder, frozen_text
    )

    # 4) LoRA layers (their random init is seeded: same seed, same starting LoRA), with pivotal tuning the new
    # token's vectors (trainers/core/pivotal.py), optimizer, schedule.
    set_seed(train.seed)
    lora_configs = add_lora(unet, text_encoder, method)
    vectors = pivotal.add_vectors(tokenizer, text_encoder, method)  # None unless method.pivotal
    trained = pivotal.with_vectors(unet_and_text_encoder(unet, text_encoder, method), vectors, method)
    opt = prepare_optimization(trained, recipe, accelerator)
    pivotal.hook(text_encoder, opt, vectors)

    # 5) Checkpoints hold the LoRA tensors, optimizer, scheduler, EMA and where the loop stands; resume restores them.
    state = start_or_resume(accelerator, opt.originals, run.resume_from, train.resume, out_dir, opt.extra_state)

    # 6) What the run writes: the LoRA in both formats (every checkpoint too), then grid, scores and manifest.
    # The held-out loss (validation.loss_split / loss_dir): fixed timesteps and noise, logged as val_loss.
    held_out = held_out_loss(recipe, held, frozen, accelerator)
    validator = Validator(recipe, pipe, accelerator, out_dir, base.name, held_out)
    outputs = RunOutputs.for_run(run, scan, accelerator, validator, dtype)
    writer = LoraWriter(outputs, unet, text_encoder, lora_configs, opt.trainable)
    if vectors is not None:  # both kinds of files, the embedding bundled in the kohya one; the base: untrained token
        writer = pivotal.PivotalWriter(writer, vectors)
        validator.without_adapter = pivotal.untrained(vectors, unet, text_encoder)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-lora", config=tracker_config(recipe))

    # 7) The loop. A step = gradient_accumulation_steps micro-batches; each draws its noise from its own seed.
    idle = idle_during_steps(recipe.data, text_cache, frozen.vae, text_encoder)  # on the CPU while it steps
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator, idle, opt.outputs_weights)
    for batch in loop.micro_batches():
        captions = pivotal.captions(tokenizer, batch.captions, method)  # the new token spelled out as its vectors
        with (
            accelerator.accumulate(*opt.models),
            accelerator.autocast(),
            pivotal.phase(unet, text_encoder, method, state.step),
        ):
            states = text_states(text_cache, tokenizer, opt.prepared(text_encoder), captions, device)
            # noise the latents at random timesteps, predict the noise (or v), MSE with optional min-SNR weights;
            # regularization images (is_reg subsets) at the end of the batch count at prior_loss_weight
            loss = batch_loss(opt.model, noise_scheduler, batch, states, train, dtype, False, method.prior_loss_weight)
            opt.step(loss, train.max_grad_norm)  # backward, clip, step, schedule (and the EMA, if on)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])

    # 8) Final adapter: both formats, the export check, the A/B grid, the scores, the manifest (130 instead, if
    # Ctrl-C stopped the run: its checkpoint is saved).
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))


def cli(argv=None) -> int:
    """Entry point with one-line errors for bad input (no traceback for what the user can fix)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
