"""LoRA on the UNet (and optionally the text encoder) through peft; adapters/lora_files.py writes its files.

A LoRA replaces a frozen weight W by W + (lora_alpha / rank) * B @ A, with A (rank x in) and B (out x rank)
trained and B starting at zero, so training starts exactly at the base model. The presets say which layers get one.

`method.algo` picks the form of the update (LyCORIS's names), all through peft, all at scale alpha / rank:
    lora   B @ A                                   peft LoraConfig
    loha   (W1a @ W1b) * (W2a @ W2b), elementwise  peft LoHaConfig: rank up to r^2 from 2r(out + in) parameters
    lokr   kron(W1, W2a @ W2b)                     peft LoKrConfig: W1 small and full, the update full-rank
peft's LoHa/LoKr are LyCORIS's own math and tensor layout (its layers cite LyCORIS's modules), so the kohya/LyCORIS
file is a renaming (adapters/lycoris.py); docs/architecture.md says why peft and not the lycoris-lora package.
"""

from __future__ import annotations

from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.utils import get_peft_model_state_dict

from sdtune.trainers.core.recipe import LoraParams

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
# LoCon (kohya's name): every linear and conv of the transformer and resnet blocks, as kohya's LoRA-C3Lier/LoCon.
CONV = ["proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]
UNET_PRESETS = {"attn": ATTN, "attn+ff": ATTN + FEED_FORWARD, "locon": ATTN + FEED_FORWARD + CONV}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def unet_target_modules(params: LoraParams) -> list[str]:
    """peft `target_modules` for the UNet: the explicit list if given, else the preset's."""
    return list(params.target_modules) if params.target_modules else list(UNET_PRESETS[params.preset])


def lora_config(params: LoraParams, target_modules: list[str]) -> LoraConfig | LoHaConfig | LoKrConfig:
    """The peft config of `params.algo` over `target_modules`; every form starts at a zero update (the base)."""
    if params.algo == "loha":
        # peft's init: W2b = 0, the rest Kaiming-uniform, so the product starts at zero and W2b gets a gradient.
        return LoHaConfig(r=params.rank, alpha=params.alpha, target_modules=target_modules, init_weights=True)
    if params.algo == "lokr":
        # peft's init: W1 = 0 (its rows get gradients through W2), W2 Kaiming-uniform.
        return LoKrConfig(
            r=params.rank,
            alpha=params.alpha,
            target_modules=target_modules,
            decompose_factor=params.factor,
            decompose_both=params.decompose_both,
            init_weights=True,
        )
    # Gaussian init of A (B = 0) is what the diffusers examples use; lora_alpha is stored so reloads scale right.
    return LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
        use_dora=params.use_dora,
    )


def add_lora(unet, text_encoder, params: LoraParams) -> tuple[LoraConfig, LoraConfig | None]:
    """Injects trainable LoRA layers (fp32) into the frozen `unet` (and `text_encoder` if asked); returns configs."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet_config = lora_config(params, unet_target_modules(params))
    unet.add_adapter(unet_config)
    text_config = None
    if params.train_text_encoder:
        text_config = lora_config(params, TEXT_ENCODER_TARGETS)
        text_encoder.add_adapter(text_config)
    # The frozen base may sit in fp16/bf16; the trainable LoRA weights stay fp32 so small updates are not lost.
    for model in (unet, text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return unet_config, text_config


def lora_state_dicts(unet, text_encoder, train_text_encoder: bool) -> tuple[dict, dict | None]:
    """The LoRA tensors only, peft-named (`down_blocks.0...to_q.lora_A.weight`), detached and on the CPU."""
    unet_sd = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    te_sd = None
    if train_text_encoder:
        te_sd = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(text_encoder).items()}
    return unet_sd, te_sd
