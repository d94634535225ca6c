"""Merging LoRAs into a new LoRA, resizing a LoRA's rank, and baking LoRAs into a full model.

Each LoRA module adds delta_i = s_i * up_i @ down_i (s_i = alpha_i / rank_i). With weights w_i:

    linear   down = sum sign(w_i) c_i down_i, up = sum c_i up_i, c_i = sqrt(|w_i| s_i / s)  (same ranks; peft's
             `add_weighted_adapter(combination_type="linear")`, sd-scripts' merge_lora). Exact for one parent; for
             several, cross terms up_i @ down_j appear: the merge is a blend, not a sum.
    concat   down = [down_1; down_2; ...], up = [w_1 s_1 up_1, w_2 s_2 up_2, ...], alpha = rank = sum of ranks:
             exactly sum w_i delta_i, at the cost of rank (peft's `cat`, sd-scripts merge_lora --concat).
    svd      sum w_i delta_i, then its best rank-r approximation (`lowrank.factorize`), alpha = r: sd-scripts'
             svd_merge_lora (a separate rank for convs with a kernel, `conv_rank`), without its 0.99-quantile clamp
             of the factors, so the result is the optimal rank-r one.
    resize   one LoRA's modules refactorized at a lower rank; with a dynamic method the rank is chosen per module
             from its singular values (sd-scripts' resize_lora: sv_ratio, sv_fro, sv_cumulative), alpha keeps the
             scale (alpha' = s * rank').
    to-lora  a LyCORIS LoHa/LoKr's updates ((A1 B1) * (A2 B2), kron(W1, W2): no LoRA factors to add up) turned into a
             LoRA of rank r by SVD, the kept share of the norm reported (`lycoris_to_lora_into_registry`).

Which apply to a LoHa/LoKr: bake (adapters load as the LoRA of the same update, adapters/lycoris.py). linear,
concat, svd and resize take LoRAs: a LoHa/LoKr parent is refused in one line that says to run to-lora first.

Every result is written in both formats, passes the export check (`export_check.check_lora_files`: both files,
reloaded through diffusers, render what the arithmetic says within 2/255, and every kohya key maps in A1111 and
ComfyUI) and is registered with its parents, weights and method in its manifest.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sdtune.adapters import lowrank
from sdtune.adapters.atomic import atomic_folder
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.lora_files import LoraFileError, lora_header, read_lora
from sdtune.adapters.lora_modules import LoraModule, LoraModules

MERGE_METHODS = ("linear", "concat", "svd")


class MergeError(SdtuneError, ValueError):
    """Parents that cannot be merged this way (ranks differ for linear, nothing in common...); one line."""


def load_modules(ref: str, registry=None) -> LoraModules:
    """The modules of a LoRA given by registry name, run folder or file (either format)."""
    return load_lora(ref, registry)[0]


def load_lora(ref: str, registry=None, option: str = "parent") -> tuple[LoraModules, dict[str, str]]:
    """The modules of a LoRA given by registry name, run folder or file, and the kohya header that says its facts
    (resolution, prediction type, base), which a merge or resize inherits ({} when none says them)."""
    from sdtune.adapters.compose import resolve_adapter

    path = resolve_adapter(ref, registry, option)
    try:
        modules, header = read_lora(path)
    except LoraFileError as exc:  # a LoHa/LoKr says how to make it a LoRA (merges add LoRA factors, not theirs)
        raise MergeError(f"{ref}: {exc}" + ("" if "to-lora" in str(exc) else " to merge")) from None
    return modules, lora_header(path, header)


def _check_weights(parents: Sequence[LoraModules], weights: Sequence[float]) -> None:
    if len(parents) != len(weights) or not parents:
        raise MergeError(f"give one weight per parent: {len(parents)} parents, {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights {list(weights)}: each must be a finite number")


def merge_linear(parents: Sequence[LoraModules], weights: Sequence[float]) -> LoraModules:
    _check_weights(parents, weights)
    merged = {}
    for name in sorted(set().union(*parents)):
        present = [(p[name], w) for p, w in zip(parents, weights) if name in p]
        ranks = {m.rank for m, _ in present}
        if len(ranks) > 1:
            raise MergeError(f"linear merge needs equal ranks; {name} has ranks {sorted(ranks)} (use concat or svd)")
        rank = ranks.pop()
        first = present[0][0]
        down = torch.zeros_like(first.down, dtype=torch.float32)
        up = torch.zeros_like(first.up, dtype=torch.float32)
        for module, weight in present:
            c = math.sqrt(abs(weight) * module.scale)  # the merged module's own scale is alpha/rank = 1
            down += math.copysign(c, weight) * module.down.float()
            up += c * module.up.float()
        merged[name] = LoraModule(down, up, float(rank))
    return merged


def merge_concat(parents: Sequence[LoraModules], weights: Sequence[float]) -> LoraModules:
    _check_weights(parents, weights)
    merged = {}
    for name in sorted(set().union(*parents)):
        present = [(p[name], w) for p, w in zip(parents, weights) if name in p]
        # split each parent's factor w_i * s_i as sqrt between up and down, so fp16 storage keeps both in range
        roots = [math.sqrt(abs(w) * m.scale) for m, w in present]
        down = torch.cat([math.copysign(c, w) * m.down.float() for (m, w), c in zip(present, roots)], dim=0)
        up = torch.cat([c * m.up.float() for (m, _), c in zip(present, roots)], dim=1)
        merged[name] = LoraModule(down, up, float(down.shape[0]))
    return merged


def merge_svd(
    parents: Sequence[LoraModules], weights: Sequence[float], rank: int, conv_rank: int | None = None
) -> LoraModules:
    _check_weights(parents, weights)
    merged = {}
    for name in sorted(set().union(*parents)):
        present = [(p[name], w) for p, w in zip(parents, weights) if name in p]
        delta = sum(w * m.delta() for m, w in present)
        is_conv = delta.dim() == 4 and delta.shape[-1] > 1
        target = (conv_rank or rank) if is_conv else rank
        up, down = lowrank.factorize(delta, target)
        merged[name] = LoraModule(down, up, float(down.shape[0]))
    return merged


def resize(
    modules: LoraModules, max_rank: int, dynamic: str | None = None, param: float | None = None
) -> tuple[LoraModules, dict]:
    """Refactorizes every module at `max_rank`, or at the rank `lowrank.dynamic_rank` picks (never above max_rank).

    Returns:
        the resized modules, and stats: the mean and minimum share of each module's Frobenius norm kept, and ranks.
    """
    resized, kept = {}, []
    for name, module in sorted(modules.items()):
        product = module.delta() / module.scale  # sd-scripts factorizes up @ down and keeps the scale in alpha
        s = lowrank.singular_values(product)
        rank = min(max_rank, module.rank) if dynamic is None else lowrank.dynamic_rank(s, dynamic, param, max_rank)
        up, down = lowrank.factorize(product, rank)
        resized[name] = LoraModule(down, up, module.scale * down.shape[0])
        kept.append(lowrank.kept_share(s, down.shape[0]))
    ranks = [m.rank for m in resized.values()]
    stats = {
        "mean_fro_kept": round(sum(kept) / len(kept), 4),
        "min_fro_kept": round(min(kept), 4),
        "ranks": {"min": min(ranks), "max": max(ranks), "mean": round(sum(ranks) / len(ranks), 2)},
    }
    return resized, stats


# -- writing, checking and registering ----------------------------------------------------------------------------


def register_lora(
    name: str,
    modules: LoraModules,
    *,
    base: str,
    origin: dict,
    prompt: str,
    registry=None,
    dtype: torch.dtype = torch.float16,
    tags: Sequence[str] = (),
    parents: Sequence[Mapping[str, str]] = (),
):
    """Writes `modules` in both formats, runs the export check on a fresh base, and registers the result. The kohya
    file's facts (resolution, prediction type, base) are its `parents`' (their kohya headers), else `base`'s.

    Raises:
        ExportCheckError: a file does not render what the arithmetic says (nothing is registered then).
    """
    from sdtune.adapters import sampling
    from sdtune.adapters.base import load_pipeline, recommended_guidance, resolve_base
    from sdtune.adapters.export_check import ExportCheckError, check_lora_files
    from sdtune.adapters.file_metadata import facts_of_base, inherited_facts
    from sdtune.adapters.lora_files import save_modules, summary_facts
    from sdtune.adapters.lora_modules import base_shapes, module_table
    from sdtune.adapters.registry import Registry, check_name

    registry = registry or Registry()
    check_name(name)
    source = resolve_base(base)
    pipe = load_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    table = module_table(*base_shapes(pipe))
    settings = sampling.SampleSettings(prompt=prompt, seed=0, guidance=recommended_guidance(base))

    model, made_on = inherited_facts(parents, *facts_of_base(base, name))
    trigger_words = origin.pop("trigger_words", [])
    model = replace(model, trigger_words=tuple(trigger_words))
    facts = summary_facts(modules, model, made_on, {"ss_merge": origin.get("merge_method", "")})

    def fill(staging: Path):
        files = save_modules(staging, name, modules, table, facts, dtype)
        report = check_lora_files(pipe, files, modules, table, settings, staging, dtype)
        if not report.ok:
            raise ExportCheckError(f"{name}: {report.summary()}")
        return _made_lora_manifest(name, base, source.kind, modules, files, report, trigger_words, origin)

    return registry.add(name, fill, tags=tags)


def _made_lora_manifest(name, base, base_kind, modules: LoraModules, files, report, trigger_words, origin):
    """The `AdapterManifest` of a LoRA made from others (merged or resized): no training run behind it, its
    module ranks as its training facts, its export check's strip as its preview."""
    from sdtune.adapters.base import base_hash
    from sdtune.adapters.manifest import AdapterManifest, BaseRef

    ranks = sorted({m.rank for m in modules.values()})
    return AdapterManifest(
        name=name,
        method="lora",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        base=BaseRef(base, base_kind, base_hash(base)),
        trigger_words=trigger_words,
        dataset={},
        training={"modules": len(modules), "ranks": ranks},
        files={fmt: Path(p).name for fmt, p in files.items()},
        samples={"export_check": report.images["strip"]} if report.images.get("strip") else {},  # its preview
        scores=None,
        export_check={**report.__dict__, "ok": report.ok},
        recipe={},
        origin=origin,
    )


