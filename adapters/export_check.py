"""The export check: reload adapter files the way other tools load them, render, and compare with a reference.

A trainer's reference is the adapter as it sits in training (see trainers/core/export.py); a merged or resized
LoRA's reference is its weight change added to the base weights by plain arithmetic (`applied`), so the check
proves the written files (PEFT through diffusers, kohya through diffusers' converter) mean what the merge computed.
The kohya keys are also replayed through the key mapping A1111 and ComfyUI use for SD v1 LoRAs. Any unmatched key,
or a pixel difference over 2/255, fails.

A LoHa/LoKr run is checked the same way, each file as its users load it: the LyCORIS single file with A1111's and
ComfyUI's delta math (adapters/lycoris.py) added to the base weights, peft's adapter folders through peft's
injection (diffusers' `load_lora_weights` loads neither for SD v1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdtune.adapters import a1111_keys, contact_sheet, lycoris, lycoris_peft, sampling
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.lora_modules import module_table
from sdtune.adapters.single_file_keys import text_encoder_to_original, unet_to_original

PIXEL_TOLERANCE = 2  # out of 255


class ExportCheckError(SdtuneError, RuntimeError):
    """An exported file does not reproduce the trained adapter; the message says which and by how much."""


@dataclass
class ExportCheck:
    max_pixel_diff: dict[str, int] = field(default_factory=dict)  # pair of formats -> max |difference| in 0..255
    unmatched_a1111: list[str] = field(default_factory=list)
    unmatched_comfyui: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # why a format was not written (DoRA has no kohya form)

    @property
    def ok(self) -> bool:
        return (
            all(d <= PIXEL_TOLERANCE for d in self.max_pixel_diff.values())
            and not self.unmatched_a1111
            and not self.unmatched_comfyui
        )

    def summary(self) -> str:
        diffs = ", ".join(f"{pair} {d}/255" for pair, d in self.max_pixel_diff.items())
        keys = f"A1111 unmatched {len(self.unmatched_a1111)}, ComfyUI unmatched {len(self.unmatched_comfyui)}"
        return f"export check {'passed' if self.ok else 'FAILED'}: {diffs}; {keys}" + (
            f"; {self.skipped}" if self.skipped else ""
        )


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image.convert("RGB"), dtype=np.int16)


class ExportChecker:
    """Holds a clean copy of the base (loaded once, parked on the CPU between checks) and checks exports."""

    def __init__(self, load_base, device, settings: sampling.SampleSettings, autocast):
        self._load_base, self.device, self.settings, self.autocast = load_base, device, settings, autocast
        self._pipe = None

    def _base(self):
        if self._pipe is None:
            self._pipe = self._load_base()
            self._pipe.set_progress_bar_config(disable=True)
            # Module names of the pristine base, before peft wraps any layer in a `base_layer`.
            unet_keys, te_keys = self._pipe.unet.state_dict(), self._pipe.text_encoder.state_dict()
            original = list(unet_to_original(unet_keys, self._pipe.unet.config))
            original += list(text_encoder_to_original(te_keys))
            self._compvis = a1111_keys.compvis_modules_from_checkpoint_keys(original)
            self._comfy_map = a1111_keys.comfyui_lora_key_map(unet_keys.keys(), te_keys.keys())
            self._layers_per_block = self._pipe.unet.config.layers_per_block
            self._table = module_table(
                {k: tuple(v.shape) for k, v in unet_keys.items()}, {k: tuple(v.shape) for k, v in te_keys.items()}
            )
        return self._pipe

    def _render(self, pipe) -> sampling.Sample:
        with torch.no_grad(), self.autocast():
            return sampling.generate(pipe, [self.settings])[0]

    def _render_file(self, pipe, path: Path) -> sampling.Sample:
        """The check's image with one file loaded the way its users load it: a LoRA through diffusers; a LyCORIS
        LoHa/LoKr file as A1111 and ComfyUI apply it (their delta math, W + dW); peft's LoHa/LoKr adapter folders
        through peft's own injection."""
        if path.is_dir():
            with lycoris_peft.peft_adapter_applied(pipe, path, "export_check"):
                return self._render(pipe)
        if lycoris.is_lycoris_file(path):
            with applied(pipe, lycoris.read_file(path), self._table):
                return self._render(pipe)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="export_check")
        try:
            return self._render(pipe)
        finally:
            pipe.delete_adapters("export_check")

    def base_state_dicts(self) -> tuple[dict, dict]:
        """The clean base's UNet and text-encoder weights (diffusers names, on the CPU), whatever the check loaded."""

        def plain(model):
            return {
                k.replace(".base_layer.", "."): v.detach().cpu()
                for k, v in model.state_dict().items()
                if ".lora_" not in k
            }

        pipe = self._base()
        return plain(pipe.unet), plain(pipe.text_encoder)

    def render_state_dict(self, unet_sd: dict, te_sd: dict | None) -> sampling.Sample:
        """The check's image from LoRA tensors in memory (peft names, alpha = rank) on the clean base: the reference
        an extracted LoRA's files are compared with, as a trained LoRA's are with the model in training."""
        pipe = self._base().to(self.device)
        tensors = {f"unet.{k}": v for k, v in unet_sd.items()}
        tensors |= {f"text_encoder.{k}": v for k, v in (te_sd or {}).items()}
        pipe.load_lora_weights(tensors, adapter_name="export_check")
        try:
            with torch.no_grad(), self.autocast():
                return sampling.generate(pipe, [self.settings])[0]
        finally:
            pipe.delete_adapters("export_check")
            self._pipe = pipe.to("cpu")

    def _unmatched(self, kohya_path: Path) -> tuple[list[str], list[str]]:
        from safetensors.torch import load_file

        kohya_sd = load_file(str(kohya_path))
        a1111 = a1111_keys.unmatched_kohya_keys(kohya_sd, self._compvis, self._layers_per_block)
        return a1111, a1111_keys.comfyui_unmatched_kohya_keys(kohya_sd, self._comfy_map)

    def check(
        self, files: dict, trained: sampling.Sample, out_dir: Path, reference_label: str = "trained"
    ) -> ExportCheck:
        """Renders `self.settings` from each file and compares with `trained` (the reference image: the adapter in
        training, or a merge's arithmetic), labelled `reference_label`."""
        pipe = self._base().to(self.device)
        result = ExportCheck()
        try:
            images = {reference_label: trained}
            for fmt, path in files.items():
                images[fmt] = self._render_file(pipe, Path(path))
            if "kohya" in files:
                result.unmatched_a1111, result.unmatched_comfyui = self._unmatched(Path(files["kohya"]))
            else:
                result.skipped = "no kohya file (output.export_kohya off, or DoRA, which has no faithful A1111 form)"
        finally:
            self._pipe = pipe.to("cpu")
        for fmt in files:
            result.max_pixel_diff[f"{reference_label}-vs-{fmt}"] = int(
                np.abs(_pixels(images[fmt]) - _pixels(trained)).max()
            )
        if "kohya" in files:
            result.max_pixel_diff["peft-vs-kohya"] = int(
                np.abs(_pixels(images["peft"]) - _pixels(images["kohya"])).max()
            )
        result.images = save_strip(images, self.settings, out_dir, "each file reloaded through diffusers")
        return result


