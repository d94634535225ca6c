"""Sampling: the one code path behind `sdtune sample`, training validation grids and the export check.

Sampler names and their diffusers classes are in `schedulers.py`; contact sheets in `contact_sheet.py`.

Because validation previews go through exactly this code, a preview shows what inference will give later.
Each image gets its own CPU `torch.Generator` seeded with its seed, and images are rendered one at a time, so the
same prompt, seed and settings give the same pixels whatever else is in the run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.compose import split_number
from sdtune.adapters.errors import NotFoundError, SdtuneError
from sdtune.adapters.lora_files import PEFT_FILE
from sdtune.adapters.schedulers import SCHEDULER_NAMES, SCHEDULERS, a1111_sampler_name


class SamplingError(SdtuneError, ValueError):
    """A sampling option the user can fix (a scheduler name, one control image per ControlNet)."""


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides an image's pixels, besides the model and adapters."""

    prompt: str
    seed: int = 0
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    width: int | None = None  # None = the base's native size (64 for the toy base, 512 for SD v1-5)
    height: int | None = None
    scheduler: str = "default"
    # ControlNet: one conditioning image file and one scale per loaded ControlNet (see `load_controlnets`), and the
    # share of the sampling steps, from start to end, during which the ControlNets steer.
    control_images: tuple[str, ...] = ()
    control_scales: tuple[float, ...] = ()
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    # A model trained with `train.zero_terminal_snr` samples with the rescaled schedule (`zero_terminal_snr_sampler`).
    zero_terminal_snr: bool = False

    def __post_init__(self):
        # diffusers refuses other sizes from deep inside the pipeline, with a traceback; say it here in one line
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is not None and value % 8:
                raise SamplingError(f"{side} {value}: must be a multiple of 8 (the VAE works on 8x8 pixel blocks)")


@dataclass
class Sample:
    image: Image.Image
    settings: SampleSettings
    parameters: str  # A1111-style "parameters" text, also stored in the PNG


def existing(path: str, option: str, expected: str) -> str:
    if not Path(path).exists():
        raise NotFoundError(f"{option}: {path} not found (expected {expected})")
    return path


@dataclass
class AdapterSpec:
    """A LoRA to apply at `weight`: a run folder (holding pytorch_lora_weights.safetensors) or a .safetensors file."""

    path: str
    weight: float = 1.0
    name: str = field(default="")

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """`PATH[:WEIGHT]`, e.g. `runs/quickstart:0.8`."""
        path, weight = split_number(text)
        return cls(path=existing(path, "--adapter", "a LoRA .safetensors file or a run folder"), weight=weight)


@dataclass
class ControlSpec:
    """A ControlNet to steer with at `scale`: a diffusers folder, a training run folder or a single file."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ControlSpec:
        """`PATH[:SCALE]`, e.g. `runs/edges:0.8`."""
        path, scale = split_number(text)
        return cls(path=existing(path, "--controlnet", "a ControlNet folder, run or file"), scale=scale)


def load_controlnets(pipe, specs: list[ControlSpec]):
    """A ControlNet pipeline over `pipe`'s own components (LoRAs already loaded stay active); several ControlNets
    become diffusers' MultiControlNet, each steering with its own image and scale."""
    from sdtune.adapters.controlnet import load_controlnet

    models = [load_controlnet(spec.path, unet=pipe.unet, torch_dtype=pipe.unet.dtype) for spec in specs]
    models = [model.to(pipe.unet.device) for model in models]
    return controlnet_pipeline(pipe, models[0] if len(models) == 1 else models)


def controlnet_pipeline(pipe, controlnet):
    """diffusers' StableDiffusionControlNetPipeline over `pipe`'s own components, as they are.

    Not `from_pipe`: it casts every component to its `torch_dtype` argument, float32 by default, in place, so the
    pipeline it was given (and a training run's frozen half-precision UNet sharing it) would silently turn fp32.
    """
    from diffusers import StableDiffusionControlNetPipeline

    components = {key: value for key, value in pipe.components.items() if key != "controlnet"}
    controlled = StableDiffusionControlNetPipeline(**components, controlnet=controlnet, requires_safety_checker=False)
    controlled.set_progress_bar_config(disable=True)
    return controlled


