"""The studio API: plain-data functions behind the `sdtune` command and the Streamlit studio.

Arguments and results are strings, numbers, lists, dicts and paths, so a UI page can call them without knowing
torch or diffusers. Importing this module stays cheap: torch, diffusers and the trainers' core load inside the
functions that need them (tests/test_layout.py holds that). Errors a user can fix raise `StudioError` with one line.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.schedulers import SCHEDULER_NAMES

DTYPE_NAMES = ("fp32", "fp16", "bf16")


class StudioError(SdtuneError, ValueError):
    """Input the user can fix (a missing file, a bad base); the message is one line."""


def scheduler_names() -> list[str]:
    """Samplers `sample_images` accepts; `default` is the base's own."""
    return list(SCHEDULER_NAMES)


def sample_images(
    prompts: list[str],
    out_dir: str | Path,
    *,
    seeds: list[int] | None = None,
    base: str = "toy",
    adapters: list[str] | None = None,
    negative_prompt: str = "",
    steps: int = 25,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    scheduler: str = "default",
    grid: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    controlnets: list[str] | None = None,
    control_images: list[str] | None = None,
    control_guidance_start: float = 0.0,
    control_guidance_end: float = 1.0,
    fuse: bool = False,
) -> list[Path]:
    """Renders every prompt once per seed into `out_dir` as PNGs with A1111 `parameters`; returns the files written.

    Args:
        adapters: registry names, LoRA files or run folders, each optionally `NAME_OR_PATH:WEIGHT`; stacked in order.
        guidance: classifier-free guidance; None takes the base's recommended value (7.5 SD v1-5, 3 the toy base).
        grid: also write `grid.png`, a labelled contact sheet (returned last).
        device: cuda / cpu / mps; None picks cuda when present.
        dtype: fp32 / fp16 / bf16; None gives fp16 on CUDA and fp32 elsewhere.
        controlnets: ControlNet folders, run folders, files or registry names, each optionally `REF:SCALE`;
            several make a MultiControlNet. They combine with `adapters`.
        control_images: one conditioning image per ControlNet, in the same order.
        control_guidance_start, control_guidance_end: the share of the steps during which the ControlNets steer.
        fuse: merge the adapters into the base weights first (faster steps, same images within 2/255).
    """
    from sdtune.adapters import compose, contact_sheet, sampling
    from sdtune.adapters.base import BaseLoadError, recommended_guidance, resolve_base

    if not prompts:
        raise StudioError("give at least one prompt")
    _size_threads()
    try:  # a folder, run folder or file, or a registered ControlNet's name, each optionally :SCALE
        refs = [sampling.split_number(c) for c in controlnets or []]
        controls = [sampling.ControlSpec(compose.resolve_controlnet(ref), scale) for ref, scale in refs]
        uses = [compose.AdapterUse.parse(a) for a in adapters or []]
    except ValueError as exc:  # ComposeError, or a weight that is no finite number
        raise StudioError(str(exc)) from None
    control_images = list(control_images or [])
    _check_controls(controls, control_images, control_guidance_start, control_guidance_end)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise StudioError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    seeds = list(seeds or [0])
    spec = compose.PipelineSpec(
        base=base,
        adapters=uses,
        device=device,
        dtype=dtype,
        fuse=fuse,
        controlnets=controls,
    )
    try:
        composer = compose.build(spec)
        base = compose.resolve_base_ref(base)
        source = resolve_base(base)
        guidance = guidance if guidance is not None else recommended_guidance(base)
    except (BaseLoadError, FileNotFoundError, ValueError) as exc:  # ValueError: ComposeError, a bad ControlNet
        raise StudioError(str(exc)) from None
    lora = composer.lora_label()
    settings = sampling.grid_settings(
        prompts,
        seeds,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        scheduler=scheduler,
        control_images=tuple(control_images),
        control_scales=tuple(c.scale for c in controls),
        control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end,
    )
    samples = sampling.generate(
        composer.pipe, settings, model_name=source.name, extra_parameters={"Lora": lora} if lora else None
    )
    out_dir = Path(out_dir)
    written = []
    for i, sample in enumerate(samples):
        written.append(out_dir / f"{i:04d}-seed{sample.settings.seed}.png")
        sampling.save_png(sample, written[-1])
    if grid:
        title = source.name + (f" + {lora}" if lora else "") + f"  |  {steps} steps, CFG {guidance:g}"
        written.append(out_dir / "grid.png")
        contact_sheet.save_grid(contact_sheet.samples_grid(samples, prompts, seeds, title), written[-1])
    return written


