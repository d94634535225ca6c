"""Sweeps: one recipe over a grid of settings, queued as one named group of jobs.

    sdtune jobs sweep recipe.yaml train.learning_rate=1e-4,3e-4 method.rank=8,16 --seeds 0,1 --name lr-rank
    sdtune jobs sweep show lr-rank --rank-by val_loss        # the leaderboard (studio/leaderboard.py)

Each axis is `section.key=v1,v2,...` (the recipe's own override paths; a value holding a comma is written in YAML
brackets or quotes, e.g. `validation.seeds=[0,1],[2,3]`); `--seeds` is the axis `train.seed`. The grid is every
combination, the first axis slowest; an axis of one value is a setting every run shares. Every run's recipe is validated before anything is queued: a bad key or value
is one line that names it, and no job exists. The runs are ordinary jobs (their own folder, their own run folder,
registered as `<sweep>-<n>`) tied to the sweep by `sweep_id`, with the retry budget of studio/retry.py.

Cached work is shared, not multiplied: every run of a sweep gets the same `data.cache_dir` (the recipe's, else the
cache this machine uses by default), and the caches are keyed by content (latents: image bytes, bucket and VAE;
class images: base weights, class prompt and sampling settings), so N runs over one dataset encode its latents once.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sdtune.adapters.workspace import default_cache_dir
from sdtune.studio import jobs, retry

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    source     TEXT NOT NULL,             -- the recipe file as submitted
    axes       TEXT NOT NULL,             -- JSON: [[path, [value text, ...]], ...]
    fixed      TEXT NOT NULL DEFAULT '',  -- overrides every run shares, one per line
    cache_dir  TEXT NOT NULL,             -- the one cache every run reads and fills
    created_at REAL NOT NULL
);
"""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SweepError(jobs.JobError):
    """A sweep that cannot be queued or found; one line."""


@dataclass
class Sweep:
    id: int
    name: str
    source: str
    axes: list  # [[path, [value text, ...]], ...]
    fixed: list[str]
    cache_dir: str
    created_at: float

    def to_dict(self) -> dict:
        return asdict(self)


def split_values(text: str) -> list[str]:
    """`1e-4,3e-4` -> ['1e-4', '3e-4']; commas inside brackets, braces or quotes do not split."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return [*values, current]


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`train.learning_rate=1e-4,3e-4` -> ('train.learning_rate', ['1e-4', '3e-4'])."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip() or "." not in path:
        raise SweepError(f"axis {text!r}: expected section.key=value1,value2, e.g. train.learning_rate=1e-4,3e-4")
    values = [value.strip() for value in split_values(raw)]
    if any(not value for value in values):
        raise SweepError(f"axis {text!r}: an empty value; separate values with single commas")
    return path.strip(), values


def grid(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination as override strings, the first axis slowest."""
    return [[f"{path}={value}" for path, value in zip([p for p, _ in axes], combo)]
            for combo in itertools.product(*[values for _, values in axes])]  # fmt: skip


def parse_axes(axis_texts: list[str], seeds: list[int] | None = None) -> list[tuple[str, list[str]]]:
    """Every axis parsed, `seeds` as the `train.seed` axis; an axis given twice, or none at all, is refused."""
    axes = [parse_axis(text) for text in axis_texts] + ([("train.seed", [str(s) for s in seeds])] if seeds else [])
    paths = [path for path, _ in axes]
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:
        raise SweepError(f"axis {repeated[0]}: given twice; list all its values in one axis")
    if not axes:
        raise SweepError("a sweep needs at least one axis (section.key=v1,v2) or --seeds")
    return axes


def _validated(recipe: Path, runs: list[list[str]], fixed: list[str]) -> list:
    """The resolved recipe of every run; the first bad one raises with its override named."""
    from sdtune.trainers.core.recipe import RecipeError, load_recipe

    resolved = []
    for overrides in runs:
        try:
            resolved.append(load_recipe(recipe, [*fixed, *overrides]))
        except RecipeError as exc:
            raise SweepError(f"{exc} (in the sweep's run {' '.join(overrides)})") from None
    return resolved


