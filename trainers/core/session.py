"""The parts of a training script that every method shares, in the order a script calls them.

    recipe, base, resume_from = load_run_recipe(args, "dreambooth")    # 1) typed recipe, one-line errors
    pipe, dtype, noise_scheduler = load_frozen_base(recipe, accelerator) # 2) the base, frozen, in the run's dtype
    opt = prepare_optimization(unet, text_encoder, recipe, accelerator)  # 4) optimizer, schedule, Accelerate
    loop = make_loop(accelerator, recipe, state, batches, validator, on_checkpoint)  # 6) the loop's chores
    sys.exit(run_cli(main))                                              # bad input -> one line, exit 2

What differs between methods (which weights train, how a batch is built, the loss, what is saved) stays visible in
each trainer's `main()`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from sdtune.adapters.base import BaseLoadError, load_pipeline, resolve_base
from sdtune.trainers.core import export
from sdtune.trainers.core.checkpointing import resolve_resume
from sdtune.trainers.core.data import DataError
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.recipe import Recipe, RecipeError, load_recipe, trainer_for
from sdtune.trainers.core.runtime import (
    make_lr_scheduler,
    make_optimizer,
    param_groups,
    prepare_models,
    scaled_lr,
    weight_dtype,
)


def parse_args(description: str, argv=None):
    """`script.py recipe.yaml [section.key=value ...]`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/).")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 output.dir=runs/x")
    return parser.parse_args(argv)


def load_run_recipe(args, method_type: str):
    """The validated recipe, its resolved base and the checkpoint to resume from (None: a fresh start)."""
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.method.type != method_type:
        raise RecipeError(f"{args.recipe}: method.type is {recipe.method.type!r}: {trainer_for(recipe.method.type)}")
    return recipe, resolve_base(recipe.base), resolve_resume(Path(recipe.output.dir), recipe.train.resume)


def load_frozen_base(recipe: Recipe, accelerator):
    """The base pipeline on the run's device, every weight frozen, in fp16/bf16 under mixed precision; the dtype;
    and the training noise scheduler (DDPM with the base's prediction_type)."""
    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(recipe.base, torch_dtype=dtype).to(accelerator.device)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    return pipe, dtype, DDPMScheduler.from_config(pipe.scheduler.config)


@dataclass
class Optimization:
    """What `prepare_optimization` hands back: the models to call, optimizer, schedule, what to clip."""

    unet: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped, compiled): call this one in the loop
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    models: list  # what `accelerator.accumulate` watches
    trainable: list[torch.nn.Parameter]


def prepare_optimization(unet, text_encoder, recipe: Recipe, accelerator) -> Optimization:
    """Gradient checkpointing if asked, the optimizer over what requires grad (text encoder at its own lr), the LR
    schedule, and Accelerate's preparation of all of it."""
    method, train = recipe.method, recipe.train
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if method.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    lr = scaled_lr(train, accelerator.num_processes)
    optimizer = make_optimizer(param_groups(unet, text_encoder, method, lr), train)
    lr_scheduler = make_lr_scheduler(optimizer, train, accelerator.num_processes)
    prepared = prepare_models(
        accelerator, unet, text_encoder, method.train_text_encoder, optimizer, lr_scheduler, train.torch_compile
    )
    trainable = [p for group in prepared[2].param_groups for p in group["params"]]
    return Optimization(*prepared, trainable)


def make_loop(accelerator, recipe: Recipe, state, batches, validator, on_checkpoint=None) -> RunLoop:
    """The run's `RunLoop`: checkpoints every `train.checkpointing_steps` (then `on_checkpoint`), grids every
    `validation.validation_steps` into samples/."""
    out_dir = Path(recipe.output.dir)
    return RunLoop(
        accelerator,
        recipe.train,
        state,
        batches,
        out_dir,
        on_checkpoint=on_checkpoint,
        on_validation=lambda step: validator.grid(step, out_dir / "samples" / f"step-{step:06d}.png"),
        validation_steps=recipe.validation.validation_steps,
    )


def run_cli(main, argv=None) -> int:
    """Runs a trainer's `main`, turning what the user can fix into one `error:` line and exit status 2."""
    try:
        return main(argv)
    except (RecipeError, DataError, BaseLoadError, FileNotFoundError, export.ExportCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
