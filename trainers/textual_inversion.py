"""Textual inversion: learn a new word (a few token vectors) for a concept, over a frozen Stable Diffusion v1-5 base.

Usage:
    accelerate launch trainers/textual_inversion.py recipes/textual_inversion.yaml     # toy base, CPU, a few minutes
    python trainers/textual_inversion.py recipe.yaml method.placeholder_token='<my-cat>' method.initializer_token=cat
    python trainers/textual_inversion.py recipe.yaml train.resume=latest              # continue a stopped run

Textual inversion (Gal et al. 2022, https://arxiv.org/abs/2208.01618) changes no weight of the model: it finds the
input vectors of one new token, `placeholder_token`, so that "a photo of <zq>" renders the training images. The
vectors start at `initializer_token`'s and are the only thing that trains, so the result is a few kilobytes; and
the model can only be steered toward what it can already draw (a LoRA or DreamBooth teaches new things).

What happens, in order:
    1. the recipe is validated; the data is scanned; images without a caption get a template sentence that holds
       the placeholder ("a photo of a <zq>", ...); the preflight is printed before any model loads;
    2. the base loads frozen; the placeholder's tokens are added (a token the tokenizer knows is refused) and their
       rows set to the initializer's vector; VAE latents are cached. The text encoder runs every step (its input
       vectors are what trains); the UNet and the text encoder's weights never change;
    3. the loop: encode the captions with the current vectors, noise the latents, predict, MSE; step the vectors;
    4. `learned_embeds.safetensors` (diffusers) and `<token>.safetensors` (A1111/ComfyUI) are written, both
       reloaded into a clean base and compared (export check); `adapter.json` records the untrained token's and the
       trained token's toy scores.
Ctrl-C saves a checkpoint and stops; `train.resume=latest` continues it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from accelerate.utils import set_seed

from sdtune.trainers.core.batches import idle_during_steps, make_batches
from sdtune.trainers.core.cache import encode_text
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.data import CaptionBuilder, DataError, DatasetScan, scan_dataset
from sdtune.trainers.core.diffusion import batch_loss
from sdtune.trainers.core.embeddings import EmbeddingWriter, TokenVectors, add_placeholder, hook_into, spell_out
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.outputs import RunOutputs
from sdtune.trainers.core.recipe import Recipe
from sdtune.trainers.core.runtime import (
    Trained,
    load_frozen_base,
    make_accelerator,
    parse_args,
    prepare_optimization,
    run_cli,
    start_run,
    tracker_config,
)
from sdtune.trainers.core.validation import Validator

# Sentences for images without a caption, each holding the placeholder once (after diffusers' textual-inversion
# example, which draws one at random per image; here each image keeps its own, so a resumed run sees the same).
TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a picture of the {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a good photo of the {}",
    "an image of a {}",
    "a clean picture of a {}",
    "a small {}",
    "a large {}",
    "the {}",
)


def captioned_images(recipe: Recipe) -> DatasetScan:
    """The training images, each with a caption that names the placeholder: its own caption (through
    data.caption_template, which may hold the placeholder itself), or, with none, a template sentence."""
    token, data = recipe.method.placeholder_token, recipe.data
    scan = scan_dataset(data)

    def builder(record) -> CaptionBuilder:
        return CaptionBuilder(data.for_subset(record.subset) if record.subset is not None else data)

    records = []
    for index, record in enumerate(scan.records):
        if not record.caption and token not in builder(record).template(""):
            record = replace(record, caption=TEMPLATES[index % len(TEMPLATES)].format(token))
        records.append(record)
    if not any(token in builder(r).template(r.caption) for r in records):
        raise DataError(
            f"method.placeholder_token: no training caption holds {token!r}, so it would never train; write it into "
            f"the captions or data.caption_template (e.g. 'a {token}'), or remove the captions to use templates"
        )
    scan.records = records
    return scan


def run_facts(recipe: Recipe) -> dict:
    """Textual inversion's own settings, for the manifest's `training`."""
    method = recipe.method
    return {
        "placeholder_token": method.placeholder_token,
        "initializer_token": method.initializer_token,
        "num_vectors": method.num_vectors,
    }


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)

    # 1) Recipe, data (a template sentence for each uncaptioned image), preflight: before any model loads.
    run = start_run(args.recipe, args.overrides, "textual_inversion")
    recipe, base = run.recipe, run.base
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    scan = captioned_images(recipe)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, scan, device.type, accelerator.num_processes))

    # 2) The frozen base, and the new word in it: its tokens in the tokenizer, its rows (the initializer's vector).
    frozen = load_frozen_base(recipe, accelerator)
    pipe, dtype, noise_scheduler = frozen.pipe, frozen.dtype, frozen.noise_scheduler
    unet, text_encoder, tokenizer = frozen.unet, frozen.text_encoder, frozen.tokenizer
    token_ids = add_placeholder(
        tokenizer, text_encoder, method.placeholder_token, method.initializer_token, method.num_vectors
    )

    # 3) Latents are cached (the VAE runs once per image, ever); the text states cannot be: their input trains.
    batches, _ = make_batches(scan, recipe.data, train, accelerator, frozen.vae, tokenizer, text_encoder, False)

    # 4) What trains: the placeholder's vectors alone (fp32). The UNet and text encoder are frozen, but gradients
    # pass through both, so they are the `frozen` models that gradient checkpointing (if asked) applies to.
    set_seed(train.seed)
    vectors = TokenVectors(text_encoder, token_ids)
    opt = prepare_optimization([Trained(vectors)], recipe, accelerator, frozen=(unet, text_encoder))
    hook_into(text_encoder, opt.model)  # every encoding, in training and in previews, uses the current vectors

    # 5) Checkpoints hold the vectors, optimizer, schedule, EMA and where the loop stands.
    state = start_or_resume(accelerator, opt.originals, run.resume_from, train.resume, out_dir, opt.extra_state)

    # 6) What the run writes: both embedding files (every checkpoint too), then grid, scores and manifest. The
    # "base" beside the embedding is the untrained token.
    validator = Validator(recipe, pipe, accelerator, out_dir, base.name)
    validator.without_adapter = vectors.untrained
    outputs = RunOutputs.for_run(run, scan, accelerator, validator, dtype, facts=run_facts(recipe))
    writer = EmbeddingWriter(outputs, vectors)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-textual-inversion", config=tracker_config(recipe))

    # 7) The loop: the captions are encoded every step (the placeholder written out as its n tokens), then noise,
    # predict, MSE (min-SNR optional), and a step of the vectors.
    idle = idle_during_steps(recipe.data, None, frozen.vae, text_encoder)  # the VAE, on the CPU while it steps
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator, idle, opt.outputs_weights)
    for batch in loop.micro_batches():
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            captions = [spell_out(tokenizer, c, method.placeholder_token) for c in batch.captions]
            states = encode_text(tokenizer, text_encoder, captions, device)
            loss = batch_loss(unet, noise_scheduler, batch, states, train, dtype)
            opt.step(loss, train.max_grad_norm)  # backward (through the frozen UNet and text encoder), clip, step
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])

    # 8) Both files, the export check, the A/B grid (untrained vs trained token), the scores, the manifest (130
    # instead, if Ctrl-C stopped the run: its checkpoint is saved).
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))


def cli(argv=None) -> int:
    """Entry point: bad input ends in one `error:` line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
