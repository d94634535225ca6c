"""The `sdtune` command.

Usage:
    sdtune sample --prompt "a red circle" --seed 0 --seed 1 --out samples/ --grid
    sdtune sample --base runs/quickstart/... --adapter runs/quickstart:0.8 --prompts-file prompts.txt
    sdtune convert path/to/diffusers-folder model.safetensors --half      # and back: model.safetensors folder/
    sdtune extract-lora toy runs/toy-dreambooth/diffusers --rank 32 --out runs/sks-lora   # LoRA of a fine-tune
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

EPILOG = "Training: accelerate launch trainers/lora.py recipes/quickstart.yaml (see README.md)."


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


def _extract_parser(sub):
    p = sub.add_parser("extract-lora", help="A LoRA from the weight delta of a fine-tune (SVD), in both formats.")
    p.add_argument("base", help="The base the fine-tune started from (toy, a folder, a .safetensors, a hub id).")
    p.add_argument("tuned", help="The fine-tuned model (e.g. a DreamBooth run's diffusers/ folder).")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank: higher keeps more of the fine-tune (default 32).")
    p.add_argument("--out", type=Path, required=True, help="Folder for the PEFT and kohya files.")
    p.add_argument("--dtype", choices=api.DTYPE_NAMES, default="fp16", help="dtype of the saved files.")
    p.set_defaults(run=run_extract)


def run_extract(args) -> int:
    try:
        for fmt, path in api.extract_lora(args.base, args.tuned, args.rank, args.out, dtype=args.dtype).items():
            print(f"{fmt}: {path}")
    except api.StudioError as exc:
        raise SystemExit(f"sdtune extract-lora: {exc}") from None
    return 0


def _doctor_parser(sub):
    p = sub.add_parser("doctor", help="What this machine can train: torch, CUDA, bitsandbytes, SDPA, GPU, disk.")
    p.set_defaults(run=run_doctor)


def run_doctor(args) -> int:
    print(api.doctor_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sample,convert,extract-lora,doctor}")
    _sample_parser(sub)
    _convert_parser(sub)
    _extract_parser(sub)
    _doctor_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
