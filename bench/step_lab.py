"""One LoRA training step of the UNet, timed in variants of how it runs: what each GPU speed-up buys on its own.

Usage:
    python bench/step_lab.py --batch 8 --json lab.json                    # SD v1-5 UNet, 512 px, on the GPU
    python bench/step_lab.py --batch 8 --variants baseline channels_last fused_adamw compile
    python bench/step_lab.py --model toy --device cpu --steps 4           # a rehearsal on the CPU

The step is the trainer's own (trainers/core): `add_lora` (rank 16, attention), `denoising_step_loss` on cached
latents and text states (the trainer's step when latents and captions are cached), backward, clip, AdamW from
`make_optimizer`; the frozen UNet in bf16 with the LoRA in fp32 under bf16 autocast, as `train.mixed_precision:
bf16` runs it. Around it nothing: no data pipeline, logging or checkpoints, so the differences are the variants':

    baseline         SDPA attention (diffusers' default), NCHW, torch AdamW (foreach), eager
    math_attention   diffusers' AttnProcessor (softmax(QK^T)V written out): what SDPA/flash attention buys
    channels_last    train.channels_last
    fused_adamw      train.fused_optimizer
    fp32_base        the frozen UNet in fp32 under bf16 autocast (vs. the bf16 base sdtune keeps)
    compile          train.torch_compile (compile time reported apart)
    cudagraphs       train.torch_compile_mode: reduce-overhead (CUDA graphs; static shapes)
    all              channels_last + fused_adamw + compile

Each variant: a fresh LoRA on a copy of the same UNet, `--warmup` steps, then `--steps` steps timed between CUDA
events (no synchronize inside the timed stretch), peak memory from a reset. FLOPs are counted once, on an eager
baseline step, with torch.utils.flop_counter.FlopCounterMode; MFU = FLOPs / (s/step x the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from benchlib import StepTimer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": {},
    "math_attention": {"attention": "math"},
    "channels_last": {"channels_last": True},
    "fused_adamw": {"fused": True},
    "fp32_base": {"base_dtype": torch.float32},
    "compile": {"compile": "default"},
    "cudagraphs": {"compile": "reduce-overhead"},
    "all": {"channels_last": True, "fused": True, "compile": "default"},
}
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets, by a part of the device name.
DENSE_BF16_PEAK = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12}


def peak_flops(device_name: str) -> float | None:
    return next((peak for part, peak in DENSE_BF16_PEAK.items() if part in device_name), None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "toy"], default="sd15")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="Timed steps per variant.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--device", default=None, help="Default: cuda when present.")
    p.add_argument("--json", type=Path, help="Write the results here.")
    return p.parse_args(argv)


def frozen_unet(model: str) -> torch.nn.Module:
    """The UNet at seeded random weights (SD v1-5's architecture) or the bundled toy base's, fp32 on the CPU."""
    from diffusers import UNet2DConditionModel

    if model == "toy":
        return UNet2DConditionModel.from_pretrained(ROOT / "adapters" / "toy_base" / "unet")
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(ROOT / "adapters" / "sd15_config" / "unet")
    )


class Step:
    """One variant's UNet with a fresh LoRA, its optimizer and inputs; `run()` is one training step."""

    def __init__(self, unet_cpu, options: dict, batch: int, device: str):
        from diffusers import DDPMScheduler
        from diffusers.models.attention_processor import AttnProcessor

        from sdtune.trainers.core.lora_layers import add_lora
        from sdtune.trainers.core.recipe import LoraParams, TrainConfig
        from sdtune.trainers.core.runtime import apply_speed_settings, make_optimizer

        self.device, self.autocast_dtype = device, torch.bfloat16
        unet = copy.deepcopy(unet_cpu).to(device, options.get("base_dtype", torch.bfloat16))
        if options.get("attention") == "math":
            unet.set_attn_processor(AttnProcessor())
        torch.manual_seed(0)
        add_lora(unet, torch.nn.Identity(), LoraParams(rank=16))
        compile_mode = options.get("compile")
        train = TrainConfig(
            learning_rate=1e-4,
            channels_last=options.get("channels_last", False),
            fused_optimizer=options.get("fused", False),
            torch_compile=compile_mode is not None,
            torch_compile_mode=compile_mode or "default",
        )
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer([{"params": self.params, "lr": train.learning_rate}], train)
        self.model = apply_speed_settings(train, unet)
        self.unet = unet
        self.scheduler = DDPMScheduler.from_pretrained(ROOT / "adapters" / "sd15_config" / "scheduler")
        size = unet.config.sample_size
        generator = torch.Generator().manual_seed(1)
        self.latents = torch.randn(batch, 4, size, size, generator=generator).to(device, unet.dtype)
        width = unet.config.cross_attention_dim
        self.states = torch.randn(batch, 77, width, generator=generator).to(device, unet.dtype)

    def run(self, seed: int):
        from sdtune.trainers.core.diffusion import denoising_step_loss

        generator = torch.Generator().manual_seed(seed)
        with torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype):
            loss = denoising_step_loss(self.model, self.scheduler, self.latents, self.states, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def count_flops(step: Step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.run(seed=10_000)
    return counter.get_total_flops()


def measure_variant(unet_cpu, name: str, args, device: str) -> dict:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    built = time.perf_counter()
    step = Step(unet_cpu, VARIANTS[name], args.batch, device)
    warm_start = time.perf_counter()
    for i in range(args.warmup):
        step.run(seed=i)
    if cuda:
        torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - warm_start
    timer = StepTimer(cuda)
    timer.mark()
    for i in range(args.steps):
        step.run(seed=args.warmup + i)
        timer.mark()
    intervals = timer.intervals()
    result = {
        "variant": name,
        "batch": args.batch,
        "seconds_per_step": statistics.median(intervals),
        "warmup_seconds": round(warmup_seconds, 2),
        "build_seconds": round(warm_start - built, 2),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }
    if name == "baseline":
        result["flops_per_step"] = count_flops(step)
    del step
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sdtune.adapters import quiet_libraries

    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unet_cpu = frozen_unet(args.model)
    results = []
    for variant in args.variants:
        try:
            results.append(measure_variant(unet_cpu, variant, args, device))
        except Exception as exc:  # a variant that cannot run here (e.g. CUDA graphs) is reported, not fatal
            results.append({"variant": variant, "batch": args.batch, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(json.dumps(results[-1]), flush=True)
        report = summary(results, name, args)
        if args.json:  # after every variant: a run stopped at its deadline keeps what it measured
            args.json.write_text(json.dumps(report, indent=2))
    return report


def summary(results: list[dict], device_name: str, args) -> dict:
    """The variants with MFU (from the baseline's FLOP count) and what they ran on."""
    flops = next((r["flops_per_step"] for r in results if "flops_per_step" in r), None)
    peak = peak_flops(device_name)
    for r in results:
        if flops and peak and r.get("seconds_per_step"):
            r["mfu"] = flops / r["seconds_per_step"] / peak
    report = {"device": device_name, "torch": torch.__version__, "model": args.model, "peak_bf16_flops": peak}
    return report | {"flops_per_step": flops, "variants": results}


if __name__ == "__main__":
    main()
