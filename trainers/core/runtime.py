"""The run's machinery shared by every trainer: Accelerate, precision, optimizer (built in optimizers.py), LR schedule,
EMA, per-step seeds."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from sdtune.adapters.base import BaseSource
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.lora_files import SAVE_PRECISIONS, save_dtype
from sdtune.trainers.core.ema import ema_weights, make_ema
from sdtune.trainers.core.optimizers import KNOWN as KNOWN_OPTIMIZERS
from sdtune.trainers.core.optimizers import make_optimizer, optimizer_class, outputs_point, param_groups
from sdtune.trainers.core.progress import ProgressTracker
from sdtune.trainers.core.recipe import Recipe, RecipeError, TrainConfig
from sdtune.trainers.core.trackers import report_trackers

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # train.mixed_precision -> dtype
SAVE_DTYPES = {name: save_dtype(name) for name in SAVE_PRECISIONS}  # output.save_precision (adapters/lora_files.py)


def make_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerate decides devices and processes (one CPU, one GPU, DDP, FSDP, DeepSpeed: `accelerate config`)."""
    train = recipe.train
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    project = ProjectConfiguration(project_dir=recipe.output.dir, logging_dir=f"{recipe.output.dir}/logs")
    # Several processes and no GPU (torchrun / `accelerate launch --cpu`): Accelerate runs DDP over gloo only if told.
    several_cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Progress for the job queue and the studio (metrics.jsonl in the run folder) is always on; TensorBoard and
    # wandb if asked (trackers.py).
    trackers = [ProgressTracker(recipe.output.dir, train.max_train_steps), *report_trackers(recipe)]
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        log_with=trackers,
        project_config=project,
    )
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype of the frozen base: half precision under mixed precision (the trainable weights stay fp32)."""
    return DTYPES[accelerator.mixed_precision]


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that depends only on (seed, parts), e.g. (seed, step, micro_batch).

    Drawing each step's noise, timesteps and dropout masks from a generator seeded this way (instead of from one
    long-lived RNG stream) makes step N identical whether or not the run was stopped and resumed before it.
    """
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, *parts))


def item_rng(seed: int, epoch: int, position: int) -> random.Random:
    """Per-sample RNG for flips, caption shuffle and dropout: a pure function of (seed, epoch, position)."""
    return random.Random(step_seed(seed, epoch, position, 7))


def make_lr_scheduler(optimizer, train: TrainConfig, num_processes: int):
    from diffusers.optimization import get_scheduler

    # Accelerate steps a prepared scheduler once per process per optimizer step; scale so the schedule spans the run.
    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps * num_processes,
        num_training_steps=train.max_train_steps * num_processes,
        num_cycles=train.lr_num_cycles,
        power=train.lr_power,
    )


def scaled_lr(train: TrainConfig, num_processes: int) -> float:
    if not train.scale_lr:
        return train.learning_rate
    return train.learning_rate * train.train_batch_size * train.gradient_accumulation_steps * num_processes


def check_replicas_agree(accelerator, params: list[torch.nn.Parameter]):
    """Under DDP every process must end with the same weights: each trained on its own shard and noise, so equal
    weights show that the gradients were all-reduced every step. A single process has nothing to compare."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)
    per_process = accelerator.gather(sums).reshape(accelerator.num_processes, -1)
    if not torch.equal(per_process, per_process[:1].expand_as(per_process)):
        raise RuntimeError("DDP: the processes ended with different weights; gradients were not all-reduced")
    accelerator.print(f"ddp: all {accelerator.num_processes} processes hold identical weights ({len(params)} tensors)")


@dataclass
class FrozenBase:
    """The base pipeline of a run and its parts, on the run's device, every weight frozen."""

    pipe: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPM with the base's schedule and prediction type: what training noises with
    dtype: torch.dtype  # of the frozen weights: fp16/bf16 under mixed precision, else fp32


