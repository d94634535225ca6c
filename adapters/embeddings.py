"""Textual-inversion embeddings: the files A1111, ComfyUI and diffusers load, read and written in one place.

An embedding is `n` token vectors of the text encoder's width (768 for SD v1-5) that stand for one new word. Its
layouts, by the tensors they hold (never by the file name):

    diffusers   `learned_embeds.safetensors`: {"<zq>": [n, width]}; `pipe.load_textual_inversion(path)` adds the
                token (and `<zq>_1`... for n > 1) named by the key
    a1111       `<name>.safetensors`: {"emb_params": [n, width]}; A1111 (`embeddings/`) and ComfyUI
                (`embedding:<name>`) name it by its file, and put its vectors where that name stands in a prompt
    a1111 .pt   {"string_to_param": {"*": [n, width]}, "name": ...}: A1111's older pickle (read on import only)
    sdxl        {"clip_g": [n, 1280], "clip_l": [n, 768]}: two text encoders; refused, as SD 2.x's 1024-wide ones

Loading into a pipeline goes through diffusers' `load_textual_inversion` with the vectors already read, so every
layout lands the same way: the token is added to the tokenizer and its rows to the text encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.errors import SdtuneError

if TYPE_CHECKING:
    import torch

DIFFUSERS_FILE = "learned_embeds.safetensors"  # the name diffusers' examples write and `load_textual_inversion` reads
A1111_KEY = "emb_params"  # what A1111 writes into an embedding .safetensors (and ComfyUI reads)
# Text-encoder widths a user may meet, to say what a file is for when it does not fit the base.
WIDTHS = {768: "SD v1", 1024: "SD 2.x", 1280: "SDXL (clip_g)"}


class EmbeddingError(SdtuneError, ValueError):
    """An embedding file that cannot be used with this base; the message names the file and what to do."""


@dataclass
class Embedding:
    """The vectors of one embedding file, and the token it names itself by (None: it goes by its file name)."""

    vectors: torch.Tensor  # [n, width]
    token: str | None
    layout: str  # diffusers, a1111, a1111-pt


def a1111_name(token: str) -> str:
    """The file name (without .safetensors) A1111 and ComfyUI will call `token` by: its letters, digits, '.', '_'
    and '-' (`<zq>` -> `zq`), since `<` and `>` are not allowed in Windows file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "", token).strip(".") or "embedding"


