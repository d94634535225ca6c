"""The `sdtune` command.

Usage:
    sdtune sample --prompt "a red circle" --seed 0 --seed 1 --out samples/ --grid
    sdtune sample --base runs/quickstart/... --adapter runs/quickstart:0.8 --prompts-file prompts.txt
    sdtune sample --prompt "a red circle" --controlnet runs/cn:0.9 --control-image edges.png --adapter runs/q
    sdtune annotate --kind canny photos/ data/conditioning/             # ControlNet conditioning images
    sdtune convert path/to/diffusers-folder model.safetensors --half      # and back: model.safetensors folder/
    sdtune doctor

Training runs through `accelerate launch trainers/lora.py recipe.yaml` (see the README). Every command calls
`sdtune.studio.api`, the same functions the Streamlit studio uses; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdtune.adapters import quiet_libraries
from sdtune.studio import api

EPILOG = (
    "Training: accelerate launch trainers/lora.py recipes/quickstart.yaml, or trainers/controlnet.py (see README.md)."
)


def _sample_parser(sub):
    p = sub.add_parser("sample", help="Render images from a base (+ LoRA adapters) with fixed seeds.")
    p.add_argument("--base", default="toy", help="Hub id, diffusers folder, .safetensors file or 'toy' (default).")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="LoRA file or run folder, optionally with a weight; repeatable to stack adapters.",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="ControlNet folder, run folder or single file, optionally with a scale; repeatable (MultiControlNet).",
    )
    p.add_argument(
        "--control-image", action="append", default=[], metavar="IMG", help="Conditioning image, one per --controlnet."
    )
    p.add_argument("--control-guidance-start", type=float, default=0.0, help="Share of steps before control starts.")
    p.add_argument("--control-guidance-end", type=float, default=1.0, help="Share of steps after which it stops.")
    p.add_argument("--prompt", action="append", default=[], help="Prompt; repeatable.")
    p.add_argument("--prompts-file", type=Path, help="Text file with one prompt per line.")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", action="append", type=int, default=[], help="Seed; repeatable (default: 0).")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Classifier-free guidance (default: the base's recommended: 7.5 for SD v1-5, 3 for the toy base).",
    )
    p.add_argument("--width", type=int, default=None, help="Default: the base's native size.")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default="default", choices=api.scheduler_names())
    p.add_argument("--out", type=Path, default=Path("samples"), help="Folder for the PNGs (default: samples/).")
    p.add_argument("--grid", action="store_true", help="Also write grid.png: a labelled contact sheet.")
    p.add_argument("--device", default=None, help="cuda / cpu / mps (default: cuda if available).")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="Default: fp16 on CUDA, fp32 on CPU."
    )
    p.set_defaults(run=run_sample)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise SystemExit(f"sdtune sample: --prompts-file {args.prompts_file} not found")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("sdtune sample: give at least one --prompt or a --prompts-file")
    return prompts


def run_sample(args) -> int:
    try:
        written = api.sample_images(
            _prompts(args),
            args.out,
            seeds=args.seed,
            base=args.base,
            adapters=args.adapter,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            width=args.width,
            height=args.height,
            scheduler=args.scheduler,
            grid=args.grid,
            device=args.device,
            dtype=args.dtype,
            controlnets=args.controlnet,
            control_images=args.control_image,
            control_guidance_start=args.control_guidance_start,
            control_guidance_end=args.control_guidance_end,
        )
    except api.StudioError as exc:
        raise SystemExit(f"sdtune sample: {exc}") from None
    print("\n".join(str(path) for path in written))
    return 0


def _convert_parser(sub):
    p = sub.add_parser("convert", help="diffusers folder <-> single-file SD checkpoint (.safetensors).")
    p.add_argument("src", type=Path, help="A diffusers folder, or a single-file .safetensors checkpoint.")
    p.add_argument("dst", type=Path, help="A .safetensors file (from a folder), or a folder (from a file).")
    p.add_argument("--half", action="store_true", help="Write fp16 weights (single file only).")
    p.add_argument("--config", default=None, help="Config folder for a single file (default: detected).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing destination.")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    try:
        print(api.convert_checkpoint(args.src, args.dst, half=args.half, config=args.config, overwrite=args.overwrite))
    except api.StudioError as exc:
        raise SystemExit(f"sdtune convert: {exc}") from None
    return 0


def _annotate_parser(sub):
    p = sub.add_parser("annotate", help="Make ControlNet conditioning images (canny, softedge, scribble, mask ...).")
    p.add_argument("--kind", required=True, help="canny, softedge, scribble, mask; midas or hed with --weights.")
    p.add_argument("in_dir", type=Path, help="Folder of images (searched recursively).")
    p.add_argument("out_dir", type=Path, help="Where the PNGs go, same relative names (e.g. data/conditioning).")
    p.add_argument("--low-threshold", type=int, default=100, help="canny/scribble hysteresis low threshold.")
    p.add_argument("--high-threshold", type=int, default=200, help="canny/scribble hysteresis high threshold.")
    p.add_argument("--mask-threshold", type=float, default=0.18, help="mask: colour distance from the background.")
    p.add_argument("--weights", default=None, help="A local detector model file (midas, hed); never downloaded.")
    p.set_defaults(run=run_annotate)


def run_annotate(args) -> int:
    options = {key: getattr(args, key) for key in ("low_threshold", "high_threshold", "mask_threshold", "weights")}
    try:
        written = api.annotate_images(args.kind, args.in_dir, args.out_dir, **options)
    except api.StudioError as exc:
        raise SystemExit(f"sdtune annotate: {exc}") from None
    print(f"{len(written)} {args.kind} images in {args.out_dir}")
    return 0


def _doctor_parser(sub):
    p = sub.add_parser("doctor", help="What this machine can train: torch, CUDA, bitsandbytes, SDPA, GPU, disk.")
    p.set_defaults(run=run_doctor)


def run_doctor(args) -> int:
    print(api.doctor_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sample,annotate,convert,doctor}")
    _sample_parser(sub)
    _annotate_parser(sub)
    _convert_parser(sub)
    _doctor_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