def load_frozen_base(recipe: Recipe, accelerator: Accelerator) -> FrozenBase:
    """Loads the recipe's base onto the run's device and freezes it. Under mixed precision its weights sit in
    fp16/bf16; whatever the trainer then adds (LoRA, ControlNet) stays fp32."""
    from diffusers import DDPMScheduler

    from sdtune.adapters.base import load_pipeline
    from sdtune.trainers.core.diffusion import check_schedule

    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(recipe.base, torch_dtype=dtype).to(accelerator.device)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # keeps the base's prediction_type
    check_schedule(recipe.train, noise_scheduler)
    return FrozenBase(pipe, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, noise_scheduler, dtype)


def optimizer_step(accelerator: Accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm: float):
    """Backward, then (once per accumulated step, when Accelerate syncs gradients) clip; step; schedule; zero."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def tracker_config(recipe: Recipe) -> dict:
    """The recipe as TensorBoard hparams, which want flat scalars."""
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


@dataclass
class RunStart:
    """What a trainer knows before it touches data or models: its checked recipe, base and resume point."""

    recipe: Recipe
    base: BaseSource
    resume_from: Path | None  # the checkpoint to resume
    started_at: float


def start_run(recipe_file: str, overrides: list[str], method_type: str) -> RunStart:
    """Loads and checks a trainer's recipe (one-line `RecipeError` for a recipe of another method), resolves its
    base and the checkpoint to resume, and quiets the libraries' progress noise."""
    import time

    from sdtune.adapters import quiet_libraries
    from sdtune.adapters.base import resolve_base
    from sdtune.trainers.core.checkpointing import clear_previous_run, resolve_resume
    from sdtune.trainers.core.recipe import load_recipe, trainer_for

    started_at = time.time()
    quiet_libraries()
    recipe = load_recipe(recipe_file, overrides)
    if recipe.method.type != method_type:
        raise RecipeError(f"{recipe_file}: method.type is {recipe.method.type!r}: {trainer_for(recipe.method.type)}")
    out = Path(recipe.output.dir).expanduser()
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # found now, not after the models loaded
        raise RecipeError(f"output.dir: {blocked} is a file, not a folder; choose another output.dir")
    if "." in recipe.train.optimizer_type or recipe.train.optimizer_type in KNOWN_OPTIMIZERS:
        optimizer_class(
            recipe.train
        )  # a missing package or a bad module.ClassName fails now, not after the models load
    recipe.validation.sample_prompts()  # a bad line of validation.prompts_file fails now, not at the first grid
    resume_from = resolve_resume(recipe.output.dir, recipe.train.resume)
    if resume_from is None:  # every process clears before any can write: they meet first in Accelerator()
        clear_previous_run(recipe.output.dir, recipe.train.resume, recipe.output.overwrite)
    return RunStart(recipe, resolve_base(recipe.base), resume_from, started_at)


@dataclass
class Trained:
    """A model that trains, at `lr` (None: the run's `train.learning_rate`, scaled if `train.scale_lr`); with
    `blocks` (a method with down/mid/up_lr_weight), each UNet block at lr x its weight."""

    module: torch.nn.Module
    lr: float | None = None
    blocks: object = None


def unet_and_text_encoder(unet, text_encoder, method) -> list[Trained]:
    """What trains in a LoRA or DreamBooth run: the UNet at `method.unet_lr` (default: the run's lr), block by block
    with the block weights; the text encoder, if asked, at `method.text_encoder_lr` (kohya's split)."""
    trained = [Trained(unet, method.unet_lr, blocks=method)]
    if method.train_text_encoder:
        trained.append(Trained(text_encoder, method.text_encoder_lr or None))
    return trained