def vector_tokens(token: str, n: int) -> list[str]:
    """The tokenizer entries of an n-vector embedding, as diffusers names them: `<zq>`, `<zq>_1`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def save_embedding(out_dir: Path, token: str, vectors: torch.Tensor, dtype: torch.dtype, name: str, metadata=None):
    """Writes `vectors` [n, width] as the diffusers file and the A1111 file `<name>.safetensors` (atomically);
    returns {"embedding": path, "a1111": path}."""
    from safetensors.torch import save_file

    tensor = vectors.detach().to("cpu", dtype).contiguous()
    files = {"embedding": Path(out_dir) / DIFFUSERS_FILE, "a1111": Path(out_dir) / f"{name}.safetensors"}
    for fmt, key in (("embedding", token), ("a1111", A1111_KEY)):
        with atomic_path(files[fmt], ".safetensors") as tmp:
            save_file({key: tensor.clone()}, tmp, metadata=dict(metadata or {}))
    return files


def from_tensors(tensors: dict, source: str) -> Embedding:
    """The embedding in a file's tensors, read as A1111's `create_embedding_from_data` reads them."""
    if "clip_g" in tensors or "clip_l" in tensors:
        raise EmbeddingError(
            f"{source}: an SDXL embedding (clip_g/clip_l vectors for two text encoders); this base has one text "
            "encoder (SD v1): use an embedding made for SD v1"
        )
    if "string_to_param" in tensors:
        params = tensors["string_to_param"]
        return Embedding(_rows(next(iter(params.values()))), tensors.get("name"), "a1111-pt")
    if A1111_KEY in tensors and len(tensors) == 1:
        return Embedding(_rows(tensors[A1111_KEY]), None, "a1111")
    if len(tensors) == 1 and hasattr(next(iter(tensors.values())), "shape"):
        token, vectors = next(iter(tensors.items()))
        return Embedding(_rows(vectors), token, "diffusers")
    raise EmbeddingError(
        f"{source}: not a textual-inversion embedding (keys: {', '.join(list(tensors)[:3])}); expected one tensor "
        f"(diffusers' {{token: vectors}}, A1111's {A1111_KEY}) or string_to_param"
    )


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[None] if tensor.dim() == 1 else tensor


def is_embedding(tensors: dict) -> bool:
    """True for the tensors of an embedding file of any layout above (SDXL's too: refused later, by name): one tensor
    of at most 75 rows (a prompt's length) under a key without dots (a token, or `emb_params`), at least 64 wide."""
    if {"clip_g", "clip_l"} <= set(tensors) or "string_to_param" in tensors:
        return True
    if len(tensors) != 1:
        return False
    key, tensor = next(iter(tensors.items()))
    shape = tuple(getattr(tensor, "shape", ()))
    return "." not in key and len(shape) in (1, 2) and shape[-1] >= 64 and (len(shape) == 1 or shape[0] <= 75)


def read_embedding(path: str | Path) -> Embedding:
    """Reads an embedding file (.safetensors; .pt/.bin only as tensors, never running code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return from_tensors(load_file(str(path)), str(path))
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    return from_tensors(data if isinstance(data, dict) else {"emb_params": data}, str(path))


def check_width(embedding: Embedding, width: int, source: str) -> None:
    """Refuses vectors of another text encoder's width, saying which model they were made for."""
    found = embedding.vectors.shape[-1]
    if found != width:
        made_for = WIDTHS.get(found, "another model")
        base = f" ({WIDTHS[width]})" if width in WIDTHS else ""
        raise EmbeddingError(
            f"{source}: an embedding {found} wide ({made_for}); this base's text encoder is {width} wide{base}: "
            "use an embedding made for it"
        )


def text_width(pipe) -> int:
    return pipe.text_encoder.get_input_embeddings().weight.shape[-1]


def load_embedding(pipe, path: str | Path, token: str | None = None) -> str:
    """Puts an embedding file into `pipe` under `token` (default: the file's own token, else its file name, as
    A1111 names it); returns the token a prompt uses."""
    path = Path(path)
    embedding = read_embedding(path)
    return load_vectors(pipe, embedding.vectors, token or embedding.token or path.stem, str(path))


def load_vectors(pipe, vectors: torch.Tensor, token: str, source: str) -> str:
    """Puts `vectors` [n, width] into `pipe` as `token` (and `token_1`...), through diffusers'
    `load_textual_inversion`; one-line `EmbeddingError`s for another width and a token the tokenizer knows."""
    check_width(Embedding(vectors, token, ""), text_width(pipe), source)
    taken = [t for t in vector_tokens(token, len(vectors)) if t in pipe.tokenizer.get_vocab()]
    if taken:
        raise EmbeddingError(
            f"{source}: its token {token!r} is already a word of the base's tokenizer (or a loaded embedding's); "
            "rename the file (A1111 and ComfyUI call an embedding by its file name)"
        )
    pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=token)
    return token


def unload_embedding(pipe, token: str) -> None:
    """Takes an embedding's token (and its `_1`... rows) back out of `pipe`."""
    added = pipe.tokenizer.added_tokens_encoder
    pipe.unload_textual_inversion([t for t in added if t == token or re.fullmatch(re.escape(token) + r"_\d+", t)])


# -- importing into the registry (adapters/importer.py) -------------------------------------------------------------


def prepare_import(path: Path, tensors: dict, metadata: dict, base: str):
    """An embedding file's import report and payload: its vectors must be as wide as the base's text encoder (an
    SD 2.x or SDXL embedding is refused by name); its token is the file's own (diffusers) or its file name (A1111)."""
    from sdtune.adapters.importer import ImportReport

    embedding = from_tensors(tensors, str(path))
    check_width(embedding, base_text_width(base), str(path))
    n = len(embedding.vectors)
    detail = f"textual inversion, {n} vector{'s' * (n > 1)} ({embedding.layout} layout)"
    report = ImportReport(str(path), "embedding", detail, base, modules=1, matched=1)
    return report, {"vectors": embedding.vectors, "token": embedding.token or path.stem, "metadata": metadata}


def base_text_width(base: str) -> int:
    """The width of the base's text encoder (768 for SD v1-5), from its config where the base is a folder."""
    import json

    from sdtune.adapters.base import load_pipeline, resolve_base

    source = resolve_base(base)
    if source.kind in ("toy", "folder"):
        return json.loads((Path(source.location) / "text_encoder" / "config.json").read_text())["hidden_size"]
    return load_pipeline(base).text_encoder.config.hidden_size


def registered_files(staging: Path, payload: dict) -> dict[str, str]:
    """The registered copy of an imported embedding: both layouts, whichever it came in, named after its token."""
    vectors, token = payload["vectors"], payload["token"]
    files = save_embedding(staging, token, vectors, vectors.dtype, a1111_name(token), payload["metadata"])
    return {fmt: file.name for fmt, file in files.items()}


# -- bundled in a kohya LoRA (pivotal tuning) -------------------------------------------------------------------------

BUNDLE_PREFIX = "bundle_emb."  # A1111's Lora extension: bundle_emb.<name>.string_to_param.* loads as embedding <name>


def bundle_keys(name: str, vectors: torch.Tensor) -> dict:
    """The kohya keys that carry an embedding inside a LoRA file, as A1111's `networks.load_network` reads them."""
    return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors.detach().cpu().contiguous()}


def bundle_embedding(kohya_file: Path, name: str, vectors: torch.Tensor) -> None:
    """Adds the embedding `name` to a kohya LoRA file, rewritten atomically with its header (hashes recomputed)."""
    import safetensors
    from safetensors.torch import load_file

    from sdtune.adapters.lora_files import save_kohya

    with safetensors.safe_open(str(kohya_file), "pt") as handle:
        metadata = handle.metadata() or {}
    save_kohya(kohya_file, {**load_file(str(kohya_file)), **bundle_keys(name, vectors)}, metadata)


def split_bundle(tensors: dict) -> tuple[dict, dict[str, Embedding]]:
    """A kohya file's tensors -> (its LoRA keys, {name: bundled embedding}), as A1111 splits them."""
    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    bundled: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, rest = key[len(BUNDLE_PREFIX) :].partition(".")
            if rest.startswith("string_to_param."):
                bundled.setdefault(name, {})["string_to_param"] = {rest.split(".", 1)[1]: tensor}
    return lora, {name: from_tensors(data, f"{BUNDLE_PREFIX}{name}") for name, data in bundled.items()}
