"""Writing a trained LoRA in both ecosystem formats, proving both load, and recording what was made.

The check itself (reload, render, compare, key coverage) is inference-side and lives in
`sdtune.adapters.export_check`, where merges and resizes use it too; this module gives it the trained reference.

Every save writes:
    pytorch_lora_weights.safetensors   diffusers/PEFT format, with the LoRA adapter metadata (true lora_alpha)
    <name>.safetensors                 kohya/A1111 format: lora_unet_* / lora_te_* keys, true .alpha, ss_* metadata
and then runs the export check: a fresh copy of the base loads each file the way users will (diffusers'
`load_lora_weights` for both; the kohya file goes through diffusers' kohya converter), renders the same image
with each, and compares them with the adapter as it was in training, its tensors rounded to the saved dtype
(`output.save_precision` is the user's choice; the check is about keys, scales and formats). The kohya keys are also replayed through
the key mapping A1111 and ComfyUI use for SD v1 LoRAs. Any unmatched key or a pixel difference over 2/255 fails
the run: a LoRA that loads differently in another tool is the ecosystem's most common complaint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sdtune.adapters import kohya
from sdtune.adapters.export_check import PIXEL_TOLERANCE, ExportCheck, ExportChecker, ExportCheckError
from sdtune.adapters.manifest import AdapterManifest, BaseRef, write_manifest
from sdtune.trainers.core.lora_layers import lora_state_dicts, save_peft_lora

__all__ = ["PIXEL_TOLERANCE", "ExportCheck", "ExportCheckError", "ExportChecker", "manifest", "save_lora_files"]


def kohya_alpha(config) -> float:
    return float(config.lora_alpha)


def save_lora_files(
    out_dir: Path, name: str, unet, text_encoder, unet_config, te_config, dtype, metadata, write_kohya: bool = True
) -> dict:
    """Writes the PEFT file and (if asked, and unless DoRA) the kohya file into `out_dir`; returns {format: path}."""
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder, te_config is not None)
    files = {"peft": save_peft_lora(out_dir, unet_sd, te_sd, unet_config, te_config, dtype)}
    if not write_kohya or unet_config.use_dora:
        return files  # peft's DoRA magnitude has no faithful kohya/A1111 form (see adapters/kohya.py)
    kohya_sd = kohya.peft_to_kohya(
        unet_sd,
        te_sd,
        unet_alpha=kohya_alpha(unet_config),
        text_encoder_alpha=kohya_alpha(te_config) if te_config is not None else None,
    )
    files["kohya"] = kohya.save_kohya_lora(out_dir / f"{name}.safetensors", kohya_sd, metadata, dtype=dtype)
    return files


@contextlib.contextmanager
def rounded_to(params, dtype: torch.dtype):
    """Temporarily rounds trainable tensors to the dtype they are saved in: the export check's reference is the
    adapter as saved (at low precision a double rounding, fp32 -> fp16 -> bf16 compute, can shift a few pixels)."""
    kept = [p.data.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype).to(p.dtype)
    try:
        yield
    finally:
        for p, data in zip(params, kept):
            p.data = data


def manifest(
    *,
    name: str,
    method: str,
    base: BaseRef,
    recipe,
    scan,
    trigger_words: list[str],
    steps: int,
    final_loss: float | None,
    files: dict,
    samples: dict[str, str],
    scores: dict | None,
    export_check: ExportCheck | None,
    started_at: float,
) -> AdapterManifest:
    """The run's `adapter.json` (see sdtune.adapters.manifest): the trainer's side of the contract."""
    return AdapterManifest(
        name=name,
        method=method,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        base=base,
        trigger_words=trigger_words,
        dataset={
            "fingerprint": scan.fingerprint(),
            "kind": scan.kind,
            "images": len(scan.records),
            "images_with_repeats": sum(r.repeats for r in scan.records),
            "skipped": [asdict(s) for s in scan.skipped],
            "buckets": {f"{w}x{h}": n for (w, h), n in sorted(scan.bucket_counts().items())},
        },
        training={"steps": steps, "final_loss": final_loss, "seconds": round(time.time() - started_at, 1)},
        files={fmt: Path(p).name for fmt, p in files.items()},
        samples=samples,
        scores=scores,
        export_check=None if export_check is None else {**asdict(export_check), "ok": export_check.ok},
        recipe=recipe.to_dict(),
    )


def finish_run(
    recipe,
    *,
    method: str,
    base: BaseRef,
    scan,
    state,
    files: dict,
    validator,
    export_check: ExportCheck | None,
    started_at: float,
    speed: dict,
    log=print,
) -> Path:
    """The end of every trainer's run, after its files are written: the final grid (`ab_grid.png`), the toy-world
    scores, and `adapter.json` (with the run's speed and memory) beside the files. Returns the manifest's path.

    Every trainer ends here, so whatever must happen to each finished run (e.g. registering it) belongs here too.

    Args:
        validator: the trainer's validator (`enabled`, `grid(step, path)`, `toy_scores()`).
    """
    out_dir = Path(recipe.output.dir)
    samples = {}
    if validator.enabled:
        validator.grid(state.step, out_dir / "ab_grid.png")
        samples["ab_grid"] = "ab_grid.png"
    scores = validator.toy_scores()
    if scores:
        log(f"toy scores: base {scores['base']}  adapter {scores['adapter']}")
    info = manifest(
        name=recipe.output.name,
        method=method,
        base=base,
        recipe=recipe,
        scan=scan,
        trigger_words=[recipe.data.trigger_word] if recipe.data.trigger_word else [],
        steps=state.step,
        final_loss=state.last_loss,
        files=files,
        samples=samples,
        scores=scores,
        export_check=export_check,
        started_at=started_at,
    )
    info.training.update(speed)
    manifest_file = write_manifest(out_dir, info)
    written = [out_dir / name for name in [*info.files.values(), *info.samples.values()]]
    log(f"done: {', '.join(str(p) for p in [*written, manifest_file])}")
    if recipe.output.register:
        register_run(out_dir, log)
    return manifest_file


def register_run(out_dir: Path, log=print):
    """Adds a finished run to the registry (`output.register: false` skips it), as `name`, or `name-2`... when a
    run of that name is already there."""
    from sdtune.adapters.registry import Registry

    registry = Registry()
    entry = registry.register_run(out_dir)
    log(f"registered as {entry.name!r} in {registry.home} (sdtune adapters show {entry.name})")
