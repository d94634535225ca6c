"""The run's machinery shared by every trainer: Accelerate, precision, optimizer, LR schedule, per-step seeds."""

from __future__ import annotations

import hashlib
import os
import random

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from sdtune.trainers.core.recipe import Recipe, RecipeError, TrainConfig

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # train.mixed_precision -> dtype
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # output.save_precision, --dtype


def make_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerate decides devices and processes (one CPU, one GPU, DDP, FSDP, DeepSpeed: `accelerate config`)."""
    train = recipe.train
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    project = ProjectConfiguration(project_dir=recipe.output.dir, logging_dir=f"{recipe.output.dir}/logs")
    # Several processes and no GPU (torchrun / `accelerate launch --cpu`): Accelerate runs DDP over gloo only if told.
    several_cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        log_with=None if recipe.output.report_to == "none" else recipe.output.report_to,
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


def make_optimizer(param_groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch), 8-bit AdamW (bitsandbytes: optimizer states in 8 bits, 4x less memory) or Adafactor."""
    adam = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if train.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, **adam)
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RecipeError(
                f"train.optimizer: adamw8bit needs bitsandbytes ({exc}); pip install bitsandbytes "
                "or use optimizer: adamw"
            ) from None
        return bnb.optim.AdamW8bit(param_groups, **adam)
    from transformers.optimization import Adafactor

    # With an explicit lr and a diffusers schedule, Adafactor's own relative-step schedule must be off.
    return Adafactor(
        param_groups,
        lr=train.learning_rate,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        weight_decay=train.adam_weight_decay,
    )


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


def prepare_models(accelerator, unet, text_encoder, train_text_encoder: bool, optimizer, lr_scheduler, compile: bool):
    """Hands the trained models, optimizer and schedule to Accelerate (DDP wrapping, mixed precision).

    Returns (unet to call, text encoder to call, optimizer, lr_scheduler, the models to `accumulate` over).
    """
    trained_unet = torch.compile(unet) if compile else unet
    if train_text_encoder:
        trained_unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            trained_unet, text_encoder, optimizer, lr_scheduler
        )
        return trained_unet, text_encoder, optimizer, lr_scheduler, [trained_unet, text_encoder]
    trained_unet, optimizer, lr_scheduler = accelerator.prepare(trained_unet, optimizer, lr_scheduler)
    return trained_unet, text_encoder, optimizer, lr_scheduler, [trained_unet]


def optimizer_step(accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm: float):
    """Backward, clip (once the micro-batches of a step are summed), step the optimizer and the schedule."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def param_groups(unet, text_encoder, method, lr: float) -> list[dict]:
    """What trains in the UNet at the run's lr; in the text encoder (if trained) at `method.text_encoder_lr`."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr}]
    if method.train_text_encoder:
        te_lr = method.text_encoder_lr or lr
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": te_lr})
    return groups
