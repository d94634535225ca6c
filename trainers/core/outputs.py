"""The end of a run, one way for every trainer: a `Writer` saves the method's files, `RunOutputs` does the rest.

A writer is anything with `save(out_dir, step) -> (files, report)`: it writes the method's files as they stand at
`step` into `out_dir` (a checkpoint folder, or `output.dir` at the end), and returns {format: path} with its export
check (None when nothing was checked). Every checkpoint and the final save go through it. The writers:

    trainers/core/export.py             LoraWriter: a trained LoRA, PEFT and kohya files, export-checked
    trainers/core/full_model.py         a full fine-tune: the pipeline folder, the single file, the extracted LoRA
    trainers/core/controlnet_writer.py  ControlNetWriter: the diffusers folder and the original-layout file

`RunOutputs` is the run's context, gathered once (recipe, data, base, validator, the export checker), and
`finish`, the end of every run. A trainer reads:

    outputs = RunOutputs.for_run(run, scan, accelerator, validator, dtype)
    writer = LoraWriter(outputs, unet, text_encoder, lora_configs, opt.trainable)
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator, idle)
    ...
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdtune.adapters import sampling
from sdtune.adapters.base import BaseSource, base_hash, recommended_guidance
from sdtune.adapters.export_check import ExportCheck, ExportChecker
from sdtune.adapters.file_metadata import ModelFacts, prediction_type
from sdtune.adapters.manifest import AdapterManifest, BaseRef, write_manifest
from sdtune.trainers.core.checkpointing import TrainState
from sdtune.trainers.core.data import DatasetScan
from sdtune.trainers.core.recipe import Recipe

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from sdtune.trainers.core.runtime import RunStart
    from sdtune.trainers.core.validation import ControlValidator, Validator


class Writer(Protocol):
    """What a training method saves; see the module docstring."""

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        """Writes the method's files into `out_dir` as they stand at `step`; returns {format: path} and the export
        check's report (None: nothing was checked)."""
        ...


class Writers:
    """Several writers as one, each saving in turn into the same folder (a full fine-tune: the pipeline, then the
    LoRA extracted from it). The manifest records one export check, so at most one of them may run one."""

    def __init__(self, *parts: Writer):
        self.parts = parts

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        files, reports = {}, []
        for part in self.parts:
            written, report = part.save(out_dir, step)
            files |= written
            reports += [report] if report is not None else []
        if len(reports) > 1:
            raise ValueError(f"Writers: {len(reports)} export checks in one save; the manifest records one")
        return files, (reports[0] if reports else None)


def trigger_words(recipe: Recipe) -> list[str]:
    """What calls up the trained concept: DreamBooth's instance prompt, the new token, or the data's trigger word."""
    if recipe.method.type == "dreambooth":
        return [recipe.method.instance_prompt]
    if recipe.method.type == "textual_inversion" or getattr(recipe.method, "pivotal", False):
        return [recipe.method.placeholder_token]
    return [recipe.data.trigger_word] if recipe.data.trigger_word else []


def model_facts(recipe: Recipe, date: float | None = None) -> ModelFacts:
    """What the model spec says of a file this run saves: its name, training resolution, the base's prediction
    type, the trigger words, the save time."""
    from sdtune.trainers.core.estimate import base_config_folder

    res = recipe.data.resolution
    return ModelFacts(
        title=recipe.output.name,
        resolution=(res, res),
        prediction_type=prediction_type(base_config_folder(recipe)),
        date=time.time() if date is None else date,
        trigger_words=tuple(trigger_words(recipe)),
    )


def check_settings(recipe: Recipe) -> sampling.SampleSettings:
    """The one image the export check renders per format: the first validation prompt (else the trigger), seed 0."""
    v = recipe.validation
    prompts = v.sample_prompts()
    prompt = prompts[0].prompt if prompts else (trigger_words(recipe) or ["a photo"])[0]
    return sampling.SampleSettings(
        prompt=prompt,
        seed=0,
        negative_prompt=v.negative_prompt,
        steps=v.num_inference_steps,
        guidance=v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base),
        scheduler=v.scheduler,
    )


