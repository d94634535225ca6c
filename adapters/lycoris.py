"""LyCORIS LoHa and LoKr files: the key map, the delta math of the tools that load them, and their peft form.

The single file (LyCORIS's `lycoris.kohya` network module, what sd-scripts trains with `--network_module
lycoris.kohya`) names each adapted module as a kohya LoRA does (`lora_unet_<diffusers path, "." -> "_">`,
`lora_te_text_model_<path>`), so A1111's and ComfyUI's key maps (adapters/a1111_keys.py) apply unchanged; only the
tensors behind the name differ:

    LoHa  <name>.hada_w1_a [out, r]   <name>.hada_w1_b [r, in*kh*kw]   <name>.hada_w2_a / .hada_w2_b (same)   .alpha
          a conv in Tucker form adds .hada_t1 / .hada_t2 [r, r, kh, kw]; its w1_a/w2_a are then [r, out], w1_b/w2_b
          [r, in]
    LoKr  <name>.lokr_w1 [a, c]   or  .lokr_w1_a [a, r] + .lokr_w1_b [r, c]
          <name>.lokr_w2 [b, d] (a conv: [b, d, kh, kw])   or  .lokr_w2_a [b, r] + .lokr_w2_b [r, d*kh*kw]   .alpha
          (Tucker: .lokr_t2 [r, r, kh, kw] with .lokr_w2_a [r, b], .lokr_w2_b [r, d]); out = a*b, in = c*d

The weight change every loader adds (A1111's network_hada.py / network_lokr.py / network.py, ComfyUI's
weight adapters), reshaped to the layer's weight:

    LoHa  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r               r = hada_w1_b.shape[0]
    LoKr  dW = kron(w1, w2) * alpha / r                                 w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, ...

with LoKr's r the inner width of a decomposed factor (lokr_w1_b's, else lokr_w2_b's). A LoKr module whose two
factors are both full matrices has no r, and the loaders scale it by 1 whatever its alpha says. peft's LoHa/LoKr
compute the same products but always scale by alpha / r, so on export peft's scale is folded into lokr_w1 for such
a module (`peft_to_lycoris`), and the file loads at the strength it trained at.

The peft side (peft's adapter folders) is adapters/lycoris_peft.py. Inside sdtune a LoHa/LoKr file loads as the
LoRA that makes exactly its update (`exact_lora`, `load_as_lora`), so stacking, block weights, fusing, baking and
A/B are the LoRA's; `to_lora` truncates it to a rank by SVD for the merges, which add LoRA factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters import kohya
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.manifest import LYCORIS_KINDS

LABELS = LYCORIS_KINDS
ALGOS = tuple(LABELS)
PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
NETWORK_MODULE = "lycoris.kohya"  # ss_network_module of a LyCORIS file, as sd-scripts writes it
# LyCORIS's `preset` for each of sdtune's layer presets (the `preset` network arg in ss_network_args)
LYCORIS_PRESETS = {"attn": "attn-only", "attn+ff": "attn-mlp", "locon": "full"}


class LycorisError(SdtuneError, ValueError):
    """A LyCORIS file or tensors that cannot be read or written as LoHa/LoKr; one line naming the module."""


# -- which LyCORIS algorithm a file holds ------------------------------------------------------------------------


def algo_of(keys) -> str | None:
    """ "loha" or "lokr" from a file's tensor names, or None."""
    for algo, parts in PARTS.items():
        if any(key.rsplit(".", 1)[-1] in parts for key in keys):
            return algo
    return None


