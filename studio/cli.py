"""The `sdtune` command.

Usage:
    sdtune sample --prompt "a red circle" --seed 0 --seed 1 --out samples/ --grid
    sdtune sample --base runs/quickstart/... --adapter runs/quickstart:0.8 --prompts-file prompts.txt
    sdtune sample --prompt "a red circle" --controlnet runs/cn:0.9 --control-image edges.png --adapter runs/q
    sdtune annotate --kind canny photos/ data/conditioning/             # ControlNet conditioning images
    sdtune convert path/to/diffusers-folder model.safetensors --half      # and back: model.safetensors folder/
    sdtune doctor
    sdtune jobs submit recipes/quickstart.yaml [train.lr=1e-4 ...]    # queue a training run
    sdtune worker                                                      # run queued jobs (a separate process)
    sdtune jobs list | show ID | cancel ID | resume ID | retry ID | sample ID | save ID

Training runs through `accelerate launch trainers/lora.py recipe.yaml` (see the README). Every command calls
`sdtune.studio.api`, the same functions the Streamlit studio uses; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdtune.adapters import quiet_libraries
from sdtune.studio import api, jobs, worker

EPILOG = (
    "Training: accelerate launch trainers/lora.py recipes/quickstart.yaml (or trainers/controlnet.py), or queue "
    "it: sdtune jobs submit recipes/quickstart.yaml and run sdtune worker (see README.md)."
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


def _jobs_parser(sub):
    p = sub.add_parser("jobs", help="The training queue: submit, list, show, cancel, resume, retry, sample, save.")
    actions = p.add_subparsers(
        dest="action", required=True, metavar="{submit,list,show,cancel,resume,retry,sample,save}"
    )
    submit = actions.add_parser("submit", help="Queue a recipe (validated now; `sdtune worker` runs it).")
    submit.add_argument("recipe", type=Path)
    submit.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    listing = actions.add_parser("list", help="Jobs, newest first, with their progress.")
    listing.add_argument("--state", action="append", choices=jobs.STATES, help="Only jobs in this state; repeatable.")
    for name, text in [
        ("show", "A job's record, progress and log tail."),
        ("cancel", "Cancel: at once if queued; a running trainer saves a checkpoint and stops."),
        ("resume", "Queue an interrupted/cancelled/failed job again, from its last checkpoint."),
        ("retry", "Queue a finished job again from scratch."),
        ("sample", '"Sample now": the running trainer renders a validation grid at its next step.'),
        ("save", '"Save now": the running trainer writes a checkpoint at its next step.'),
    ]:
        actions.add_parser(name, help=text).add_argument("id", type=int)
    p.set_defaults(run=run_jobs)


def _progress_text(job: jobs.Job) -> str:
    info = jobs.progress(job.id)
    if not info["total_steps"]:
        return "-"
    text = f"{info['step']}/{info['total_steps']}"
    if info["loss"] is not None:
        text += f" loss {info['loss']:.4f}"
    if info["eta"] is not None:
        text += f" eta {info['eta']:.0f}s"
    return text


def run_jobs(args) -> int:
    try:
        if args.action == "submit":
            job = jobs.submit(args.recipe, args.overrides)
            print(f"job {job.id}: queued ({job.method}, {job.name}); run folder {job.run_dir}")
        elif args.action == "list":
            print(f"{'id':>4}  {'state':<11} {'method':<10} {'name':<20} progress")
            for job in jobs.list_jobs(args.state):
                print(f"{job.id:>4}  {job.state:<11} {job.method:<10} {job.name:<20} {_progress_text(job)}")
        if args.action in ("submit", "list", "resume", "retry") and not jobs.workers():
            print("no worker is running: start one with `sdtune worker` (in another terminal)")
        elif args.action == "show":
            job = jobs.get(args.id)
            for key, value in job.to_dict().items():
                print(f"{key:>16}: {' '.join(value.splitlines()) if isinstance(value, str) else value}")
            info = jobs.progress(job.id)
            print(f"{'progress':>16}: {_progress_text(job)}")
            print(f"{'latest grid':>16}: {info['latest_grid']}")
            print(f"--- log tail ({job.log}) ---\n{jobs.log_tail(job.id)}")
        elif args.action in ("cancel", "resume", "retry"):
            job = getattr(jobs, args.action)(args.id)
            flagged = " (the worker is stopping it)" if job.cancel_requested else ""
            print(f"job {job.id}: {job.state}{flagged}")
        else:
            path = (jobs.request_sample if args.action == "sample" else jobs.request_save)(args.id)
            print(f"job {args.id}: asked ({path}); the trainer acts at its next step")
    except jobs.JobError as exc:
        raise SystemExit(f"sdtune jobs: {exc}") from None
    return 0


def _worker_parser(sub):
    p = sub.add_parser("worker", help="Run queued training jobs (one at a time by default) until Ctrl-C.")
    worker.build_parser(p)
    p.set_defaults(run=worker.run_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sample,annotate,convert,doctor,jobs,worker}")
    _sample_parser(sub)
    _annotate_parser(sub)
    _convert_parser(sub)
    _doctor_parser(sub)
    _jobs_parser(sub)
    _worker_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("jobs", "worker"):  # these load no model: skip importing diffusers/transformers
        quiet_libraries()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
