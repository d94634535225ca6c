"""Composing at inference: a base plus any number of LoRAs, each at its own weight (per block if wanted).

One call turns a spec into a ready pipeline:

    composer = compose.build(PipelineSpec(base="toy", adapters=[AdapterUse("toy-purple", 0.8), AdapterUse("star")]))
    image = composer.pipe("a purple star").images[0]
    composer.set([AdapterUse("toy-purple", 1.0, blocks={"down": 0.0, "mid": 1.0, "up": [0.5, 1.0]})])  # no reload
    composer.fuse()      # weights merged into the base layers: no LoRA cost per step; composer.unfuse() undoes it

An adapter is named by a registry name or a path (a LoRA file in either format, or a run folder). Stacking uses
diffusers' `set_adapters` (the LoRAs' outputs add up, each times its weight); adapters loaded once stay loaded, so
switching is only a change of weights. Per-block weights scale each LoRA layer by where it sits:

    text_encoder  every text-encoder layer (A1111 LoRA Block Weight's BASE)
    down / up     a number for all down (up) blocks, or a list with one number per block level
    mid           the middle block
    lbw           instead of the above: A1111 LoRA Block Weight's full (LyCORIS) vector, BASE, IN00..INnn, MID,
                  OUT00..OUTnn, one number per block of the original (LDM) UNet: 26 numbers for SD v1-5, 14 for the
                  toy base. Layers outside these blocks (conv_in, time embedding, conv_out) keep the adapter weight.

Textual-inversion embeddings (`PipelineSpec.embeddings`, `Composer.set_embeddings`) stack with the LoRAs: each adds
its token to the tokenizer, which a prompt then uses (`a photo of <zq>`).

ControlNets (`sampling.ControlSpec`, folder, run or file at a scale) turn the pipeline into diffusers'
StableDiffusionControlNetPipeline over the same components; several make a MultiControlNet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.adapters.a1111_keys import kohya_to_compvis_module
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.lora_files import PEFT_FILE
from sdtune.adapters.manifest import adapter_kind


class ComposeError(SdtuneError, ValueError):
    """A spec that cannot be built (unknown adapter, bad block weights...); the message is one line."""


def split_number(text: str, default: float = 1.0) -> tuple[str, float]:
    """`PATH[:NUMBER]` -> (PATH, NUMBER); a colon not followed by a number belongs to the path. A weight of NaN or
    inf is refused (ComposeError): it would render black images, or merge into a file of NaNs."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            number = float(tail)
        except ValueError:
            return text, default
        if not math.isfinite(number):
            raise ComposeError(f"{text}: the weight {tail!r} is not a finite number")
        return head, number
    return text, default


@dataclass
class AdapterUse:
    """One adapter in a composition: `ref` is a registry name or a path; `blocks` optional per-block weights."""

    ref: str
    weight: float = 1.0
    blocks: dict | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterUse:
        """`NAME_OR_PATH[:WEIGHT]`, e.g. `toy-purple:0.8` or `runs/quickstart:0.5`."""
        return cls(*split_number(text))


@dataclass
class PipelineSpec:
    """Everything `build` needs: the base, the adapters with weights, and the ControlNets with scales."""

    base: str = "toy"
    adapters: list[AdapterUse] = field(default_factory=list)
    controlnets: list = field(default_factory=list)  # sampling.ControlSpec, in the order of the control images
    device: str | None = None  # None: cuda when present
    dtype: str | None = None  # fp32 / fp16 / bf16; None: fp16 on CUDA, fp32 elsewhere
    fuse: bool = False
    embeddings: list[str] = field(default_factory=list)  # textual-inversion embeddings: names, files or run folders


