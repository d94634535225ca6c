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
    prompts: list[str | dict],
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
        prompts: texts, or dicts of a `prompt` and its own settings (`negative_prompt`, `width`, `height`, `steps`,
            `guidance_scale`, and `seed`: that one image instead of one per seed), as sd-scripts' prompt files set
            them per prompt; what a dict leaves out takes the arguments below.
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
    if not prompts:
        raise StudioError("give at least one prompt")
    _check_own_settings(prompts)
    size_threads()
    control_images = list(control_images or [])
    controls, uses = _controls_and_adapters(controlnets, adapters)
    _check_controls(controls, control_images, control_guidance_start, control_guidance_end)
    composer, source, guidance = _compose(base, uses, controls, device, dtype, fuse, guidance, embeddings or [])
    common = dict(
        negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height,
        scheduler=scheduler, control_images=tuple(control_images), control_scales=tuple(c.scale for c in controls),
        control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
    )  # fmt: skip
    rows = [_prompt_row(prompt, list(seeds or [0]), common) for prompt in prompts]
    samples, title = _render(composer, source, rows, common)
    return _write_samples(samples, Path(out_dir), rows, prompts, title if grid else None)


def _render(composer, source, rows: list[list], common: dict) -> tuple[list, str]:
    """The rows' images, in order, and the grid's title (the model, its adapters, the common steps and CFG)."""
    from sdtune.adapters import sampling

    lora = composer.lora_label()
    samples = sampling.generate(
        composer.pipe, [s for row in rows for s in row], model_name=source.name,
        extra_parameters={"Lora": lora} if lora else None,
    )  # fmt: skip
    title = source.name + (f" + {lora}" if lora else "") + "".join(f" + {t}" for t in composer.embeddings.values())
    # the call's steps and CFG; a prompt's own are in its row's label
    return samples, title + f"  |  {common['steps']} steps, CFG {common['guidance']:g}"


def _check_own_settings(prompts: list[str | dict]):
    """Before any model loads: each prompt a text, or a dict of a `prompt` and its own settings."""
    from sdtune.adapters.sampling import OWN_SETTINGS

    for prompt in prompts:
        if isinstance(prompt, dict) and ("prompt" not in prompt or set(prompt) - {"prompt", "seed", *OWN_SETTINGS}):
            raise StudioError(f"prompts: {prompt}: a prompt with settings has a 'prompt' and any of seed, "
                              f"{', '.join(OWN_SETTINGS)}")  # fmt: skip


def _prompt_row(prompt: str | dict, seeds: list[int], common: dict) -> list:
    """A prompt's images (`sampling.prompt_row`, as a recipe's validation prompts render)."""
    from sdtune.adapters import sampling

    if isinstance(prompt, str):
        return sampling.prompt_row(prompt, seeds, {}, **common)
    return sampling.prompt_row(prompt["prompt"], seeds, prompt, **common)


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


def _write_samples(samples: list, out_dir: Path, rows: list[list], prompts: list, grid_title: str | None):
    """Each sample as `NNNN-seedS.png`, then `grid.png` when there is a title for it; the paths written."""
    from sdtune.adapters import contact_sheet, sampling

    written = []
    for i, sample in enumerate(samples):
        written.append(out_dir / f"{i:04d}-seed{sample.settings.seed}.png")
        sampling.save_png(sample, written[-1])
    if grid_title is not None:
        written.append(out_dir / "grid.png")
        contact_sheet.save_grid(_grid(samples, rows, prompts, grid_title), written[-1])
    return written


def _grid(samples: list, rows: list[list], prompts: list, title: str):
    """One row a prompt, one column a seed; where the rows do not share their seeds (a prompt with its own), the
    columns are numbered and each row's label names its seed. A row's label shows the settings its prompt sets."""
    from sdtune.adapters import contact_sheet

    seeds = [[s.seed for s in row] for row in rows]
    shared = all(row_seeds == seeds[0] for row_seeds in seeds)
    columns = [f"seed {seed}" if shared else str(j + 1) for j, seed in enumerate(max(seeds, key=len))]
    cells, labels, start = [], [], 0
    for prompt, row in zip(prompts, rows):
        cells.append([sample.image for sample in samples[start : start + len(row)]])
        own = {} if isinstance(prompt, str) else {k: v for k, v in prompt.items() if k != "prompt"}
        if shared:
            own.pop("seed", None)
        labels.append(contact_sheet.row_label(row[0].prompt, own, cells[-1][0].size))
        start += len(row)
    return contact_sheet.make_grid(cells, labels, columns, title)


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
