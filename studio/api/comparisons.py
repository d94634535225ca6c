"""A/B comparisons: two SPECs rendered side by side, votes and their tally, a run's checkpoints scored, and the
control images a side can be steered by."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated
from sdtune.studio.api.registry import open_registry
from sdtune.studio.api.render import size_threads
from sdtune.studio.api.training import read_run

BUNDLED_CONTROL_IMAGES = Path(__file__).resolve().parents[2] / "datasets" / "toy-masks" / "validation"
CONTROL_IMAGE_MAX_MB = 25  # as one dataset image (studio/datasets_store.py MAX_FILE_BYTES)


def _ab_settings(prompts, seeds, steps, guidance, scheduler, size, negative_prompt=""):
    from sdtune.adapters.ab import Settings

    width, height = (size, size) if isinstance(size, int) else (size or (None, None))
    return Settings(list(prompts), [int(s) for s in seeds], steps, guidance, scheduler, width, height, negative_prompt)


@translated()
def ab_compare(
    a: str,
    b: str,
    prompts: list[str],
    seeds: list[int],
    *,
    blind: bool = False,
    steps: int = 25,
    guidance: float | None = None,
    scheduler: str = "default",
    size: int | tuple[int, int] | None = None,
    score: str | None = None,
    negative_prompt: str = "",
) -> dict:
    """Renders two SPECs (`BASE[+ADAPTER[:WEIGHT]]...`, e.g. `toy+toy-purple:0.8`) at the same prompts x seeds and
    settings, writes the pair images and `grid.png`, stores the comparison; returns it as `ab_get` does.

    Args:
        blind: shuffle the sides per pair; `left_is`/`right_is`, the scores and the tally stay hidden until every
            pair is voted.
        size: one side length, or (width, height); None: the base's native size.
        score: a toy-world scorer (`toy`, `toy:COLOR`, `toy:COLOR:SHAPE`): a score per image beside the votes.
    """
    from sdtune.adapters import ab

    settings = _ab_settings(prompts, seeds, steps, guidance, scheduler, size, negative_prompt)
    size_threads()
    return ab_get(ab.compare(a, b, settings, blind=blind, score=score))


@translated()
def ab_vote(comparison_id: str, pair: int, choice: str) -> dict:
    """One vote on one pair: `left`, `right` or `tie` as shown (`a`/`b` too when not blind); voting a pair again
    replaces its vote (both are kept in the pair's `votes`) until every pair of a blind comparison is voted: it is
    revealed then, and its votes are final. Returns the tally (as `ab_tally`)."""
    from sdtune.adapters import ab

    return ab.ABStore().vote(comparison_id, int(pair), choice)


@translated()
def ab_tally(comparison_id: str) -> dict:
    """Votes for a, b, tie; n; share_a with its 95% Wilson interval ci_low..ci_high over the decisive votes (ties
    are counted, not split); verdict; pairs and remaining (not yet voted)."""
    from sdtune.adapters import ab

    return ab.ABStore().tally(comparison_id)


@translated()
def ab_get(comparison_id: str) -> dict:
    """A stored comparison: id, kind, a, b, settings, blind, score, folder, grid, scores, pairs (pair, prompt, seed,
    left, right image paths, vote, votes (every vote cast), left_is, right_is, score_left, score_right), revealed
    (an open comparison, or a blind one with every pair voted: its votes are final) and the tally (`sealed`, with
    only how many pairs are voted, while a blind one is not revealed). A checkpoint
    comparison has run_dir, candidates (label, step, path, score, val_loss), best, rank_by and registered instead of
    pairs."""
    from sdtune.adapters import ab

    data = ab.ABStore().get(comparison_id)
    data["grid"] = str(Path(data["folder"]) / data["grid"]) if data.get("grid") else None
    return data


@translated()
def ab_history(limit: int = 50) -> list[dict]:
    """Comparisons, newest first: id, kind, created_at, sides, blind, score, tally."""
    from sdtune.adapters import ab

    return ab.ABStore().history(limit)


@translated()
def control_images() -> list[dict]:
    """Control images to steer an A/B side by: the ones uploaded for comparisons (`$SDTUNE_HOME/ab/inputs/`,
    newest first), then the toy masks that ship with sdtune. Each: name, path."""
    from sdtune.adapters.ab import ABStore

    inputs = ABStore().root / "inputs"
    uploaded = sorted(inputs.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True) if inputs.is_dir() else []
    bundled = sorted(BUNDLED_CONTROL_IMAGES.glob("*.png"))
    return [{"name": p.name, "path": str(p)} for p in uploaded] + [
        {"name": f"toy-masks/{p.name}", "path": str(p)} for p in bundled
    ]


@translated()
def save_control_image(filename: str, data: bytes) -> str:
    """Keeps an uploaded control image for comparisons (checked as a dataset upload is: size, header, decoding),
    as a PNG named by its content, atomically; returns its path. The same image uploaded twice is one file."""
    import hashlib
    import io

    from PIL import Image

    from sdtune.adapters.ab import ABStore
    from sdtune.adapters.atomic import atomic_path
    from sdtune.studio.datasets_store import check_image

    problem = check_image(data)
    if problem:
        raise StudioError(f"control image {filename}: {problem}")
    inputs = ABStore().root / "inputs"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(filename).stem)[:40] or "control"
    target = inputs / f"{stem}-{hashlib.sha256(data).hexdigest()[:10]}.png"
    if not target.exists():
        # no .png suffix on the temp file: `control_images` lists *.png, and a half-written one is not a choice
        with Image.open(io.BytesIO(data)) as image, atomic_path(target) as tmp:
            image.convert("RGB").save(tmp, format="PNG")
    return str(target)


@translated()
def ab_checkpoints(
    run_dir: str | Path,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    *,
    score: str = "toy",
    register: str | None = None,
    base: str | None = None,
    steps: int = 25,
    guidance: float | None = None,
    scheduler: str = "default",
    rank_by: str = "score",
) -> dict:
    """Scores every saved checkpoint of a LoRA run (and its final LoRA) on the same prompts and seeds, names the
    best and, with `register`, registers it under that name (provenance: which checkpoint of which run).

    Args:
        prompts: default: the prompts of the run recipe's `validation.toy_score`.
        seeds: default: the run recipe's `validation.toy_seeds` (0-3 unless it set others), the seeds its score used.
        score: the toy-world scorer (`toy` reads colour and shape from each prompt; `toy:purple`...).
        base: default: the base in the run's adapter.json.
        rank_by: "score", or "val_loss": the lowest held-out validation loss the run recorded (shown either way).
    """
    from sdtune.adapters import ab

    default_prompts, default_seeds = toy_score_defaults(run_dir)
    if not (prompts or default_prompts):
        raise StudioError(f"--checkpoints {run_dir}: its recipe has no validation.toy_score prompts; give --prompt")
    settings = _ab_settings(prompts or default_prompts, seeds or default_seeds, steps, guidance, scheduler, None)
    if register:
        from sdtune.adapters.registry import check_name

        check_name(register)
        if register in open_registry():
            raise StudioError(f"--register: an adapter named {register!r} is already registered; choose another")
    size_threads()
    comparison_id = ab.compare_checkpoints(run_dir, settings, score=score, base=base, rank_by=rank_by)
    if register:
        ab.register_best(ab.ABStore().get(comparison_id), register, open_registry())
    return ab_get(comparison_id)


def toy_score_defaults(run_dir) -> tuple[list[str], list[int]]:
    """The prompts and seeds a run's own toy score used (its recipe's `validation.toy_score` and `toy_seeds`), so that
    its checkpoints are compared as its score was measured."""
    try:
        validation = read_run(run_dir)["recipe"].get("validation") or {}
    except StudioError:
        validation = {}
    prompts = [t["prompt"] for t in validation.get("toy_score") or []]
    return prompts, list(validation.get("toy_seeds") or [0, 1, 2, 3])
