"""`sdtune caption`: caption or tag every image of a dataset with a captioner.

Usage:
    sdtune caption DATASET_OR_DIR [--model toy] [--mode replace|append|prefix|missing] [--trigger WORD]
                   [--dry-run] [--batch-size 8] [--general-threshold 0.35] [--character-threshold 0.85]
                   [--blacklist TAG ...]

    sdtune caption purple                                          # the workspace dataset "purple", toy captioner
    sdtune caption photos/ --model Salesforce/blip-image-captioning-base --mode replace --dry-run
    sdtune caption photos/ --model SmilingWolf/wd-vit-tagger-v3 --trigger sks --blacklist watermark

DATASET_OR_DIR is a folder (captions are `.txt` files beside the images) or the name of a workspace dataset (its
editable copy, through the datasets store: a frozen version a job trains on never changes). The work is
`sdtune.studio.api.caption_folder` / `caption_dataset`, the functions the Datasets page calls.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.studio import api

MODES = ("replace", "append", "prefix", "missing")  # studio/captioning.py explains each


def add_caption_parser(sub):
    p = sub.add_parser(
        "caption",
        help="Caption or tag a dataset: toy, BLIP, BLIP-2, Florence-2 (transformers) or WD14 (onnxruntime).",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("target", help="A folder of images, or the name of a workspace dataset.")
    p.add_argument(
        "--model",
        default="toy",
        help="toy (the toy world's colour + shape), a model folder, or a Hub id (offline: from the cache).",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="missing",
        help="replace the caption, append to it, prefix: trigger + new caption, missing: only uncaptioned images "
        "(the default: a stopped run resumes).",
    )
    p.add_argument("--trigger", default="", help="Put this word in front of every caption written (once).")
    p.add_argument("--dry-run", action="store_true", help="Print what would change; write nothing.")
    p.add_argument("--batch-size", type=int, default=8, help="Images per captioner call (default 8).")
    p.add_argument("--general-threshold", type=float, default=0.35, help="WD14: general tags from (default 0.35).")
    p.add_argument("--character-threshold", type=float, default=0.85, help="WD14: characters from (default 0.85).")
    p.add_argument("--blacklist", nargs="*", default=[], metavar="TAG", help="WD14: tags never written.")
    p.set_defaults(run=run_caption)


def run_caption(args) -> int:
    from tqdm import tqdm

    options = {
        "model": args.model,
        "mode": args.mode,
        "trigger": args.trigger,
        "dry_run": args.dry_run,
        "batch_size": args.batch_size,
        "general_threshold": args.general_threshold,
        "character_threshold": args.character_threshold,
        "blacklist": args.blacklist,
    }
    with tqdm(desc="captioning", unit="image", disable=None) as bar:  # disable=None: no bar when not a terminal

        def progress(done: int, total: int):
            bar.total = total
            bar.update(done - bar.n)

        if Path(args.target).expanduser().is_dir():
            result = api.caption_folder(args.target, progress=progress, **options)
        else:
            result = api.caption_dataset(_dataset_name(args.target), progress=progress, **options)
    print("\n".join(result["lines"]))
    return 0


def _dataset_name(target: str) -> str:
    names = [d["name"] for d in api.list_datasets()]
    if target not in names:
        known = f" (workspace datasets: {', '.join(names)})" if names else ""
        raise api.StudioError(f"{target}: no such folder, and no workspace dataset of that name{known}")
    return target
