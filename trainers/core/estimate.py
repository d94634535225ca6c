"""Estimates of a run's memory and time, from the base's configs alone (no weights are loaded).

The UNet is built on the meta device and run once on meta tensors with hooks that count multiply-accumulates
(convolutions, linear layers, attention matmuls), so the FLOP count is exact for the architecture and the bucket
size. Time = FLOPs / (this device's measured matmul speed x a utilisation factor); memory = weights + trainable
state + activations. Both are estimates for planning (the preflight, `sdtune doctor`); `bench/` measures.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters.base import SD15_CONFIG, TOY_BASE, resolve_base
from sdtune.trainers.core.optimizers import optimizer_notes
from sdtune.trainers.core.recipe import Recipe

GB = 1024**3
# Bytes of optimizer state per trainable parameter.
# Optimizer state bytes per trained parameter (Adam: 2 fp32 moments; Prodigy adds its two others; schedule-free AdamW
# keeps z and the second moment; Lion one momentum). A module.ClassName optimizer is counted as Adam.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,
    "adamw8bit": 2,
    "adafactor": 4,
    "prodigy": 16,
    "schedulefree_adamw": 8,
    "lion": 4,
}
# Activation memory kept for backward, bytes per UNet multiply-accumulate of one sample. Set from commonly reported
# SD v1-5 LoRA figures with SDPA (512 px: ~3 GB per sample in fp16 without checkpointing, ~0.8 GB with); not yet
# calibrated on a GPU here: bench/train_lora.py measures the real peak (bench/RESULTS.md).
ACTIVATION_BYTES_PER_MAC = {False: 3.0 * GB / 401.6e9, True: 0.8 * GB / 401.6e9}
CUDA_CONTEXT_BYTES = 0.6 * GB
UTILISATION = {"cuda": 0.45, "cpu": 0.35, "mps": 0.3}


@dataclass
class RunEstimate:
    unet_params: int
    trainable_params: int
    macs_per_sample: float  # UNet forward at the training resolution
    memory_bytes: float
    seconds_per_step: float
    device: str

    def summary(self, steps: int) -> str:
        total = self.seconds_per_step * steps
        return (
            f"estimated: {size_text(self.memory_bytes)} peak on {self.device}, ~{self.seconds_per_step:.2f} s/step, "
            f"~{_duration(total)} for {steps} steps (rough: bench/ measures)"
        )


def size_text(size: float) -> str:
    """GB, or MB below 1 GB (the toy base's few MB read "0.0 GB")."""
    return f"{size / GB:.1f} GB" if size >= GB else f"{size / 2**20:.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def base_config_folder(recipe: Recipe) -> Path:
    """A local folder holding the base's component configs (the base itself, or the bundled SD v1-5 configs)."""
    source = resolve_base(recipe.base)
    if source.kind == "toy":
        return TOY_BASE
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "single_file" and recipe.base.config and Path(recipe.base.config).is_dir():
        return Path(recipe.base.config)
    return SD15_CONFIG  # hub ids and single files of SD v1 share the SD v1-5 architecture


@functools.lru_cache(maxsize=16)
def _unet_stats(config_folder: str, latent_h: int, latent_w: int, lora_rank: int, lora_targets: tuple[str, ...]):
    """(UNet params, LoRA params for targets, MACs per sample) from a meta-device forward with counting hooks."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    config = UNet2DConditionModel.load_config(Path(config_folder) / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    unet.to("meta")
    macs, lora_params = [0], 0

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[0] += output.numel() * module.in_channels // module.groups * k
        else:
            macs[0] += output.numel() * module.in_features

    def count_attention(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        queries = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        keys = context.shape[1] if context is not None else queries
        macs[0] += 2 * hidden.shape[0] * queries * keys * module.inner_dim  # QK^T and attention x V

    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
            if any(name == t or name.endswith("." + t) for t in lora_targets):
                fan_in = (
                    module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    if isinstance(module, torch.nn.Conv2d)
                    else module.in_features
                )
                fan_out = module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features
                lora_params += lora_rank * (fan_in + fan_out)
        elif isinstance(module, Attention):
            module.register_forward_hook(count_attention, with_kwargs=True)
    with torch.no_grad():
        sample = torch.zeros(1, config["in_channels"], latent_h, latent_w, device="meta")
        context = torch.zeros(1, 77, config["cross_attention_dim"], device="meta")
        unet(sample, torch.zeros(1, device="meta", dtype=torch.long), context)
    return sum(p.numel() for p in unet.parameters()), lora_params, float(macs[0])


@functools.lru_cache(maxsize=16)
def _other_params(config_folder: str, only: str | None = None) -> int:
    """Parameters of the VAE and text encoder (or of `only` one of them), counted on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    total = 0
    with init_empty_weights():
        if only in (None, "vae"):
            total += sum(
                p.numel()
                for p in AutoencoderKL.from_config(AutoencoderKL.load_config(Path(config_folder) / "vae")).parameters()
            )
        if only in (None, "text_encoder"):
            config = CLIPTextConfig.from_pretrained(Path(config_folder) / "text_encoder")
            total += sum(p.numel() for p in CLIPTextModel(config).parameters())
    return total


@functools.lru_cache(maxsize=4)
def matmul_flops(device: str) -> float:
    """This device's measured dense matmul speed (FLOP/s): fp32 on CPU, fp16 on CUDA; ~0.3 s to measure."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.25:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def lora_target_names(recipe: Recipe) -> tuple[str, ...]:
    from sdtune.trainers.core.lora_layers import unet_target_modules

    method = recipe.method
    if method.type in ("controlnet", "textual_inversion") or (method.type == "dreambooth" and not method.lora):
        return ()
    return tuple(unet_target_modules(method))


def estimate_run(recipe: Recipe, device: str | None = None, bucket: tuple[int, int] | None = None) -> RunEstimate:
    """Peak memory and seconds per optimizer step of `recipe` on `device` (default: cuda if present, else cpu).

    Args:
        bucket: (width, height) of the training images; default resolution x resolution.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    width, height = bucket or (recipe.data.resolution, recipe.data.resolution)
    folder = base_config_folder(recipe)
    vae_factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    method = recipe.method
    targets = lora_target_names(recipe)
    rank = getattr(method, "rank", 0)
    unet_params, lora_params, macs = _unet_stats(str(folder), height // vae_factor, width // vae_factor, rank, targets)
    if method.type == "controlnet":
        trainable = unet_params // 2  # the ControlNet copies the encoder half of the UNet
    elif method.type == "textual_inversion":  # a few token vectors; the UNet is frozen
        trainable = (
            method.num_vectors * json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
        )
    elif targets:
        trainable = lora_params
    else:
        trainable = unet_params
    half = recipe.train.mixed_precision != "no"
    # Frozen weights sit in the run's dtype; a fully trained UNet is held in fp32 (counted as trainable) instead.
    frozen = (0 if trainable == unet_params else unet_params) + _other_params(str(folder))
    weight_bytes = frozen * (2 if half else 4)
    trainable_bytes = trainable * (4 + 4 + OPTIMIZER_STATE_BYTES.get(recipe.train.optimizer_type, 8))
    if getattr(method, "train_text_encoder", False):
        trainable_bytes += _other_params(str(folder), "text_encoder") * (
            4 + 4 + OPTIMIZER_STATE_BYTES.get(recipe.train.optimizer_type, 8)
        )
    batch = recipe.train.train_batch_size
    if getattr(method, "with_prior_preservation", False):
        batch *= 2  # DreamBooth: as many class images as instance images in every forward pass
    activations = macs * batch * ACTIVATION_BYTES_PER_MAC[recipe.train.gradient_checkpointing] * (1 if half else 2)
    if method.type == "controlnet":
        activations *= 1.5
    memory = weight_bytes + trainable_bytes + activations + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)
    # forward + backward ~ 3 forwards; gradient checkpointing recomputes the forward once more.
    passes = 4 if recipe.train.gradient_checkpointing else 3
    flops = 2 * macs * passes * batch * recipe.train.gradient_accumulation_steps
    speed = matmul_flops(device) * UTILISATION.get(device, 0.3) * (1 if device != "cuda" or half else 0.25)
    return RunEstimate(unet_params, trainable, macs, memory, flops / speed, device)


def preflight(recipe: Recipe, scan, device: str | None = None, num_processes: int = 1) -> str:
    """The summary printed before any model loads: the data as found, then steps, epochs, time and memory."""
    from sdtune.trainers.core.data import format_preflight

    train = recipe.train
    images_per_step = train.train_batch_size * train.gradient_accumulation_steps * num_processes
    seen = sum(r.repeats for r in scan.records)
    epochs = train.max_train_steps * images_per_step / max(seen, 1)
    lines = [
        format_preflight(scan, recipe.data.resolution),
        f"plan: {train.max_train_steps} steps x {images_per_step} images/step = {epochs:.1f} epochs "
        f"over {seen} images (with repeats)",
    ]
    largest = max(scan.bucket_counts(), key=lambda b: b[0] * b[1], default=None)
    try:
        estimate = estimate_run(recipe, device=device, bucket=largest)
        lines.append(estimate.summary(train.max_train_steps))
    except (OSError, ValueError, KeyError) as exc:  # configs of an uncached hub base: no estimate, not an error
        lines.append(f"estimate unavailable: {str(exc).splitlines()[0]}")
    lines.extend(optimizer_notes(recipe))
    return "\n".join(lines)
