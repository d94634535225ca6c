"""Train a ControlNet over a frozen Stable Diffusion v1-5 base, from one YAML recipe.

Usage:
    accelerate launch trainers/controlnet.py recipes/controlnet-toy.yaml              # toy base, CPU, a few minutes
    accelerate launch trainers/controlnet.py recipes/sd15-controlnet-low-vram.yaml data.train_data_dir=my-pairs
    python trainers/controlnet.py recipe.yaml train.resume=latest                     # continue a stopped run

A ControlNet (Zhang et al. 2023, https://arxiv.org/abs/2302.05543) is a trainable copy of the UNet's encoder. It
reads the noisy latent, the timestep, the prompt and a conditioning image (edges, a mask, a pose ...), and adds
one residual to each skip connection of the frozen UNet and one to its middle block. Those residuals leave the
base through zero-initialised 1x1 convolutions, so at step 0 the ControlNet changes nothing and training starts
from the base exactly. The loss is the base's own denoising loss: the ControlNet learns whatever in the condition
helps the frozen UNet predict the noise.

What happens, in order (as diffusers' examples/controlnet/train_controlnet.py, on sdtune's shared core):
    1. the recipe is validated; every image/condition pair is checked and a preflight printed, before any model;
    2. the base loads frozen; target latents are cached (VAE once per image) and prompts encoded once;
    3. the ControlNet is copied from the base UNet (`ControlNetModel.from_unet`) or continued from a file;
    4. the loop: noise the latents, ControlNet residuals, frozen UNet prediction, MSE; log, checkpoint, validate;
    5. the ControlNet is written as a diffusers folder and as one `control_model.*` file (A1111 / ComfyUI), with
       `ab_grid.png` (condition | base | ControlNet) and `adapter.json` (recipe, data fingerprint, scores).
Ctrl-C saves a checkpoint and stops; `train.resume=latest` continues it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from sdtune.adapters import annotate
from sdtune.adapters.controlnet import load_controlnet
from sdtune.adapters.manifest import condition_file, pair_prompts
from sdtune.adapters.sampling import save_png_atomic
from sdtune.trainers.core import runtime
from sdtune.trainers.core.batches import idle_during_steps, make_batches
from sdtune.trainers.core.cache import text_states
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.controlnet_writer import ControlNetWriter
from sdtune.trainers.core.data import (
    PairScan,
    condition_tensor,
    fit_to_bucket,
    load_condition,
    load_image,
    scan_pairs,
)
from sdtune.trainers.core.diffusion import batch_loss, host_to_device
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.outputs import RunOutputs
from sdtune.trainers.core.recipe import ControlNetMethod, DataConfig, Recipe, RecipeError
from sdtune.trainers.core.val_loss import held_out_images, held_out_loss
from sdtune.trainers.core.validation import ControlValidator

VALIDATION_CONDITIONS = 2  # training conditions shown in the grids when the recipe names no validation_image
KEEP_CONDITIONS_BYTES = 512 * 2**20  # conditioning tensors kept in memory once read (all of them at toy scale)


# -- data -----------------------------------------------------------------------------------------------------------


def data_config(recipe: Recipe) -> DataConfig:
    """The data section the batches use: diffusers' `proportion_empty_prompts` is kohya's caption dropout."""
    if recipe.method.proportion_empty_prompts:
        return recipe.data.model_copy(update={"caption_dropout_rate": recipe.method.proportion_empty_prompts})
    return recipe.data


@dataclass
class Conditions:
    """Record index -> the conditioning tensor ([3, H, W] in [0, 1]), fitted to the image's bucket and crop.

    Given conditions are read from their files; `conditioning: canny` computes them from the image itself. They
    are kept once read, up to `KEEP_CONDITIONS_BYTES` (48 kB each at 64 px, 3 MB at 512 px); the rest are read
    again when their image comes up.
    """

    scan: PairScan
    cfg: DataConfig
    method: ControlNetMethod

    def __post_init__(self):
        self._kept: dict[int, torch.Tensor] = {}

    def image(self, index: int):
        if self.scan.conditions is not None:
            return load_condition(self.scan, index, self.cfg)
        record = self.scan.records[index]
        source = fit_to_bucket(load_image(record, self.cfg, self.scan.dataset), record.bucket)
        options = annotate.AnnotateOptions(self.method.canny_low_threshold, self.method.canny_high_threshold)
        return annotate.canny(source, options)

    def __call__(self, index: int) -> torch.Tensor:
        if index in self._kept:
            return self._kept[index]
        tensor = condition_tensor(self.image(index))
        if (len(self._kept) + 1) * tensor.numel() * tensor.element_size() <= KEEP_CONDITIONS_BYTES:
            self._kept[index] = tensor
        return tensor


def validation_conditions(recipe: Recipe, conditions: Conditions, out_dir: Path) -> list[str]:
    """The validation conditioning images: the recipe's `method.validation_image`, else the first training pairs'
    conditions, saved under `samples/conditions/` so the grids and `sdtune sample` can name them."""
    given = recipe.method.validation_image
    for path in given:
        if not Path(path).is_file():
            raise RecipeError(f"method.validation_image: {path} not found")
    paths = list(given)
    for index in range(0 if given else min(VALIDATION_CONDITIONS, len(conditions.scan.records))):
        paths.append(str(out_dir / condition_file(index)))
        save_png_atomic(conditions.image(index), Path(paths[-1]))
    try:
        if recipe.validation.prompts:  # no prompts: no validation, nothing to pair
            pair_prompts(recipe.validation.sample_prompts(), paths)  # refuse a prompt/image count mismatch now
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return paths


# -- model ----------------------------------------------------------------------------------------------------------


def init_controlnet(method: ControlNetMethod, unet):
    """The trainable ControlNet, fp32: continued from a folder or file, or copied from the base UNet's encoder
    (its zero convolutions start at 0, so the base's output is unchanged at step 0)."""
    from diffusers import ControlNetModel

    if method.controlnet_model_name_or_path:
        try:
            controlnet = load_controlnet(method.controlnet_model_name_or_path, unet=unet, torch_dtype=torch.float32)
        except (FileNotFoundError, ValueError) as exc:
            raise RecipeError(f"method.controlnet_model_name_or_path: {exc}") from None
    else:
        controlnet = ControlNetModel.from_unet(unet).to(torch.float32)
    controlnet.requires_grad_(True)
    controlnet.train()
    return controlnet.to(unet.device)


def controlled_unet(controlnet, unet, conditions: torch.Tensor, dtype: torch.dtype):
    """The model the diffusion loss trains: the ControlNet reads the noisy latent and the condition; its residuals
    are added to the frozen UNet's skip connections and middle block."""

    def forward(noisy_latents, timesteps, encoder_hidden_states, return_dict=False):
        down, mid = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=conditions,
            return_dict=False,
        )
        return unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states,
            down_block_additional_residuals=[residual.to(dtype) for residual in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
        )

    return forward


