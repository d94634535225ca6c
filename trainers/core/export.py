"""Writing a trained LoRA in both ecosystem formats, proving both load, and recording what was made.

Every save writes:
    pytorch_lora_weights.safetensors   diffusers/PEFT format, with the LoRA adapter metadata (true lora_alpha)
    <name>.safetensors                 kohya/A1111 format: lora_unet_* / lora_te_* keys, true .alpha, ss_* metadata
and then runs the export check: a fresh copy of the base loads each file the way users will (diffusers'
`load_lora_weights` for both; the kohya file goes through diffusers' kohya converter), renders the same image
with each, and compares them with the adapter as it was in training, its tensors rounded to the saved dtype
(`output.save_precision` is the user's choice; the check is about keys, scales and formats). The kohya keys are also replayed through
the key mapping A1111 and ComfyUI use for SD v1 LoRAs. Any unmatched key or a pixel difference over 2/255 fails
the run: a LoRA that loads differently in another tool is the ecosystem's most common complaint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdtune.adapters import a1111_keys, contact_sheet, kohya, sampling
from sdtune.adapters.manifest import AdapterManifest, BaseRef
from sdtune.adapters.single_file import text_encoder_to_original, unet_to_original
from sdtune.trainers.core.lora_layers import save_peft_lora

PIXEL_TOLERANCE = 2  # out of 255


class ExportCheckError(RuntimeError):
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


def kohya_alpha(config) -> float:
    return float(config.lora_alpha)


def write_lora_files(
    out_dir: Path, name: str, unet_sd, te_sd, unet_config, te_config, dtype, metadata, write_kohya: bool = True
) -> dict:
    """Writes peft-named LoRA tensors (trained or extracted) as the PEFT file and, if asked and unless DoRA, the kohya
    file into `out_dir`; returns {format: path}."""
    files = {"peft": save_peft_lora(out_dir, unet_sd, te_sd, unet_config, te_config, dtype)}
    if not write_kohya or unet_config.use_dora:
        return files  # peft's DoRA magnitude has no faithful kohya/A1111 form (see adapters/kohya.py)
    kohya_sd = kohya.peft_to_kohya(
        unet_sd,
        te_sd,
        unet_alpha=kohya_alpha(unet_config),
        text_encoder_alpha=kohya_alpha(te_config) if te_config is not None else None,
    )
    files["kohya"] = kohya.save_kohya_lora(out_dir / f"{name}.safetensors", kohya_sd, metadata, dtype=dtype)
    return files


@contextlib.contextmanager
def rounded_to(params, dtype: torch.dtype):
    """Temporarily rounds trainable tensors to the dtype they are saved in: the export check's reference is the
    adapter as saved (at low precision a double rounding, fp32 -> fp16 -> bf16 compute, can shift a few pixels)."""
    kept = [p.data.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype).to(p.dtype)
    try:
        yield
    finally:
        for p, data in zip(params, kept):
            p.data = data


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
        return self._pipe

    def _render_file(self, pipe, path: Path) -> sampling.Sample:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="export_check")
        try:
            with torch.no_grad(), self.autocast():
                return sampling.generate(pipe, [self.settings])[0]
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

    def check(self, files: dict, trained: sampling.Sample, out_dir: Path) -> ExportCheck:
        """Renders `self.settings` from each file and compares with `trained` (the in-training adapter's image)."""
        pipe = self._base().to(self.device)
        result = ExportCheck()
        try:
            images = {"trained": trained}
            for fmt, path in files.items():
                images[fmt] = self._render_file(pipe, Path(path))
            if "kohya" in files:
                result.unmatched_a1111, result.unmatched_comfyui = self._unmatched(Path(files["kohya"]))
            else:
                result.skipped = "no kohya file (output.export_kohya off, or DoRA, which has no faithful A1111 form)"
        finally:
            self._pipe = pipe.to("cpu")
        for fmt in files:
            result.max_pixel_diff[f"trained-vs-{fmt}"] = int(np.abs(_pixels(images[fmt]) - _pixels(trained)).max())
        if "kohya" in files:
            result.max_pixel_diff["peft-vs-kohya"] = int(
                np.abs(_pixels(images["peft"]) - _pixels(images["kohya"])).max()
            )
        strip = contact_sheet.make_grid(
            [[s.image for s in images.values()]],
            [self.settings.prompt],
            list(images),
            "export check: same prompt and seed, each file reloaded through diffusers",
        )
        contact_sheet.save_grid(strip, out_dir / "export_check.png")
        result.images = {"strip": "export_check.png"}
        return result


def manifest(
    *,
    name: str,
    method: str,
    base: BaseRef,
    recipe,
    scan,
    trigger_words: list[str],
    steps: int,
    final_loss: float | None,
    files: dict,
    samples: dict[str, str],
    scores: dict | None,
    export_check: ExportCheck | None,
    started_at: float,
) -> AdapterManifest:
    """The run's `adapter.json` (see sdtune.adapters.manifest): the trainer's side of the contract."""
    return AdapterManifest(
        name=name,
        method=method,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        base=base,
        trigger_words=trigger_words,
        dataset={
            "fingerprint": scan.fingerprint(),
            "kind": scan.kind,
            "images": len(scan.records),
            "images_with_repeats": sum(r.repeats for r in scan.records),
            "skipped": [asdict(s) for s in scan.skipped],
            "buckets": {f"{w}x{h}": n for (w, h), n in sorted(scan.bucket_counts().items())},
        },
        training={"steps": steps, "final_loss": final_loss, "seconds": round(time.time() - started_at, 1)},
        files={fmt: Path(p).name for fmt, p in files.items()},
        samples=samples,
        scores=scores,
        export_check=None if export_check is None else {**asdict(export_check), "ok": export_check.ok},
        recipe=recipe.to_dict(),
    )