def _size_threads():
    """A render shares the CPU with the queue's running trainers: torch takes the cores they leave (threads.py)."""
    from sdtune.studio.threads import size_torch_for_render

    size_torch_for_render()


def _check_controls(controls: list, images: list[str], start: float, end: float):
    if len(images) != len(controls):
        raise StudioError(
            f"--control-image: {len(images)} given for {len(controls)} --controlnet; give one image per ControlNet"
        )
    for image in images:
        if not Path(image).is_file():
            raise StudioError(f"--control-image: {image} not found")
    if not 0.0 <= start < end <= 1.0:
        raise StudioError(f"--control-guidance-start/end: need 0 <= start ({start}) < end ({end}) <= 1")


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, half: bool = False, config: str | None = None, overwrite: bool = False
) -> Path:
    """diffusers folder -> single-file `.safetensors` checkpoint, or back; returns what was written."""
    from sdtune.adapters.single_file import convert

    try:
        return Path(convert(Path(src), Path(dst), half=half, config=config, overwrite=overwrite))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise StudioError(str(exc)) from None


def annotation_kinds() -> dict[str, list[str]]:
    """Kinds `annotate` knows: those that run as they are, and those that need a local weights file."""
    from sdtune.adapters import annotate

    return {"no_weights": list(annotate.KINDS), "need_weights": list(annotate.WEIGHTED_KINDS)}


def annotate_images(
    kind: str,
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    low_threshold: int = 100,
    high_threshold: int = 200,
    mask_threshold: float = 0.18,
    weights: str | None = None,
) -> list[Path]:
    """Makes `kind` conditioning images (canny, softedge, scribble, mask; midas/hed with `weights`) for every image
    in `in_dir`, written to `out_dir` with the same relative names as PNG; returns the files written."""
    from sdtune.adapters import annotate

    if not 0 <= low_threshold <= high_threshold <= 255:
        raise StudioError(f"thresholds: need 0 <= low ({low_threshold}) <= high ({high_threshold}) <= 255")
    options = annotate.AnnotateOptions(low_threshold, high_threshold, mask_threshold, weights)
    try:
        return annotate.annotate_folder(in_dir, out_dir, kind, options)
    except annotate.AnnotateError as exc:
        raise StudioError(str(exc)) from None


def extract_lora(base: str, tuned: str, rank: int, out: str | Path, *, dtype: str = "fp16") -> dict[str, str]:
    """A LoRA of rank `rank` from the weight delta between two bases (e.g. a DreamBooth fine-tune and its base),
    written into the folder `out` as `pytorch_lora_weights.safetensors` (PEFT) and `<folder name>.safetensors`
    (kohya/A1111). Returns {format: path}."""
    from sdtune.adapters.base import BaseLoadError, load_pipeline
    from sdtune.adapters.extract import extract_lora as extract
    from sdtune.adapters.lora_files import save_extracted

    if rank < 1:
        raise StudioError(f"--rank must be at least 1, got {rank}")
    try:
        base_pipe, tuned_pipe = load_pipeline(base), load_pipeline(tuned)
    except (BaseLoadError, FileNotFoundError, ValueError) as exc:
        raise StudioError(str(exc)) from None
    import torch

    try:
        lora = extract(
            base_pipe.unet.state_dict(),
            tuned_pipe.unet.state_dict(),
            rank,
            base_pipe.text_encoder.state_dict(),
            tuned_pipe.text_encoder.state_dict(),
            device="cuda" if torch.cuda.is_available() else "cpu",  # the SVDs on a GPU when there is one
        )
        files = save_extracted(Path(out), lora, base=base, tuned=tuned, precision=dtype)
    except ValueError as exc:
        raise StudioError(str(exc)) from None
    return {fmt: str(path) for fmt, path in files.items()}