def resolve_adapter(ref: str, registry=None, option: str = "--adapter") -> Path:
    """The LoRA file an adapter reference means: a file, a run folder's PEFT file, or a registered LoRA's file; an
    unknown name is one line under `option`, what the user typed it as."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / PEFT_FILE).is_file():
            return path / PEFT_FILE
        from sdtune.adapters.lycoris import file_of_run

        lycoris_file = file_of_run(path)
        if lycoris_file is None:
            raise ComposeError(f"adapter {ref}: folder without {PEFT_FILE} (expected a run folder or a LoRA file)")
        return lycoris_file
    registry, manifest = registered(ref, registry, option, "a LoRA file", "sdtune adapters list")
    if "embedding" in manifest.files and not {"peft", "kohya"} & set(manifest.files):
        raise ComposeError(f"adapter {ref!r} is an embedding, not a LoRA: use --embedding {ref} (A/B: +emb={ref})")
    if manifest.method != "lora" and not {"peft", "kohya"} & set(manifest.files):
        raise ComposeError(
            f"adapter {ref!r} is a {manifest.method} model, not a LoRA: use it as the base (--base {ref})"
        )
    # a LoHa/LoKr loads from its LyCORIS file (its peft side is peft's adapter folders, which diffusers cannot stack)
    fmt = "peft" if "peft" in manifest.files and adapter_kind(manifest) == "lora" else "kohya"
    return registry.file(ref, fmt)


def registered(ref: str, registry, option: str, what: str, listing: str):
    """(registry, manifest) of the registered adapter `ref` names, for a reference that is no file or folder; else
    one line saying what `option` accepts and where to list the names (`listing`)."""
    from sdtune.adapters.registry import Registry, RegistryError

    registry = registry or Registry()
    try:
        return registry, registry.manifest(ref)
    except RegistryError:
        raise ComposeError(
            f"{option}: {ref} not found (not {what}, a run folder, or a name in the registry at {registry.home}; "
            f"see `{listing}`)"
        ) from None


def resolve_controlnet(ref: str, registry=None) -> str:
    """The ControlNet a reference means: a diffusers folder, run folder or single file as given, or the files of a
    ControlNet in the registry (its diffusers folder first)."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    from sdtune.adapters.registry import Registry

    registry = registry or Registry()
    if ref in registry:
        manifest = registry.manifest(ref)
        if manifest.method != "controlnet":
            raise ComposeError(f"--controlnet {ref}: the registered {manifest.method} {ref!r} is not a ControlNet")
        fmt = next(f for f in ("diffusers", "controlnet", "original") if f in manifest.files)
        return str(registry.file(ref, fmt))
    raise ComposeError(
        f"--controlnet: {ref} not found (not a ControlNet folder, run folder or file, or a name in the registry at "
        f"{registry.home}; see `sdtune adapters list --method controlnet`)"
    )


def resolve_base_ref(base: str, registry=None) -> str:
    """A base given as a registry name of a full model (DreamBooth) becomes its folder or file; else unchanged."""
    if base == "toy" or Path(base).expanduser().exists() or "/" in base:
        return base
    from sdtune.adapters.registry import Registry

    registry = registry or Registry()
    if base not in registry:
        return base
    manifest = registry.manifest(base)
    for fmt in ("diffusers", "single_file"):
        if fmt in manifest.files:
            return str(registry.file(base, fmt))
    raise ComposeError(f"--base {base}: the registered {manifest.method} {base!r} has no full model to load")


# -- per-block weights ----------------------------------------------------------------------------------------------

_BLOCK_KEYS = {"text_encoder", "down", "mid", "up", "lbw"}


def check_blocks(blocks: dict, unet_config) -> None:
    """Refuses unknown keys, lists of the wrong length, and an `lbw` vector mixed with the named form."""
    unknown = sorted(set(blocks) - _BLOCK_KEYS)
    if unknown:
        raise ComposeError(f"block weights: unknown key {unknown[0]!r} (use {', '.join(sorted(_BLOCK_KEYS))})")
    if "lbw" in blocks and len(blocks) > 1:
        raise ComposeError("block weights: give either lbw (the A1111 vector) or text_encoder/down/mid/up, not both")
    levels = len(unet_config.block_out_channels)
    for key in ("down", "up"):
        value = blocks.get(key)
        if isinstance(value, list) and len(value) != levels:
            raise ComposeError(f"block weights: {key} needs {levels} numbers (one per block level), got {len(value)}")
    if "lbw" in blocks and len(blocks["lbw"]) != lbw_length(unet_config):
        raise ComposeError(
            f"block weights: lbw needs {lbw_length(unet_config)} numbers for this UNet (BASE, "
            f"IN00-IN{ldm_blocks(unet_config) - 1:02d}, MID, OUT00-OUT{ldm_blocks(unet_config) - 1:02d}), "
            f"got {len(blocks['lbw'])}"
        )


