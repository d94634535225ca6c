"""Loading the base model: one function, used by every trainer, `sdtune sample` and the studio.

`base:` in a recipe (or `--base` on the command line) may be:
    - `toy`: the bundled toy base (a small SD v1-5-layout model, see adapters/toy_base/README.md);
    - a local diffusers folder (has `model_index.json`);
    - a single-file `.safetensors` checkpoint (A1111/Civitai style), read by diffusers' `from_single_file` with
      the bundled SD v1-5 configs, so no download is needed;
    - a Hugging Face Hub repo id, e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5` (from the local cache when
      offline).
Pickle files (`.ckpt`, `.bin`, `.pt`, `.pth`) run code when loaded: they are refused unless `allow_pickle: true`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from sdtune.adapters.atomic import write_text_atomic
from sdtune.adapters.errors import SdtuneError

# The bundled model folders (package data of sdtune.adapters): the toy base, and SD v1-5's configs without weights,
# which describe any SD v1 single-file checkpoint offline. Keyed by the names `detect_config` returns.
TOY_BASE = Path(__file__).resolve().parent / "toy_base"
SD15_CONFIG = Path(__file__).resolve().parent / "sd15_config"
BUNDLED_CONFIGS = {"sd15": SD15_CONFIG, "toy": TOY_BASE}
# Pickle checkpoints run code when loaded: refused unless the user opts in.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def _not_empty(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("empty: give a path or id, or leave the key out")  # "" would mean the current folder
    return value


@dataclass(frozen=True)
class LocalPath:
    """Marks a recipe key that may name a file or folder on this machine; `writes`: a run writes into it. The
    studio confines every key so marked (studio/confine.py finds them in the schema by this mark)."""

    writes: bool = False


PathText = Annotated[str, AfterValidator(_not_empty), LocalPath()]  # a path or hub id in a recipe: never ""


class BaseModelConfig(BaseModel):
    """Which Stable Diffusion v1-5 base to fine-tune. A plain string is shorthand for `pretrained_model_name_or_path`.

    The recipe's `base:` section. It lives with base loading because trainers, `sdtune sample` and the studio all
    pass it in.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)

    pretrained_model_name_or_path: PathText = Field(
        "toy", description="Hub repo id, local diffusers folder, single-file .safetensors checkpoint, or 'toy'."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. 'fp16' (files *.fp16.safetensors).")
    config: PathText | None = Field(
        None,
        description="For a single-file checkpoint: diffusers folder or hub id whose configs describe it. "
        "Default: the bundled SD v1-5 configs, or the toy base's for a toy-sized file.",
    )
    allow_pickle: bool = Field(
        False, description="Allow .ckpt/.bin/.pt pickle files. Unpickling runs code: only for files you trust."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"pretrained_model_name_or_path": value} if isinstance(value, str) else value


class BaseLoadError(SdtuneError, RuntimeError):
    """The base model cannot be loaded; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class BaseSource:
    """Where a base comes from. `kind` is one of toy, folder, single_file, hub."""

    kind: str
    location: str  # path or hub id
    name: str  # short human name (for file metadata, grids, model cards)


def resolve_base(spec: str | BaseModelConfig) -> BaseSource:
    """Decides what kind of base `spec` names, without loading anything."""
    cfg = spec if isinstance(spec, BaseModelConfig) else BaseModelConfig(pretrained_model_name_or_path=spec)
    name = cfg.pretrained_model_name_or_path.strip()
    if name == "toy":
        return BaseSource("toy", str(TOY_BASE), "sdtune-toy-base")
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not cfg.allow_pickle:
            raise BaseLoadError(
                f"base: {name} is a pickle file; loading it can run arbitrary code. Convert it to .safetensors, "
                "or set base.allow_pickle: true if you trust its source"
            )
        if not path.is_file():
            raise BaseLoadError(f"base: file {name} not found")
        return BaseSource("single_file", str(path), path.stem)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise BaseLoadError(f"base: file {name} not found")
        return BaseSource("single_file", str(path), path.stem)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseLoadError(f"base: {name} is a folder but not a diffusers model (no model_index.json in it)")
        return BaseSource("folder", str(path), path.name)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise BaseLoadError(
            f"base: {name} not found (expected a diffusers folder, a .safetensors file, a hub id or 'toy')"
        )
    return BaseSource("hub", name, name.split("/")[-1])


def _offline_error(repo_id: str) -> BaseLoadError:
    return BaseLoadError(
        f"base: '{repo_id}' is not in the local Hugging Face cache and the Hub cannot be reached. Fetch it once on a "
        f"connected machine with `hf download {repo_id}` (it lands in ~/.cache/huggingface), or point base: at a "
        "local diffusers folder or a single .safetensors checkpoint"
    )


def _single_file_config(cfg: BaseModelConfig, path: Path) -> str:
    if cfg.config:
        return cfg.config
    from sdtune.adapters.single_file import detect_config

    return str(BUNDLED_CONFIGS[detect_config(path, allow_pickle=cfg.allow_pickle)])


def load_pipeline(spec: str | BaseModelConfig, torch_dtype=None):
    """Loads the base as a `StableDiffusionPipeline` (no safety checker), on the CPU, in `torch_dtype`.

    Args:
        spec: a `BaseModelConfig` or the string forms listed in the module docstring.
        torch_dtype: dtype of every component (default fp32); trainers choose it from `train.mixed_precision`.

    Raises:
        BaseLoadError: with one line saying what is wrong and what to do.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    torch_dtype = torch_dtype or torch.float32
    cfg = spec if isinstance(spec, BaseModelConfig) else BaseModelConfig(pretrained_model_name_or_path=spec)
    source = resolve_base(cfg)
    kwargs = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    if source.kind == "toy" and not (TOY_BASE / "model_index.json").is_file():
        raise BaseLoadError(
            f"base: toy base missing at {TOY_BASE}; rebuild it with "
            "python trainers/tools/pretrain_toy.py --out adapters/toy_base"
        )
    if source.kind == "single_file":
        from sdtune.adapters.single_file import load_single_file

        config = _single_file_config(cfg, Path(source.location))
        return load_single_file(source.location, config, torch_dtype=torch_dtype, allow_pickle=cfg.allow_pickle)
    if source.kind in ("toy", "folder"):
        return StableDiffusionPipeline.from_pretrained(source.location, local_files_only=True, **kwargs)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers prints its own offline chatter; we raise one clear line
    try:
        return StableDiffusionPipeline.from_pretrained(
            source.location, revision=cfg.revision, variant=cfg.variant, **kwargs
        )
    except OSError as exc:
        if "not fully cached" in str(exc) or "Couldn't connect" in str(exc) or "offline" in str(exc).lower():
            raise _offline_error(source.location) from None
        raise BaseLoadError(
            f"base: cannot load '{source.location}' from the Hub: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


DEFAULT_GUIDANCE = 7.5  # SD v1-5's usual classifier-free guidance


def recommended_guidance(spec: str | BaseModelConfig) -> float:
    """The base's recommended guidance scale: `sdtune.json` in a local base folder says it, else SD's 7.5.

    The toy base ships one (3.0): its tiny UNet overshoots at higher guidance (see adapters/toy_base/README.md),
    the way many community checkpoints publish the CFG they were tuned for.
    """
    cfg = spec if isinstance(spec, BaseModelConfig) else BaseModelConfig(pretrained_model_name_or_path=spec)
    source = resolve_base(cfg)
    folder = Path(source.location)
    if source.kind == "single_file":  # read with a config folder's settings: the toy base as one file is the toy's
        config = _single_file_config(cfg, folder)
        folder = BUNDLED_CONFIGS.get(config, Path(config))
    settings = folder / "sdtune.json"
    if source.kind != "hub" and settings.is_file():
        return float(json.loads(settings.read_text()).get("guidance_scale", DEFAULT_GUIDANCE))
    return DEFAULT_GUIDANCE


def base_hash(spec: str | BaseModelConfig) -> str:
    """A stable sha256 of the base weights, for manifests and kohya `ss_sd_model_hash`.

    A single file hashes its bytes (as A1111's "new" model hash does); a folder hashes its component weight files
    in a fixed order. Results are cached beside ~/.cache/sdtune by path, size and mtime, since SD weights are GBs.
    """
    source = resolve_base(spec)
    if source.kind == "hub":
        return f"hub:{source.location}"
    root = Path(source.location)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin"))
    stamp = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    cache = Path(os.environ.get("SDTUNE_CACHE", Path.home() / ".cache" / "sdtune")) / "base_hashes.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    key = hashlib.sha256(stamp.encode()).hexdigest()
    if key not in known:
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        known[key] = digest.hexdigest()
        write_text_atomic(cache, json.dumps(known))
    return known[key]
