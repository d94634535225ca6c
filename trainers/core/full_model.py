"""What a full fine-tune writes: a diffusers folder, a single-file checkpoint, and a LoRA extracted from the delta.

<output.dir>/diffusers/                   the whole pipeline: `base:` of a later run, `sdtune sample --base`
<output.dir>/<name>.safetensors           the same weights in the original SD layout (A1111, ComfyUI)
<output.dir>/pytorch_lora_weights.safetensors, <name>-lora.safetensors
                                          the fine-tune as a rank-r LoRA (PEFT and kohya), SVD of W_tuned - W_base,
                                          checked like a trained LoRA: it stacks with other adapters.

Two writers (see trainers/core/outputs.py), composed by `full_model_writer`: `PipelineWriter` and
`ExtractedLoraWriter`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.adapters.export_check import ExportCheck
from sdtune.adapters.extract import extract_lora
from sdtune.adapters.lora_files import cast
from sdtune.adapters.single_file import save_pipeline_folder, save_single_file
from sdtune.trainers.core.export import save_checked_lora
from sdtune.trainers.core.outputs import RunOutputs, Writer, Writers
from sdtune.trainers.core.runtime import SAVE_DTYPES

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def full_model_writer(outputs: RunOutputs, pipe: StableDiffusionPipeline, base_folder: Path | None) -> Writer:
    """The writer of a full fine-tune of `pipe` (trained in place): the pipeline's files, then, if
    `method.extract_lora_rank` is set, the extracted LoRA."""
    pipeline = PipelineWriter(outputs, pipe, base_folder)
    rank = outputs.recipe.method.extract_lora_rank
    return Writers(pipeline, ExtractedLoraWriter(outputs, pipe, rank)) if rank else pipeline


@dataclass
class PipelineWriter:
    """The fine-tuned pipeline as a diffusers folder and, if `method.save_single_file`, one original-layout file."""

    outputs: RunOutputs
    pipe: StableDiffusionPipeline  # its UNet (and text encoder) were trained in place
    base_folder: Path | None  # the base's own folder, for its sdtune.json (recommended guidance), if any

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        recipe = self.outputs.recipe
        folder = out_dir / "diffusers"
        save_pipeline_folder(self.pipe, folder, overwrite=True)
        if self.base_folder is not None and (self.base_folder / "sdtune.json").is_file():
            shutil.copy(self.base_folder / "sdtune.json", folder / "sdtune.json")
        files = {"diffusers": folder}
        if recipe.method.save_single_file:
            half = recipe.output.save_precision != "fp32"
            single = out_dir / f"{recipe.output.name}.safetensors"
            files["single_file"] = save_single_file(folder, single, half=half, overwrite=True)
        return files, None  # not export-checked: the extracted LoRA is


@dataclass
class ExtractedLoraWriter:
    """The fine-tune as a rank-`rank` LoRA (SVD of the weight delta) in both LoRA formats, export-checked against the
    same LoRA in memory on the clean base."""

    outputs: RunOutputs
    pipe: StableDiffusionPipeline
    rank: int

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        checker, recipe = self.outputs.checker, self.outputs.recipe
        base_unet, base_te = checker.base_state_dicts()
        trained_te = recipe.method.train_text_encoder
        extracted = extract_lora(
            base_unet,
            {k: v.detach() for k, v in self.pipe.unet.state_dict().items()},
            self.rank,
            base_te if trained_te else None,
            {k: v.detach() for k, v in self.pipe.text_encoder.state_dict().items()} if trained_te else None,
            device=self.pipe.unet.device,  # the SVDs on the run's GPU, when it has one
        )
        dtype = SAVE_DTYPES[recipe.output.save_precision]
        configs = (
            extracted.lora_config("unet"),
            extracted.lora_config("text_encoder") if extracted.text_encoder else None,
        )

        def reference():
            return checker.render_state_dict(cast(extracted.unet, dtype), cast(extracted.text_encoder, dtype))

        name = f"{recipe.output.name}-lora"
        return save_checked_lora(
            self.outputs, out_dir, step, extracted.unet, extracted.text_encoder, configs, reference, name
        )
