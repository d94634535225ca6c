"""The studio API: plain-data functions behind the `sdtune` command and the coming Streamlit studio.

Arguments and results are strings, numbers, lists, dicts and paths, so a UI page can call them without knowing
torch or diffusers. Importing this module stays cheap: torch, diffusers and the trainers' core load inside the
functions that need them (tests/test_layout.py holds that). Errors a user can fix raise `StudioError` with one line.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.adapters.schedulers import SCHEDULER_NAMES

DTYPE_NAMES = ("fp32", "fp16", "bf16")


class StudioError(ValueError):
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
) -> list[Path]:
    """Renders every prompt once per seed into `out_dir` as PNGs with A1111 `parameters`; returns the files written.

    Args:
        adapters: LoRA files or run folders, each optionally `PATH:WEIGHT`; stacked in order.
        guidance: classifier-free guidance; None takes the base's recommended value (7.5 SD v1-5, 3 the toy base).
        grid: also write `grid.png`, a labelled contact sheet (returned last).
        device: cuda / cpu / mps; None picks cuda when present.
        dtype: fp32 / fp16 / bf16; None gives fp16 on CUDA and fp32 elsewhere.
        controlnets: ControlNet folders, run folders or files, each optionally `PATH:SCALE`; several make a
            MultiControlNet. They combine with `adapters`.
        control_images: one conditioning image per ControlNet, in the same order.
        control_guidance_start, control_guidance_end: the share of the steps during which the ControlNets steer.
    """
    import torch

    from sdtune.adapters import contact_sheet, sampling
    from sdtune.adapters.base import BaseLoadError, load_pipeline, recommended_guidance, resolve_base

    if not prompts:
        raise StudioError("give at least one prompt")
    seeds = list(seeds or [0])
    try:
        specs = [sampling.AdapterSpec.parse(a) for a in adapters or []]
        controls = [sampling.ControlSpec.parse(c) for c in controlnets or []]
    except FileNotFoundError as exc:
        raise StudioError(str(exc)) from None
    control_images = list(control_images or [])
    _check_controls(controls, control_images, control_guidance_start, control_guidance_end)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in torch_dtypes:
        raise StudioError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    try:
        source = resolve_base(base)
        guidance = guidance if guidance is not None else recommended_guidance(base)
        pipe = load_pipeline(base, torch_dtype=torch_dtypes[dtype]).to(device)
    except BaseLoadError as exc:
        raise StudioError(str(exc)) from None
    pipe.set_progress_bar_config(disable=True)
    sampling.load_adapters(pipe, specs)
    if controls:
        try:
            pipe = sampling.load_controlnets(pipe, controls)
        except (FileNotFoundError, ValueError) as exc:
            raise StudioError(str(exc)) from None
    lora = ", ".join(f"{Path(a.path).name}:{a.weight:g}" for a in specs)
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
        pipe, settings, model_name=source.name, extra_parameters={"Lora": lora} if lora else None
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
