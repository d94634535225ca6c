"""`sdtune jobs sweep`: queue a grid of runs as one sweep, and read its leaderboard.

Usage:
    sdtune jobs sweep recipe.yaml train.learning_rate=1e-4,3e-4 method.rank=8,16 [--seeds 0,1] [--name NAME]
    sdtune jobs sweep show NAME [--rank-by score|color|shape|val_loss|step_time|peak_memory] [--top 3] [--ab-top 2]
    sdtune jobs sweep list

The runs are jobs: `sdtune worker` runs them, retrying transient failures (studio/retry.py); see README "Sweeps".
"""

from __future__ import annotations

from sdtune.studio import jobs, leaderboard, sweeps


def _seeds(text: str) -> list[int]:
    import argparse

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are integers separated by commas, e.g. 0,1") from None


def add_sweep_parser(actions) -> None:
    p = actions.add_parser("sweep", help="Queue a grid of runs as one sweep; `sweep show NAME`: its leaderboard.")
    p.add_argument("words", nargs="+", metavar="RECIPE AXIS... | show NAME | list",
                   help="A recipe and its axes (section.key=v1,v2), or `show NAME`, or `list`.")  # fmt: skip
    p.add_argument("--seeds", type=_seeds, default=None, help="Also sweep train.seed over these, e.g. 0,1.")
    p.add_argument("--name", default=None, help="The sweep's name (default: the recipe's stem and the time).")
    p.add_argument("--rank-by", default="score", choices=list(leaderboard.METRICS), help="show: the ranking metric.")
    p.add_argument("--top", type=int, default=0, metavar="N", help="show: render the N best runs into top.png.")
    p.add_argument("--ab-top", type=int, default=0, metavar="2", help="show: a blind A/B of the two best runs.")
    p.add_argument("--steps", type=int, default=None, help="show: sampling steps of --top / --ab-top images.")


def run_sweep(args) -> None:
    words = args.words
    if words[0] == "list":
        for sweep in sweeps.list_sweeps():
            runs = sweeps.sweep_jobs(sweep.name)
            done = sum(job.state == "done" for job in runs)
            print(f"{sweep.name}: {done}/{len(runs)} done; axes {', '.join(path for path, _ in sweep.axes)}")
    elif words[0] == "show":
        if len(words) != 2:
            raise jobs.JobError("sweep show: give the sweep's NAME (see `sdtune jobs sweep list`)")
        _show(words[1], args)
    else:
        sweep, queued = sweeps.submit_sweep(words[0], words[1:], seeds=args.seeds, name=args.name)
        print(f"sweep {sweep.name}: {len(queued)} runs queued (jobs {queued[0].id}-{queued[-1].id}); "
              f"cache {sweep.cache_dir}")  # fmt: skip
        for job in queued:
            print(f"  job {job.id}: {' '.join(sweeps.swept_values(sweep, job).values())} -> {job.run_dir}")
        print(f"leaderboard: sdtune jobs sweep show {sweep.name}")


def _show(name: str, args) -> None:
    board = leaderboard.leaderboard(name, args.rank_by)
    print(leaderboard.table_text(board))
    if args.top or args.ab_top:  # these render: keep the libraries' loading chatter out of the output
        from sdtune.adapters import quiet_libraries

        quiet_libraries()
    if args.top:
        print(f"top {args.top}: {leaderboard.top_grid(board, args.top, steps=args.steps)}")
    if args.ab_top:
        comparison = leaderboard.ab_top(board, args.ab_top, steps=args.steps)
        print(f"blind A/B {comparison['id']} of the two best: vote with `sdtune ab vote {comparison['id']}`")
