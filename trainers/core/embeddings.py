"""New token vectors in a frozen text encoder (textual inversion), and `EmbeddingWriter`, the writer of them.

The placeholder (`<zq>`, and `<zq>_1`... for more vectors, diffusers' names) is added to the tokenizer and the
embedding matrix grows by as many rows, each set to the vector of one of the initializer's tokens. What trains is
not that matrix but `TokenVectors`, a [n, width] fp32 parameter that a forward hook puts in place of those rows'
output: the optimizer holds n x width numbers (not 49408 x 768), no other row can move (no weight decay on them,
nothing to restore after each step), and switching the hook off shows the untrained token, the run's "base".

Every save writes (adapters/embeddings.py):
    learned_embeds.safetensors   diffusers: {"<zq>": [n, width]}, for `pipe.load_textual_inversion`
    <name>.safetensors           A1111 / ComfyUI: {"emb_params": [n, width]}, named by the token (`<zq>` -> zq)
then the export check reloads both into a clean base and renders the check prompt within 2/255 of the model as
trained.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters.embeddings import a1111_name, save_embedding, vector_tokens
from sdtune.adapters.export_check import ExportCheck, ExportCheckError, check_embedding_files
from sdtune.adapters.file_metadata import model_spec
from sdtune.trainers.core.export import rounded_to
from sdtune.trainers.core.outputs import RunOutputs, model_facts
from sdtune.trainers.core.recipe import RecipeError
from sdtune.trainers.core.runtime import SAVE_DTYPES


def add_placeholder(tokenizer, text_encoder, placeholder: str, initializer: str, num_vectors: int) -> list[int]:
    """Adds the placeholder's tokens to `tokenizer` and their rows to `text_encoder`; returns their ids. Row i starts
    at the vector of the initializer's token i mod n (sd-scripts' init_word rule), so one word seeds every vector and a
    rare word ("<ps>" is "<", "ps", ">") gives the new token exactly what that word meant. One-line `RecipeError`s for
    a placeholder the tokenizer already knows and an initializer of no tokens or more tokens than vectors."""
    tokens = vector_tokens(placeholder, num_vectors)
    known = [t for t in tokens if t in tokenizer.get_vocab()]
    if known:
        raise RecipeError(
            f"method.placeholder_token: {known[0]!r} is already a token of the base's tokenizer, so its old meaning "
            f"would train instead of a new word; choose a new one, e.g. <{placeholder.strip('<>')}-x>"
        )
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)  # before the placeholder is a token itself
    if not init_ids:
        raise RecipeError(f"method.initializer_token: {initializer!r} is no token for this tokenizer; give a word")
    if len(init_ids) > num_vectors:
        raise RecipeError(
            f"method.initializer_token: {initializer!r} is {len(init_ids)} tokens for this tokenizer and "
            f"num_vectors is {num_vectors}; give one word (e.g. object, shape, style), or raise num_vectors to "
            f"{len(init_ids)} so that each of its tokens starts a vector"
        )
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # its rows are set just below
    text_encoder.get_input_embeddings().requires_grad_(False)  # a new matrix: frozen like the old (no 49408-row grad)
    rows = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        rows[ids] = rows[[init_ids[i % len(init_ids)] for i in range(len(ids))]].clone()
    return ids


class TokenVectors(torch.nn.Module):
    """The trained vectors of the placeholder's tokens; `forward(input_ids, embeds)` puts them in place of those
    tokens' rows in the embedding output (the text encoder's hook calls it)."""

    def __init__(self, text_encoder, token_ids: list[int]):
        super().__init__()
        rows = text_encoder.get_input_embeddings().weight
        self.vectors = torch.nn.Parameter(rows[token_ids].detach().float().clone())  # fp32: small steps survive
        self.register_buffer("token_ids", torch.tensor(token_ids, device=rows.device), persistent=False)
        self.active = True

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return embeds
        hit = input_ids[..., None] == self.token_ids  # [b, L, n]: which placeholder token stands where
        new = self.vectors[hit.float().argmax(-1)].to(embeds.dtype)
        return torch.where(hit.any(-1, keepdim=True), new, embeds)

    def gradient_checkpointing_enable(self):
        """Nothing to recompute here: the frozen text encoder and UNet, handed to `prepare_optimization` as
        `frozen`, hold the activations and checkpoint them."""

    @contextlib.contextmanager
    def untrained(self):
        """The placeholder as it started (the initializer's vector): the run's base, for grids and scores."""
        self.active = False
        try:
            yield
        finally:
            self.active = True


def hook_into(text_encoder, call) -> torch.utils.hooks.RemovableHandle:
    """Routes the text encoder's token-embedding output through `call(input_ids, embeds)` (the `TokenVectors`, as
    Accelerate prepared it, so that DDP sees its forward and all-reduces its gradient)."""
    return text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: call(args[0], out))


def spell_out(tokenizer, text: str, placeholder: str) -> str:
    """A caption as the pipeline will see it: the placeholder written out as its n tokens (`<zq> <zq>_1 ...`), as
    diffusers' `maybe_convert_prompt` does at inference."""
    added = [t for t in vector_tokens(placeholder, 75) if t in tokenizer.added_tokens_encoder]
    return text.replace(placeholder, " ".join(added)) if len(added) > 1 else text


@dataclass
class EmbeddingWriter:
    """The writer (see trainers/core/outputs.py) of a textual inversion: both files, export-checked against the
    vectors as they sit in training."""

    outputs: RunOutputs
    vectors: TokenVectors

    @property
    def token(self) -> str:
        return self.outputs.recipe.method.placeholder_token

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        recipe = self.outputs.recipe
        dtype = SAVE_DTYPES[recipe.output.save_precision]
        header = model_spec(model_facts(recipe), "stable-diffusion-v1/textual-inversion", "diffusers")
        files = save_embedding(out_dir, self.token, self.vectors.vectors, dtype, a1111_name(self.token), header)
        if not recipe.output.export_check:
            return files, None
        with rounded_to([self.vectors.vectors], dtype):  # the reference: the vectors as just saved
            reference = self.outputs.validator.render_one(self.outputs.checker.settings)
        report = check_embedding_files(self.outputs.checker, files, reference, out_dir, self.token)
        self.outputs.accelerator.print(report.summary())
        if not report.ok:
            raise ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
        return files, report