def unsupported_algo(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The LyCORIS algorithm of a file sdtune does not load (IA3, OFT, BOFT, GLoRA, full, norm), named by its keys, or
    None. (LyCORIS's DyLoRA saves plain `lora_down`/`lora_up` keys: it loads as a LoRA.)"""
    suffixes = {key.rsplit(".", 1)[-1]: key for key in tensors}
    if "on_input" in suffixes:
        return "IA3 (weight/on_input keys)"
    if "oft_blocks" in suffixes:
        blocks = tensors[suffixes["oft_blocks"]]
        return "BOFT (4-d oft_blocks keys)" if blocks.dim() == 4 else "OFT (oft_blocks keys)"
    if "oft_diag" in suffixes:
        return "OFT (oft_diag keys)"
    if any(key.endswith((".a1.weight", ".b1.weight")) for key in tensors):
        return "GLoRA (a1/a2/b1/b2 keys)"
    if "diff" in suffixes or "diff_b" in suffixes:
        return "full fine-tune difference (diff keys)"
    if "w_norm" in suffixes or "b_norm" in suffixes:
        return "norm layers (w_norm/b_norm keys)"
    return None


# -- one module and its weight change --------------------------------------------------------------------------------


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """A Tucker-form conv factor: the core t [r, r, kh, kw] times w_a [r, out] on its first mode and w_b [r, in] on
    its second -> [out, in, kh, kw]."""
    return torch.einsum("abhw,ao,bi->oihw", t, w_a, w_b)


@dataclass
class LycorisModule:
    """One adapted layer of a LoHa or LoKr file: its tensors by part name (`hada_w1_a`...), and its alpha (None: the
    file has none, the scale is 1)."""

    algo: str
    weights: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        """The r the loaders divide alpha by: LoHa's w1_b rows; LoKr's decomposed factor's inner width, or None."""
        w = self.weights
        if self.algo == "loha":
            return w["hada_w1_b"].shape[0]
        for part in ("lokr_w1_b", "lokr_w2_b"):
            if part in w:
                return w[part].shape[0]
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank is not None else 1.0

    def to(self, dtype: torch.dtype) -> LycorisModule:
        return LycorisModule(self.algo, {k: v.to(dtype) for k, v in self.weights.items()}, self.alpha)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors in float32: LoHa's (w1_a @ w1_b, w2_a @ w2_b), LoKr's (w1, w2)."""
        w = {k: v.float() for k, v in self.weights.items()}
        if self.algo == "loha":
            if "hada_t1" in w:
                return _tucker(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]), _tucker(
                    w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"]
                )
            return w["hada_w1_a"] @ w["hada_w1_b"], w["hada_w2_a"] @ w["hada_w2_b"]
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = _tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        return w1, w2

    def delta(self) -> torch.Tensor:
        """The weight change, float32: [out, in*kh*kw] or [out, in, kh, kw]; reshape it to the layer's weight."""
        w1, w2 = self.factors()
        if self.algo == "loha":
            return w1 * w2 * self.scale
        if w2.dim() == 4:  # kron of a matrix with a conv kernel: the matrix gets 1x1 spatial dims
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2) * self.scale

    def flat_shape(self) -> tuple[int, int]:
        """(out, in*kh*kw) of the weight change, from the shapes alone (no product is computed)."""
        w = self.weights
        if self.algo == "loha":
            if "hada_t1" in w:
                t = w["hada_t1"]
                return w["hada_w1_a"].shape[1], w["hada_w1_b"].shape[1] * t.shape[2] * t.shape[3]
            return w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]
        w1 = (w["lokr_w1"].shape) if "lokr_w1" in w else (w["lokr_w1_a"].shape[0], w["lokr_w1_b"].shape[1])
        if "lokr_w2" in w:
            w2 = (w["lokr_w2"].shape[0], math.prod(w["lokr_w2"].shape[1:]))
        elif "lokr_t2" in w:
            t = w["lokr_t2"]
            w2 = (w["lokr_w2_a"].shape[1], w["lokr_w2_b"].shape[1] * t.shape[2] * t.shape[3])
        else:
            w2 = (w["lokr_w2_a"].shape[0], w["lokr_w2_b"].shape[1])
        return w1[0] * w2[0], w1[1] * w2[1]

    def parameters(self) -> int:
        return sum(v.numel() for v in self.weights.values())


LycorisModules = dict[str, LycorisModule]


def shape_problem(module: LycorisModule, base) -> str | None:
    """Why a module does not fit its base layer (`lora_modules.BaseModule`), or None."""
    out, flat = module.flat_shape()
    if out != base.shape[0] or flat != math.prod(base.shape[1:]):
        return f"{module.algo} update [{out}, {flat}] does not fit the base weight {tuple(base.shape)}"
    return None


