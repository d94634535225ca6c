"""Importing an adapter from elsewhere: detect its format, validate it against a base, register it with provenance.

Formats, detected from the tensor names (never from the file name):
    diffusers/PEFT LoRA   `unet.<module>.lora_A.weight` (+ `text_encoder.`), LoraConfig in the header
    kohya/A1111 LoRA      `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_text_model_...`
                          (and `lora_te1_`, as diffusers' converter writes SD v1); LoCon conv layers included
    LyCORIS LoHa / LoKr   `lora_unet_<module>.hada_w1_a...` / `.lokr_w1...` (adapters/lycoris.py), kept as the file;
                          IA3, OFT, BOFT, GLoRA, full diff and norm files are refused in one line naming the algorithm
    embedding             one tensor of token vectors (diffusers' {token: vectors}, A1111's emb_params): a textual
                          inversion, as wide as the base's text encoder (adapters/embeddings.py)
    ControlNet            a diffusers folder (config.json of a ControlNetModel) or a single file (`input_hint_block`,
                          `controlnet_cond_embedding`)
    DreamBooth full model a diffusers folder (model_index.json) or a single-file SD v1 checkpoint

A LoRA is checked against the chosen base (`toy`, a folder, a single file, a hub id): every module must name a layer
of the base and fit its shape; unmatched modules are listed per block. The base the file says it was trained on
(`ss_sd_model_name`, `ss_new_sd_model_hash`, `modelspec.architecture`) is read and compared. Pickle files (.ckpt,
.pt, .bin) are refused unless `allow_pickle` (they run code when loaded); then only tensors are read
(`weights_only`) and stored as safetensors. The registered copy keeps both LoRA formats, and its manifest records
the origin, the hashes (sha256 of the file, and `sshs_model_hash`, the sha256 of the tensor bytes that A1111 and
sd-scripts index LoRAs by) and the file's own metadata.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from sdtune.adapters.base import PICKLE_SUFFIXES, base_hash, resolve_base
from sdtune.adapters.embeddings import is_embedding, prepare_import, registered_files
from sdtune.adapters.import_checks import (
    ImportRefused,
    ImportReport,
    check_architecture,
    check_controlnet,
    check_lora,
    controlnet_shapes,
    folder_shapes,
)
from sdtune.adapters.manifest import AdapterManifest, BaseRef
from sdtune.adapters.registry import Entry, Registry, check_name, copy_into

CLAIM_KEYS = (
    "ss_sd_model_name",
    "ss_base_model_version",
    "ss_new_sd_model_hash",
    "ss_sd_model_hash",
    "modelspec.architecture",
)


# -- reading ----------------------------------------------------------------------------------------------------------


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return path.suffix.lower() in PICKLE_SUFFIXES or magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"


def read_tensors(path: Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(tensors, header metadata) of a weights file; one-line `ImportRefused` for pickles and broken files."""
    import safetensors
    import safetensors.torch

    if _is_pickle(path):
        if not allow_pickle:
            raise ImportRefused(
                f"{path}: refused: a pickle file (.ckpt/.pt/.bin) runs code when loaded. Convert it to .safetensors, "
                "or pass --allow-pickle if you trust where it came from (only its tensors are then read)"
            )
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ImportRefused(f"{path}: the pickle holds no state dict of tensors")
        return {k: v for k, v in data.items() if hasattr(v, "shape")}, {}
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for each kind of damage
        raise ImportRefused(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); it is truncated or corrupt: "
            "download or copy it again"
        ) from None
    return tensors, metadata


def detect_format(keys: Iterable[str], metadata: Mapping[str, str]) -> str:
    """peft, kohya, loha, lokr, sdxl, controlnet, checkpoint or unknown."""
    keys = list(keys)
    claims = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(k.startswith("lora_te2_") or k.startswith("conditioner.embedders.1") for k in keys) or "xl" in claims:
        return "sdxl"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.")) and ".lora_A." in k for k in keys):
        return "peft"
    if any("input_hint_block" in k or k.startswith("controlnet_cond_embedding") for k in keys):
        return "controlnet"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    return "unknown"


LORA_FORMATS = ("kohya", "peft", "loha", "lokr")  # adapters applied over a base, checked module by module


def _refuse_format(path: Path, fmt: str, tensors: Mapping) -> None:
    from sdtune.adapters.lycoris import unsupported_algo

    keys = list(tensors)
    if algo := unsupported_algo(tensors):
        raise ImportRefused(f"{path}: unsupported LyCORIS algorithm: {algo}; sdtune imports LoRA, LoCon, LoHa, LoKr")
    if fmt == "sdxl":
        raise ImportRefused(
            f"{path}: architecture mismatch: this is an SDXL adapter (two text encoders: lora_te1_/lora_te2_ keys, "
            "or its metadata says SDXL); sdtune trains and runs Stable Diffusion v1-5"
        )
    if fmt == "unknown":
        raise ImportRefused(
            f"{path}: unknown format (first keys: {', '.join(keys[:3])}); expected a diffusers/PEFT or kohya LoRA, a "
            "ControlNet or a Stable Diffusion v1 checkpoint"
        )