def ldm_blocks(unet_config) -> int:
    """Input (and output) blocks of the original UNet: 1 + levels x (layers_per_block + 1) - 1 (12 for SD v1-5)."""
    return len(unet_config.block_out_channels) * (unet_config.layers_per_block + 1)


def lbw_length(unet_config) -> int:
    return 2 + 2 * ldm_blocks(unet_config)


_LDM_BLOCK = re.compile(r"diffusion_model_(input_blocks|middle_block|output_blocks)(?:_(\d+))?")


def block_scale(component: str, module: str, blocks: dict, unet_config) -> float:
    """The factor `blocks` gives the LoRA layer at `module` (a peft module path inside `component`)."""
    if component == "text_encoder":
        return float(blocks["lbw"][0] if "lbw" in blocks else blocks.get("text_encoder", 1.0))
    if "lbw" in blocks:
        ldm = kohya_to_compvis_module("lora_unet_" + module.replace(".", "_"), unet_config.layers_per_block)
        match = _LDM_BLOCK.match(ldm or "")
        if match is None:
            return 1.0
        n = ldm_blocks(unet_config)
        index = {"input_blocks": 1 + int(match[2] or 0), "middle_block": 1 + n}.get(match[1])
        index = index if index is not None else 2 + n + int(match[2])
        return float(blocks["lbw"][index])
    for key, prefix in (("down", "down_blocks."), ("up", "up_blocks.")):
        if module.startswith(prefix):
            value = blocks.get(key, 1.0)
            return float(value[int(module.split(".")[1])] if isinstance(value, list) else value)
    if module.startswith("mid_block."):
        return float(blocks.get("mid", 1.0))
    return 1.0


def _apply_block_weights(pipe, adapter_name: str, weight: float, blocks: dict):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for module_name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
                module.set_scale(adapter_name, weight * block_scale(component, module_name, blocks, pipe.unet.config))


# -- the composer ---------------------------------------------------------------------------------------------------


class Composer:
    """A loaded base and the LoRAs put on it; `set` switches the active ones and their weights without a reload."""

    def __init__(self, pipe, registry=None):
        self.pipe, self.registry = pipe, registry
        self.loaded: dict[str, str] = {}  # resolved file -> adapter name inside the pipeline
        self.active: list[AdapterUse] = []
        self.fused = False
        self._kept: list = []  # (layer, its base weight) while fused
        self.embeddings: dict[str, str] = {}  # resolved embedding file -> the token a prompt calls it by

    def _load(self, use: AdapterUse) -> str:
        path = resolve_adapter(use.ref, self.registry)
        key = str(path.resolve())
        if key not in self.loaded:
            from sdtune.adapters.sampling import load_lora_file

            name = f"adapter{len(self.loaded)}"
            load_lora_file(self.pipe, path, name)
            self.loaded[key] = name
        return self.loaded[key]

    def set(self, adapters: list[AdapterUse]) -> Composer:
        """Makes exactly `adapters` active at their weights (loading any not yet loaded); [] gives the plain base."""
        was_fused = self.fused
        if was_fused:
            self.unfuse()
        for use in adapters:
            if use.blocks is not None:
                check_blocks(use.blocks, self.pipe.unet.config)
        names = [self._load(use) for use in adapters]
        if len(set(names)) != len(names):
            raise ComposeError("adapters: the same adapter is listed twice; give it one weight")
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, [use.weight for use in adapters])
            for name, use in zip(names, adapters):
                if use.blocks:
                    _apply_block_weights(self.pipe, name, use.weight, use.blocks)
        elif self.loaded:
            self.pipe.disable_lora()
        self.active = list(adapters)
        if was_fused:
            self.fuse()
        return self

    def _active_names(self) -> list[str]:
        return [self.loaded[str(resolve_adapter(u.ref, self.registry).resolve())] for u in self.active]

    def fuse(self) -> Composer:
        """Merges the active LoRAs, at their current (block) weights, into the base weights: a step then costs what
        the base costs. The adapted layers' base weights are kept first, so `unfuse` restores them bit for bit
        (subtracting the merged change back, as peft's unmerge does, leaves float rounding that adds up)."""
        if self.active and not self.fused:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._kept = [
                (module.get_base_layer(), module.get_base_layer().weight.data.clone())
                for component in (self.pipe.unet, self.pipe.text_encoder)
                for module in component.modules()
                if isinstance(module, BaseTunerLayer)
            ]
            self.pipe.fuse_lora(
                components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=self._active_names()
            )
            self.fused = True
        return self

    def unfuse(self) -> Composer:
        if self.fused:
            self.pipe.unfuse_lora(components=["unet", "text_encoder"])  # peft's bookkeeping: layers not merged
            for layer, weight in self._kept:
                layer.weight.data.copy_(weight)
            self._kept, self.fused = [], False
        return self

    def lora_label(self) -> str:
        """`name:weight, ...` of the active adapters, for PNG parameters and grid titles."""
        return ", ".join(f"{Path(u.ref).name}:{u.weight:g}" for u in self.active)

    def set_embeddings(self, refs: list[str]) -> Composer:
        """Makes exactly the embeddings `refs` loaded, each under its own token (a diffusers file's key, an A1111
        file's name), which a prompt then uses; an embedding has no weight (A1111 has none either)."""
        from sdtune.adapters.embeddings import load_embedding, unload_embedding

        wanted = [str(resolve_embedding(ref, self.registry).resolve()) for ref in refs]
        for key in [k for k in self.embeddings if k not in wanted]:
            unload_embedding(self.pipe, self.embeddings.pop(key))
        for key in wanted:
            if key not in self.embeddings:
                self.embeddings[key] = load_embedding(self.pipe, key)
        return self


