"""The writer (see trainers/core/outputs.py) of a trained ControlNet.

<output.dir>/controlnet/            the diffusers folder (`ControlNetModel.from_pretrained`, `sdtune sample`)
<output.dir>/<name>.safetensors     the original `control_model.*` layout (A1111's sd-webui-controlnet, ComfyUI)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters.controlnet import save_controlnet
from sdtune.adapters.export_check import ExportCheck
from sdtune.trainers.core.outputs import RunOutputs, model_facts
from sdtune.trainers.core.runtime import SAVE_DTYPES


@dataclass
class ControlNetWriter:
    """Both layouts of the ControlNet; every checkpoint and the final save go through `save`."""

    outputs: RunOutputs
    controlnet: torch.nn.Module  # as Accelerate prepared it (DDP-wrapped, compiled): unwrapped to save

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        recipe = self.outputs.recipe
        model = self.outputs.accelerator.unwrap_model(self.controlnet, keep_torch_compile=False)
        files = save_controlnet(model, out_dir, model_facts(recipe), SAVE_DTYPES[recipe.output.save_precision])
        return files, None  # no reload check for ControlNets yet; tests/test_controlnet_format.py reloads both