@dataclass
class RunOutputs:
    """What the outputs of a run need to know, gathered once, and `finish`, the end of every run."""

    recipe: Recipe
    scan: DatasetScan  # a PairScan for ControlNet
    base: BaseSource
    started_at: float
    accelerator: Accelerator
    validator: Validator | ControlValidator
    checker: ExportChecker  # loads a clean copy of the base the first time a LoRA is checked, not before
    facts: dict = field(default_factory=dict)  # the method's own settings, added to the manifest's `training`
    # the method's own manifest sections, measured as the run ends (preference tuning: `preference`, `origin`)
    sections: Callable[[], dict] | None = None

    @classmethod
    def for_run(
        cls,
        run: RunStart,
        scan: DatasetScan,
        accelerator: Accelerator,
        validator: Validator | ControlValidator,
        dtype: torch.dtype,
        facts: dict | None = None,
    ) -> RunOutputs:
        """The outputs of `run`; the export check's base copy loads in `dtype` (the frozen base's)."""
        from sdtune.adapters.base import load_pipeline

        recipe = run.recipe
        checker = ExportChecker(
            lambda: load_pipeline(recipe.base, torch_dtype=dtype),
            accelerator.device,
            check_settings(recipe),
            accelerator.autocast,
        )
        return cls(recipe, scan, run.base, run.started_at, accelerator, validator, checker, facts or {})

    @functools.cached_property
    def base_ref(self) -> BaseRef:
        """The base as the manifest and the kohya metadata name it (its weights are hashed once, on first use)."""
        return BaseRef(self.recipe.base.pretrained_model_name_or_path, self.base.kind, base_hash(self.recipe.base))

    def finish(self, writer: Writer, state: TrainState, speed: dict) -> Path:
        """The end of every trainer's run (main process): the final files through `writer`, the final grid
        (`ab_grid.png`), the toy-world scores, `adapter.json` (with the run's speed and memory) beside the files,
        and, unless `output.register` is off, the registry entry. Returns the manifest's path.

        Whatever must happen to each finished run belongs here."""
        out_dir = Path(self.recipe.output.dir)
        log = self.accelerator.print
        files, report = writer.save(out_dir, state.step)
        samples = {}
        if self.validator.enabled:
            self.validator.grid(state.step, out_dir / "ab_grid.png")
            samples["ab_grid"] = "ab_grid.png"
        samples.update(self.validator.keep_conditions(out_dir))
        scores = self.validator.toy_scores()
        if scores:
            log(f"toy scores: base {scores['base']}  adapter {scores['adapter']}")
        info = self.manifest(state, files, samples, scores, report)
        info.training.update(speed | self.facts)
        held_out = getattr(self.validator, "loss", None)
        if held_out is not None:  # the held-out loss per evaluated step: every checkpoint's, and the end's
            info.training["val_loss"] = held_out.manifest_entry()
        for key, value in (self.sections() if self.sections else {}).items():
            setattr(info, key, value)
        manifest_file = write_manifest(out_dir, info)
        written = [out_dir / name for name in [*info.files.values(), *info.samples.values()]]
        log(f"done: {', '.join(str(p) for p in [*written, manifest_file])}")
        if self.recipe.output.register:
            register_run(out_dir, log)
        return manifest_file

    def manifest(
        self, state: TrainState, files: dict, samples: dict[str, str], scores: dict | None, report: ExportCheck | None
    ) -> AdapterManifest:
        """The run's `adapter.json` (see sdtune.adapters.manifest): the trainer's side of the contract."""
        recipe, scan = self.recipe, self.scan
        return AdapterManifest(
            name=recipe.output.name,
            method=recipe.method.type,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            base=self.base_ref,
            trigger_words=trigger_words(recipe),
            dataset={
                "fingerprint": scan.fingerprint(),
                "kind": scan.kind,
                "images": len(scan.records),
                "images_with_repeats": sum(r.repeats for r in scan.records),
                "skipped": [asdict(s) for s in scan.skipped],
                "buckets": {f"{w}x{h}": n for (w, h), n in sorted(scan.bucket_counts().items())},
            },
            training={
                "steps": state.step,
                "final_loss": state.last_loss,
                "seconds": round(time.time() - self.started_at, 1),
            },
            files={fmt: Path(p).name for fmt, p in files.items()},
            samples=samples,
            scores=scores,
            export_check=None if report is None else {**asdict(report), "ok": report.ok},
            recipe=recipe.to_dict(),
        )


def register_run(out_dir: Path, log=print):
    """Adds a finished run to the registry (`output.register: false` skips it), as `name`, or `name-2`... when a
    run of that name is already there."""
    from sdtune.adapters.registry import Registry

    registry = Registry()
    entry = registry.register_run(out_dir)
    log(f"registered as {entry.name!r} in {registry.home} (sdtune adapters show {entry.name})")