def build(spec: PipelineSpec, registry=None) -> Composer:
    """Loads the base of `spec`, puts its adapters on it at their weights, fuses if asked: ready to sample.

    Raises:
        ComposeError: an adapter that cannot be found or used, or bad block weights.
        sdtune.adapters.base.BaseLoadError: the base cannot be loaded.
    """
    import torch

    from sdtune.adapters.base import load_pipeline

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = spec.dtype or ("fp16" if device == "cuda" else "fp32")
    if dtype not in dtypes:
        raise ComposeError(f"dtype: {dtype!r} is not one of {', '.join(dtypes)}")
    for use in spec.adapters:
        resolve_adapter(use.ref, registry)  # every name is checked before the base loads
    for ref in spec.embeddings:
        resolve_embedding(ref, registry)
    pipe = load_pipeline(resolve_base_ref(spec.base, registry), torch_dtype=dtypes[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    composer = Composer(pipe, registry).set(spec.adapters).set_embeddings(spec.embeddings)
    if spec.fuse:
        composer.fuse()
    if spec.controlnets:  # a ControlNet pipeline over the same components: the LoRAs set above stay in effect
        from sdtune.adapters.sampling import load_controlnets

        composer.pipe = load_controlnets(composer.pipe, spec.controlnets)
    return composer


def resolve_embedding(ref: str, registry=None) -> Path:
    """The embedding file a reference means: a file, a textual-inversion run folder's `learned_embeds.safetensors`,
    or the embedding of a registered adapter (a textual inversion, or a pivotal-tuning LoRA)."""
    from sdtune.adapters.embeddings import DIFFUSERS_FILE

    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            raise ComposeError(f"--embedding {ref}: folder without {DIFFUSERS_FILE} (expected a run folder or a file)")
        return path / DIFFUSERS_FILE
    listing = "sdtune adapters list --method textual_inversion"
    registry, manifest = registered(ref, registry, "--embedding", "an embedding file", listing)
    if "embedding" not in manifest.files:
        raise ComposeError(f"--embedding {ref}: the registered {manifest.method} {ref!r} holds no embedding")
    return registry.file(ref, "embedding")


__all__ = [
    "AdapterUse",
    "ComposeError",
    "Composer",
    "PipelineSpec",
    "block_scale",
    "build",
    "check_blocks",
    "lbw_length",
    "resolve_adapter",
    "resolve_base_ref",
    "resolve_controlnet",
    "resolve_embedding",
]
