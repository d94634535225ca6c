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
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdtune.adapters import kohya, sampling
from sdtune.adapters.base import base_hash, recommended_guidance
from sdtune.adapters.export_check import PIXEL_TOLERANCE, ExportCheck, ExportChecker, ExportCheckError
from sdtune.adapters.manifest import AdapterManifest, BaseRef, write_manifest
from sdtune.trainers.core.lora_layers import lora_state_dicts, save_peft_lora
from sdtune.trainers.core.runtime import SAVE_DTYPES

__all__ = [
    "PIXEL_TOLERANCE",
    "AdapterWriter",
    "ExportCheck",
    "ExportCheckError",
    "ExportChecker",
    "finish_run",
    "manifest",
    "save_lora_files",
    "write_lora_files",
]


def kohya_alpha(config) -> float:
    return float(config.lora_alpha)


def write_lora_files(
    out_dir: Path, name: str, unet_sd, te_sd, unet_config, te_config, dtype, metadata, write_kohya: bool = True
) -> dict:
    """Writes peft-named LoRA tensors (trained or extracted) as the PEFT file and, if asked and unless DoRA, the kohya
    file into `out_dir`; returns {format: path}."""
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


def save_lora_files(
    out_dir: Path, name: str, unet, text_encoder, unet_config, te_config, dtype, metadata, write_kohya: bool = True
) -> dict:
    """`write_lora_files` of the LoRA layers trained in `unet` (and `text_encoder`, when `te_config` is set)."""
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder, te_config is not None)
    return write_lora_files(out_dir, name, unet_sd, te_sd, unet_config, te_config, dtype, metadata, write_kohya)


def trigger_words(recipe) -> list[str]:
    """What calls up the trained concept: DreamBooth's instance prompt, or the data's trigger word."""
    if recipe.method.type == "dreambooth":
        return [recipe.method.instance_prompt]
    return [recipe.data.trigger_word] if recipe.data.trigger_word else []


def check_settings(recipe) -> sampling.SampleSettings:
    """The one image the export check renders per format: the first validation prompt (else the trigger), seed 0."""
    v = recipe.validation
    prompt = v.prompts[0] if v.prompts else (trigger_words(recipe) or ["a photo"])[0]
    return sampling.SampleSettings(
        prompt=prompt,
        seed=0,
        negative_prompt=v.negative_prompt,
        steps=v.num_inference_steps,
        guidance=v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base),
        scheduler=v.scheduler,
    )


@dataclass
class AdapterWriter:
    """What saving a LoRA needs, gathered once: every checkpoint and the final save go through `save` (a trained
    LoRA) or `save_state_dicts` (LoRA tensors made otherwise, e.g. extracted from a full fine-tune)."""

    recipe: object  # Recipe
    scan: object  # DatasetScan
    base: object  # sdtune.adapters.base.BaseSource
    started_at: float
    accelerator: object  # accelerate.Accelerator
    unet: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    lora_configs: tuple  # peft LoraConfig of the UNet and of the text encoder (None when it is not trained)
    trainable: list[torch.nn.Parameter] | None
    validator: object  # trainers.core.validation.Validator
    checker: ExportChecker

    def save(self, out_dir: Path, step: int) -> tuple[dict, ExportCheck | None]:
        """Writes the trained LoRA in both formats into `out_dir` and, if asked, runs the export check on them."""
        unet_sd, te_sd = lora_state_dicts(self.unet, self.text_encoder, self.lora_configs[1] is not None)
        dtype = SAVE_DTYPES[self.recipe.output.save_precision]

        def reference():  # the adapter as just saved
            with rounded_to(self.trainable, dtype):
                return self.validator.render_one(self.checker.settings)

        return self.save_state_dicts(out_dir, step, unet_sd, te_sd, self.lora_configs, reference)

    def save_state_dicts(self, out_dir: Path, step: int, unet_sd, te_sd, configs, reference, name=None):
        """Writes peft-named LoRA tensors as both formats, then checks them against `reference()`'s image."""
        recipe = self.recipe
        dtype = SAVE_DTYPES[recipe.output.save_precision]
        metadata = kohya_metadata(recipe, self.scan, self.base, step, self.started_at, configs[0])
        files = write_lora_files(
            out_dir,
            name or recipe.output.name,
            unet_sd,
            te_sd,
            *configs,
            dtype,
            metadata,
            write_kohya=recipe.output.export_kohya,
        )
        if not recipe.output.export_check:
            return files, None
        report = self.checker.check(files, reference(), out_dir)
        self.accelerator.print(report.summary())
        if not report.ok:
            raise ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
        return files, report

    def finish(self, state, speed: dict, save=None, facts: dict | None = None) -> Path:
        """The run's end (main process): the final files through `save` (default: this LoRA's `save`), then
        `finish_run` with `facts` (the method's own settings) added to the manifest's `training`."""
        recipe = self.recipe
        files, report = (save or self.save)(Path(recipe.output.dir), state.step)
        return finish_run(
            recipe,
            method=recipe.method.type,
            base=BaseRef(recipe.base.pretrained_model_name_or_path, self.base.kind, base_hash(recipe.base)),
            scan=self.scan,
            state=state,
            files=files,
            validator=self.validator,
            export_check=report,
            started_at=self.started_at,
            speed=speed | (facts or {}),
            log=self.accelerator.print,
        )


