"""Pivotal tuning: new token vectors (textual inversion) and a LoRA, trained together (`method.pivotal: true`).

A rare word ("sks") keeps what the text encoder already meant by it, and the LoRA must work around that meaning; a new
token starts at `initializer_token` and moves toward the concept while the LoRA learns the rest (Kim et al.'s pivotal
tuning, as diffusers' advanced DreamBooth-LoRA script and kohya's `bundle_emb` keys do it). With
`embedding_only_steps: N` the vectors train alone (the LoRA switched off) for the first N steps, so the LoRA starts
from a token that already points at the concept.

The run writes the LoRA's two files and the embedding's two (trainers/core/embeddings.py); the kohya file also
carries the vectors as `bundle_emb.<name>.string_to_param.*`, which A1111's Lora extension loads with the LoRA. The
export check renders the diffusers pair (`load_lora_weights` + `load_textual_inversion`) and the kohya file alone
(its LoRA keys and its bundled embedding), within 2/255 of the model as trained.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.embeddings import a1111_name, bundle_embedding, save_embedding
from sdtune.adapters.export_check import ExportCheck, ExportCheckError, check_pivotal_files
from sdtune.adapters.file_metadata import model_spec
from sdtune.adapters.lora_files import save_lora
from sdtune.trainers.core.embeddings import TokenVectors, add_placeholder, hook_into, spell_out
from sdtune.trainers.core.export import LoraWriter, lora_facts, rounded_to
from sdtune.trainers.core.lora_layers import lora_state_dicts
from sdtune.trainers.core.outputs import model_facts
from sdtune.trainers.core.runtime import SAVE_DTYPES, Trained
from sdtune.trainers.core.validation import adapters_disabled


def add_vectors(tokenizer, text_encoder, method) -> TokenVectors | None:
    """The placeholder's new vectors (None unless `method.pivotal`), their tokens added to the tokenizer."""
    if not method.pivotal:
        return None
    ids = add_placeholder(
        tokenizer, text_encoder, method.placeholder_token, method.initializer_token, method.num_vectors
    )
    return TokenVectors(text_encoder, ids)


def with_vectors(trained: list[Trained], vectors: TokenVectors | None, method) -> list[Trained]:
    """What trains, the vectors last, at `method.embedding_lr` (default: the run's learning rate)."""
    return trained + ([Trained(vectors, method.embedding_lr)] if vectors is not None else [])


def hook(text_encoder, opt, vectors: TokenVectors | None) -> None:
    """Every encoding uses the current vectors, through the module Accelerate prepared (DDP all-reduces them)."""
    if vectors is not None:
        hook_into(text_encoder, opt.prepared(vectors))


def captions(tokenizer, texts: list[str], method) -> list[str]:
    """The batch's captions with the placeholder written out as its n tokens (as the pipeline does at inference)."""
    if not getattr(method, "pivotal", False):
        return texts
    return [spell_out(tokenizer, text, method.placeholder_token) for text in texts]


def phase(unet, text_encoder, method, step: int):
    """The LoRA switched off while the embedding trains alone (the first `embedding_only_steps` steps)."""
    if getattr(method, "pivotal", False) and step < method.embedding_only_steps:
        return adapters_disabled(unet, text_encoder)
    return contextlib.nullcontext()


@dataclass
class PivotalWriter:
    """The writer (see trainers/core/outputs.py) of a pivotal-tuning run: the LoRA's files, the embedding's files,
    the embedding bundled into the kohya file, and one export check over both ways of loading them."""

    lora: LoraWriter
    vectors: TokenVectors

    def save(self, out_dir: Path, step: int) -> tuple[dict[str, Path], ExportCheck | None]:
        lora, outputs = self.lora, self.lora.outputs
        recipe = outputs.recipe
        token, dtype = recipe.method.placeholder_token, SAVE_DTYPES[recipe.output.save_precision]
        name = a1111_name(token)
        unet_sd, te_sd = lora_state_dicts(lora.unet, lora.text_encoder, lora.lora_configs[1] is not None)
        facts = lora_facts(outputs, step, lora.lora_configs[0]) if recipe.output.export_kohya else None
        files = save_lora(out_dir, recipe.output.name, unet_sd, te_sd, lora.lora_configs, dtype, facts)
        header = model_spec(model_facts(recipe), "stable-diffusion-v1/textual-inversion", "diffusers")
        files |= save_embedding(out_dir, token, self.vectors.vectors, dtype, name, header)
        if "kohya" in files:
            bundle_embedding(files["kohya"], name, self.vectors.vectors.detach().to("cpu", dtype))
        if not recipe.output.export_check:
            return files, None
        with rounded_to([*lora.trainable, self.vectors.vectors], dtype):  # the reference: as just saved
            reference = outputs.validator.render_one(outputs.checker.settings)
        report = check_pivotal_files(outputs.checker, files, reference, out_dir, token)
        outputs.accelerator.print(report.summary())
        if not report.ok:
            raise ExportCheckError(f"{out_dir}: {report.summary()} (see {out_dir / 'export_check.png'})")
        return files, report


def untrained(vectors: TokenVectors | None, unet, text_encoder):
    """The run's "base" for grids and scores: the LoRA off and, with pivotal tuning, the token as it started."""

    @contextlib.contextmanager
    def both():
        with adapters_disabled(unet, text_encoder), vectors.untrained() if vectors else contextlib.nullcontext():
            yield

    return both


__all__ = ["PivotalWriter", "add_vectors", "captions", "hook", "phase", "untrained", "with_vectors"]
