"""Preference tuning from votes: what stored comparisons give as training pairs, and the run that tunes on them
(`sdtune tune-from-votes`, the A/B page's "Train on these votes"), queued as a job or run now.

Torch-free: the votes are read and checked here, in one line each, before a trainer (and torch) starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sdtune.studio.api.errors import translated

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "preference.yaml"
TRAINER = ROOT / "trainers" / "preference.py"


@translated()
def votes_summary(comparison_ids: list[str]) -> dict:
    """What the comparisons give: pairs, decisive votes (a, b), ties and unvoted pairs left out, and the winner share
    of side A, pooled and per comparison; `needed`, the fewest decisive votes a run takes (the recipe's default)."""
    from sdtune.adapters.ab.votes import MIN_PAIRS, collect_votes

    return {**collect_votes(comparison_ids, min_pairs=0).summary(), "needed": MIN_PAIRS}


def _run_overrides(comparison_ids: list[str], spec: str) -> list[str]:
    """The recipe overrides of a run on these votes over the reference `spec` (its base is the run's base)."""
    from sdtune.adapters.ab.votes import spec_base
    from sdtune.trainers.core.recipe.loader import override_text

    return [
        override_text("method.comparisons", list(dict.fromkeys(comparison_ids))),
        override_text("method.reference", spec),
        override_text("base.pretrained_model_name_or_path", spec_base(spec)),
    ]


def _output_overrides(out: str | Path | None = None, name: str | None = None) -> list[str]:
    from sdtune.trainers.core.recipe.loader import override_text

    named = [override_text("output.name", name)] if name else []
    return ([override_text("output.dir", str(Path(out).resolve()))] if out is not None else []) + named


def _checked(comparison_ids: list[str], spec: str, recipe: str | Path, overrides: list[str]) -> list[str]:
    """The run's overrides, after the checks the trainer would make first: the recipe, enough votes (its
    min_pairs), their images, the reference's base. Raises the one-line error of the first that fails."""
    from sdtune.adapters.ab.votes import check_same_base, collect_votes
    from sdtune.trainers.core.recipe import load_recipe

    everything = [*_run_overrides(comparison_ids, spec), *overrides]
    resolved = load_recipe(recipe, everything)
    if resolved.method.type != "preference":
        _refuse(f"{recipe}: method.type is {resolved.method.type!r}; tune-from-votes takes a preference recipe")
    check_same_base(collect_votes(resolved.method.comparisons, min_pairs=resolved.method.min_pairs), spec)
    return everything


def _refuse(message: str):
    from sdtune.trainers.core.recipe import RecipeError

    raise RecipeError(message)


@translated()
def queue_tune_from_votes(
    comparison_ids: list[str],
    spec: str,
    *,
    name: str | None = None,
    recipe: str | Path = RECIPE,
    overrides: list[str] | None = None,
    submission_key: str | None = None,
) -> dict:
    """Checks the votes and queues the preference run as a job (`sdtune worker` runs it); returns the job."""
    from sdtune.studio import jobs

    extra = [*_output_overrides(name=name), *(overrides or [])]
    return jobs.submit(recipe, _checked(comparison_ids, spec, recipe, extra), submission_key=submission_key).to_dict()


@translated()
def tune_from_votes(
    comparison_ids: list[str],
    spec: str,
    out: str | Path,
    *,
    name: str | None = None,
    recipe: str | Path = RECIPE,
    overrides: list[str] | None = None,
) -> int:
    """Checks the votes, then runs trainers/preference.py in this terminal (its progress shown as it goes);
    returns its exit status."""
    extra = [*_output_overrides(out, name), *(overrides or [])]
    recipe = Path(recipe).resolve()  # the trainer runs in the repository
    command = [sys.executable, str(TRAINER), str(recipe), *_checked(comparison_ids, spec, recipe, extra)]
    return subprocess.run(command, cwd=ROOT).returncode