def adapter_writer(recipe, scan, base, started_at: float, accelerator, validator, dtype, **trained) -> AdapterWriter:
    """An `AdapterWriter` whose export check loads a clean copy of the base (in `dtype`) when it first runs;
    `trained`: unet, text_encoder, lora_configs, trainable (absent: tensors come through `save_state_dicts`)."""
    from sdtune.adapters.base import load_pipeline

    checker = ExportChecker(
        lambda: load_pipeline(recipe.base, torch_dtype=dtype),
        accelerator.device,
        check_settings(recipe),
        accelerator.autocast,
    )
    trained = {"unet": None, "text_encoder": None, "lora_configs": (None, None), "trainable": None} | trained
    return AdapterWriter(recipe, scan, base, started_at, accelerator, validator=validator, checker=checker, **trained)


def kohya_metadata(recipe, scan, base, step: int, started_at: float, unet_config) -> dict[str, str]:
    """sd-scripts' `ss_*` metadata of this run, for the kohya file of the LoRA `unet_config` describes."""
    from sdtune.adapters.kohya import kohya_metadata as build

    method, train = recipe.method, recipe.train
    res = recipe.data.resolution
    images = max(sum(r.repeats for r in scan.records), 1)
    base_model_name, new_hash, legacy_hash = base_metadata(recipe, base)
    return build(
        base_model_name=base_model_name,
        base_model_hash=new_hash,
        base_model_legacy_hash=legacy_hash,
        bucket_counts=scan.bucket_counts(),
        trigger_words=trigger_words(recipe),
        resolution=(res, res),
        steps=step,
        max_train_steps=train.max_train_steps,
        epochs=max(1, math.ceil(step * train.train_batch_size * train.gradient_accumulation_steps / images)),
        rank=unet_config.r,
        alpha=float(unet_config.lora_alpha),
        learning_rate=train.learning_rate,
        text_encoder_lr=(method.text_encoder_lr or train.learning_rate) if method.train_text_encoder else None,
        unet_lr=train.learning_rate,
        seed=train.seed,
        mixed_precision=train.mixed_precision,
        optimizer=train.optimizer,
        lr_scheduler=train.lr_scheduler,
        batch_size=train.train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_images=len(scan.records),
        dataset_dirs=scan.dataset_dirs(),
        tag_frequency=scan.tag_frequency(),
        title=recipe.output.name,
        output_name=recipe.output.name,
        network_dropout=method.lora_dropout,
        prediction_type=recipe_prediction_type(recipe),
        training_started_at=started_at,
        training_finished_at=time.time(),
    )


def base_metadata(recipe, base) -> tuple[str, str | None, str | None]:
    """`ss_sd_model_name`, `ss_new_sd_model_hash`, `ss_sd_model_hash` of the base, never a local path.

    A single file gets A1111's own hashes (sha256 of the file, and the old 8-hex hash); a diffusers folder (and the
    toy base) gets sdtune's sha256 over its weight files, and its first 8 hex as the short form; a hub id is its
    name, and its hashes are unknown without the files.
    """
    from sdtune.adapters.kohya import legacy_model_hash

    if base.kind == "hub":
        return base.location, None, None
    digest = base_hash(recipe.base)
    if base.kind == "single_file":
        return Path(base.location).name, digest, legacy_model_hash(base.location)
    return base.name, digest, digest[:8]


def recipe_prediction_type(recipe) -> str:
    import json

    from sdtune.trainers.core.estimate import base_config_folder

    try:
        config = json.loads((base_config_folder(recipe) / "scheduler" / "scheduler_config.json").read_text())
        return config.get("prediction_type", "epsilon")
    except OSError:
        return "epsilon"


@contextlib.contextmanager
def rounded_to(params, dtype: torch.dtype):
    """Temporarily rounds trainable tensors to the dtype they are saved in: the export check's reference is the
    adapter as saved (at low precision a double rounding, fp32 -> fp16 -> bf16 compute, can shift a few pixels)."""
    kept = [p.data.clone() for p in params]
    with torch.no_grad():  # in place: the parameters keep their storage (compiled graphs and CUDA graphs hold it)
        for p in params:
            p.data.copy_(p.data.to(dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in zip(params, kept):
                p.data.copy_(data)


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
        validator: the trainer's validator (`enabled`, `grid(step, path)`, `toy_scores()`, `keep_conditions(dir)`).
    """
    out_dir = Path(recipe.output.dir)
    samples = {}
    if validator.enabled:
        validator.grid(state.step, out_dir / "ab_grid.png")
        samples["ab_grid"] = "ab_grid.png"
    samples.update(validator.keep_conditions(out_dir))
    scores = validator.toy_scores()
    if scores:
        log(f"toy scores: base {scores['base']}  adapter {scores['adapter']}")
    info = manifest(
        name=recipe.output.name,
        method=method,
        base=base,
        recipe=recipe,
        scan=scan,
        trigger_words=trigger_words(recipe),
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
