"""A LoRA extracted from a full fine-tune: the weight delta of each adaptable layer, factorized by SVD.

A DreamBooth (or any) full fine-tune changes every weight. Most of what it learned sits in a few directions of
each layer's delta W_tuned - W_base, so the best rank-r factorization of that delta (`lowrank.factorize`) is a
LoRA that carries the fine-tune as a small file, stacks with other adapters and loads in every tool. Only the
layers a LoRA can hold are extracted (peft/kohya LoCon names: attention, feed-forward, projections, resnet
convolutions; the text encoder's attention); biases and norms stay with the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.lowrank import factorize

# Layer names a LoRA may adapt, as peft `target_modules` (a module matches by its last name parts).
UNET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
    "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv",
)  # fmt: skip
TEXT_ENCODER_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


class ExtractError(SdtuneError, ValueError):
    """Two models a LoRA cannot be extracted from (not the same architecture, or no difference)."""


@dataclass
class ExtractedLora:
    """peft-named LoRA tensors (`<module>.lora_A.weight` = down, `.lora_B.weight` = up) and their config."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None
    rank: int

    def lora_config(self, part: str = "unet"):
        """A peft `LoraConfig` for the unet or text_encoder tensors (alpha = rank: the delta at scale 1)."""
        from peft import LoraConfig

        tensors = self.unet if part == "unet" else self.text_encoder
        modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
        return LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=modules, init_lora_weights="gaussian")


def _adaptable(module: str, targets: tuple[str, ...]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def extract_deltas(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    rank: int,
    targets: tuple[str, ...],
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Rank-`rank` LoRA tensors of every adaptable weight that differs between two state dicts of one model; the
    SVDs run on `device` (on a GPU, SD v1-5's ~700 layers take seconds instead of minutes), the tensors come back
    on the CPU."""
    lora = {}
    for key, tuned_weight in tuned.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or tuned_weight.ndim not in (2, 4) or not _adaptable(module, targets):
            continue
        if key not in base or base[key].shape != tuned_weight.shape:
            raise ExtractError(f"extract: {key} is missing or shaped differently in the base: not the same model")
        delta = tuned_weight.to(device).float() - base[key].to(device).float()
        if not torch.any(delta):
            continue
        up, down = factorize(delta, rank, pad=True)
        lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"] = down.cpu(), up.cpu()
    return lora


def extract_lora(
    base_unet: Mapping[str, torch.Tensor],
    tuned_unet: Mapping[str, torch.Tensor],
    rank: int,
    base_text_encoder: Mapping[str, torch.Tensor] | None = None,
    tuned_text_encoder: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> ExtractedLora:
    """The LoRA of rank `rank` that best reproduces `tuned` from `base` (state dicts with diffusers names).

    The text encoder is extracted when both of its state dicts are given and it changed. The SVDs run on `device`.

    Raises:
        ExtractError: the two UNets are not the same architecture, or nothing adaptable changed.
    """
    unet = extract_deltas(base_unet, tuned_unet, rank, UNET_MODULES, device)
    text_encoder = None
    if base_text_encoder is not None and tuned_text_encoder is not None:
        text_encoder = (
            extract_deltas(base_text_encoder, tuned_text_encoder, rank, TEXT_ENCODER_MODULES, device) or None
        )
    if not unet:
        raise ExtractError("extract: the UNet weights are identical to the base's; there is nothing to extract")
    return ExtractedLora(unet=unet, text_encoder=text_encoder, rank=rank)
