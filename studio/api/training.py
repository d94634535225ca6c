"""Recipes, their preflight and the job queue: what the Train page and `sdtune jobs` call; and what a machine can
train (`doctor`), and what a finished run says about itself."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@translated()
def recipe_templates(method: str | None = None) -> dict[str, str]:
    """Recipe templates in recipes/ ({file name: method.type}), only `method`'s if given."""
    from sdtune.trainers.core.recipe import read_yaml

    found = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = read_yaml(path.read_text()) or {}
        kind = (data.get("method") or {}).get("type", "lora")
        if method is None or kind == method:
            found[path.name] = kind
    return found


@translated()
def recipe_text(template: str) -> str:
    path = RECIPES_DIR / Path(template).name
    if not path.is_file():
        raise StudioError(f"recipe template {template!r} not found in {RECIPES_DIR}")
    return path.read_text()


@translated()
def validate_recipe(text: str, overrides: list[str] | None = None, source: str = "recipe.yaml") -> dict:
    """Checks recipe YAML (+ `section.key=value` overrides) against the recipe schema without torch.

    Returns {"ok": True, "recipe": resolved dict} or {"ok": False, "error": the CLI's one-line message}.
    """
    import yaml

    from sdtune.trainers.core.recipe import RecipeError, apply_overrides, read_yaml, recipe_from_dict

    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        return {"ok": False, "error": f"{source}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})"}
    try:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (base, data, method, train, ...)")
        recipe = recipe_from_dict(apply_overrides(data, list(overrides or [])), source)
    except RecipeError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "recipe": recipe.to_dict()}


@translated()
def preflight(text: str, overrides: list[str] | None = None, device: str | None = None) -> dict:
    """The trainer's preflight for recipe YAML: the data as found (images, buckets, skipped files), the plan, and
    the time and memory estimate for this machine. Loads torch (the estimate runs the UNet on meta tensors).

    Returns {"report": text, "buckets": {"WxH": images per epoch}, "images": n, "skipped": [{"file", "reason"}]}.
    """
    from sdtune.trainers.core.estimate import preflight as report

    recipe, scan = _scan_data(text, overrides)
    return {
        "report": report(recipe, scan, device=device),
        "buckets": {f"{w}x{h}": n for (w, h), n in scan.bucket_counts().items()},
        "images": len(scan.records),
        "skipped": [{"file": s.file, "reason": s.reason} for s in scan.skipped],
    }


@translated()
def check_data(text: str, overrides: list[str] | None = None) -> int:
    """Raises StudioError (the trainer's own message) when the recipe's data has no usable image; returns how many
    images it has. Run before queueing, so a job is not launched only to fail at its preflight."""
    return len(_scan_data(text, overrides)[1].records)


def _scan_data(text: str, overrides: list[str] | None):
    from sdtune.studio import confine
    from sdtune.trainers.core.data import scan_dataset
    from sdtune.trainers.core.recipe import recipe_from_dict

    checked = validate_recipe(text, overrides)
    if not checked["ok"]:
        raise StudioError(checked["error"])
    confine.check_recipe(checked["recipe"])  # the scan reads the data folders
    recipe = recipe_from_dict(checked["recipe"])
    return recipe, scan_dataset(recipe.data)  # a DataError is the trainer's own line


@translated()
def submit_job(text: str, overrides: list[str] | None = None, submission_key: str | None = None) -> dict:
    """Queues recipe YAML as a training job (the text is kept under $SDTUNE_HOME/studio/recipes/); returns the job.
    The studio's jobs are confined: every path key must lie in the folders studio/confine.py allows (the CLI queues
    with `jobs.submit`, which is not). A `submission_key` already used returns that job instead (one Launch
    clicked twice queues one job)."""
    import os
    import time

    from sdtune.adapters.atomic import write_text_atomic
    from sdtune.studio import confine, jobs

    checked = validate_recipe(text, overrides)
    if not checked["ok"]:
        raise StudioError(checked["error"])
    confine.check_recipe(checked["recipe"])
    folder = jobs.sdtune_home() / "studio" / "recipes"
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}.yaml"
    write_text_atomic(path, text)  # the worker reads it: never half a recipe
    return jobs.submit(path, overrides, submission_key=submission_key).to_dict()


@translated()
def submit_sweep(
    text: str, overrides: list[str], axes: list[str], seeds: list[int] | None = None, name: str | None = None
) -> dict:
    """Queues recipe YAML (+ overrides every run shares) over a grid of `section.key=v1,v2` axes as one sweep
    (studio/sweeps.py); returns {"sweep": ..., "jobs": [...]}. Confined like `submit_job`: every run's recipe, since
    an axis may name a path."""
    import os
    import time

    from sdtune.adapters.atomic import write_text_atomic
    from sdtune.studio import confine, jobs, sweeps

    for run in sweeps.grid(sweeps.parse_axes(axes, seeds)):
        checked = validate_recipe(text, [*overrides, *run])
        if not checked["ok"]:
            raise StudioError(f"{checked['error']} (in the sweep's run {' '.join(run)})")
        confine.check_recipe(checked["recipe"])
    path = jobs.sdtune_home() / "studio" / "recipes" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yaml"
    write_text_atomic(path, text)
    sweep, queued = sweeps.submit_sweep(path, axes, seeds=seeds, name=name, fixed=overrides)
    return {"sweep": sweep.to_dict(), "jobs": [job.to_dict() for job in queued]}


@translated()
def read_run(run_dir: str | Path) -> dict:
    """A run folder's `adapter.json` as plain data (checked against the manifest's fields)."""
    from sdtune.adapters.manifest import read_manifest

    return read_manifest(run_dir).to_dict()


@translated()
def doctor_report() -> str:
    """What this machine can train (torch, CUDA, bitsandbytes, SDPA, memory, disk) and which recipes fit."""
    from sdtune.studio.doctor import doctor_report as report

    return report()
