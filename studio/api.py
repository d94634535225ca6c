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
) -> list[Path]:
    """Renders every prompt once per seed into `out_dir` as PNGs with A1111 `parameters`; returns the files written.

    Args:
        adapters: LoRA files or run folders, each optionally `PATH:WEIGHT`; stacked in order.
        guidance: classifier-free guidance; None takes the base's recommended value (7.5 SD v1-5, 3 the toy base).
        grid: also write `grid.png`, a labelled contact sheet (returned last).
        device: cuda / cpu / mps; None picks cuda when present.
        dtype: fp32 / fp16 / bf16; None gives fp16 on CUDA and fp32 elsewhere.
    """
    import torch

    from sdtune.adapters import contact_sheet, sampling
    from sdtune.adapters.base import BaseLoadError, load_pipeline, recommended_guidance, resolve_base

    if not prompts:
        raise StudioError("give at least one prompt")
    seeds = list(seeds or [0])
    try:
        specs = [sampling.AdapterSpec.parse(a) for a in adapters or []]
    except FileNotFoundError as exc:
        raise StudioError(str(exc)) from None
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


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, half: bool = False, config: str | None = None, overwrite: bool = False
) -> Path:
    """diffusers folder -> single-file `.safetensors` checkpoint, or back; returns what was written."""
    from sdtune.adapters.single_file import convert

    try:
        return Path(convert(Path(src), Path(dst), half=half, config=config, overwrite=overwrite))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise StudioError(str(exc)) from None


def extract_lora(base: str, tuned: str, rank: int, out: str | Path, *, dtype: str = "fp16") -> dict[str, str]:
    """A LoRA of rank `rank` from the weight delta between two bases (e.g. a DreamBooth fine-tune and its base),
    written into the folder `out` as `pytorch_lora_weights.safetensors` (PEFT) and `<folder name>.safetensors`
    (kohya/A1111). Returns {format: path}."""
    from sdtune.adapters.base import BaseLoadError, load_pipeline
    from sdtune.adapters.extract import extract_lora as extract
    from sdtune.trainers.core.export import write_lora_files
    from sdtune.trainers.core.runtime import SAVE_DTYPES

    if rank < 1:
        raise StudioError(f"--rank must be at least 1, got {rank}")
    try:
        base_pipe, tuned_pipe = load_pipeline(base), load_pipeline(tuned)
    except (BaseLoadError, FileNotFoundError, ValueError) as exc:
        raise StudioError(str(exc)) from None
    try:
        lora = extract(
            base_pipe.unet.state_dict(),
            tuned_pipe.unet.state_dict(),
            rank,
            base_pipe.text_encoder.state_dict(),
            tuned_pipe.text_encoder.state_dict(),
        )
    except ValueError as exc:
        raise StudioError(str(exc)) from None
    out = Path(out)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
        "sdtune_extracted_from": f"{tuned} - {base}",
    }
    te_config = lora.lora_config("text_encoder") if lora.text_encoder else None
    files = write_lora_files(
        out, out.name, lora.unet, lora.text_encoder, lora.lora_config("unet"), te_config, SAVE_DTYPES[dtype], metadata
    )
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
