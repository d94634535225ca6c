"""`sdtune tune-from-votes`: a LoRA trained on your blind A/B votes (Diffusion-DPO, trainers/preference.py).

Usage:
    sdtune tune-from-votes AB_ID [AB_ID ...] --from SPEC [-o runs/liked] [--name liked] [--queue]
                           [--recipe recipes/preference.yaml] [--set section.key=value ...]

    sdtune tune-from-votes 20261207-101500-ab12cd --from toy+toy-purple:0.8 -o runs/liked
    sdtune tune-from-votes ID1 ID2 --from toy --queue --set train.max_train_steps=400   # a job for `sdtune worker`

Each voted pair of the comparisons is a (prompt, winner, loser) triple (ties and unvoted pairs are left out and
counted). SPEC is the reference, frozen, as `sdtune ab` writes a side: its base is the run's base, its adapters are
merged in, and the new LoRA trains on top of it; use the result as SPEC+NAME. The votes are checked first (enough of
them, their images, the base), each problem in one line. The work is `sdtune.studio.api.tune_from_votes` /
`queue_tune_from_votes`, which the A/B page's "Train on these votes" calls.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.studio import api
from sdtune.studio.api.preference import RECIPE


def add_votes_parser(sub):
    p = sub.add_parser(
        "tune-from-votes",
        help="Train a LoRA on blind A/B votes (Diffusion-DPO) over a reference SPEC.",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("ids", nargs="+", metavar="AB_ID", help="A/B comparison ids (sdtune ab list); pooled.")
    p.add_argument(
        "--from", dest="spec", required=True, metavar="SPEC", help="The reference, e.g. toy+toy-purple:0.8."
    )
    p.add_argument("-o", "--out", type=Path, help="Run folder (default: the recipe's output.dir).")
    p.add_argument("--name", help="The adapter's name (output.name; default: the recipe's).")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="A preference recipe (default: "
                   "recipes/preference.yaml).")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="A recipe override, e.g. train.max_train_steps=400; repeatable.")  # fmt: skip
    p.add_argument("--queue", action="store_true", help="Queue it as a job for `sdtune worker` instead of now.")
    p.set_defaults(run=run_tune_from_votes)


def run_tune_from_votes(args) -> int:
    summary = api.votes_summary(args.ids)
    print(f"votes: {summary['decisive']} pairs used (A {summary['a']}, B {summary['b']}), {summary['ties']} ties and "
          f"{summary['skipped']} unvoted left out")  # fmt: skip
    options = {"name": args.name, "recipe": args.recipe, "overrides": args.overrides}
    if args.queue:
        if args.out is not None:
            raise api.StudioError("-o/--out: a queued job writes into its own job folder; leave -o out with --queue")
        job = api.queue_tune_from_votes(args.ids, args.spec, **options)
        print(f"job {job['id']}: queued (preference, {job['name']}); run folder {job['run_dir']}")
        return 0
    return api.tune_from_votes(args.ids, args.spec, args.out, **options)