def describe(modules: LycorisModules) -> str:
    """ "LyCORIS LoHa", "LyCORIS LoKr (conv layers too)"...: the kind of a file, as an import report says it."""
    algo = next(iter(modules.values())).algo
    conv = any(name.endswith(("_conv", "_conv1", "_conv2", "_conv_shortcut")) for name in modules)
    return f"LyCORIS {LABELS[algo]}" + (" (conv layers too)" if conv else "")


# -- reading a file --------------------------------------------------------------------------------------------------


def read_modules(tensors: Mapping[str, torch.Tensor]) -> LycorisModules:
    """A LoHa/LoKr file's tensors -> {kohya module name: LycorisModule}. `lora_te1_` is read as `lora_te_`, as for a
    LoRA (adapters/lora_modules.read_kohya).

    Raises:
        LycorisError: a key that is neither a LoHa/LoKr part nor `.alpha`, two algorithms in one file, or a module
            missing a factor.
    """
    algo = algo_of(tensors)
    if algo is None:
        raise LycorisError("no hada_* or lokr_* keys: not a LoHa or LoKr file")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.rpartition(".")
        if part not in (*PARTS[algo], "alpha"):
            other = algo_of([key])
            what = f"a {other} key in a {algo} file" if other else f"expected <module>.{PARTS[algo][0]}... or .alpha"
            raise LycorisError(f"LyCORIS key {key!r}: {what}")
        if module.startswith("lora_te1_") and not any(k.startswith("lora_te2_") for k in tensors):
            module = "lora_te_" + module.removeprefix("lora_te1_")
        grouped.setdefault(module, {})[part] = tensor
    modules = {}
    for name, parts in grouped.items():
        alpha = parts.pop("alpha", None)
        _check_parts(name, algo, parts)
        modules[name] = LycorisModule(algo, parts, None if alpha is None else float(alpha.float().item()))
    return modules


def _check_parts(name: str, algo: str, parts: Mapping[str, torch.Tensor]):
    if algo == "loha":
        needed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (["hada_t2"] if "hada_t1" in parts else [])
        missing = [part for part in needed if part not in parts]
    else:
        one = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)
        two = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
        missing = [
            side for side, ok in (("lokr_w1 (or lokr_w1_a + _b)", one), ("lokr_w2 (or _a + _b)", two)) if not ok
        ]
    if missing:
        raise LycorisError(f"{algo} module {name!r} has no {', '.join(missing)}")


def read_file(path: str | Path) -> LycorisModules:
    import safetensors.torch

    return read_modules(safetensors.torch.load_file(str(path)))


def file_of_run(folder: str | Path) -> Path | None:
    """The LyCORIS single file of a LoHa/LoKr run or registry folder (its adapter.json's kohya file), or of a run's
    checkpoint folder (no adapter.json: its one LyCORIS file), or None."""
    from sdtune.adapters.manifest import ManifestError, read_manifest

    folder = Path(folder)
    if not (folder / "adapter.json").is_file():
        found = [p for p in sorted(folder.glob("*.safetensors")) if is_lycoris_file(p)]
        return found[0] if len(found) == 1 else None
    try:
        kohya_file = folder / read_manifest(folder).files["kohya"]
    except (ManifestError, KeyError, OSError):
        return None
    return kohya_file if is_lycoris_file(kohya_file) else None


def is_lycoris_file(path: str | Path) -> bool:
    """True for a `.safetensors` file whose tensor names are LoHa/LoKr's (read from the header only)."""
    import safetensors

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            return algo_of(handle.keys()) is not None
    except Exception:  # not a safetensors file at all: not ours to judge here
        return False


# -- peft (trained) -> the LyCORIS file ------------------------------------------------------------------------------


def config_algo(config) -> str:
    """ "lora", "loha" or "lokr" of a peft config (or its to_dict())."""
    peft_type = config.get("peft_type") if isinstance(config, Mapping) else config.peft_type
    return {"LOHA": "loha", "LOKR": "lokr"}.get(str(getattr(peft_type, "value", peft_type)), "lora")