def save_strip(images: dict, settings: sampling.SampleSettings, out_dir: Path, how: str) -> dict[str, str]:
    """The check's images side by side, labelled, as `export_check.png` in `out_dir`; returns the report's images."""
    strip = contact_sheet.make_grid(
        [[s.image for s in images.values()]],
        [settings.prompt],
        list(images),
        f"export check: same prompt and seed, {how}",
    )
    contact_sheet.save_grid(strip, out_dir / "export_check.png")
    return {"strip": "export_check.png"}


@contextlib.contextmanager
def applied(pipe, modules, table, dtype: torch.dtype | None = None):
    """Adds each module's weight change to its base layer (W += delta) for the duration; restores W after.

    Args:
        modules: `lora_modules.LoraModules`, or `lycoris.LycorisModules` (LoHa/LoKr, A1111's delta math);
            table: `lora_modules.module_table` of this base.
        dtype: round the module tensors to this dtype first (the files are saved in it), then compute in float32.
    """
    kept = []
    with torch.no_grad():
        for name, module in modules.items():
            target = table[name]
            layer = getattr(pipe, target.component).get_submodule(target.path)
            if dtype is not None:
                module = module.to(dtype)
            kept.append((layer, layer.weight.data.clone()))
            layer.weight.data += module.delta().to(layer.weight.dtype).reshape(layer.weight.shape)
    try:
        yield pipe
    finally:
        for layer, weight in kept:
            layer.weight.data = weight


def check_lora_files(pipe, files: dict, modules, table, settings: sampling.SampleSettings, out_dir: Path, dtype):
    """The export check of a LoRA made without training (merge, resize). The reference is the arithmetic
    (`applied`); the PEFT file is reloaded through diffusers; the kohya file is read the way A1111 and ComfyUI apply
    it (W + alpha / rank * up @ down, per module) and its keys replayed through their key tables.

    Why not diffusers' kohya loader for the kohya file: under transformers 5 it drops per-module text-encoder
    alphas (its alpha patterns keep the `text_model.` level the CLIP modules no longer have), so a file whose
    text-encoder alpha differs from the UNet's renders wrongly in diffusers alone (measured: 138/255 off for a
    resized LoRA whose PEFT file is 0/255 off). diffusers users get the PEFT file.
    """
    import safetensors.torch

    from sdtune.adapters.lora_modules import read_kohya

    def render():
        return sampling.generate(pipe, [settings])[0]

    with applied(pipe, modules, table, dtype):
        reference = render()
    kohya_path = Path(files["kohya"])
    with applied(pipe, read_kohya(safetensors.torch.load_file(str(kohya_path))), table):
        kohya_image = render()
    checker = ExportChecker(lambda: pipe, pipe.device, settings, contextlib.nullcontext)
    report = checker.check({"peft": files["peft"]}, reference, out_dir, reference_label="merged")
    report.unmatched_a1111, report.unmatched_comfyui = checker._unmatched(kohya_path)
    report.skipped = None
    report.max_pixel_diff["merged-vs-kohya (A1111 formula)"] = int(
        np.abs(_pixels(kohya_image) - _pixels(reference)).max()
    )
    return report


