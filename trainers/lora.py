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
import time

from accelerate.utils import set_seed

from sdtune.adapters import quiet_libraries
from sdtune.trainers.core.batches import BatchBuilder, prepare_latents
from sdtune.trainers.core.cache import text_conditioner
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.data import scan_dataset
from sdtune.trainers.core.diffusion import denoising_step_loss
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.outputs import AdapterWriter, finish_run, run_context, tracker_config
from sdtune.trainers.core.runtime import check_replicas_agree, make_accelerator, optimizer_step
from sdtune.trainers.core.session import (
    load_frozen_base,
    load_run_recipe,
    make_loop,
    parse_args,
    prepare_optimization,
    run_cli,
)


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    started_at = time.time()
    quiet_libraries()

    # 1) Recipe and preflight: everything that can be wrong with the inputs fails here, before a model loads.
    recipe, base, resume_from = load_run_recipe(args, "lora")
    method, train = recipe.method, recipe.train
    scan = scan_dataset(recipe.data)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The frozen base. Under mixed precision its weights sit in fp16/bf16; only the LoRA will be fp32.
    pipe, dtype, noise_scheduler = load_frozen_base(recipe, accelerator)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer

    # 3) Caches: the VAE runs once per image (ever, thanks to the disk cache), the text encoder once per caption.
    latents = prepare_latents(scan, recipe.data, vae, log=accelerator.print)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = BatchBuilder(scan, recipe.data, latents, vae, train.train_batch_size, train.seed, rank, world)

    # 4) LoRA layers (their random init is seeded: same seed, same starting LoRA), optimizer, schedule.
    set_seed(train.seed)
    unet_config, te_config = add_lora(unet, text_encoder, method)
    opt = prepare_optimization(unet, text_encoder, recipe, accelerator)
    captions = None if method.train_text_encoder else batches.possible_captions()
    text_states = text_conditioner(tokenizer, opt.text_encoder, captions, device)

    # 5) Checkpoints hold the LoRA tensors, optimizer, scheduler and where the loop stands; resume restores them.
    models = [unet, text_encoder] if method.train_text_encoder else [unet]
    state = start_or_resume(accelerator, models, resume_from, train.resume, recipe.output.dir)
    run = run_context(recipe, scan, base, pipe, accelerator, dtype, started_at)
    writer = AdapterWriter(run, unet, text_encoder, (unet_config, te_config), opt.trainable)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-lora", config=tracker_config(recipe))

    # 6) The loop. A step = gradient_accumulation_steps micro-batches; each draws its noise from its own seed.
    loop = make_loop(accelerator, recipe, state, batches, run.validator, on_checkpoint=writer.save)
    for batch in loop.micro_batches():
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            # noise the latents at random timesteps, predict the noise (or v), MSE with optional min-SNR weights
            loss = denoising_step_loss(
                opt.unet,
                noise_scheduler,
                batch.latents.to(device, dtype),
                text_states(batch.captions).to(dtype),
                noise_offset=train.noise_offset,
                snr_gamma=train.snr_gamma,
                generator=batch.generator,
            )
            optimizer_step(accelerator, loss, opt.trainable, opt.optimizer, opt.lr_scheduler, train.max_grad_norm)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])
    if loop.stopped_early:
        accelerator.end_training()
        return 130

    # 7) Final adapter: both formats, the export check, the A/B grid, the scores, the manifest. Under DDP every
    # process must hold the same weights by now (gradients are all-reduced each step): checked, not assumed.
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, opt.trainable)
    if accelerator.is_main_process:
        finish_run(run, writer.save, state, loop.speed_and_memory())
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """Entry point with one-line errors for bad input (no traceback for what the user can fix)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