def _group(state_dict: Mapping[str, torch.Tensor], algo: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, _, part = key.rpartition(".")
        if part not in PARTS[algo]:
            raise LycorisError(f"{algo} key {key!r}: expected <module>.{'/'.join(PARTS[algo][:4])}... (peft names)")
        modules.setdefault(module, {})[part] = tensor.detach()
    return modules


def peft_to_lycoris(
    unet: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor] | None,
    unet_config,
    text_encoder_config=None,
) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr state dicts (`get_peft_model_state_dict`: `<module>.hada_w1_a`...) and their configs -> the
    LyCORIS file's tensors (`lora_unet_<module>.hada_w1_a`..., `.alpha`), loading at peft's scale in every tool.

    The configs' r and alpha are the run's (sdtune sets no rank or alpha patterns for LoHa/LoKr)."""
    out: dict[str, torch.Tensor] = {}
    parts = [(unet, unet_config, kohya.UNET_PREFIX, str)]
    if text_encoder:
        parts.append((text_encoder, text_encoder_config, kohya.TEXT_ENCODER_PREFIX, kohya._with_text_model))
    for state_dict, config, prefix, rename in parts:
        algo = config_algo(config)
        for module, tensors in _group(state_dict, algo).items():
            name = prefix + rename(module).replace(".", "_")
            alpha, r = float(config.alpha), int(config.r)
            if algo == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
                # both factors whole: the loaders scale by 1, peft by alpha / r; fold peft's into w1
                tensors = {**tensors, "lokr_w1": tensors["lokr_w1"].float() * (alpha / r)}
                alpha = float(r)
            for part, tensor in tensors.items():
                out[f"{name}.{part}"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def network_args(params) -> dict[str, object]:
    """`ss_network_args` of a LoHa/LoKr trained with the recipe's `method`, as LyCORIS's network args name them."""
    args: dict[str, object] = {"algo": params.algo, "preset": LYCORIS_PRESETS.get(params.preset, "full")}
    if params.preset == "locon" or params.target_modules:
        args |= {"conv_dim": params.rank, "conv_alpha": params.alpha}
    if params.algo == "lokr":
        args |= {"factor": params.factor, "decompose_both": params.decompose_both}
    return args


# -- as a LoRA: exactly, or truncated by SVD -----------------------------------------------------------------------


def exact_lora(module: LycorisModule, base_shape: tuple[int, ...]):
    """The LoRA module (adapters/lora_modules.LoraModule, alpha = rank) whose update equals this module's exactly, so
    that stacking, per-block weights, fusing and A/B run through the LoRA machinery.

    No SVD: LoHa's Hadamard product of two rank-r products is the product of their row-wise Khatri-Rao factors (rank
    r^2); LoKr's Kronecker product of two factorizations is the factorization of the Kronecker products (rank
    r1*r2). When that rank exceeds min(out, in), the update itself is the down (or up) factor, with an identity
    beside it."""
    from sdtune.adapters.lora_modules import LoraModule

    w = {k: v.float() for k, v in module.weights.items()}
    out, flat = base_shape[0], math.prod(base_shape[1:])
    up = down = None
    if module.algo == "loha" and "hada_t1" not in w:
        a1, b1, a2, b2 = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        up = (a1[:, :, None] * a2[:, None, :]).reshape(out, -1)  # up[o, (i, j)] = a1[o, i] a2[o, j]
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, flat)  # down[(i, j), c] = b1[i, c] b2[j, c]
    elif module.algo == "lokr" and "lokr_t2" not in w:
        (l1, r1), (l2, r2) = _sides(w, "1"), _sides(w, "2")
        up, down = torch.kron(l1, l2), torch.kron(r1, r2)
    if up is None or up.shape[1] > min(out, flat):
        delta = module.delta().reshape(out, flat)
        up, down = (torch.eye(out), delta) if out <= flat else (delta, torch.eye(flat))
    else:
        up = up * module.scale
    rank = up.shape[1]
    if len(base_shape) == 4:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *base_shape[1:])
    return LoraModule(down.contiguous(), up.contiguous(), float(rank))


def _sides(w: Mapping[str, torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as (left, right) with left @ right = the factor (a conv's w2 flattened to [b, d*kh*kw]): its
    own decomposition, or the whole matrix beside an identity, on the side that keeps the inner width smallest."""
    if f"lokr_w{side}_a" in w:
        return w[f"lokr_w{side}_a"], w[f"lokr_w{side}_b"]
    whole = w[f"lokr_w{side}"].flatten(1)
    rows, cols = whole.shape
    return (torch.eye(rows), whole) if rows <= cols else (whole, torch.eye(cols))