def submit_sweep(
    recipe: str | Path,
    axes: list[str],
    *,
    seeds: list[int] | None = None,
    name: str | None = None,
    fixed: list[str] | None = None,
    max_tries: int = retry.DEFAULT_MAX_TRIES,
    home: str | Path | None = None,
) -> tuple[Sweep, list[jobs.Job]]:
    """Validates every run of the grid, then queues them all as one sweep in one transaction.

    Args:
        axes: `section.key=v1,v2` strings; seeds: the `train.seed` axis; fixed: overrides every run shares.
        name: the sweep's unique name (default: the recipe's stem and the time).
    Returns:
        The sweep and its jobs, in grid order.
    """
    recipe, fixed = Path(recipe), list(fixed or [])
    name = name or f"{recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise SweepError(f"--name {name!r}: letters, digits, '.', '_' and '-', at most 64, starting alnum")
    parsed = parse_axes(axes, seeds)
    # an axis of one value is a setting every run shares, not a column of the leaderboard
    fixed += [f"{path}={values[0]}" for path, values in parsed if len(values) == 1]
    parsed = [(path, values) for path, values in parsed if len(values) > 1]
    runs = grid(parsed)
    resolved = _validated(recipe, runs, fixed)
    cache_dir = str(default_cache_dir(resolved[0].data.cache_dir).resolve())
    with jobs.connect(home) as conn, jobs.transaction(conn):
        _ensure_table(conn)
        if conn.execute("SELECT 1 FROM sweeps WHERE name = ?", (name,)).fetchone():
            raise SweepError(f"--name {name}: a sweep of that name exists (see `sdtune jobs sweep list`)")
        cursor = conn.execute(
            "INSERT INTO sweeps (name, source, axes, fixed, cache_dir, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (name, str(recipe.resolve()), json.dumps(parsed), "\n".join(fixed), cache_dir, time.time()),
        )
        sweep_id, queued = cursor.lastrowid, []
        for index, (overrides, run) in enumerate(zip(runs, resolved), start=1):
            run.output.name = f"{name}-{index}"  # the registry entry: one per run, named by the sweep
            if run.data.cache_dir is None:
                run.data.cache_dir = cache_dir
            job = jobs.insert(conn, run, recipe, [*fixed, *overrides], home, sweep_id=sweep_id, max_tries=max_tries)
            queued.append(job)
        return _sweep(conn, name), queued


def _ensure_table(conn):
    conn.execute(SCHEMA.strip().rstrip(";"))


def _sweep(conn, name: str) -> Sweep:
    row = conn.execute("SELECT * FROM sweeps WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise SweepError(f"sweep {name!r}: no such sweep (see `sdtune jobs sweep list`)")
    return Sweep(**{**dict(row), "axes": json.loads(row["axes"]), "fixed": row["fixed"].splitlines()})


def get_sweep(name: str, *, home: str | Path | None = None) -> Sweep:
    with jobs.connect(home) as conn:
        _ensure_table(conn)
        return _sweep(conn, name)


def list_sweeps(*, home: str | Path | None = None) -> list[Sweep]:
    """Sweeps, newest first."""
    with jobs.connect(home) as conn:
        _ensure_table(conn)
        names = [row["name"] for row in conn.execute("SELECT name FROM sweeps ORDER BY id DESC").fetchall()]
        return [_sweep(conn, name) for name in names]


def sweep_jobs(name: str, *, home: str | Path | None = None) -> list[jobs.Job]:
    """The sweep's runs in grid order."""
    with jobs.connect(home) as conn:
        _ensure_table(conn)
        sweep = _sweep(conn, name)
        rows = conn.execute("SELECT * FROM jobs WHERE sweep_id = ? ORDER BY id", (sweep.id,)).fetchall()
    return [jobs.job_from_row(row) for row in rows]


def swept_values(sweep: Sweep, job: jobs.Job) -> dict[str, str]:
    """{axis path: this run's value}, read from the job's overrides (`fixed` ones excluded)."""
    paths = [path for path, _ in sweep.axes]
    pairs = [line.split("=", 1) for line in job.overrides.splitlines() if "=" in line]
    return {path: value for path, value in pairs if path in paths}