def merge_into_registry(
    name: str,
    parents: Sequence[str],
    weights: Sequence[float],
    method: str,
    *,
    base: str = "toy",
    rank: int | None = None,
    conv_rank: int | None = None,
    prompt: str = "a photo",
    registry=None,
):
    """Merges registered (or file) LoRAs by `method` into a new registered LoRA; its manifest names the parents."""
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method {method!r}: choose {', '.join(MERGE_METHODS)}")
    if method == "svd" and not rank:
        raise MergeError("svd merge needs a target rank (--rank)")
    pairs = [load_lora(p, registry) for p in parents]
    loaded, headers = [modules for modules, _ in pairs], [header for _, header in pairs]
    if method == "linear":
        modules = merge_linear(loaded, weights)
    elif method == "concat":
        modules = merge_concat(loaded, weights)
    else:
        modules = merge_svd(loaded, weights, rank, conv_rank)
    origin = {
        "kind": "merged",
        "merge_method": method,
        "parents": list(parents),
        "weights": list(weights),
        "params": {"rank": rank, "conv_rank": conv_rank} if method == "svd" else {},
        "trigger_words": _parent_triggers(parents, registry),
    }
    return register_lora(name, modules, base=base, origin=origin, prompt=prompt, registry=registry, parents=headers)