def exact_loras(modules: LycorisModules, table) -> dict:
    """`exact_lora` of every module, by kohya name (`table`: lora_modules.module_table of the base)."""
    return {name: exact_lora(module, table[name].shape) for name, module in modules.items()}


def pipe_table(pipe) -> dict:
    """`lora_modules.module_table` of a loaded pipeline, adapters already in it or not (peft's wrappers renamed back
    to the plain layer names, their own tensors left out)."""
    from sdtune.adapters.lora_modules import module_table

    def shapes(model):
        return {
            k.replace(".base_layer.", "."): tuple(v.shape)
            for k, v in model.state_dict().items()
            if ".lora_" not in k and not any(f".{part}." in k for parts in PARTS.values() for part in parts)
        }

    return module_table(shapes(pipe.unet), shapes(pipe.text_encoder))


def load_as_lora(pipe, path: str | Path, adapter_name: str):
    """Loads a LoHa/LoKr file into `pipe` as the LoRA adapter `adapter_name` that makes exactly its update
    (`exact_lora`), so it stacks with LoRAs at weights, takes per-block weights, fuses and bakes like one. The LoRA
    goes through a PEFT file in a temp folder, whose LoraConfig keeps every module's own rank at scale 1."""
    import tempfile

    from sdtune.adapters.lora_files import PEFT_FILE, save_modules_peft

    table = pipe_table(pipe)
    modules = read_file(path)
    missing = sorted(set(modules) - set(table))
    if missing:
        raise LycorisError(f"{path}: {len(missing)} modules are not layers of this base, e.g. {missing[0]}")
    with tempfile.TemporaryDirectory(prefix="sdtune-lycoris-") as tmp:
        save_modules_peft(tmp, exact_loras(modules, table), table, torch.float32)
        pipe.load_lora_weights(tmp, weight_name=PEFT_FILE, adapter_name=adapter_name)


@dataclass
class ConvertedLora:
    """A LoHa/LoKr as a LoRA of rank r (`to_lora`): the modules, and per module the share of its update's norm kept
    and that update's squared norm."""

    modules: dict
    kept: dict[str, float]
    norms: dict[str, float]

    @property
    def kept_overall(self) -> float:
        """The share of the whole update's Frobenius norm kept, over every module."""
        total = sum(self.norms.values())
        return 1.0 if total == 0 else math.sqrt(sum(self.kept[n] ** 2 * v for n, v in self.norms.items()) / total)


def to_lora(modules: LycorisModules, table, rank: int, device="cpu") -> ConvertedLora:
    """Each module's update truncated to rank `rank` by SVD (best in the Frobenius norm, as sd-scripts' extract and
    resize tools do): a LoRA any tool and any merge takes. `kept` says, per module, the share of the update's norm
    the truncation keeps (1.0: exact)."""
    from sdtune.adapters.lora_modules import LoraModule
    from sdtune.adapters.lowrank import factorize, kept_share, singular_values

    converted, kept, norms = {}, {}, {}
    for name, module in sorted(modules.items()):
        delta = module.delta().to(device).reshape(table[name].shape)
        up, down = factorize(delta, rank)
        s = singular_values(delta)
        kept[name], norms[name] = kept_share(s, up.shape[1]), float(s.pow(2).sum())
        converted[name] = LoraModule(down.cpu(), up.cpu(), float(up.shape[1]))
    return ConvertedLora(converted, kept, norms)


__all__ = [
    "ALGOS",
    "LABELS",
    "NETWORK_MODULE",
    "ConvertedLora",
    "LycorisError",
    "LycorisModule",
    "LycorisModules",
    "algo_of",
    "config_algo",
    "describe",
    "exact_lora",
    "exact_loras",
    "file_of_run",
    "is_lycoris_file",
    "load_as_lora",
    "network_args",
    "peft_to_lycoris",
    "pipe_table",
    "read_file",
    "read_modules",
    "shape_problem",
    "to_lora",
    "unsupported_algo",
]
