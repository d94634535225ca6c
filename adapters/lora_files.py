"""LoRA files in both formats, in one place: every LoRA sdtune writes or reads goes through here.

    pytorch_lora_weights.safetensors   `PEFT_FILE`, diffusers/PEFT: `unet.` / `text_encoder.` peft keys, the
                                       LoraConfigs in the header (true alphas, per-module ranks)
    <name>.safetensors                 kohya/A1111: `lora_unet_*` / `lora_te_*` keys, true `.alpha`, the `ss_*` /
                                       `modelspec.*` header built from `LoraFacts` (adapters/file_metadata.py)

Writers, by what the LoRA is held as:
    save_lora(out_dir, name, unet, text_encoder, configs, dtype, facts)   peft-named tensors and their LoraConfigs
                                                                          (trained, extracted) -> both files
    save_modules(out_dir, name, modules, table, facts, dtype)             kohya-named modules (merged, resized,
                                                                          imported; adapters/lora_modules.py) -> both
    save_peft / save_modules_peft / save_kohya                            one file
Readers: `read_lora(path)` (modules and header of a file of either format) and `lora_header(path)` (the kohya header
that says a LoRA's facts, found beside a PEFT file through its folder's adapter.json).

Torch loads only when a file is written or read, so the studio, the registry and run-folder listings import
`PEFT_FILE` for free.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.adapters.atomic import atomic_path, replace_readable
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.file_metadata import BaseFacts, LoraFacts, ModelFacts, kohya_metadata

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from sdtune.adapters.extract import ExtractedLora
    from sdtune.adapters.lora_modules import BaseModule, LoraModules

PEFT_FILE = "pytorch_lora_weights.safetensors"
SAVE_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # output.save_precision, --dtype


class LoraFileError(SdtuneError, ValueError):
    """A file that cannot be written or read as a LoRA (not a LoRA, a wrong name, a module the base lacks); one
    line."""


def save_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a save precision name (fp32, fp16, bf16)."""
    import torch

    if precision not in SAVE_PRECISIONS:
        raise LoraFileError(f"dtype {precision!r}: choose one of {', '.join(SAVE_PRECISIONS)}")
    return getattr(torch, SAVE_PRECISIONS[precision])


def kohya_path(out_dir: str | Path, name: str) -> Path:
    """Where the kohya file of the LoRA `name` goes: A1111 and ComfyUI list LoRAs by file name."""
    return Path(out_dir) / f"{name}.safetensors"


def cast(state_dict: Mapping[str, torch.Tensor] | None, dtype: torch.dtype) -> dict | None:
    """Tensors in the dtype they are saved in, contiguous as safetensors wants them."""
    return None if state_dict is None else {k: v.to(dtype).contiguous() for k, v in state_dict.items()}


def summary_facts(modules: LoraModules, model: ModelFacts, base: BaseFacts, extra=None) -> LoraFacts:
    """The facts of a LoRA held as modules and not trained here (merged, resized, imported)."""
    ranks, alphas = [m.rank for m in modules.values()], [m.alpha for m in modules.values()]
    return LoraFacts.summary(ranks, alphas, model, base, extra)


# -- writing ----------------------------------------------------------------------------------------------------------


def save_peft(
    out_dir: str | Path,
    unet: Mapping[str, torch.Tensor] | None,
    text_encoder: Mapping[str, torch.Tensor] | None,
    unet_config: dict | None,
    text_encoder_config: dict | None,
    dtype: torch.dtype,
) -> Path:
    """Writes `PEFT_FILE` from peft-named tensors (`down_blocks.0...to_q.lora_A.weight`) and their
    `LoraConfig.to_dict()`s.

    The configs in the header are what let diffusers reload a LoRA trained with lora_alpha != rank at the right
    strength. diffusers writes into a temp folder of ours (its file is 0600), then the file is renamed into place.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=cast(unet, dtype),
            text_encoder_lora_layers=cast(text_encoder, dtype),
            unet_lora_adapter_metadata=unet_config,
            text_encoder_lora_adapter_metadata=text_encoder_config,
            weight_name=PEFT_FILE,
        )
        replace_readable(Path(tmp) / PEFT_FILE, out_dir / PEFT_FILE)
    return out_dir / PEFT_FILE


def save_kohya(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes a kohya LoRA `.safetensors` atomically, with its header and the `sshs_*` hashes sd-scripts adds.

    Args:
        path: target file; must end in `.safetensors`.
        tensors: `kohya.peft_to_kohya` or `lora_modules.to_kohya` output.
        metadata: `kohya_metadata(facts)` (string values), or an imported file's own header.
        dtype: cast every tensor (alphas included, as sd-scripts' save_dtype does), e.g. torch.float16.
    """
    import safetensors.torch

    from sdtune.adapters.kohya import sshs_hashes

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: a kohya LoRA must end in .safetensors (A1111/ComfyUI read LoRAs from it)")
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise LoraFileError(f"{path}: header values must be strings (safetensors header); not: {bad}")
    tensors = {
        key: (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous() for key, t in tensors.items()
    }
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(tensors, metadata)
    with atomic_path(path, ".safetensors") as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return path


def save_lora(
    out_dir: str | Path,
    name: str,
    unet: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor] | None,
    configs: tuple[LoraConfig, LoraConfig | None],
    dtype: torch.dtype,
    facts: LoraFacts | None,
) -> dict[str, Path]:
    """Both files of a LoRA held as peft-named tensors (trained, extracted) with the LoraConfigs of the UNet and the
    text encoder (None: not adapted); returns {format: path}. A LoHa/LoKr (peft LoHaConfig/LoKrConfig) goes to
    adapters/lycoris_peft.py: peft's adapter folders and the LyCORIS single file.

    The kohya file is left out when `facts` is None (`output.export_kohya: false`) and for DoRA: peft's DoRA
    magnitude has no kohya/A1111 form that loads the same (see adapters/kohya.py)."""
    from sdtune.adapters.kohya import peft_to_kohya
    from sdtune.adapters.lycoris import config_algo
    from sdtune.adapters.lycoris_peft import save_lycoris

    unet_config, te_config = configs
    if config_algo(unet_config) != "lora":  # LoHa / LoKr: peft's adapter folders and the LyCORIS file
        return save_lycoris(out_dir, name, unet, text_encoder, configs, dtype, facts)
    te_dict = te_config.to_dict() if te_config is not None else None
    files = {"peft": save_peft(out_dir, unet, text_encoder, unet_config.to_dict(), te_dict, dtype)}
    if facts is None or unet_config.use_dora:
        return files
    tensors = peft_to_kohya(
        unet,
        text_encoder,
        unet_alpha=float(unet_config.lora_alpha),
        text_encoder_alpha=float(te_config.lora_alpha) if te_config is not None else None,
    )
    files["kohya"] = save_kohya(kohya_path(out_dir, name), tensors, kohya_metadata(facts), dtype=dtype)
    return files