def resize_into_registry(
    name: str,
    parent: str,
    max_rank: int,
    *,
    dynamic: str | None = None,
    param: float | None = None,
    base: str = "toy",
    prompt: str = "a photo",
    registry=None,
):
    """Resizes a LoRA (sd-scripts resize_lora semantics) into a new registered LoRA."""
    loaded, header = load_lora(parent, registry)
    try:
        modules, stats = resize(loaded, max_rank, dynamic, param)
    except MergeError:
        raise
    except ValueError as exc:  # lowrank's checks of the rank and the dynamic method, as one line
        raise MergeError(f"resize {parent}: {exc}") from None
    origin = {
        "kind": "merged",
        "merge_method": "resize",
        "parents": [parent],
        "weights": [1.0],
        "params": {"max_rank": max_rank, "dynamic": dynamic, "param": param, **stats},
        "trigger_words": _parent_triggers([parent], registry),
    }
    return register_lora(name, modules, base=base, origin=origin, prompt=prompt, registry=registry, parents=[header])


def lycoris_to_lora_into_registry(
    name: str, parent: str, rank: int, *, base: str = "toy", prompt: str = "a photo", registry=None
):
    """A LoHa/LoKr (registry name, run folder or file) as a new registered LoRA of rank `rank`: each module's update
    truncated by SVD, as sd-scripts' extract tools do, so every LoRA merge and every LoRA tool takes it. Its
    origin's params say the share of the update's norm kept (`fro_kept`, over all modules; `mean_fro_kept`)."""
    from sdtune.adapters import lycoris
    from sdtune.adapters.compose import resolve_adapter
    from sdtune.adapters.importer import _base_table
    from sdtune.adapters.lora_files import lora_header

    path = resolve_adapter(parent, registry, "parent")
    if not lycoris.is_lycoris_file(path):
        raise MergeError(f"to-lora {parent}: not a LyCORIS LoHa/LoKr file ({path.name}); a LoRA is one already")
    modules, table = lycoris.read_file(path), _base_table(base)
    missing = sorted(set(modules) - set(table))
    if missing:
        raise MergeError(f"to-lora {parent}: {len(missing)} modules are not layers of {base}, e.g. {missing[0]}")
    converted = lycoris.to_lora(modules, table, rank)
    kept = list(converted.kept.values())
    origin = {
        "kind": "merged",
        "merge_method": "to-lora",
        "parents": [parent],
        "weights": [1.0],
        "params": {"rank": rank, "fro_kept": converted.kept_overall, "mean_fro_kept": sum(kept) / len(kept)},
        "trigger_words": _parent_triggers([parent], registry),
    }
    return register_lora(
        name,
        converted.modules,
        base=base,
        origin=origin,
        prompt=prompt,
        registry=registry,
        parents=[lora_header(path)],
    )


