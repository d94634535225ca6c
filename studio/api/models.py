"""Whole models: converting checkpoints, extracting a LoRA from a fine-tune, and the bases a recipe can name."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import StudioError, translated
from sdtune.studio.api.registry import open_registry


@translated()
def convert_checkpoint(
    src: str | Path, dst: str | Path, *, half: bool = False, config: str | None = None, overwrite: bool = False
) -> Path:
    """diffusers folder -> single-file `.safetensors` checkpoint, or back; returns what was written."""
    from sdtune.adapters.single_file import convert

    return Path(convert(Path(src), Path(dst), half=half, config=config, overwrite=overwrite))


@translated()
def extract_lora(base: str, tuned: str, rank: int, out: str | Path, *, dtype: str = "fp16") -> dict[str, str]:
    """A LoRA of rank `rank` from the weight delta between two bases (e.g. a DreamBooth fine-tune and its base),
    written into the folder `out` as `pytorch_lora_weights.safetensors` (PEFT) and `<folder name>.safetensors`
    (kohya/A1111). Returns {format: path}."""
    from sdtune.adapters.base import load_pipeline
    from sdtune.adapters.extract import extract_lora as extract
    from sdtune.adapters.lora_files import save_extracted

    if rank < 1:
        raise StudioError(f"--rank must be at least 1, got {rank}")
    import torch

    base_pipe, tuned_pipe = load_pipeline(base), load_pipeline(tuned)
    lora = extract(
        base_pipe.unet.state_dict(),
        tuned_pipe.unet.state_dict(),
        rank,
        base_pipe.text_encoder.state_dict(),
        tuned_pipe.text_encoder.state_dict(),
        device="cuda" if torch.cuda.is_available() else "cpu",  # the SVDs on a GPU when there is one
    )
    files = save_extracted(Path(out), lora, base=base, tuned=tuned, precision=dtype)
    return {fmt: str(path) for fmt, path in files.items()}


@translated()
def base_models(hub_cache: str | Path | None = None) -> list[dict]:
    """The bases a recipe can name without a download, for the Train page's picker: the toy base, the registry's
    full models (a fine-tune's diffusers folder, or its single file), and the diffusers pipelines in the local
    Hugging Face cache (`hub_cache`, default the usual one): model repos whose snapshot holds a `model_index.json`.

    Returns [{"value": what `base.pretrained_model_name_or_path` takes, "label": where it comes from}].
    """
    found = [{"value": "toy", "label": "toy: the bundled toy base (64 px, CPU)"}]
    registry = open_registry()
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
