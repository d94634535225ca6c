"""Rendering images: a base with stacked adapters and ControlNets, prompts x seeds, into PNGs and a contact sheet."""

from __future__ import annotations

from pathlib import Path

from sdtune.adapters.schedulers import SCHEDULER_NAMES
from sdtune.studio.api.errors import StudioError, translated

DTYPE_NAMES = ("fp32", "fp16", "bf16")


@translated()
def scheduler_names() -> list[str]:
    """Samplers `sample_images` accepts; `default` is the base's own."""
    return list(SCHEDULER_NAMES)


@translated()
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
    embeddings: list[str] | None = None,
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
        embeddings: textual-inversion embeddings (names, files, run folders); a prompt calls each by its token.
    """
    from sdtune.adapters import sampling

    if not prompts:
        raise StudioError("give at least one prompt")
    size_threads()
    control_images = list(control_images or [])
    controls, uses = _controls_and_adapters(controlnets, adapters)
    _check_controls(controls, control_images, control_guidance_start, control_guidance_end)
    composer, source, guidance = _compose(base, uses, controls, device, dtype, fuse, guidance, embeddings or [])
    seeds = list(seeds or [0])
    settings = sampling.grid_settings(
        prompts, seeds, negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height,
        scheduler=scheduler, control_images=tuple(control_images), control_scales=tuple(c.scale for c in controls),
        control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
    )  # fmt: skip
    lora = composer.lora_label()
    samples = sampling.generate(
        composer.pipe, settings, model_name=source.name, extra_parameters={"Lora": lora} if lora else None
    )
    title = source.name + (f" + {lora}" if lora else "") + "".join(f" + {t}" for t in composer.embeddings.values())
    title += f"  |  {steps} steps, CFG {guidance:g}"
    return _write_samples(samples, Path(out_dir), prompts, seeds, title if grid else None)


def _controls_and_adapters(controlnets: list[str] | None, adapters: list[str] | None) -> tuple[list, list]:
    """The ControlNets (a folder, run folder or file, or a registered ControlNet's name, each optionally :SCALE)
    and the adapter uses (`NAME_OR_PATH[:WEIGHT]`), parsed and found."""
    from sdtune.adapters import compose, sampling

    refs = [sampling.split_number(c) for c in controlnets or []]
    controls = [sampling.ControlSpec(compose.resolve_controlnet(ref), scale) for ref, scale in refs]
    return controls, [compose.AdapterUse.parse(a) for a in adapters or []]


def _compose(base: str, uses: list, controls: list, device, dtype, fuse: bool, guidance, embeddings: list[str]):
    """The pipeline (base + adapters + ControlNets), the base's source, and the guidance to render at."""
    from sdtune.adapters import compose
    from sdtune.adapters.base import recommended_guidance, resolve_base

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise StudioError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    spec = compose.PipelineSpec(base=base, adapters=uses, device=device, dtype=dtype, fuse=fuse, controlnets=controls)
    spec.embeddings = list(embeddings)
    composer = compose.build(spec)
    base = compose.resolve_base_ref(base)
    source = resolve_base(base)
    return composer, source, guidance if guidance is not None else recommended_guidance(base)


def _write_samples(samples: list, out_dir: Path, prompts: list[str], seeds: list[int], grid_title: str | None):
    """Each sample as `NNNN-seedS.png`, then `grid.png` when there is a title for it; the paths written."""
    from sdtune.adapters import contact_sheet, sampling

    written = []
    for i, sample in enumerate(samples):
        written.append(out_dir / f"{i:04d}-seed{sample.settings.seed}.png")
        sampling.save_png(sample, written[-1])
    if grid_title is not None:
        written.append(out_dir / "grid.png")
        contact_sheet.save_grid(contact_sheet.samples_grid(samples, prompts, seeds, grid_title), written[-1])
    return written


def size_threads():
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