def _control_arguments(pipe, s: SampleSettings, width: int, height: int) -> dict:
    """The ControlNet pipeline's arguments of one sample; none for a sample without conditioning images."""
    if not s.control_images:
        return {}
    count = len(getattr(pipe.controlnet, "nets", [None])) if hasattr(pipe, "controlnet") else 0
    if count != len(s.control_images):
        raise SamplingError(f"--control-image: {len(s.control_images)} images for {count} ControlNets; give one each")
    images = []
    for path in s.control_images:
        with Image.open(path) as opened:
            images.append(opened.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    scales = list(s.control_scales) or [1.0] * count
    single = count == 1
    return {
        "image": images[0] if single else images,
        "controlnet_conditioning_scale": scales[0] if single else scales,
        "control_guidance_start": s.control_guidance_start,
        "control_guidance_end": s.control_guidance_end,
    }


def control_parameters(s: SampleSettings) -> dict:
    """A1111's ControlNet entries of the PNG `parameters` text, one per ControlNet."""
    scales = list(s.control_scales) or [1.0] * len(s.control_images)
    return {
        f"ControlNet {i}": f'"Image: {Path(image).name}, Weight: {scale:g}, Guidance Start: '
        f'{s.control_guidance_start:g}, Guidance End: {s.control_guidance_end:g}"'
        for i, (image, scale) in enumerate(zip(s.control_images, scales))
    }


def set_scheduler(pipe, name: str, zero_terminal_snr: bool = False):
    """Swaps the pipeline's sampler, keeping the base's noise schedule (betas, prediction type...), or with
    `zero_terminal_snr` that schedule rescaled."""
    if name not in SCHEDULER_NAMES:
        raise SamplingError(f"--scheduler: unknown scheduler {name!r}; choose from {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    if name != "default":
        class_name, extra, _ = SCHEDULERS[name]
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    if zero_terminal_snr:
        pipe.scheduler = zero_terminal_snr_sampler(pipe.scheduler)
    return pipe


def zero_terminal_snr_sampler(scheduler):
    """`scheduler` on the zero-terminal-SNR schedule a `train.zero_terminal_snr` model learned (Lin et al. 2024,
    https://arxiv.org/abs/2305.08891): the rescaled betas, and "trailing" timesteps so that sampling starts at
    t = T, the pure noise it starts from. A sampler without that schedule (PNDM, SD v1-5's default) gives way to
    DDIM, the paper's sampler; the PNG's parameters name the sampler used."""
    import inspect

    import diffusers

    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = diffusers.DDIMScheduler
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def load_lora_file(pipe, path: str | Path, adapter_name: str):
    """Loads one LoRA into `pipe` as `adapter_name`: a diffusers/PEFT or kohya/A1111 file (diffusers converts the
    latter), or a run folder (its `pytorch_lora_weights.safetensors`); a LyCORIS LoHa/LoKr file loads as the LoRA
    that makes exactly its update (adapters/lycoris.py).

    peft warns "Already found a `peft_config` attribute ... multiple adapters" for every LoRA after the first:
    stacking is what the caller asked for, so that one warning is dropped."""
    from sdtune.adapters import lycoris

    path = Path(path)
    if path.is_dir() and not (path / PEFT_FILE).is_file():  # a LoHa/LoKr run folder: its LyCORIS file
        path = lycoris.file_of_run(path) or path
    if lycoris.is_lycoris_file(path):  # LoHa/LoKr: diffusers loads none for SD v1; as the LoRA of the same update
        try:
            return lycoris.load_as_lora(pipe, path, adapter_name)
        except lycoris.LycorisError as exc:
            raise SamplingError(str(exc)) from None
    folder, weight_name = (path, PEFT_FILE) if path.is_dir() else (path.parent, path.name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
        except ValueError as exc:  # diffusers' refusal of a file that holds no LoRA it can read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SamplingError(f"{path}: not a LoRA file diffusers can load ({first})") from None


def load_adapters(pipe, adapters: list[AdapterSpec]):
    """Loads LoRAs (diffusers/PEFT or kohya/A1111 files; diffusers converts the latter) and sets their weights."""
    names = []
    for i, adapter in enumerate(adapters):
        name = adapter.name or f"adapter{i}"
        load_lora_file(pipe, adapter.path, name)
        names.append(name)
    if names:
        pipe.set_adapters(names, [a.weight for a in adapters])
    return names


def a1111_parameters(settings: SampleSettings, width: int, height: int, model_name: str, extra: dict | None = None):
    """The A1111 "parameters" text: prompt, negative prompt, then `Key: value` pairs."""
    pairs = {
        "Steps": settings.steps,
        "Sampler": a1111_sampler_name(settings.scheduler),
        "CFG scale": settings.guidance,
        "Seed": settings.seed,
        "Size": f"{width}x{height}",
        "Model": model_name,
        **(extra or {}),
        "Version": "sdtune",
    }
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


@torch.no_grad()
def generate(pipe, settings: list[SampleSettings], model_name: str = "base", extra_parameters: dict | None = None):
    """Renders each `SampleSettings` with its own seeded CPU generator; returns `Sample`s in the same order."""
    samples = []
    current_scheduler = None
    original = pipe.scheduler
    try:
        for s in settings:
            if (s.scheduler, s.zero_terminal_snr) != current_scheduler:
                pipe.scheduler = original
                set_scheduler(pipe, s.scheduler, s.zero_terminal_snr)
                current_scheduler = (s.scheduler, s.zero_terminal_snr)
            width, height = s.width or native_size(pipe), s.height or native_size(pipe)
            generator = torch.Generator("cpu").manual_seed(s.seed)
            image = pipe(
                prompt=s.prompt,
                negative_prompt=s.negative_prompt or None,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=width,
                height=height,
                generator=generator,
                **_control_arguments(pipe, s, width, height),
            ).images[0]
            extra = {**(extra_parameters or {}), **control_parameters(s)}
            named = "default" if s.zero_terminal_snr else s.scheduler  # by class: PNDM may have become DDIM
            sampler = {"Sampler": a1111_sampler_name(named, type(pipe.scheduler).__name__)}
            samples.append(Sample(image, s, a1111_parameters(s, width, height, model_name, {**sampler, **extra})))
    finally:
        pipe.scheduler = original
    return samples


def grid_settings(prompts: list[str], seeds: list[int], **common) -> list[SampleSettings]:
    """prompts x seeds, row-major (all seeds of the first prompt first)."""
    return [SampleSettings(prompt=p, seed=s, **common) for p in prompts for s in seeds]


# A prompt's own settings, under the names recipes and sd-scripts' prompt files give them, and the field each sets.
OWN_SETTINGS = {"negative_prompt": "negative_prompt", "width": "width", "height": "height", "steps": "steps",
                "guidance_scale": "guidance"}  # fmt: skip


def prompt_row(prompt: str, seeds: list[int], own: dict, **common) -> list[SampleSettings]:
    """A prompt's images: one per seed, or the one of its own `seed`; its own settings (`own`, OWN_SETTINGS' names;
    None = not set) over `common`. A recipe's validation prompts and `sdtune sample --prompts-file` both use it."""
    mine = {OWN_SETTINGS[key]: value for key, value in own.items() if key in OWN_SETTINGS and value is not None}
    seeds = [own["seed"]] if own.get("seed") is not None else seeds
    return grid_settings([prompt], seeds, **(common | mine))


def save_png(sample: Sample, path: str | Path):
    """Writes a PNG with the generation parameters in a `parameters` text chunk (A1111 style), atomically."""
    info = PngInfo()
    info.add_text("parameters", sample.parameters)
    save_png_atomic(sample.image, Path(path), pnginfo=info)


def save_png_atomic(image: Image.Image, path: Path, **kwargs):
    """A reader (the studio, a half-finished run) never sees a half-written PNG: write beside it, then rename."""
    with atomic_path(path, ".png") as tmp:
        image.save(tmp, format="PNG", **kwargs)