def doctor_report() -> str:
    """What this machine can train (torch, CUDA, bitsandbytes, SDPA, memory, disk) and which recipes fit."""
    from sdtune.studio.doctor import doctor_report as report

    return report()


def read_run(run_dir: str | Path) -> dict:
    """A run folder's `adapter.json` as plain data (checked against the manifest's fields)."""
    from sdtune.adapters.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run_dir).to_dict()
    except ManifestError as exc:
        raise StudioError(str(exc)) from None


# -- the adapter registry ---------------------------------------------------------------------------------------------


def _registry():
    from sdtune.adapters.registry import Registry

    return Registry()


def _studio_errors():
    """The registry's, importer's, merger's and base loader's one-line errors, as `StudioError`."""
    return (SdtuneError, FileNotFoundError)  # every one-line error derives from SdtuneError (adapters/errors.py)


def _call(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except _studio_errors() as exc:
        raise StudioError(str(exc)) from None


def list_adapters(
    *, base: str | None = None, method: str | None = None, tag: str | None = None, trigger: str | None = None
) -> list[dict]:
    """Registered adapters (newest first) as dicts: name, method, base, trigger_words, tags, origin, folder..."""
    return [e.to_dict() for e in _registry().list(base=base, method=method, tag=tag, trigger=trigger)]


def show_adapter(name: str) -> dict:
    """One adapter: its index entry and its whole manifest."""
    registry = _registry()
    entry = _call(registry.get, name)
    return {**entry.to_dict(), "manifest": registry.manifest(name).to_dict()}


def import_adapter(
    path: str | Path,
    *,
    base: str = "toy",
    name: str | None = None,
    allow_pickle: bool = False,
    tags: list[str] | None = None,
    dry_run: bool = False,
    confined: bool = False,
) -> dict:
    """Detects, validates against `base` and registers a LoRA / ControlNet / full model; returns the check report
    (and the entry unless `dry_run`). `confined` (the studio): `path` must lie in the folders studio/confine.py
    allows, checked before anything reads it."""
    from sdtune.adapters import importer

    if confined:
        from sdtune.studio import confine

        confine.check_path(path, "path")
    if dry_run:
        return {"report": _call(importer.inspect, path, base=base, allow_pickle=allow_pickle).to_dict()}
    entry, report = _call(
        importer.import_adapter, path, base=base, name=name, allow_pickle=allow_pickle, tags=tags or [],
        registry=_registry(),
    )  # fmt: skip
    return {"entry": entry.to_dict(), "report": report.to_dict()}


def export_adapter(name: str, dest: str | Path, fmt: str | None = None, overwrite: bool = False) -> list[Path]:
    """Copies one format's file (`peft`, `kohya`...) or the whole adapter folder out of the registry; an existing
    file is replaced only with `overwrite`."""
    return _call(_registry().export, name, dest, fmt, overwrite)


def remove_adapter(name: str) -> None:
    _call(_registry().remove, name)


def tag_adapter(name: str, add: list[str] | None = None, remove: list[str] | None = None) -> list[str]:
    return _call(_registry().tag, name, add or [], remove or [])


def check_registry(repair: bool = False) -> dict:
    """Compares the index with the adapter folders; `repair` makes them agree. Returns the findings."""
    report = _registry().check(repair=repair)
    return {**report.__dict__, "ok": report.ok, "summary": report.summary()}


def merge_adapters(
    name: str,
    parents: list[str],
    weights: list[float] | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    conv_rank: int | None = None,
    base: str = "toy",
    prompt: str = "a photo",
) -> dict:
    """Merges registered LoRAs (or files) into a new registered LoRA (linear, concat or svd); returns its entry."""
    from sdtune.adapters import merge

    weights = weights or [1.0] * len(parents)
    entry = _call(
        merge.merge_into_registry, name, parents, weights, method, base=base, rank=rank, conv_rank=conv_rank,
        prompt=prompt, registry=_registry(),
    )  # fmt: skip
    return entry.to_dict()


def resize_adapter(name: str, parent: str, max_rank: int, **options) -> dict:
    """Resizes a LoRA's rank into a new registered LoRA; `options` as `adapters.merge.resize_into_registry`
    (`dynamic`: sv_ratio / sv_fro / sv_cumulative with `param`, `base`, `prompt`)."""
    from sdtune.adapters import merge

    return _call(merge.resize_into_registry, name, parent, max_rank, registry=_registry(), **options).to_dict()


def bake_model(
    out_folder: str | Path, *, base: str = "toy", adapters: list[str], single_file: str | Path | None = None
) -> list[Path]:
    """Base + adapters (`NAME_OR_PATH[:WEIGHT]`) -> a diffusers folder (+ a single-file checkpoint)."""
    from sdtune.adapters import compose, merge

    uses = [compose.AdapterUse.parse(a) for a in adapters]
    return _call(merge.bake, base, uses, out_folder, single_file)


# -- datasets in the workspace (studio/datasets_store.py, torch-free) -------------------------------------------------


def _datasets_call(function, *args, **kwargs):
    from sdtune.studio.datasets_store import DatasetError

    try:
        return function(*args, **kwargs)
    except DatasetError as exc:
        raise StudioError(str(exc)) from None


def list_datasets() -> list[dict]:
    """Datasets under $SDTUNE_HOME/datasets: name, image and caption counts, fingerprint, versions."""
    from sdtune.studio import datasets_store

    return datasets_store.list_datasets()


def create_dataset(name: str) -> dict:
    from sdtune.studio import datasets_store

    _datasets_call(datasets_store.create, name)
    return datasets_store.info(name)


def dataset_info(name: str) -> dict:
    from sdtune.studio import datasets_store

    return _datasets_call(datasets_store.info, name)


def dataset_images(name: str) -> list[dict]:
    """Every image of a dataset's work copy: file (relative path), folder, path, caption, caption_error,
    conditioning image (or None)."""
    from sdtune.studio import datasets_store

    return _datasets_call(datasets_store.images, name)


def dataset_thumbnail(path: str | Path) -> bytes:
    """A JPEG thumbnail of an image as the trainers see it (any PIL mode, 16-bit grey included); StudioError with
    the reason when it cannot be shown."""
    from sdtune.studio import datasets_store

    return _datasets_call(datasets_store.thumbnail, path)


def upload_to_dataset(name: str, files: list[tuple[str, bytes]]) -> dict:
    """Checks (size limits, zip-slip, zip bombs, PIL header checks, a full decode, name clashes) and writes an upload
    of images, `.txt` captions and zips of them (folders kept); returns {"written", "captions", "replaced",
    "rejected": [{"file", "reason"}]}, by path relative to the dataset's images/."""
    from sdtune.studio import datasets_store

    return _datasets_call(datasets_store.add_files, name, files).to_dict()


def set_caption(name: str, file: str, caption: str) -> None:
    from sdtune.studio import datasets_store

    _datasets_call(datasets_store.set_caption, name, file, caption)


def bulk_captions(name: str, *, trigger: str = "", find: str = "", replace: str = "", template: str = "") -> int:
    """Template ({caption} {trigger} {name}), then find/replace, then the trigger word; returns captions changed."""
    from sdtune.studio import datasets_store

    return _datasets_call(
        datasets_store.bulk_captions, name, trigger=trigger, find=find, replace=replace, template=template
    )


def remove_dataset_image(name: str, file: str) -> None:
    from sdtune.studio import datasets_store

    _datasets_call(datasets_store.remove_image, name, file)


def freeze_dataset(name: str) -> dict:
    """The dataset's current content as a frozen version (a new one only if it changed): {"version", "path",
    "fingerprint", "images"}. Jobs train on these paths."""
    from sdtune.studio import datasets_store

    return _datasets_call(datasets_store.snapshot, name)


def annotate_dataset(name: str, kind: str, **options) -> list[Path]:
    """ControlNet conditioning images for every image of the dataset (`annotate_images` into work/conditioning)."""
    from sdtune.studio import datasets_store

    folder = _datasets_call(datasets_store.work_dir, name)
    return annotate_images(kind, folder / datasets_store.IMAGES, folder / datasets_store.CONDITIONING, **options)


# -- recipes, preflight and jobs ----------------------------------------------------------------------------------------

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_templates(method: str | None = None) -> dict[str, str]:
    """Recipe templates in recipes/ ({file name: method.type}), only `method`'s if given."""
    from sdtune.trainers.core.recipe import _yaml

    found = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = _yaml(path.read_text()) or {}
        kind = (data.get("method") or {}).get("type", "lora")
        if method is None or kind == method:
            found[path.name] = kind
    return found


def recipe_text(template: str) -> str:
    path = RECIPES_DIR / Path(template).name
    if not path.is_file():
        raise StudioError(f"recipe template {template!r} not found in {RECIPES_DIR}")
    return path.read_text()


def validate_recipe(text: str, overrides: list[str] | None = None, source: str = "recipe.yaml") -> dict:
    """Checks recipe YAML (+ `section.key=value` overrides) against the recipe schema without torch.

    Returns {"ok": True, "recipe": resolved dict} or {"ok": False, "error": the CLI's one-line message}.
    """
    import yaml

    from sdtune.trainers.core.recipe import RecipeError, _yaml, apply_overrides, recipe_from_dict

    try:
        data = _yaml(text) or {}
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


def check_data(text: str, overrides: list[str] | None = None) -> int:
    """Raises StudioError (the trainer's own message) when the recipe's data has no usable image; returns how many
    images it has. Run before queueing, so a job is not launched only to fail at its preflight."""
    return len(_scan_data(text, overrides)[1].records)


def _scan_data(text: str, overrides: list[str] | None):
    from sdtune.studio import confine
    from sdtune.trainers.core.data import DataError, scan_dataset
    from sdtune.trainers.core.recipe import recipe_from_dict

    checked = validate_recipe(text, overrides)
    if not checked["ok"]:
        raise StudioError(checked["error"])
    confine.check_recipe(checked["recipe"])  # the scan reads the data folders
    recipe = recipe_from_dict(checked["recipe"])
    try:
        return recipe, scan_dataset(recipe.data)
    except DataError as exc:
        raise StudioError(str(exc)) from None


def submit_job(text: str, overrides: list[str] | None = None, submission_key: str | None = None) -> dict:
    """Queues recipe YAML as a training job (the text is kept under $SDTUNE_HOME/studio/recipes/); returns the job.
    The studio's jobs are confined: every path key must lie in the folders studio/confine.py allows (the CLI queues
    with `jobs.submit`, which is not). A `submission_key` already used returns that job instead (one Launch
    clicked twice queues one job)."""
    import os
    import time

    from sdtune.studio import confine, jobs

    checked = validate_recipe(text, overrides)
    if not checked["ok"]:
        raise StudioError(checked["error"])
    confine.check_recipe(checked["recipe"])
    folder = jobs.sdtune_home() / "studio" / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}.yaml"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    try:
        return jobs.submit(path, overrides, submission_key=submission_key).to_dict()
    except jobs.JobError as exc:
        raise StudioError(str(exc)) from None


