"""`sdtune adapters`: the local registry (list, show, import, export, rm, tag, check) and the adapters made from
registered ones (merge, resize, to-lora)."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio import api
from sdtune.studio.cli_ab import positive_int


def add_adapters_parser(sub):
    p = sub.add_parser("adapters", help="The local adapter registry ($SDTUNE_HOME, default ~/.sdtune).")
    cmds = p.add_subparsers(
        dest="adapters_command", required=True, metavar="{list,show,import,export,rm,tag,check,merge,resize,to-lora}"
    )
    c = cmds.add_parser("list", help="Registered adapters, newest first.")
    c.add_argument("--base", help="Only adapters of this base (name, path or hash prefix).")
    c.add_argument(
        "--method", help="How it was trained: lora, dreambooth, controlnet, textual_inversion or preference."
    )
    c.add_argument("--tag")
    c.add_argument("--trigger", help="Only adapters with this trigger word.")
    c.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    c.set_defaults(run=run_adapters_list)
    c = cmds.add_parser("show", help="An adapter's entry and manifest (JSON).")
    c.add_argument("name")
    c.set_defaults(run=lambda a: print_json(api.show_adapter(a.name)))
    c = cmds.add_parser(
        "import", help="Check a LoRA (LoHa, LoKr) / ControlNet / full model against a base and register it."
    )
    c.add_argument("path", type=Path)
    c.add_argument("--base", default="toy", help="The base to validate against (default: toy).")
    c.add_argument("--name", help="Registry name (default: from the file name).")
    c.add_argument("--tag", action="append", default=[])
    c.add_argument(
        "--allow-pickle", action="store_true", help="Read a .ckpt/.pt/.bin (runs code: trusted files only)."
    )
    c.add_argument("--dry-run", action="store_true", help="Only report the checks.")
    c.set_defaults(run=run_adapters_import)
    c = cmds.add_parser("export", help="Copy an adapter's file (or whole folder) out of the registry.")
    c.add_argument("name")
    c.add_argument("dest", help='A file, or a folder (an existing one, or a path ending in "/").')
    c.add_argument("--format", dest="fmt", help="peft, kohya, controlnet, diffusers, single_file (default: all).")
    c.add_argument("--overwrite", action="store_true", help="Replace an existing file (one format only).")
    c.set_defaults(run=lambda a: print_lines(api.export_adapter(a.name, a.dest, a.fmt, a.overwrite)))
    c = cmds.add_parser("rm", help="Remove an adapter from the registry (its folder too).")
    c.add_argument("name")
    c.set_defaults(run=lambda a: api.remove_adapter(a.name) or print(f"removed {a.name}"))
    c = cmds.add_parser("tag", help="Add tags (and --remove others); prints the adapter's tags.")
    c.add_argument("name")
    c.add_argument("tags", nargs="*", metavar="TAG", help="Tags to add.")
    c.add_argument("--remove", action="append", default=[], metavar="TAG", help="A tag to remove; repeatable.")
    c.set_defaults(run=run_adapters_tag)
    c = cmds.add_parser("check", help="Compare the index with the folders; --repair makes them agree.")
    c.add_argument("--repair", action="store_true")
    c.set_defaults(run=run_adapters_check)
    _made_adapter_parsers(cmds)


def _made_adapter_parsers(cmds):
    """`sdtune adapters merge / resize / to-lora`: a new registered LoRA made from registered adapters."""
    c = cmds.add_parser("merge", help="Merge LoRAs into a new registered LoRA (linear, concat or svd).")
    c.add_argument("name", help="Name of the new adapter.")
    c.add_argument("parents", nargs="+")
    c.add_argument("--weights", nargs="+", type=float, help="One per parent (default: 1 each).")
    c.add_argument("--method", choices=["linear", "concat", "svd"], default="svd")
    c.add_argument("--rank", type=positive_int, help="svd: target rank.")
    c.add_argument("--conv-rank", type=positive_int, help="svd: target rank of 3x3 convs (default: --rank).")
    c.add_argument("--base", default="toy")
    c.add_argument("--prompt", default="a photo", help="Prompt of the export check's image.")
    c.set_defaults(run=run_adapters_merge)
    c = cmds.add_parser("resize", help="Resize a LoRA's rank into a new registered LoRA (sd-scripts resize_lora).")
    c.add_argument("name")
    c.add_argument("parent")
    c.add_argument("--rank", type=positive_int, required=True, help="The (maximum) new rank.")
    c.add_argument("--dynamic", nargs=2, metavar=("METHOD", "PARAM"), help="sv_ratio R | sv_fro F | sv_cumulative F")
    c.add_argument("--base", default="toy")
    c.add_argument("--prompt", default="a photo")
    c.set_defaults(run=run_adapters_resize)
    c = cmds.add_parser("to-lora", help="A LyCORIS LoHa/LoKr as a new registered LoRA of rank R (SVD), for merges.")
    c.add_argument("name", help="Name of the new LoRA.")
    c.add_argument("parent", help="The LoHa/LoKr: a registry name, run folder or file.")
    c.add_argument("--rank", type=positive_int, required=True)
    c.add_argument("--base", default="toy")
    c.add_argument("--prompt", default="a photo", help="Prompt of the export check's image.")
    c.set_defaults(run=run_adapters_to_lora)


def print_json(data) -> int:
    import json

    print(json.dumps(data, indent=2, default=str))
    return 0


def print_lines(paths) -> int:
    print("\n".join(str(p) for p in paths))
    return 0


def run_adapters_list(args) -> int:
    rows = api.list_adapters(base=args.base, method=args.method, tag=args.tag, trigger=args.trigger)
    if args.json:
        return print_json(rows)
    if rows:
        print(f"{'name':<28} {'method':<11} {'origin':<9} {'base':<24} triggers, #tags")
    for row in rows:
        extras = ", ".join(filter(None, [",".join(row["trigger_words"]), " ".join(f"#{t}" for t in row["tags"])]))
        print(f"{row['name']:<28} {row['method']:<11} {row['origin']:<9} {row['base']:<24} {extras}")
    if not rows:
        print("no adapters (train one, or: sdtune adapters import FILE)")
    return 0


def run_adapters_import(args) -> int:
    result = api.import_adapter(
        args.path, base=args.base, name=args.name, allow_pickle=args.allow_pickle, tags=args.tag, dry_run=args.dry_run
    )
    report = result["report"]
    print(
        f"{report['format']} ({report['detail']}): {report['matched']}/{report['modules']} modules match {args.base}"
    )
    for warning in report.get("warnings", []):
        print(f"warning: {warning}")
    if "entry" in result:
        print(f"registered as {result['entry']['name']} ({result['entry']['folder']})")
    return 0


def run_adapters_tag(args) -> int:
    print(" ".join(api.tag_adapter(args.name, args.tags, args.remove)))
    return 0


def run_adapters_check(args) -> int:
    report = api.check_registry(repair=args.repair)
    print(report["summary"])
    return 0 if report["ok"] or report["repaired"] else 1


def run_adapters_merge(args) -> int:
    entry = api.merge_adapters(
        args.name, args.parents, args.weights, method=args.method, rank=args.rank, conv_rank=args.conv_rank,
        base=args.base, prompt=args.prompt,
    )  # fmt: skip
    _print_made(entry)
    return 0


def run_adapters_resize(args) -> int:
    method, param = (args.dynamic[0], float(args.dynamic[1])) if args.dynamic else (None, None)
    entry = api.resize_adapter(
        args.name, args.parent, args.rank, dynamic=method, param=param, base=args.base, prompt=args.prompt
    )
    _print_made(entry)
    return 0


def run_adapters_to_lora(args) -> int:
    entry = api.lycoris_to_lora(args.name, args.parent, args.rank, base=args.base, prompt=args.prompt)
    _print_made(entry)
    kept = api.show_adapter(entry["name"])["manifest"]["origin"]["params"]["fro_kept"]
    print(f"kept {kept:.1%} of the LoHa/LoKr update's norm at rank {args.rank}")
    return 0


def _print_made(entry: dict):
    """What a merge or resize made: its ranks (a dynamic resize picks them per module) and what it keeps."""
    manifest = api.show_adapter(entry["name"])["manifest"]
    ranks = manifest["training"].get("ranks") or []
    kept = (manifest.get("origin") or {}).get("params", {}).get("mean_fro_kept")
    detail = f"ranks {min(ranks)}-{max(ranks)}" if len(ranks) > 1 else f"rank {ranks[0]}" if ranks else ""
    detail += f", {kept:.1%} of the weight norm kept on average" if kept is not None else ""
    print(f"registered {entry['name']} ({detail}; {entry['folder']})")
