"""`sdtune dataset`: look at a folder of training images before training on it.

Usage:
    sdtune dataset report DIR [--resolution 512] [--mask-dir MASKS] [-o report.png]   # the picture + the text
    sdtune dataset dupes DIR [--threshold 10]                                           # exact and near duplicates

The work is `sdtune.studio.api` (`folder_report`, `folder_duplicates`), the same functions the Datasets page calls;
this module parses and prints.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.studio import api


def add_dataset_parser(sub):
    p = sub.add_parser("dataset", help="Look at a dataset folder: report (PNG + text), dupes (duplicate images).")
    cmds = p.add_subparsers(dest="dataset_command", required=True, metavar="{report,dupes}")
    c = cmds.add_parser(
        "report",
        help="Buckets at the resolution, image sizes, caption lengths in CLIP tokens, tags, duplicates, images "
        "without captions or masks, skipped files: printed, and drawn into a PNG.",
    )
    c.add_argument("folder", type=Path, help="The images with their .txt captions (a kohya folder works too).")
    c.add_argument("--resolution", type=int, default=512, help="The recipe's data.resolution (default 512).")
    c.add_argument("--mask-dir", type=Path, help="Masked loss's mask folder: count the images without a mask.")
    c.add_argument("-o", "--output", type=Path, default=Path("report.png"), help="The PNG (default report.png).")
    c.set_defaults(run=run_report)
    c = cmds.add_parser("dupes", help="Groups of exact (same pixels) and near-duplicate images (perceptual hash).")
    c.add_argument("folder", type=Path, help="The images (subfolders too).")
    c.add_argument(
        "--threshold",
        type=int,
        help="Largest pHash distance, in bits of 64, between near duplicates (default 10; 0 = the same hash: a "
        "re-encoded or slightly brightened copy still groups; exact pixel copies are marked as such either way).",
    )
    c.set_defaults(run=run_dupes)


def run_report(args) -> int:
    from sdtune.adapters.atomic import write_bytes_atomic

    report = api.folder_report(args.folder, args.resolution, args.mask_dir)
    write_bytes_atomic(args.output, report["png"])
    print(report["text"])
    print(f"wrote {args.output}")
    return 0


def run_dupes(args) -> int:
    found = api.folder_duplicates(args.folder, args.threshold)
    groups = len(found["groups"])
    print("\n".join(found["lines"]) if found["lines"] else "no duplicates")
    if groups:
        print(f"{groups} group{'s' if groups > 1 else ''} of near-duplicates")
    return 0
