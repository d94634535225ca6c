"""What a full fine-tune writes: a diffusers folder, a single-file checkpoint, and a LoRA extracted from the delta.

<output.dir>/diffusers/                   the whole pipeline: `base:` of a later run, `sdtune sample --base`
<output.dir>/<name>.safetensors           the same weights in the original SD layout (A1111, ComfyUI)
<output.dir>/pytorch_lora_weights.safetensors, <name>-lora.safetensors
                                          the fine-tune as a rank-r LoRA (PEFT and kohya), SVD of W_tuned - W_base,
                                          checked like a trained LoRA: it stacks with other adapters.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.extract import extract_lora
from sdtune.adapters.single_file import save_pipeline_folder, save_single_file
from sdtune.trainers.core.export import AdapterWriter
from sdtune.trainers.core.lora_layers import cast
from sdtune.trainers.core.runtime import SAVE_DTYPES


@dataclass
class FullModelWriter:
    """Writes a full fine-tune's three outputs; `lora` (an `AdapterWriter`) writes and checks the extracted LoRA."""

    pipe: object  # the pipeline whose UNet (and text encoder) were trained in place
    lora: AdapterWriter
    base_folder: Path | None  # the base's own folder, for its sdtune.json (recommended guidance), if any

    def save(self, out_dir: Path, step: int):
        recipe = self.lora.recipe
        method, name = recipe.method, recipe.output.name
        folder = out_dir / "diffusers"
        save_pipeline_folder(self.pipe, folder, overwrite=True)
        if self.base_folder is not None and (self.base_folder / "sdtune.json").is_file():
            shutil.copy(self.base_folder / "sdtune.json", folder / "sdtune.json")
        files = {"diffusers": folder}
        if method.save_single_file:
            half = recipe.output.save_precision != "fp32"
            files["single_file"] = save_single_file(folder, out_dir / f"{name}.safetensors", half=half, overwrite=True)
        if not method.extract_lora_rank:
            return files, None
        lora_files, report = self.save_extracted_lora(out_dir, step, method.extract_lora_rank)
        return files | lora_files, report

    def save_extracted_lora(self, out_dir: Path, step: int, rank: int):
        """SVD of the weight delta at `rank`, in both LoRA formats, export-checked against the same LoRA in memory."""
        base_unet, base_te = self.lora.checker.base_state_dicts()
        trained_te = self.lora.recipe.method.train_text_encoder
        extracted = extract_lora(
            base_unet,
            {k: v.detach() for k, v in self.pipe.unet.state_dict().items()},
            rank,
            base_te if trained_te else None,
            {k: v.detach() for k, v in self.pipe.text_encoder.state_dict().items()} if trained_te else None,
            device=self.pipe.unet.device,  # the SVDs on the run's GPU, when it has one
        )
        dtype = SAVE_DTYPES[self.lora.recipe.output.save_precision]
        configs = (
            extracted.lora_config("unet"),
            extracted.lora_config("text_encoder") if extracted.text_encoder else None,
        )

        def reference():
            return self.lora.checker.render_state_dict(
                cast(extracted.unet, dtype), cast(extracted.text_encoder, dtype)
            )

        name = f"{self.lora.recipe.output.name}-lora"
        return self.lora.save_state_dicts(
            out_dir, step, extracted.unet, extracted.text_encoder, configs, reference, name
        )