def save_extracted(
    out_dir: str | Path, lora: ExtractedLora, *, base: str, tuned: str, precision: str = "fp16"
) -> dict[str, Path]:
    """Both files of a LoRA extracted from the fine-tune `tuned` of `base` (`sdtune extract-lora`), named after
    `out_dir`: alpha = rank (the delta at scale 1), the facts of `base`, and its origin as `ss_training_comment`."""
    from sdtune.adapters.file_metadata import facts_of_base

    out_dir = Path(out_dir)
    dtype = save_dtype(precision)
    configs = (lora.lora_config("unet"), lora.lora_config("text_encoder") if lora.text_encoder else None)
    model, made_on = facts_of_base(base, out_dir.name)
    comment = {"ss_training_comment": f"extracted from {tuned} - {base}"}
    facts = LoraFacts(model, made_on, lora.rank, float(lora.rank), extra=comment)
    return save_lora(out_dir, out_dir.name, lora.unet, lora.text_encoder, configs, dtype, facts)


def save_modules_peft(
    out_dir: str | Path, modules: LoraModules, table: Mapping[str, BaseModule], dtype: torch.dtype
) -> Path:
    """`PEFT_FILE` of kohya-named modules, with a LoraConfig per component (true alphas, per-module ranks)."""
    from sdtune.adapters.lora_modules import peft_layers

    missing = sorted(set(modules) - set(table))
    if missing:
        raise LoraFileError(f"{len(missing)} LoRA modules are not layers of the base, e.g. {missing[0]}")
    layers, configs = peft_layers(modules, table)
    return save_peft(
        out_dir,
        layers.get("unet"),
        layers.get("text_encoder"),
        configs.get("unet"),
        configs.get("text_encoder"),
        dtype,
    )


def save_modules(
    out_dir: str | Path,
    name: str,
    modules: LoraModules,
    table: Mapping[str, BaseModule],
    facts: LoraFacts,
    dtype: torch.dtype,
) -> dict[str, Path]:
    """Both files of a LoRA held as kohya-named modules (merged, resized, imported); returns {format: path}."""
    from sdtune.adapters.lora_modules import to_kohya

    return {
        "peft": save_modules_peft(out_dir, modules, table, dtype),
        "kohya": save_kohya(kohya_path(out_dir, name), to_kohya(modules), kohya_metadata(facts), dtype=dtype),
    }


# -- reading ----------------------------------------------------------------------------------------------------------


def read_lora(path: str | Path) -> tuple[LoraModules, dict[str, str]]:
    """The modules (true alphas) and the header of a LoRA file of either format.

    Raises:
        LoraFileError: the file holds another kind of model (a ControlNet, a checkpoint, a LoHa...).
        ImportRefused: a pickle, or a truncated or corrupt file.
    """
    from sdtune.adapters.importer import detect_format, read_tensors
    from sdtune.adapters.lora_modules import read_kohya, read_peft
    from sdtune.adapters.lycoris import LABELS

    tensors, header = read_tensors(Path(path))
    fmt = detect_format(tensors, header)
    if fmt in LABELS:
        raise LoraFileError(
            f"{path}: a LyCORIS {LABELS[fmt]} file, not a LoRA: turn it into one first with "
            "`sdtune adapters to-lora FILE --rank R` (SVD, the kept share of its norm printed)"
        )
    if fmt not in ("kohya", "peft"):
        raise LoraFileError(f"a {fmt} file is not a LoRA")
    return (read_kohya(tensors) if fmt == "kohya" else read_peft(tensors, header)), header


def lora_header(path: str | Path, header: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kohya header that says the facts of the LoRA at `path` (its own `header` when it has `ss_*` keys, else
    the kohya file its folder's adapter.json names), or {} when there is none."""
    import safetensors

    path = Path(path)
    if header is not None and any(key.startswith("ss_") for key in header):
        return dict(header)
    manifest = path.parent / "adapter.json"
    try:
        kohya = path.parent / json.loads(manifest.read_text())["files"]["kohya"]
        with safetensors.safe_open(str(kohya), "pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, KeyError, TypeError, ValueError, safetensors.SafetensorError):  # none there, or damaged
        return {}


__all__ = [
    "PEFT_FILE",
    "SAVE_PRECISIONS",
    "LoraFileError",
    "cast",
    "kohya_path",
    "lora_header",
    "read_lora",
    "save_dtype",
    "save_extracted",
    "save_kohya",
    "save_lora",
    "save_modules",
    "save_modules_peft",
    "save_peft",
    "summary_facts",
]