def _parent_triggers(parents: Sequence[str], registry) -> list[str]:
    from sdtune.adapters.registry import Registry

    registry = registry or Registry()
    words = []
    for parent in parents:
        if parent in registry:
            words += [w for w in registry.manifest(parent).trigger_words if w not in words]
    return words


# -- baking ---------------------------------------------------------------------------------------------------------


def bake(base: str, adapters: list, out_folder: str | Path, single_file: str | Path | None = None) -> list[Path]:
    """Base + LoRAs at their weights -> a full model: a diffusers folder, and optionally a single-file checkpoint.

    Args:
        adapters: `compose.AdapterUse` items (registry names or paths, weights, block weights).
        single_file: also write the original-layout `.safetensors` checkpoint A1111/ComfyUI load.
    """
    from sdtune.adapters.base import DEFAULT_GUIDANCE, recommended_guidance
    from sdtune.adapters.compose import PipelineSpec, build, resolve_base_ref
    from sdtune.adapters.single_file import convert

    out_folder = Path(out_folder)
    if out_folder.exists():
        raise MergeError(f"bake: {out_folder} exists; choose a new folder")
    blocked = next((p for p in out_folder.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise MergeError(f"bake: {blocked} is a file, not a folder; choose another place for {out_folder.name}")
    composer = build(PipelineSpec(base=base, adapters=adapters, device="cpu", dtype="fp32", fuse=True))
    pipe = composer.pipe
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers: a plain model to save
    with atomic_folder(out_folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        guidance = recommended_guidance(resolve_base_ref(base))
        if guidance != DEFAULT_GUIDANCE:  # the base's own sampling advice holds for the baked model too (toy: 3.0)
            (tmp / "sdtune.json").write_text(json.dumps({"guidance_scale": guidance}, indent=2) + "\n")
    written = [out_folder]
    if single_file is not None:
        written.append(Path(convert(out_folder, Path(single_file))))
    return written


__all__ = [
    "MERGE_METHODS",
    "MergeError",
    "bake",
    "load_lora",
    "load_modules",
    "lycoris_to_lora_into_registry",
    "merge_concat",
    "merge_into_registry",
    "merge_linear",
    "merge_svd",
    "register_lora",
    "resize",
    "resize_into_registry",
]
