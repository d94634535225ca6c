"""Inference latency: the base, 1 and 3 stacked unfused LoRAs, and the 3 fused, through `adapters.compose`.

Usage:
    python bench/infer.py --model toy                 # the toy base on this machine (CPU), 64 px, 25 steps
    python bench/infer.py --model sd15 --steps 25 --batch 1 4 --json infer.json   # SD v1-5 at 512 px (CUDA, fp16)
    python bench/infer.py --model toy --append bench/RESULTS.md
    python bench/infer.py --model sd15 --per-step --images 8 --device cpu   # one UNet step per sample: SD v1-5 on a CPU

The LoRAs are random, rank 16 on the attention layers (to_q/k/v/out), written as PEFT files and loaded through
`compose.build` as `sdtune sample --adapter` loads them (`--fuse` for the fused one), so the timing includes peft's
per-layer LoRA branch. Each configuration is built once (its own pipeline: 4 of them in memory), renders `--warmup`
batches first, then `--images` timed ones (a CUDA synchronize around each), the configurations taking turns so
that load changes on a shared machine hit all alike. Reported: the median seconds per pipeline call, denoising
steps per second (it/s, as diffusers' progress bar counts them) and the overhead against the base. Targets: fused
<= 3% over the base, 3 unfused <= 15%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

RANK = 16
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["toy", "sd15"], default="toy")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images", type=int, default=5, help="Timed images per configuration.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None, help="Default: cuda when present.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="Images per pipeline call (default: 1).")
    parser.add_argument("--append", type=Path, help="Append a results section to this Markdown file.")
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    parser.add_argument(
        "--per-step",
        action="store_true",
        help="Time one denoising step (the UNet at classifier-free-guidance batch 2) instead of whole images: "
        "many more repeats in the same time, so a few-percent overhead stands out of the noise on a slow machine.",
    )
    return parser.parse_args(argv)


def sd15_folder(root: Path) -> Path:
    """An SD v1-5 diffusers folder at random weights (the bundled configs): the architecture without a download."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtune.adapters.base import SD15_CONFIG

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(
        SD15_CONFIG,
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd15-random")
    return root / "sd15-random"


def random_lora(base: str, out: Path, seed: int) -> Path:
    """A rank-16 attention LoRA with random A and B (B is not zero, so it changes every image)."""
    import torch

    from sdtune.adapters.base import resolve_base
    from sdtune.adapters.lora_files import save_modules_peft
    from sdtune.adapters.lora_modules import LoraModule, base_shapes, module_table

    table = module_table(*base_shapes(resolve_base(base).location))
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, target in table.items():
        if target.component == "unet" and target.path.endswith(ATTN) and ".attn" in target.path:
            out_dim, in_dim = target.shape[:2]
            down = torch.randn(RANK, in_dim, generator=generator) / in_dim**0.5
            up = torch.randn(out_dim, RANK, generator=generator) * 0.01
            modules[name] = LoraModule(down, up, float(RANK))
    out.mkdir(parents=True, exist_ok=True)
    return save_modules_peft(out, modules, table, torch.float16)


def time_image(pipe, steps: int, seed: int, size: int, batch: int = 1) -> float:
    """Seconds to render one batch of images (CUDA work synchronized on both ends)."""
    import torch

    generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(
        "a red circle",
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=size,
        height=size,
        generator=generator,
        num_images_per_prompt=batch,
    )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_step(pipe, seed: int, size: int, batch: int = 1) -> float:
    """Seconds for one denoising step: the UNet on the conditional and unconditional halves, as the pipeline runs it."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        text, negative = pipe.encode_prompt("a red circle", pipe.device, batch, True)
        states = torch.cat([negative, text])
        shape = (2 * batch, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        latents = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
        timestep = torch.tensor(500, device=pipe.device)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe.unet(latents, timestep, encoder_hidden_states=states)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from sdtune.adapters import quiet_libraries
    from sdtune.adapters.compose import AdapterUse, PipelineSpec, build

    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = "toy" if args.model == "toy" else str(sd15_folder(root))
        loras = [str(random_lora(base, root / f"lora{i}", seed=i)) for i in range(3)]
        specs = {
            "base": PipelineSpec(base=base, device=device),
            "1 LoRA, unfused": PipelineSpec(base=base, device=device, adapters=[AdapterUse(loras[0])]),
            "3 LoRAs, unfused": PipelineSpec(base=base, device=device, adapters=[AdapterUse(p) for p in loras]),
            "3 LoRAs, fused": PipelineSpec(
                base=base, device=device, adapters=[AdapterUse(p) for p in loras], fuse=True
            ),
        }
        # Each configuration built once, as a user runs it (a fuse or a weight change between samples is no part
        # of a sample's cost), then the configurations take turns, one sample each, so that a change in machine
        # load hits all of them alike.
        pipes = {label: build(spec).pipe for label, spec in specs.items()}
        size = pipes["base"].unet.config.sample_size * pipes["base"].vae_scale_factor
        results = {}
        for batch in args.batch:
            times = {label: [] for label in pipes}
            for repeat in range(args.warmup + args.images):
                for label, pipe in pipes.items():
                    if args.per_step:
                        seconds = time_step(pipe, seed=repeat, size=size, batch=batch)
                    else:
                        seconds = time_image(pipe, args.steps, seed=repeat, size=size, batch=batch)
                    if repeat >= args.warmup:
                        times[label].append(seconds)
            results[batch] = {label: statistics.median(values) for label, values in times.items()}
            for label, seconds in results[batch].items():
                print(f"batch {batch} {label:<18} {seconds:.4f} {unit(args)}", flush=True)
    command = " ".join(["python", "bench/infer.py", *(argv or sys.argv[1:])])
    report = table(results, args, device, size, command)
    print(report)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write("\n" + report)
    if args.json:
        rows = [
            {"batch": b, "configuration": label, "seconds": seconds, "it_per_s": rate(seconds, args)}
            for b, by_label in results.items()
            for label, seconds in by_label.items()
        ]
        args.json.write_text(json.dumps({"command": command, "size": size, "steps": args.steps, "rows": rows}))
    return results


def rate(seconds: float, args) -> float | None:
    """Denoising steps per second (a step covers the whole batch), as diffusers' progress bar counts them."""
    return None if args.per_step else args.steps / seconds


def unit(args) -> str:
    return "s/step" if args.per_step else "s/batch"


def table(results: dict, args, device: str, size: int, command: str) -> str:
    import platform

    import torch

    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    what = "one denoising step (UNet, guidance batch 2)" if args.per_step else f"{args.steps} steps"
    timed = "steps" if args.per_step else "images"
    lines = [
        f"## Inference: {args.model}, {size} px, {what}, rank-{RANK} attention LoRAs",
        f"Machine: {machine}, torch {torch.__version__}. Measured {time.strftime('%Y-%m-%d %H:%M')} UTC by "
        f"`{command}`; median of {args.images} {timed} after {args.warmup} warm-up.",
        "",
        f"| batch | configuration | {unit(args)} |{'' if args.per_step else ' it/s |'} over base |",
        f"| --- | --- | --- |{'' if args.per_step else ' --- |'} --- |",
    ]
    for batch, by_label in results.items():
        base = by_label["base"]
        for label, seconds in by_label.items():
            speed = "" if args.per_step else f" {rate(seconds, args):.2f} |"
            lines.append(f"| {batch} | {label} | {seconds:.4f} |{speed} {100 * (seconds / base - 1):+.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