# -- A/B comparisons ------------------------------------------------------------------------------------------------


def _ab_call(function, *args, **kwargs):
    """`_call` with the A/B module's and the base loader's errors too."""
    from sdtune.adapters.ab import ABError
    from sdtune.adapters.base import BaseLoadError

    try:
        return function(*args, **kwargs)
    except (ABError, BaseLoadError, *_studio_errors()) as exc:
        raise StudioError(str(exc)) from None


def _ab_settings(prompts, seeds, steps, guidance, scheduler, size, negative_prompt=""):
    from sdtune.adapters.ab import Settings

    width, height = (size, size) if isinstance(size, int) else (size or (None, None))
    return _ab_call(
        Settings, list(prompts), [int(s) for s in seeds], steps, guidance, scheduler, width, height, negative_prompt
    )


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
        blind: shuffle the sides per pair; `left_is`/`right_is` and the scores stay None until the pair is voted.
        size: one side length, or (width, height); None: the base's native size.
        score: a toy-world scorer (`toy`, `toy:COLOR`, `toy:COLOR:SHAPE`): a score per image beside the votes.
    """
    from sdtune.adapters import ab

    settings = _ab_settings(prompts, seeds, steps, guidance, scheduler, size, negative_prompt)
    _size_threads()
    return ab_get(_ab_call(ab.compare, a, b, settings, blind=blind, score=score))


def ab_vote(comparison_id: str, pair: int, choice: str) -> dict:
    """One vote on one pair: `left`, `right` or `tie` as shown (`a`/`b` too when not blind); voting a pair again
    replaces its vote (both are kept in the pair's `votes`) until every pair of a blind comparison is voted: it is
    revealed then, and its votes are final. Returns the tally (as `ab_tally`)."""
    from sdtune.adapters import ab

    return _ab_call(ab.ABStore().vote, comparison_id, int(pair), choice)


def ab_tally(comparison_id: str) -> dict:
    """Votes for a, b, tie; n; share_a with its 95% Wilson interval ci_low..ci_high over the decisive votes (ties
    are counted, not split); verdict; pairs and remaining (not yet voted)."""
    from sdtune.adapters import ab

    return _ab_call(ab.ABStore().tally, comparison_id)


def ab_get(comparison_id: str) -> dict:
    """A stored comparison: id, kind, a, b, settings, blind, score, folder, grid, scores, pairs (pair, prompt, seed,
    left, right image paths, vote, votes (every vote cast), left_is, right_is, score_left, score_right), revealed
    (an open comparison, or a blind one with every pair voted: its votes are final) and the tally. A checkpoint
    comparison has run_dir, candidates (label, step, path, score), best and registered instead of pairs."""
    from sdtune.adapters import ab

    data = _ab_call(ab.ABStore().get, comparison_id)
    data["grid"] = str(Path(data["folder"]) / data["grid"]) if data.get("grid") else None
    return data


def ab_history(limit: int = 50) -> list[dict]:
    """Comparisons, newest first: id, kind, created_at, sides, blind, score, tally."""
    from sdtune.adapters import ab

    return ab.ABStore().history(limit)


BUNDLED_CONTROL_IMAGES = Path(__file__).resolve().parents[1] / "datasets" / "toy-masks" / "validation"
CONTROL_IMAGE_MAX_MB = 25  # as one dataset image (studio/datasets_store.py MAX_FILE_BYTES)


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


def save_control_image(filename: str, data: bytes) -> str:
    """Keeps an uploaded control image for comparisons (checked as a dataset upload is: size, header, decoding),
    as a PNG named by its content, atomically; returns its path. The same image uploaded twice is one file."""
    import hashlib
    import io
    import os

    from PIL import Image

    from sdtune.adapters.ab import ABStore
    from sdtune.studio.datasets_store import check_image

    problem = check_image(data)
    if problem:
        raise StudioError(f"control image {filename}: {problem}")
    inputs = ABStore().root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(filename).stem)[:40] or "control"
    target = inputs / f"{stem}-{hashlib.sha256(data).hexdigest()[:10]}.png"
    if not target.exists():
        tmp = inputs / f".{target.name}.{os.getpid()}.tmp"
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, target)
    return str(target)


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
) -> dict:
    """Scores every saved checkpoint of a LoRA run (and its final LoRA) on the same prompts and seeds, names the
    best and, with `register`, registers it under that name (provenance: which checkpoint of which run).

    Args:
        prompts: default: the prompts of the run recipe's `validation.toy_score`.
        seeds: default 0-3.
        score: the toy-world scorer (`toy` reads colour and shape from each prompt; `toy:purple`...).
        base: default: the base in the run's adapter.json.
    """
    from sdtune.adapters import ab

    prompts = prompts or _toy_score_prompts(run_dir)
    settings = _ab_settings(prompts, seeds or [0, 1, 2, 3], steps, guidance, scheduler, None)
    if register:
        from sdtune.adapters.registry import check_name

        _call(check_name, register)
        if register in _registry():
            raise StudioError(f"--register: an adapter named {register!r} is already registered; choose another")
    _size_threads()
    comparison_id = _ab_call(ab.compare_checkpoints, run_dir, settings, score=score, base=base)
    if register:
        _ab_call(ab.register_best, ab.ABStore().get(comparison_id), register, _registry())
    return ab_get(comparison_id)


def _toy_score_prompts(run_dir) -> list[str]:
    try:
        targets = read_run(run_dir)["recipe"]["validation"].get("toy_score") or []
    except StudioError:
        targets = []
    if not targets:
        raise StudioError(f"--checkpoints {run_dir}: its recipe has no validation.toy_score prompts; give --prompt")
    return [t["prompt"] for t in targets]


# -- publishing to the Hub ------------------------------------------------------------------------------------------


def _publish_call(function, *args, retry: str | None = None, **kwargs):
    from sdtune.adapters.publish import NetworkFailure, PublishError

    try:
        return function(*args, **kwargs)
    except NetworkFailure as exc:  # how to try again, in the caller's words when it gives them
        raise StudioError(exc.message(retry) if retry else str(exc)) from None
    except (PublishError, *_studio_errors()) as exc:
        raise StudioError(str(exc)) from None


def publish_preview(name: str, repo: str, *, private: bool = False, license: str | None = None) -> dict:
    """What `publish` would upload, without rendering or uploading: {repo, private, card, files}."""
    from sdtune.adapters import publish as pub

    preview = _publish_call(pub.preview, name, repo, license=license or pub.DEFAULT_LICENSE, registry=_registry())
    return {**preview, "private": private}


def publish(
    name: str,
    repo: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    out_dir: str | Path | None = None,
    token: str | None = None,
    update: bool = False,
    license: str | None = None,
    retry: str | None = None,
) -> dict:
    """Publishes a registered adapter to the Hub repo `repo` (USER/NAME): model card, both LoRA formats (or the
    ControlNet / full model files) and sample images; `dry_run` writes the exact repo folder into `out_dir` instead.
    The token comes from `token`, HF_TOKEN or `hf auth login`, and is never written anywhere. An existing repo is
    refused unless `update` (or this adapter's unfinished publish to it is being resumed). `retry`: how the caller's
    user tries again after a network failure, in its words (default: the CLI's "run the same command again").
    Returns {repo, folder, files, card, url, commit, dry_run}."""
    from sdtune.adapters import publish as pub

    options = pub.PublishOptions(private, dry_run, out_dir, token, update, license or pub.DEFAULT_LICENSE)
    return _publish_call(pub.publish, name, repo, options, _registry(), retry=retry)


# -- base models for a recipe ---------------------------------------------------------------------------------------


def base_models(hub_cache: str | Path | None = None) -> list[dict]:
    """The bases a recipe can name without a download, for the Train page's picker: the toy base, the registry's
    full models (a fine-tune's diffusers folder, or its single file), and the diffusers pipelines in the local
    Hugging Face cache (`hub_cache`, default the usual one): model repos whose snapshot holds a `model_index.json`.

    Returns [{"value": what `base.pretrained_model_name_or_path` takes, "label": where it comes from}].
    """
    found = [{"value": "toy", "label": "toy: the bundled toy base (64 px, CPU)"}]
    registry = _registry()
    for entry in registry.list():
        try:
            files = registry.manifest(entry.name).files
        except (OSError, ValueError):  # a damaged entry (`sdtune adapters check`) is no base; the page still works
            continue
        fmt = next((f for f in ("diffusers", "single_file") if f in files), None)
        if fmt:
            found.append({"value": str(registry.file(entry.name, fmt)), "label": f"registry: {entry.name}"})
    found += [{"value": repo, "label": f"Hub cache: {repo}"} for repo in _cached_pipelines(hub_cache)]
    return found


def _cached_pipelines(hub_cache: str | Path | None) -> list[str]:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache folder is read at call time (scan_cache_dir's default is the one at its import)
        repos = scan_cache_dir(hub_cache or constants.HF_HUB_CACHE).repos
    except (CacheNotFound, OSError, ValueError):  # no cache yet, or the path is no cache folder
        return []
    pipelines = [
        repo.repo_id
        for repo in repos
        if repo.repo_type == "model"
        and any((rev.snapshot_path / "model_index.json").is_file() for rev in repo.revisions)
    ]
    return sorted(pipelines)