def held_out_model(held: PairScan | None, data: DataConfig, method: ControlNetMethod, opt, unet, dtype) -> tuple:
    """(forward, trained) for the held-out loss: held-out image i's model is the ControlNet with i's condition over
    the frozen UNet, as in training."""
    if held is None:
        return None, ()
    conditions, controlnet = Conditions(held, data, method), opt.originals[0]

    def forward(index: int):
        condition = host_to_device(conditions(index)[None], unet.device).to(dtype)
        return controlled_unet(controlnet, unet, condition, dtype)

    return forward, (controlnet,)


# -- main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = runtime.parse_args(__doc__, argv)

    # 1) Recipe and preflight: every image/condition pair is checked here, before a model loads.
    run = runtime.start_run(args.recipe, args.overrides, "controlnet")
    recipe, base = run.recipe, run.base
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    data = data_config(recipe)
    if method.conditioning == "canny":
        annotate.annotator("canny", annotate.AnnotateOptions())  # OpenCV missing: say so now, not at step 1
    pairs = functools.partial(scan_pairs, conditioning_column=method.conditioning_image_column,
                              computed=method.conditioning == "canny")  # fmt: skip
    scan, held = held_out_images(recipe, pairs(data), pairs)  # validation.loss_split holds some pairs back
    conditions = Conditions(scan, data, method)
    validation_images = validation_conditions(recipe, conditions, out_dir)
    accelerator = runtime.make_accelerator(recipe)
    accelerator.print(preflight(recipe, scan, accelerator.device.type, accelerator.num_processes))

    # 2) The frozen base (fp16/bf16 under mixed precision) and the caches: target latents once per image, ever;
    # the frozen text encoder once per caption (captions are a fixed set unless tags are shuffled).
    frozen = runtime.load_frozen_base(recipe, accelerator)
    unet, dtype, device = frozen.unet, frozen.dtype, accelerator.device
    batches, text_cache = make_batches(
        scan, data, train, accelerator, frozen.vae, frozen.tokenizer, frozen.text_encoder, True, conditions
    )

    # 3) The ControlNet (fp32), optimizer and schedule. The loss reaches the ControlNet through the frozen UNet's
    # decoder, so the UNet goes along: channels_last, and gradient checkpointing of both networks if asked. Seeded:
    # `from_unet` draws the conditioning embedding at random (same seed, same start, as the other trainers).
    set_seed(train.seed)
    controlnet = init_controlnet(method, unet)
    opt = runtime.prepare_optimization([runtime.Trained(controlnet)], recipe, accelerator, frozen=(unet,))

    # 4) Checkpoints hold the ControlNet, optimizer, scheduler, EMA and where the loop stands; resume restores them.
    state = start_or_resume(accelerator, opt.originals, run.resume_from, train.resume, out_dir, opt.extra_state)

    # 5) What the run writes: the ControlNet in both layouts (every checkpoint too), then grid, scores and manifest.
    held_out = held_out_loss(recipe, held, frozen, accelerator, *held_out_model(held, data, method, opt, unet, dtype))
    validator = ControlValidator(recipe, frozen.pipe, controlnet, accelerator, validation_images, base.name, held_out)
    outputs = RunOutputs.for_run(run, scan, accelerator, validator, dtype)
    writer = ControlNetWriter(outputs, opt.model)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-controlnet", config=runtime.tracker_config(recipe))

    # 6) The loop. Each micro-batch draws its noise and timesteps from its own seed (exact resume).
    idle = idle_during_steps(data, text_cache, frozen.vae, frozen.text_encoder)  # on the CPU while it steps
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator, idle, opt.outputs_weights)
    for batch in loop.micro_batches():
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            states = text_states(text_cache, frozen.tokenizer, frozen.text_encoder, batch.captions, device)
            # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; ControlNet(x_t, t, prompt, condition) -> residuals;
            # frozen UNet(x_t, t, prompt) + residuals -> eps (or v); MSE to the target
            model = controlled_unet(opt.model, unet, host_to_device(batch.conditions, device).to(dtype), dtype)
            loss = batch_loss(model, frozen.noise_scheduler, batch, states, train, dtype)
            opt.step(loss, train.max_grad_norm)  # backward, clip, step, schedule (and the EMA, if on)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])

    # 7) The ControlNet in both layouts, the grid, the scores and the manifest (130 instead, if Ctrl-C stopped the
    # run: its checkpoint is saved).
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))


def cli(argv=None) -> int:
    """Entry point with one-line errors for bad input (no traceback for what the user can fix)."""
    return runtime.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
