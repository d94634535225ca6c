"""The `sdtune` command.

Usage:
    sdtune studio [--worker] [--port 8501] [--expose] [--no-token]      # the Streamlit studio (127.0.0.1, a token)
    sdtune sample --prompt "a red circle" --seed 0 --seed 1 --out samples/ --grid
    sdtune sample --base runs/quickstart/... --adapter runs/quickstart:0.8 --prompts-file prompts.txt
    sdtune sample --prompt "a red circle" --controlnet runs/cn:0.9 --control-image edges.png --adapter runs/q
    sdtune sample --prompt "a <zq>" --embedding runs/ti --adapter toy-purple:0.8
    sdtune annotate --kind canny photos/ data/conditioning/             # ControlNet conditioning images
    sdtune convert path/to/diffusers-folder model.safetensors --half      # and back: model.safetensors folder/
    sdtune extract-lora toy runs/toy-dreambooth/diffusers --rank 32 --out runs/sks-lora   # LoRA of a fine-tune
    sdtune doctor
    sdtune jobs submit recipes/quickstart.yaml [train.lr=1e-4 ...]    # queue a training run
    sdtune worker                                                      # run queued jobs (a separate process)
    sdtune jobs list | show ID | cancel ID | resume ID | retry ID | sample ID | save ID
    sdtune jobs sweep recipe.yaml train.lr=1e-4,3e-4 method.rank=8,16 [--seeds 0,1] | sweep show NAME [--rank-by M]
    sdtune adapters list [--base toy] [--method lora] [--tag T] [--trigger purple]
    sdtune adapters show NAME | import PATH [--base B] [--name N] | export NAME DEST [--format kohya|peft]
    sdtune adapters rm NAME | tag NAME TAG... [--remove TAG] | check [--repair]
    sdtune adapters merge NEW A B --weights 1 1 --method svd --rank 8 | resize NEW A --rank 4 [--dynamic sv_ratio 4]
    sdtune adapters to-lora NEW MY-LOHA --rank 16                       # a LoHa/LoKr as a LoRA (SVD, kept share)
    sdtune bake OUT_FOLDER --adapter NAME:WEIGHT [--single-file model.safetensors]
    sdtune ab --a toy --b toy+toy-purple:0.8 --prompt "a purple circle" --seed 0 [--blind] [--score toy]
    sdtune ab vote ID [PAIR left|right|tie] | show ID | list | --checkpoints RUN_DIR [--register NAME]
    sdtune publish NAME --repo user/name [--private] [--update] [--dry-run [DIR]]
    sdtune recipe from-kohya CONFIG [--dataset-config DATASET.toml] -o recipe.yaml   # sd-scripts / kohya_ss config
    sdtune caption DATASET_OR_DIR --model toy|FOLDER|HUB_ID [--mode missing] [--trigger WORD] [--dry-run]
    sdtune tune-from-votes AB_ID [AB_ID ...] --from toy+toy-purple:0.8 [-o runs/liked] [--queue]   # DPO on votes

Training runs through `accelerate launch trainers/lora.py recipe.yaml` (see the README). Every command calls
`sdtune.studio.api`, the same functions the Streamlit studio uses; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdtune.adapters import quiet_libraries, skip_the_final_collection
from sdtune.studio import (
    api,
    cli_ab,
    cli_adapters,
    cli_caption,
    cli_dataset,
    cli_recipe,
    cli_sweep,
    jobs,
    launch,
    worker,
)
from sdtune.studio.cli_ab import positive_int
from sdtune.studio.cli_votes import add_votes_parser

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
        metavar="NAME_OR_PATH[:WEIGHT]",
        help="Registered adapter name, LoRA file or run folder, optionally with a weight; repeatable to stack.",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="REF[:SCALE]",
        help="ControlNet folder, run folder, single file or registry name, optionally with a scale; repeatable.",
    )
    p.add_argument(
        "--control-image", action="append", default=[], metavar="IMG", help="Conditioning image, one per --controlnet."
    )
    p.add_argument("--control-guidance-start", type=float, default=0.0, help="Share of steps before control starts.")
    p.add_argument("--control-guidance-end", type=float, default=1.0, help="Share of steps after which it stops.")
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE_OR_NAME_OR_RUN",
        help="Textual-inversion embedding (file, registry name or run folder); repeatable. Prompts call it by its "
        "token, e.g. 'a <zq>' (an A1111 file: by its file name).",
    )
    p.add_argument("--fuse", action="store_true", help="Merge the adapters into the base weights (faster steps).")
    p.add_argument("--prompt", action="append", default=[], help="Prompt; repeatable.")
    p.add_argument(
        "--prompts-file",
        type=Path,
        help="sd-scripts' prompt file: one prompt a line, # comments, options --n negative, --w/--h size, --d seed, "
        "--l CFG, --s steps after a prompt (a recipe's validation.prompts_file syntax).",
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", action="append", type=int, default=[], help="Seed; repeatable (default: 0).")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Classifier-free guidance (default: the base's recommended: 7.5 for SD v1-5, 3 for the toy base).",
    )
    p.add_argument("--width", type=positive_int, default=None, help="Default: the base's native size.")
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--scheduler", default="default", choices=api.scheduler_names())
    p.add_argument("--out", type=Path, default=Path("samples"), help="Folder for the PNGs (default: samples/).")
    p.add_argument("--grid", action="store_true", help="Also write grid.png: a labelled contact sheet.")
    p.add_argument("--device", default=None, help="cuda / cpu / mps (default: cuda if available).")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="Default: fp16 on CUDA, fp32 on CPU."
    )
    p.set_defaults(run=run_sample)


def _prompts(args) -> list[str | dict]:
    """--prompt texts, then the --prompts-file's prompts: sd-scripts' syntax, as a recipe's validation.prompts_file
    reads it (`#` comments; `--n`, `--w`, `--h`, `--d`, `--l`, `--s` after a prompt set its own negative prompt,
    size, seed, CFG and steps), each line with options as a dict of them."""
    prompts: list[str | dict] = list(args.prompt)
    if args.prompts_file:
        from sdtune.trainers.core.recipe import RecipeError, read_prompts_file

        if not args.prompts_file.is_file():
            raise SystemExit(f"sdtune sample: --prompts-file {args.prompts_file} not found")
        try:
            read = read_prompts_file(args.prompts_file)
        except RecipeError as exc:  # the file's own line (`prompts.txt: line 2: --w 500: ...`), under this flag
            message = str(exc).removeprefix("validation.prompts_file: ")
            raise SystemExit(f"sdtune sample: --prompts-file: {message}") from None
        prompts += [p.model_dump(exclude_none=True) if len(p.model_fields_set) > 1 else p.prompt for p in read]
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
            fuse=args.fuse,
            embeddings=args.embedding,
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


def _extract_parser(sub):
    p = sub.add_parser("extract-lora", help="A LoRA from the weight delta of a fine-tune (SVD), in both formats.")
    p.add_argument("base", help="The base the fine-tune started from (toy, a folder, a .safetensors, a hub id).")
    p.add_argument("tuned", help="The fine-tuned model (e.g. a DreamBooth run's diffusers/ folder).")
    p.add_argument(
        "--rank", type=positive_int, default=32, help="LoRA rank: higher keeps more of the fine-tune (default 32)."
    )
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


def _jobs_parser(sub):
    p = sub.add_parser("jobs", help="The training queue: submit, list, show, cancel, resume, retry, sample, save.")
    actions = p.add_subparsers(
        dest="action", required=True, metavar="{submit,list,show,cancel,resume,retry,sample,save,sweep}"
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
    cli_sweep.add_sweep_parser(actions)
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
        _run_job_action(args)
    except jobs.JobError as exc:
        raise SystemExit(f"sdtune jobs: {exc}") from None
    if args.action in ("submit", "list", "resume", "retry", "sweep") and not jobs.workers():
        print("no worker is running: start one with `sdtune worker` (in another terminal)")
    return 0


def _run_job_action(args) -> None:
    if args.action == "sweep":
        cli_sweep.run_sweep(args)
    elif args.action == "submit":
        job = jobs.submit(args.recipe, args.overrides)
        print(f"job {job.id}: queued ({job.method}, {job.name}); run folder {job.run_dir}")
    elif args.action == "list":
        jobs.settle_abandoned()  # a dead worker's jobs, their trainers stopped: interrupted (or done), not running
        print(f"{'id':>4}  {'state':<11} {'method':<10} {'name':<20} progress")
        for job in jobs.list_jobs(args.state):
            print(f"{job.id:>4}  {job.state:<11} {job.method:<10} {job.name:<20} {_progress_text(job)}")
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


def _worker_parser(sub):
    p = sub.add_parser("worker", help="Run queued training jobs (one at a time by default) until Ctrl-C.")
    worker.build_parser(p)
    p.set_defaults(run=worker.run_worker)


def _studio_parser(sub):
    p = sub.add_parser("studio", help="The Streamlit studio on http://127.0.0.1:8501 (--expose: the network).")
    launch.build_parser(p)
    p.set_defaults(run=launch.run_studio)


def _bake_parser(sub):
    p = sub.add_parser("bake", help="Base + adapters -> a full model: diffusers folder (+ single file).")
    p.add_argument("out", type=Path, help="New diffusers folder.")
    p.add_argument("--base", default="toy")
    p.add_argument("--adapter", action="append", default=[], required=True, metavar="NAME_OR_PATH[:WEIGHT]")
    p.add_argument("--single-file", type=Path, help="Also write this single-file .safetensors checkpoint.")
    p.set_defaults(
        run=lambda a: cli_adapters.print_lines(
            api.bake_model(a.out, base=a.base, adapters=a.adapter, single_file=a.single_file)
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{studio,sample,annotate,adapters,bake,ab,publish,convert,extract-lora,doctor,jobs,worker,recipe,dataset,caption,tune-from-votes}",
    )
    _studio_parser(sub)
    _sample_parser(sub)
    _annotate_parser(sub)
    cli_adapters.add_adapters_parser(sub)
    _bake_parser(sub)
    cli_ab.add_ab_parser(sub)
    cli_ab.add_publish_parser(sub)
    _convert_parser(sub)
    _extract_parser(sub)
    _doctor_parser(sub)
    _jobs_parser(sub)
    _worker_parser(sub)
    cli_recipe.add_recipe_parser(sub)
    cli_dataset.add_dataset_parser(sub)
    cli_caption.add_caption_parser(sub)
    add_votes_parser(sub)
    return parser


# Commands that read the queue, the registry or the votes and load no model. Quieting diffusers and transformers
# imports them, and torch with them: 3-4 s before `sdtune ab vote` or `sdtune adapters list` could print a line.
LOADS_NO_MODEL = {"jobs", "worker", "studio", "recipe", "ab vote", "ab show", "ab list", "adapters list",
                  "adapters show", "adapters export", "adapters rm", "adapters tag", "adapters check", "dataset dupes"}  # fmt: skip


def command_name(args) -> str:
    """The command and its action as a user types them: "jobs", "ab vote", "adapters list"."""
    action = (args.words or [""])[0] if args.command == "ab" else getattr(args, f"{args.command}_command", "")
    return f"{args.command} {action}".strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip_the_final_collection()
    if args.command not in LOADS_NO_MODEL and command_name(args) not in LOADS_NO_MODEL:
        quiet_libraries()
    try:
        return args.run(args) or 0
    except api.StudioError as exc:
        raise SystemExit(f"sdtune {args.command}: {exc}") from None
    except BrokenPipeError:  # `sdtune jobs list | head`: the reader has what it wanted; Python's advice for this
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 141  # what a shell reports for a writer stopped by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
