"""The peft side of a LoHa/LoKr: peft's own adapter folder per component, and saving a trained one's files.

    <run>/peft/unet/adapter_config.json          LoHaConfig / LoKrConfig, as `PeftConfig.save_pretrained` writes it
    <run>/peft/unet/adapter_model.safetensors    `base_model.model.<module>.hada_w1_a`..., as `PeftModel` saves
    <run>/peft/text_encoder/...                  the same, when the text encoder trained

`PeftModel.from_pretrained(pipe.unet, "run/peft/unet")` reads a folder, and so do `inject_adapter_in_model` +
`set_peft_model_state_dict` (`peft_adapter_applied`, which the export check uses). diffusers 0.42's
`load_lora_weights` loads no SD v1 LoHa, and a LoKr only into the UNet of a pipeline, so these folders, not a
diffusers LoRA file, are the peft side. The LyCORIS single file (adapters/lycoris.py) is the other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from sdtune.adapters.atomic import atomic_path, write_text_atomic
from sdtune.adapters.lycoris import LycorisError, peft_to_lycoris

PEFT_FOLDER = "peft"  # <run>/peft/unet, <run>/peft/text_encoder: peft's adapter folders
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before a module path


def save_peft_folder(folder: str | Path, state_dict: Mapping[str, torch.Tensor], config, dtype) -> Path:
    """peft's adapter folder of one component: `adapter_config.json` and `adapter_model.safetensors` with the keys
    `PeftModel.save_pretrained` writes (`base_model.model.<module>.hada_w1_a`), each file written atomically."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    settings["peft_type"] = str(getattr(settings["peft_type"], "value", settings["peft_type"]))
    write_text_atomic(folder / "adapter_config.json", json.dumps(settings, indent=2, sort_keys=True))
    tensors = {PEFT_PREFIX + k: v.detach().to(dtype).cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(folder / "adapter_model.safetensors", ".safetensors") as tmp:
        safetensors.torch.save_file(tensors, tmp)
    return folder


def read_peft_folder(folder: str | Path):
    """(peft config, state dict with plain module paths) of a folder `save_peft_folder` wrote."""
    import safetensors.torch
    from peft import PeftConfig

    folder = Path(folder)
    config = PeftConfig.from_pretrained(str(folder))
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


@contextlib.contextmanager
def peft_adapter_applied(pipe, folder: str | Path, adapter_name: str = "lycoris"):
    """Loads the peft adapter folders under `folder` (`unet/`, `text_encoder/`) into `pipe` the way peft users do
    (`inject_adapter_in_model` + `set_peft_model_state_dict`), and takes them out again after the block."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    loaded = []
    try:
        for component in ("unet", "text_encoder"):
            if (Path(folder) / component / "adapter_config.json").is_file():
                config, state_dict = read_peft_folder(Path(folder) / component)
                model = getattr(pipe, component)
                inject_adapter_in_model(config, model, adapter_name)
                loaded.append(model)
                result = set_peft_model_state_dict(model, state_dict, adapter_name)
                missing = [k for k in result.missing_keys if f".{adapter_name}" in k]
                if missing:
                    raise LycorisError(
                        f"{folder}/{component}: {len(missing)} adapter weights missing, e.g. {missing[0]}"
                    )
                model.to(pipe.device)
        yield pipe
    finally:
        for model in loaded:
            _remove_adapter(model, adapter_name)


def _remove_adapter(model, adapter_name: str):
    """Takes the LoHa/LoKr layers of `adapter_name` out of `model`: each wrapper left without an adapter is
    replaced by its base layer again, so the model is the plain one it was (a later LoRA wraps plain layers)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LycorisLayer)]
    for name, module in wrapped:
        if adapter_name in module._available_adapters:
            module.delete_adapter(adapter_name)
        if not module._available_adapters:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    config = getattr(model, "peft_config", {})
    config.pop(adapter_name, None)
    if not config and hasattr(model, "peft_config"):
        del model.peft_config


# -- saving a trained LoHa/LoKr --------------------------------------------------------------------------------------


def save_lycoris(out_dir, name, unet, text_encoder, configs, dtype, facts) -> dict[str, Path]:
    """Both files of a trained LoHa/LoKr: `peft/` (peft's adapter folders) and, unless `facts` is None, the LyCORIS
    single file `<name>.safetensors` with sd-scripts' header (`ss_network_module: lycoris.kohya`)."""
    from sdtune.adapters.file_metadata import kohya_metadata
    from sdtune.adapters.lora_files import kohya_path, save_kohya

    out_dir = Path(out_dir)
    unet_config, te_config = configs
    folder = out_dir / PEFT_FOLDER
    save_peft_folder(folder / "unet", unet, unet_config, dtype)
    if text_encoder:
        save_peft_folder(folder / "text_encoder", text_encoder, te_config, dtype)
    files = {"peft": folder}
    if facts is not None:
        tensors = peft_to_lycoris(unet, text_encoder, unet_config, te_config)
        files["kohya"] = save_kohya(kohya_path(out_dir, name), tensors, kohya_metadata(facts), dtype=dtype)
    return files


__all__ = ["PEFT_FOLDER", "peft_adapter_applied", "read_peft_folder", "save_lycoris", "save_peft_folder"]