@dataclass
class Optimization:
    """What `prepare_optimization` hands back: the trained models as the loop calls them, optimizer, schedule, what to
    clip."""

    models: list[torch.nn.Module]  # as prepared by Accelerate (DDP-wrapped, the first compiled), in the order given
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    originals: list[torch.nn.Module]  # the same models as they were given
    accelerator: Accelerator
    ema: object = None  # ema.RunEma with method.use_ema
    ema_validation: bool = True  # validation grids show the EMA weights (method.ema_validation)

    @property
    def extra_state(self) -> list:
        """What a checkpoint holds besides the weights, optimizer and schedule (`start_or_resume`'s extra_state)."""
        return [self.ema] if self.ema is not None else []

    def step(self, loss, max_grad_norm: float):
        """Backward, then (once per accumulated step, when Accelerate syncs gradients) clip; step; schedule; zero;
        and the EMA follows the new weights."""
        optimizer_step(self.accelerator, loss, self.trainable, self.optimizer, self.lr_scheduler, max_grad_norm)
        if self.ema is not None and self.accelerator.sync_gradients:
            self.ema.step(self.trainable)

    @contextlib.contextmanager
    def outputs_weights(self, validation: bool = False):
        """The weights a save, an export check or (`validation`) a grid sees: a schedule-free optimizer's averaged
        point, then the EMA's (when on); the training weights come back exactly after the block."""
        ema = None if validation and not self.ema_validation else self.ema
        with outputs_point(self.optimizer, self.trainable), ema_weights(ema, self.trainable):
            yield

    @property
    def model(self) -> torch.nn.Module:
        """The first trained model, prepared: the one the loop calls."""
        return self.models[0]

    def prepared(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` as the loop calls it: prepared if it trains, else itself (e.g. a frozen text encoder)."""
        return next((m for m, o in zip(self.models, self.originals) if o is module), module)


def prepare_optimization(
    trained: list[Trained], recipe: Recipe, accelerator: Accelerator, frozen: tuple[torch.nn.Module, ...] = ()
) -> Optimization:
    """Gradient checkpointing if asked, the optimizer over what requires grad in `trained` (one parameter group
    each, at its lr), the LR schedule, the speed settings, and Accelerate's preparation of all of it.

    Args:
        trained: what trains; the first is the model the loop calls, which `apply_speed_settings` compiles.
        frozen: models the first one runs through that do not train (ControlNet's UNet): channels_last like it, and
            gradient checkpointing too, which diffusers does only in training mode (they have no dropout).
    """
    train = recipe.train
    if train.gradient_checkpointing:
        for model in [t.module for t in trained] + list(frozen):
            enable_gradient_checkpointing(model)
        for model in frozen:
            model.train()
    lr = scaled_lr(train, accelerator.num_processes)
    groups = [group for t in trained for group in param_groups(t.module, lr if t.lr is None else t.lr, t.blocks)]
    optimizer = make_optimizer(groups, train)
    lr_scheduler = make_lr_scheduler(optimizer, train, accelerator.num_processes)
    first = apply_speed_settings(train, trained[0].module, *frozen)
    *models, optimizer, lr_scheduler = accelerator.prepare(
        first, *[t.module for t in trained[1:]], optimizer, lr_scheduler
    )
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    ema = make_ema(recipe.method, trainable)
    originals = [t.module for t in trained]
    validation = getattr(recipe.method, "ema_validation", True)
    return Optimization(models, optimizer, lr_scheduler, trainable, originals, accelerator, ema, validation)


def enable_gradient_checkpointing(model: torch.nn.Module):
    """diffusers models name it `enable_gradient_checkpointing`, transformers models `gradient_checkpointing_enable`."""
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    else:
        model.gradient_checkpointing_enable()


def apply_speed_settings(train: TrainConfig, trained: torch.nn.Module, *frozen: torch.nn.Module) -> torch.nn.Module:
    """`train.channels_last` puts every model given in NHWC memory format (cuDNN's tensor-core convolutions run
    on it without transposing each activation); `train.torch_compile` compiles the trained one. Returns the model
    the loop calls."""
    if train.channels_last:
        for model in (trained, *frozen):
            model.to(memory_format=torch.channels_last)
    if not train.torch_compile:
        return trained
    return torch.compile(trained, mode=train.torch_compile_mode)


def parse_args(doc: str, argv=None):
    """A trainer's command line, `recipe.yaml [section.key=value ...]`, with its usage docstring `doc` as help."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/); its method.type picks the trainer.")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 output.dir=runs/x")
    return parser.parse_args(argv)


def run_cli(main, argv=None) -> int:
    """Runs a trainer's `main`, turning what the user can fix (any `SdtuneError`: a recipe key, the data, the base, a
    diverged run, a failed export check) into one `error:` line and exit status 2."""
    import sys

    from sdtune.adapters import skip_the_final_collection

    skip_the_final_collection()
    try:
        return main(argv)
    except SdtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
