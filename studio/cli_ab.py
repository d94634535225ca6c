"""`sdtune ab` (A/B comparisons, blind votes, the best checkpoint of a run) and `sdtune publish` (to the Hub).

Usage:
    sdtune ab --a toy --b toy+toy-purple:0.8 --prompt "a purple circle" --seed 0 --seed 1 [--blind] [--score toy]
    sdtune ab --a toy+toy-purple --b toy+toy-purple+controlnet=toy-masks:0.9@mask.png --prompt "a purple square"
    sdtune ab vote ID                       # blind votes, one pair at a time (interactive)
    sdtune ab vote ID PAIR left|right|tie   # one vote (a|b too when not blind)
    sdtune ab show ID                       # pairs, votes, sides, scores, the tally (blind: once all are voted)
    sdtune ab list
    sdtune ab --checkpoints runs/quickstart [--score toy] [--rank-by val_loss] [--register toy-purple-best]
    sdtune publish NAME --repo user/name [--private] [--dry-run [DIR]]

Every command calls `sdtune.studio.api` (ab_* and publish*), as the studio does; this module parses and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtune.studio import api


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: 0 steps divided by zero, a 0 width fell back to the default unsaid."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


AB_ACTIONS = ("vote", "show", "list")


def add_ab_parser(sub):
    p = sub.add_parser(
        "ab",
        help="Compare two compositions (blind votes, toy scores), or a run's checkpoints; vote, show, list.",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="*", metavar="ACTION", help="vote ID [PAIR CHOICE] | show ID | list (none: compare)")
    p.add_argument(
        "--a",
        metavar="SPEC",
        help="Side A: BASE[+ADAPTER[:WEIGHT]]...[+controlnet=REF[:SCALE]@IMAGE]..., e.g. toy+toy-purple:0.8.",
    )
    p.add_argument("--b", metavar="SPEC", help="Side B, same syntax.")
    p.add_argument("--checkpoints", type=Path, metavar="RUN_DIR", help="Compare this run's checkpoints (+ final).")
    p.add_argument("--register", metavar="NAME", help="--checkpoints: register the best one under NAME.")
    p.add_argument(
        "--rank-by", default="score", choices=("score", "val_loss"),
        help="--checkpoints: the highest toy score, or the lowest held-out val_loss the run recorded.",
    )  # fmt: skip
    p.add_argument("--base", help="--checkpoints: the base (default: the one in the run's adapter.json).")
    p.add_argument("--prompt", action="append", default=[], help="Prompt; repeatable (checkpoints: the recipe's).")
    p.add_argument(
        "--seed",
        action="append",
        type=int,
        default=[],
        help="Seed; repeatable (default 0; checkpoints: the run's validation.toy_seeds, 0-3).",
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="Default: the base's recommended scale.")
    p.add_argument("--scheduler", default="default", choices=api.scheduler_names())
    p.add_argument("--size", type=_size, default=None, metavar="N|WxH", help="Image size (default: the base's).")
    p.add_argument("--blind", action="store_true", help="Shuffle the sides per pair; vote without knowing which.")
    p.add_argument("--score", default=None, help="Toy-world scorer: toy, toy:COLOR or toy:COLOR:SHAPE.")
    p.add_argument("--limit", type=positive_int, default=50, help="list: how many.")
    p.set_defaults(run=run_ab)


def _size(text: str):
    width, _, height = text.lower().partition("x")
    try:
        return (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or WxH, e.g. 64 or 512x768") from None


def run_ab(args) -> int:
    words = args.words
    if words and words[0] not in AB_ACTIONS:
        raise SystemExit(f"sdtune ab: unknown action {words[0]!r}; use {', '.join(AB_ACTIONS)} or --a/--b")
    if words and words[0] == "list":
        return _print_history(api.ab_history(args.limit))
    if words and len(words) < 2:
        raise SystemExit(f"sdtune ab {words[0]}: give the comparison ID (see `sdtune ab list`)")
    if words and words[0] == "show":
        return _print_comparison(api.ab_get(words[1]))
    if words:
        return _vote(words[1:])
    if args.checkpoints:
        return _print_checkpoints(
            api.ab_checkpoints(
                args.checkpoints, args.prompt or None, args.seed or None, score=args.score or "toy",
                register=args.register, base=args.base, steps=args.steps, guidance=args.guidance,
                scheduler=args.scheduler, rank_by=args.rank_by,
            )
        )  # fmt: skip
    if not (args.a and args.b):
        raise SystemExit("sdtune ab: give --a SPEC and --b SPEC (or --checkpoints RUN_DIR, or vote/show/list)")
    comparison = api.ab_compare(
        args.a, args.b, args.prompt, args.seed or [0], blind=args.blind, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, size=args.size, score=args.score, negative_prompt=args.negative_prompt,
    )  # fmt: skip
    _print_comparison(comparison)
    if comparison["blind"]:
        print(f"vote: sdtune ab vote {comparison['id']}")
    return 0


def _vote(words: list[str]) -> int:
    comparison_id = words[0]
    if len(words) == 3:
        return _print_tally(api.ab_vote(comparison_id, _pair(words[1]), words[2]))
    if len(words) != 1:
        raise SystemExit("sdtune ab vote: give ID, or ID PAIR CHOICE (left, right or tie)")
    keys = {"l": "left", "r": "right", "t": "tie"}
    for pair in api.ab_get(comparison_id)["pairs"]:
        if pair["vote"] is not None:
            continue
        print(f"pair {pair['pair']}: {pair['prompt']!r}, seed {pair['seed']}\n  left:  {pair['left']}\n"
              f"  right: {pair['right']}")  # fmt: skip
        answer = ""
        while answer not in (*keys, "s", "q"):
            answer = input("  [l]eft, [r]ight, [t]ie, [s]kip, [q]uit: ").strip().lower()[:1]
        if answer == "q":
            break
        if answer in keys:  # no side is shown until every pair is voted: the next votes stay blind
            api.ab_vote(comparison_id, pair["pair"], keys[answer])
    comparison = api.ab_get(comparison_id)
    return _print_comparison(comparison) if comparison["revealed"] else _print_tally(comparison["tally"])


def _pair(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"sdtune ab vote: PAIR must be a number, got {text!r}") from None


def _tally_line(t: dict) -> str:
    if t["sealed"]:
        return (
            f"{t['n']} of {t['pairs']} pairs voted: the sides and the tally show once every pair is voted "
            f"({t['remaining']} left; a tie counts)"
        )
    votes = f"A {t['a']}, B {t['b']}, tie {t['tie']}"
    if not t["decisive"]:
        return f"{votes}: no decisive vote yet ({t['remaining']} of {t['pairs']} pairs to vote)"
    # the side ahead is named, with A's share and interval flipped for B ("A preferred in 0%" read as a riddle)
    side, share, low, high = ("A", t["share_a"], t["ci_low"], t["ci_high"])
    if t["share_a"] < 0.5:
        side, share, low, high = ("B", 1 - t["share_a"], 1 - t["ci_high"], 1 - t["ci_low"])
    return (
        f"{votes}: {side} preferred in {share:.0%} of {t['decisive']} decisive votes "
        f"(95% Wilson interval {low:.2f}-{high:.2f}): {t['verdict']}; {t['remaining']} of {t['pairs']} pairs left to vote"
    )


def _print_tally(t: dict) -> int:
    print(_tally_line(t))
    return 0


def _score_text(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_comparison(c: dict) -> int:
    if c["kind"] == "checkpoints":
        return _print_checkpoints(c)
    print(f"comparison {c['id']} ({'blind' if c['blind'] else 'open'}): A = {c['a']}  |  B = {c['b']}")
    print(f"grid: {c['grid']}")
    for side, images in (c.get("control_images") or {}).items():
        if images:
            print(f"control images of {side.upper()}: {', '.join(images)}")
    for p in c["pairs"]:
        sides = f"{p['left_is'].upper()} | {p['right_is'].upper()}" if p["left_is"] else "? | ?"
        scores = f"  scores {_score_text(p['score_left'])} | {_score_text(p['score_right'])}" if c["score"] else ""
        vote = f"  vote: {p['vote']}" if p["vote"] else ""
        print(f"  pair {p['pair']}: {p['prompt']!r} seed {p['seed']}  left|right = {sides}{scores}{vote}")
    if c.get("scores"):
        print(f"{c['score']} score: A {c['scores']['a']:.2f}, B {c['scores']['b']:.2f}")
    return _print_tally(c["tally"])


def _print_checkpoints(c: dict) -> int:
    ranked = c.get("rank_by") or "score"
    print(f"comparison {c['id']}: checkpoints of {c['run_dir']} on {c['base']}, score {c['score']}, best by {ranked}")
    for candidate in c["candidates"]:
        mark = "  <- best" if candidate["label"] == c["best"] else ""
        loss = candidate.get("val_loss")
        loss_text = f"  val_loss {loss:.5f}" if loss is not None else ""
        where = f"{candidate['label']:<18} step {candidate['step']!s:>6}"
        print(f"  {where}  score {candidate['score']:.3f}{loss_text}{mark}")
    print(f"grid: {c['grid']}")
    if c.get("registered"):
        print(f"registered {c['best']} as {c['registered']} (sdtune adapters show {c['registered']})")
    return 0


def _print_history(rows: list[dict]) -> int:
    for row in rows:
        sides = row["sides"]
        what = f"{sides['a']} vs {sides['b']}" if row["kind"] == "ab" else f"checkpoints of {sides['run_dir']}"
        t = row["tally"]
        votes = _votes_text(t) if row["kind"] == "ab" else ""
        print(f"{row['id']}  {row['kind']:<11} {'blind' if row['blind'] else '':<5} {what}  {votes}")
    if not rows:
        print("no comparisons yet: sdtune ab --a SPEC --b SPEC --prompt P")
    return 0


def _votes_text(t: dict) -> str:
    if t["sealed"]:
        return f"{t['n']} voted, {t['remaining']} left (sealed)"
    return f"A {t['a']} B {t['b']} tie {t['tie']} ({t['remaining']} left)"


def add_publish_parser(sub):
    p = sub.add_parser("publish", help="Publish a registered adapter to the Hugging Face Hub (card, files, samples).")
    p.add_argument("name", help="Registered adapter (sdtune adapters list).")
    p.add_argument("--repo", required=True, help="USER/NAME or ORG/NAME on the Hub.")
    p.add_argument("--private", action="store_true", help="Create the repo private.")
    p.add_argument("--update", action="store_true", help="Upload into a repo that already exists.")
    p.add_argument("--license", default=None, help="Card license (default: creativeml-openrail-m, SD v1-5's).")
    p.add_argument(
        "--dry-run", nargs="?", const="", default=None, metavar="DIR",
        help="Write the exact repo folder into DIR (default: only print the card and files); upload nothing.",
    )  # fmt: skip
    p.set_defaults(run=run_publish)


def run_publish(args) -> int:
    if args.dry_run is not None and not args.dry_run:
        preview = api.publish_preview(args.name, args.repo, private=args.private, license=args.license)
        print(preview["card"])
        print("files:\n" + "\n".join(f"  {f}" for f in preview["files"]))
        return 0
    result = api.publish(
        args.name, args.repo, private=args.private, dry_run=args.dry_run is not None, out_dir=args.dry_run or None,
        update=args.update, license=args.license,
    )  # fmt: skip
    print("\n".join(f"  {f}" for f in result["files"]))
    if result["dry_run"]:
        print(f"dry run: the repo folder is {result['folder']} (nothing uploaded)")
    else:
        print(f"published {args.name} to {result['url']} ({result['commit']})")
    return 0