def claimed_base(metadata: Mapping[str, str], base_spec: str, hash_: str) -> tuple[dict, list[str]]:
    claims = {key: metadata[key] for key in CLAIM_KEYS if metadata.get(key)}
    warnings = []
    claimed_hash = claims.get("ss_new_sd_model_hash")
    if claimed_hash and not hash_.startswith("hub:") and claimed_hash != hash_:
        warnings.append(
            f"trained on {claims.get('ss_sd_model_name', 'another base')} (sha256 {claimed_hash[:12]}), checked "
            f"against {base_spec} ({hash_[:12]}): the keys fit, the images may differ"
        )
    return claims, warnings


def file_hashes(path: Path, metadata: Mapping[str, str]) -> dict:
    """sha256 of the file, and A1111's LoRA hash (`sshs_model_hash`: sha256 of the bytes after the header)."""
    import hashlib

    from sdtune.adapters.kohya import a1111_lora_hash

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    hashes = {"sha256": digest.hexdigest()}
    if path.suffix == ".safetensors":
        hashes["sshs_model_hash"] = a1111_lora_hash(path)
        if metadata.get("sshs_model_hash") and metadata["sshs_model_hash"] != hashes["sshs_model_hash"]:
            hashes["sshs_model_hash_in_file"] = metadata["sshs_model_hash"]  # edited after it was saved
    return hashes


def _lora_detail(modules, fmt: str) -> str:
    from sdtune.adapters.lycoris import describe

    te = ", with text encoder" if any(name.startswith("lora_te") for name in modules) else ""
    if fmt in ("loha", "lokr"):
        return describe(modules) + te
    conv = any(m.down.dim() == 4 and m.down.shape[-1] > 1 for m in modules.values())
    return ("LoCon (conv layers too)" if conv else "LoRA") + te


def _base_table(base: str):
    from sdtune.adapters.base import load_pipeline
    from sdtune.adapters.lora_modules import base_shapes, module_table

    source = resolve_base(base)
    if source.kind in ("toy", "folder"):
        return module_table(*base_shapes(source.location))
    pipe = load_pipeline(base)
    return module_table(*base_shapes(pipe))


# -- importing --------------------------------------------------------------------------------------------------------


def inspect(path: str | Path, base: str = "toy", allow_pickle: bool = False) -> ImportReport:
    """Detects and validates without registering (`sdtune adapters import --dry-run`)."""
    return _prepare(Path(path), base, allow_pickle)[0]


def _prepare(path: Path, base: str, allow_pickle: bool):
    if not path.exists():
        raise ImportRefused(f"{path}: not found")
    if path.is_dir():
        return _prepare_folder(path, base)
    tensors, metadata = read_tensors(path, allow_pickle)
    if is_embedding(tensors):  # a textual inversion (adapters/embeddings.py)
        return prepare_import(path, tensors, metadata, base)
    fmt = detect_format(tensors, metadata)
    _refuse_format(path, fmt, tensors)
    base_digest = base_hash(base)
    report = ImportReport(str(path), fmt, "", base)
    report.claimed_base, report.warnings = claimed_base(metadata, base, base_digest)
    payload = {"tensors": tensors, "metadata": metadata}
    if fmt in LORA_FORMATS:
        from sdtune.adapters.lora_modules import read_kohya, read_peft
        from sdtune.adapters.lycoris import read_modules

        reader = {"kohya": read_kohya, "peft": lambda t: read_peft(t, metadata)}.get(fmt, read_modules)
        try:
            modules = reader(tensors)
        except ValueError as exc:
            raise ImportRefused(f"{path}: {exc}") from None
        report.detail = _lora_detail(modules, fmt)
        payload["table"] = _base_table(base)
        check_lora(modules, payload["table"], report)
        payload["modules"] = modules
    elif fmt == "controlnet":
        from sdtune.adapters.controlnet import controlnet_from_original, is_original_layout

        report.format, report.detail = "controlnet", "single file"
        expected, config = controlnet_shapes(base)
        if is_original_layout(tensors):
            try:
                tensors = controlnet_from_original(tensors, config)
            except ValueError as exc:
                raise ImportRefused(f"{path}: {exc}") from None
        check_controlnet({k: tuple(v.shape) for k, v in tensors.items()}, expected, report)
    else:
        from sdtune.adapters.single_file import detect_config

        report.format = "dreambooth"
        report.detail = f"single-file SD v1 checkpoint ({detect_config(path)} layout)"
    return report, payload


_METHODS = {"kohya": "lora", "peft": "lora", "embedding": "textual_inversion"}  # a format's method in the registry


def _prepare_folder(path: Path, base: str):
    if (path / "model_index.json").is_file():
        report = ImportReport(str(path), "dreambooth", "diffusers folder", base)
        check_architecture(path, base, report)
        return report, {}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    # a ControlNetModel's config; folders written without _class_name (sdtune before 2026-11-25) by its own key
    if config.get("_class_name") == "ControlNetModel" or "conditioning_embedding_out_channels" in config:
        report = ImportReport(str(path), "controlnet", "diffusers folder", base)
        check_controlnet(folder_shapes(path), controlnet_shapes(base)[0], report)
        return report, {}
    raise ImportRefused(
        f"{path}: a folder, but not a run folder (adapter.json), a diffusers model (model_index.json) or a "
        "ControlNet (config.json of a ControlNetModel)"
    )


