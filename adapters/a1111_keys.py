"""Which kohya LoRA keys AUTOMATIC1111 and ComfyUI attach to an SD v1 model, reproduced to check an export offline.

A kohya key names a *diffusers* module (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`).
Both UIs run the original CompVis/LDM UNet, whose modules sit elsewhere, and map the name over:

- A1111 (`extensions-builtin/Lora/networks.py`, `convert_diffusers_name_to_compvis`) rewrites the name with regexes
  into the `named_modules()` name of the LDM model, "." -> "_", and looks it up; a miss is logged as "Failed to match
  keys" and that module's LoRA is silently not applied. `kohya_to_compvis_module` is that rule, and
  `unmatched_kohya_keys` replays the lookup (with A1111's fallbacks) against the module names of a real checkpoint.
- ComfyUI (`comfy/lora.py`, `model_lora_keys_unet` / `model_lora_keys_clip`) builds a table instead: for every UNet
  weight of its `unet_to_diffusers` map, `lora_unet_<diffusers key with "." -> "_">`, and for the CLIP text encoder
  `lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|...|mlp_fc2>`. `comfyui_unmatched_kohya_keys` replays it.

The LDM layout behind the regexes (SD v1, `layers_per_block` = 2, so 3 LDM blocks per diffusers level):

    input_blocks.0            conv_in
    input_blocks.1 + 3*b + j  down_blocks.b.{resnets.j -> .0, attentions.j -> .1}
    input_blocks.3 + 3*b      down_blocks.b.downsamplers.0.conv -> .0.op
    middle_block.0 / .1 / .2  mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.3*b + j     up_blocks.b.{resnets.j -> .0, attentions.j -> .1}          (j < 3)
    output_blocks.2 + 3*b     up_blocks.b.upsamplers.0.conv -> .1.conv (block 0, no attentions) or .2.conv
    ResBlock                  conv1 -> in_layers.2, conv2 -> out_layers.3, time_emb_proj -> emb_layers.1,
                              conv_shortcut -> skip_connection
    SpatialTransformer        same names inside as diffusers' Transformer2DModel (proj_in, transformer_blocks...)
    text encoder              lora_te_text_model_... -> cond_stage_model.transformer.text_model...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# A1111's suffix table: only these resnet sub-modules are renamed (norm1/norm2 are not, so A1111 misses them).
_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
# ComfyUI's LORA_CLIP_MAP: the text-encoder modules it accepts per layer.
_COMFY_CLIP_MODULES = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # A1111's fallback for SD2's fused MultiheadAttention


def kohya_to_compvis_module(kohya_module: str, layers_per_block: int = 2) -> str | None:
    """A1111's `convert_diffusers_name_to_compvis` for an SD v1 kohya module name.

    Args:
        kohya_module: the part of a kohya key before the first ".", e.g.
            `lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k`.
        layers_per_block: the UNet's `layers_per_block` (A1111 hard-codes 2, i.e. 3 LDM blocks per level).

    Returns:
        The LDM module name A1111 looks up, e.g. `diffusion_model_output_blocks_11_1_transformer_blocks_0_attn2_to_k`,
        or None when no rule applies (A1111 then tries the name as it is, and misses).
    """
    stride = layers_per_block + 1
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * stride + int(m[3])}_{_inner(m[2], m[4])}",
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: f"diffusion_model_output_blocks_{int(m[1]) * stride + int(m[3])}_{_inner(m[2], m[4])}",
        ),
        # A1111 matches these as prefixes and drops whatever follows "conv".
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{(int(m[1]) + 1) * stride}_0_op",
        ),
        # Up block 0 of SD v1 has no attentions, so its upsampler is the LDM block's 2nd child, else the 3rd.
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: f"diffusion_model_output_blocks_{(int(m[1]) + 1) * stride - 1}_{2 if int(m[1]) > 0 else 1}_conv",
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}",
        ),
    )
    for pattern, build in rules:
        match = re.match(pattern, kohya_module)
        if match:
            return build(match)
    return None


def _suffix(kind: str, rest: str) -> str:
    return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def _inner(kind: str, rest: str) -> str:
    # Inside an LDM input/output block, child 0 is the ResBlock and child 1 the SpatialTransformer.
    return f"{1 if kind == 'attentions' else 0}_{_suffix(kind, rest)}"


def compvis_modules_from_checkpoint_keys(keys: Iterable[str]) -> set[str]:
    """The module names A1111 gives an SD v1 single-file checkpoint's modules (its `network_layer_mapping` keys).

    A1111 names the UNet's modules from `sd_model.model` (`diffusion_model.input_blocks...`) and the text encoder's
    from `cond_stage_model.wrapped` (`transformer.text_model...`), with "." -> "_".

    Args:
        keys: the checkpoint's tensor names, e.g. `model.diffusion_model.input_blocks.1.1.proj_in.weight`,
            `cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`.

    Returns:
        e.g. `{"diffusion_model_input_blocks_1_1_proj_in", "transformer_text_model_encoder_layers_0_self_attn_q_proj"}`.
    """
    modules = set()
    for key in keys:
        module = key.rsplit(".", 1)[0]
        if module.startswith("model.diffusion_model."):
            modules.add(module.removeprefix("model.").replace(".", "_"))
        elif module.startswith("cond_stage_model."):
            modules.add(module.removeprefix("cond_stage_model.").replace(".", "_"))
    return modules


def kohya_modules(kohya_state_dict: Mapping[str, object]) -> list[str]:
    """The distinct module names of a kohya state dict (the part of each key before the first "."), sorted."""
    return sorted({key.split(".", 1)[0] for key in kohya_state_dict})


def a1111_module_for(kohya_module: str, compvis_module_names: set[str], layers_per_block: int = 2) -> str | None:
    """The LDM module A1111's `load_network` attaches a kohya module to, or None for a "Failed to match keys" miss.

    Replays its lookup: the converted name, then its fallbacks (the name without a trailing `_q/k/v_proj` for SD2,
    `lora_unet` -> `diffusion_model` for keys already in LDM naming, `lora_te1_text_model` -> `transformer_text_model`).
    """
    key = kohya_to_compvis_module(kohya_module, layers_per_block) or kohya_module
    if key in compvis_module_names:
        return key
    match = _X_PROJ.match(key)
    if match and match[1] in compvis_module_names:
        return match[1]
    candidates = []
    if "lora_unet" in kohya_module:
        candidates.append(kohya_module.replace("lora_unet", "diffusion_model"))
    elif "lora_te1_text_model" in kohya_module:
        candidates.append(kohya_module.replace("lora_te1_text_model", "0_transformer_text_model"))
        candidates.append(kohya_module.replace("lora_te1_text_model", "transformer_text_model"))
    return next((name for name in candidates if name in compvis_module_names), None)


def unmatched_kohya_keys(
    kohya_state_dict: Mapping[str, object], compvis_module_names: set[str], layers_per_block: int = 2
) -> list[str]:
    """Every kohya module A1111 would fail to attach to the given SD v1 checkpoint (its LoRA would be ignored).

    Args:
        kohya_state_dict: a kohya LoRA state dict (`peft_to_kohya` output or a loaded file).
        compvis_module_names: `compvis_modules_from_checkpoint_keys(<base checkpoint's tensor names>)`.
        layers_per_block: the UNet's `layers_per_block`.

    Returns:
        the unmatched kohya module names, sorted; [] for an export that loads completely.
    """
    return [
        module
        for module in kohya_modules(kohya_state_dict)
        if a1111_module_for(module, compvis_module_names, layers_per_block) is None
    ]


def comfyui_lora_key_map(unet_weight_keys: Iterable[str], text_encoder_weight_keys: Iterable[str] = ()) -> dict:
    """ComfyUI's kohya key table for an SD v1 model: kohya module -> the diffusers weight it patches.

    ComfyUI lists `lora_unet_<k with "." -> "_">` for every diffusers UNet weight `k` in its `unet_to_diffusers`
    table (all weights of an SD v1 UNet), and `lora_te_text_model_encoder_layers_<i>_<m>` for the six CLIP modules
    of `LORA_CLIP_MAP` in each layer (also under `lora_te1_`, which SD v1 files should not rely on).

    Args:
        unet_weight_keys: the diffusers UNet's state-dict keys (`unet.state_dict().keys()`).
        text_encoder_weight_keys: the `CLIPTextModel`'s state-dict keys (with or without `text_model.`).
    """
    table = {}
    for key in unet_weight_keys:
        if key.endswith(".weight"):
            table["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = key
    for key in text_encoder_weight_keys:
        match = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight", key)
        if match and match[2] in _COMFY_CLIP_MODULES:
            table[f"lora_te_text_model_encoder_layers_{match[1]}_{_COMFY_CLIP_MODULES[match[2]]}"] = key
    return table


def comfyui_unmatched_kohya_keys(kohya_state_dict: Mapping[str, object], key_map: Mapping[str, str]) -> list[str]:
    """Every kohya module ComfyUI would not load ("lora key not loaded"), given `comfyui_lora_key_map(...)`."""
    return [module for module in kohya_modules(kohya_state_dict) if module not in key_map]


__all__ = [
    "a1111_module_for",
    "comfyui_lora_key_map",
    "comfyui_unmatched_kohya_keys",
    "compvis_modules_from_checkpoint_keys",
    "kohya_modules",
    "kohya_to_compvis_module",
    "unmatched_kohya_keys",
]