def check_embedding_files(
    checker: ExportChecker, files: dict, reference: sampling.Sample, out_dir: Path, token: str
) -> ExportCheck:
    """The export check of a textual-inversion embedding: a clean copy of the base loads each file and renders
    `checker.settings`, compared with `reference` (the vectors as trained) and with each other.

    The diffusers file loads through `pipe.load_textual_inversion(path)` (its token is its key). The A1111 file is
    read as A1111 and ComfyUI read it (`emb_params`, named by its file) and its vectors stand where the trained
    token stands in the prompt, which is what A1111 does with the file's name.
    """
    from sdtune.adapters.embeddings import load_embedding, unload_embedding

    pipe = checker._base().to(checker.device)
    images = {"trained": reference}
    try:
        for fmt, path in files.items():
            loaded = load_embedding(pipe, path, token=None if fmt == "embedding" else token)
            try:
                with torch.no_grad(), checker.autocast():
                    images[fmt] = sampling.generate(pipe, [checker.settings])[0]
            finally:
                unload_embedding(pipe, loaded)
    finally:
        checker._pipe = pipe.to("cpu")
    result = ExportCheck(skipped="an embedding: no LoRA keys to match")
    for fmt in files:
        result.max_pixel_diff[f"trained-vs-{fmt}"] = int(np.abs(_pixels(images[fmt]) - _pixels(reference)).max())
    if len(files) > 1:
        first, second = list(files)[:2]
        result.max_pixel_diff[f"{first}-vs-{second}"] = int(
            np.abs(_pixels(images[first]) - _pixels(images[second])).max()
        )
    result.images = save_strip(images, checker.settings, out_dir, "each embedding file reloaded into a clean base")
    return result


def check_pivotal_files(
    checker: ExportChecker, files: dict, reference: sampling.Sample, out_dir: Path, token: str
) -> ExportCheck:
    """The export check of a pivotal-tuning run (a LoRA and an embedding): the diffusers way, the PEFT file through
    `load_lora_weights` and `learned_embeds.safetensors` through `load_textual_inversion`; the A1111 way, the kohya
    file alone: its LoRA keys, and its `bundle_emb` vectors standing where the token stands. Both are compared with
    `reference` and with each other; the kohya LoRA keys are replayed through A1111's and ComfyUI's key tables."""
    from safetensors.torch import load_file

    from sdtune.adapters.embeddings import load_embedding, load_vectors, split_bundle, unload_embedding

    pipe = checker._base().to(checker.device)
    lora_sd, bundled = split_bundle(load_file(str(files["kohya"]))) if "kohya" in files else ({}, {})
    ways = {"peft+embedding": (files["peft"], files["embedding"])}
    if bundled:
        ways["kohya+bundle_emb"] = (lora_sd, next(iter(bundled.values())).vectors)
    images = {"trained": reference}
    try:
        for label, (lora, embedding) in ways.items():
            pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora), adapter_name="export_check")
            if isinstance(embedding, torch.Tensor):  # bundled: A1111 names it by its key, here by the token
                loaded = load_vectors(pipe, embedding, token, f"{files['kohya']}: bundle_emb")
            else:
                loaded = load_embedding(pipe, embedding, token=token)
            try:
                with torch.no_grad(), checker.autocast():
                    images[label] = sampling.generate(pipe, [checker.settings])[0]
            finally:
                unload_embedding(pipe, loaded)
                pipe.delete_adapters("export_check")
    finally:
        checker._pipe = pipe.to("cpu")
    result = ExportCheck(skipped=None if bundled else "no kohya file (output.export_kohya off, or DoRA)")
    for label in ways:
        result.max_pixel_diff[f"trained-vs-{label}"] = int(np.abs(_pixels(images[label]) - _pixels(reference)).max())
    if bundled:
        diff = np.abs(_pixels(images["peft+embedding"]) - _pixels(images["kohya+bundle_emb"])).max()
        result.max_pixel_diff["peft-vs-kohya"] = int(diff)
        result.unmatched_a1111 = a1111_keys.unmatched_kohya_keys(lora_sd, checker._compvis, checker._layers_per_block)
        result.unmatched_comfyui = a1111_keys.comfyui_unmatched_kohya_keys(lora_sd, checker._comfy_map)
    result.images = save_strip(images, checker.settings, out_dir, "the LoRA and its embedding reloaded both ways")
    return result