def import_adapter(
    path: str | Path,
    *,
    base: str = "toy",
    name: str | None = None,
    allow_pickle: bool = False,
    tags: Iterable[str] = (),
    registry: Registry | None = None,
) -> tuple[Entry, ImportReport]:
    """Validates `path` against `base` and registers it. A run folder (with adapter.json) is registered as it is.

    Raises:
        ImportRefused: unreadable, pickle, unsupported format, or a LoRA whose modules do not all fit the base.
        RegistryError: the name is taken.
    """
    registry = registry or Registry()
    path = Path(path)
    if path.is_dir() and (path / "adapter.json").is_file():
        entry = registry.register_run(path, name=name, unique=False)
        return entry, ImportReport(str(path), "run", "sdtune run folder", base)
    report, payload = _prepare(path, base, allow_pickle)
    if not report.ok:
        raise ImportRefused(f"not imported: the file does not fit {base}:\n{report.summary()}")
    name = check_name(name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "adapter")
    source = resolve_base(base)
    base_ref = BaseRef(base, source.kind, base_hash(base))
    metadata = payload.get("metadata", {})

    def fill(staging: Path) -> AdapterManifest:
        files = _write_files(staging, path, report, payload, name)
        trigger = metadata.get("modelspec.trigger_phrase", "")
        return AdapterManifest(
            name=name,
            method="lora" if report.format in LORA_FORMATS else _METHODS.get(report.format, report.format),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            base=base_ref,
            trigger_words=[payload["token"]]
            if "token" in payload
            else [w.strip() for w in trigger.split(",") if w.strip()],
            dataset={},
            training={"steps": int(metadata["ss_steps"])} if metadata.get("ss_steps", "").isdigit() else {},
            files=files,
            samples={},
            scores=None,
            export_check=None,
            recipe={},
            origin={
                "kind": "imported",
                "source": str(path.resolve()),
                "format": report.format,
                "hashes": file_hashes(path, metadata) if path.is_file() else {},
                "metadata": dict(metadata),
                "check": report.to_dict(),
            },
        )

    return registry.add(name, fill, tags=tags), report


def _write_files(staging: Path, path: Path, report: ImportReport, payload: dict, name: str) -> dict[str, str]:
    """The registered copy: both formats of a LoRA (the original file kept byte for byte), a LoHa/LoKr's single file
    as it is, an embedding's two files, or the model as given."""
    if report.format == "embedding":
        return registered_files(staging, payload)
    if report.format in ("loha", "lokr"):
        if path.suffix == ".safetensors":  # as published: its hashes stay what other tools computed
            return {"kohya": copy_into(path, staging / path.name).name}
        from sdtune.adapters.lora_files import kohya_path, save_kohya

        return {"kohya": save_kohya(kohya_path(staging, name), payload["tensors"], payload["metadata"]).name}
    if report.format in ("kohya", "peft"):
        from sdtune.adapters.file_metadata import facts_of_base, kohya_metadata
        from sdtune.adapters.lora_files import PEFT_FILE, kohya_path, save_kohya, save_modules_peft, summary_facts
        from sdtune.adapters.lora_modules import to_kohya

        modules, table = payload["modules"], payload["table"]
        dtype = next(iter(modules.values())).up.dtype
        if report.format == "peft":  # its kohya twin is written with the facts of the base it was checked on
            copy_into(path, staging / PEFT_FILE)
            facts = summary_facts(modules, *facts_of_base(report.base, name))
            save_kohya(kohya_path(staging, name), to_kohya(modules), kohya_metadata(facts), dtype=dtype)
            return {"peft": PEFT_FILE, "kohya": kohya_path(staging, name).name}
        kohya_name = path.name if path.suffix == ".safetensors" else kohya_path(staging, name).name
        if path.suffix == ".safetensors" and not any(k.startswith("lora_te1_") for k in payload["tensors"]):
            copy_into(path, staging / kohya_name)  # as published: its hashes stay what other tools computed
        else:
            save_kohya(staging / kohya_name, to_kohya(modules), payload["metadata"], dtype=dtype)
        save_modules_peft(staging, modules, table, dtype)
        return {"peft": PEFT_FILE, "kohya": kohya_name}
    fmt = {"controlnet": "controlnet", "dreambooth": "diffusers" if path.is_dir() else "single_file"}[report.format]
    if path.is_file() and payload.get("metadata") is not None and path.suffix != ".safetensors":
        import safetensors.torch

        target = f"{name}.safetensors"  # a trusted pickle is stored as safetensors
        safetensors.torch.save_file({k: v.contiguous() for k, v in payload["tensors"].items()}, staging / target)
        return {fmt: target}
    target = "model" if path.is_dir() and fmt == "diffusers" else path.name
    (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging / target)
    return {fmt: target}


__all__ = ["ImportRefused", "ImportReport", "detect_format", "import_adapter", "inspect", "read_tensors"]
