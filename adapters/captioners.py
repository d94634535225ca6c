"""Captioners and taggers behind one interface: `load_captioner(model)` returns a `Captioner` whose `caption(images)`
turns a batch of PIL images into one caption each.

The families, picked from what the model folder holds:

    toy        the toy-world scorer ("a purple circle"): no weights, the default for the toy base
    blip       transformers BlipForConditionalGeneration + BlipProcessor (config.json model_type "blip")
    blip2      transformers Blip2ForConditionalGeneration + Blip2Processor (model_type "blip-2")
    florence2  transformers Florence2ForConditionalGeneration + Florence2Processor, task "<CAPTION>" (model_type
               "florence2", in transformers' own format: a checkpoint that needs trust_remote_code is refused)
    wd14       a WD14 tagger: an ONNX model + its selected_tags.csv, through onnxruntime (`sdtune[taggers]`)

`model` is "toy", a local folder, or a Hugging Face Hub id (`Salesforce/blip-image-captioning-base`,
`SmilingWolf/wd-vit-tagger-v3`), which huggingface_hub downloads, or reads from its cache when HF_HUB_OFFLINE=1.

torch, transformers and onnxruntime load inside the functions that use them: importing this module is cheap.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.adapters.errors import SdtuneError

TOY = "toy"
TAGGERS_EXTRA = "pip install 'sdtune[taggers]'"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class TransformersFamily:
    """A captioner family of transformers: its classes, and the task prompt it captions with (None: pixels alone)."""

    family: str
    processor: str
    model: str
    prompt: str | None = None


# config.json model_type -> the family. Florence-2 in transformers' own format (model_type "florence2", no remote code).
TRANSFORMERS_FAMILIES = {
    "blip": TransformersFamily("blip", "BlipProcessor", "BlipForConditionalGeneration"),
    "blip-2": TransformersFamily("blip2", "Blip2Processor", "Blip2ForConditionalGeneration"),
    "florence2": TransformersFamily(
        "florence2", "Florence2Processor", "Florence2ForConditionalGeneration", "<CAPTION>"
    ),
}
BLIP_GENERATE = {"max_new_tokens": 40, "num_beams": 3}  # beam search: the model cards' captioning setting
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# WD14's selected_tags.csv categories (from Danbooru): 0 general, 4 character, 9 rating.
GENERAL, CHARACTER, RATING = 0, 4, 9
# Kaomoji keep their underscores ("^_^" is not "^ ^"); the list kohya's tagger keeps too.
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@"}
KAOMOJI |= {"^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def taggers_installed() -> bool:
    """Whether onnxruntime (the `taggers` extra) can be imported, without importing it."""
    from importlib.util import find_spec

    try:
        return find_spec("onnxruntime") is not None
    except ValueError:  # sys.modules["onnxruntime"] is None: blocked, as a test does
        return False


class CaptionerError(SdtuneError, ValueError):
    """A captioner that cannot be loaded or run (a folder that is not a model, a wrong ONNX signature)."""


@dataclass
class TaggerOptions:
    """WD14 settings: a tag is kept when its probability reaches its category's threshold."""

    general_threshold: float = 0.35  # general tags (category 0): kohya's default
    character_threshold: float = 0.85  # character tags (category 4): a character is named only when sure
    blacklist: Sequence[str] = field(default_factory=tuple)  # tags never written (either spelling: a_b or a b)
    underscores: bool = False  # keep Danbooru's underscores (`long_hair`) instead of spaces

    def __post_init__(self):
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CaptionerError(f"{name.replace('_', '-')} {getattr(self, name)}: a probability, 0 to 1")


class Captioner:
    """One caption per image. `family` names the kind, `source` where it was loaded from."""

    family = ""

    def __init__(self, source: str):
        self.source = source

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        raise NotImplementedError


class ToyCaptioner(Captioner):
    """The toy-world scorer read back as a caption: colour by hue, shape by geometry ("a purple circle"); an image
    where no shape stands out gets an empty caption."""

    family = TOY

    def caption(self, images):
        from sdtune.adapters import toyworld

        out = []
        for image in images:
            found = toyworld.score_image(image)
            out.append(f"a {found.color} {found.shape}" if found.color and found.shape else "")
        return out


# -- finding the model ----------------------------------------------------------------------------------------------


def resolve_model(model: str) -> str | Path:
    """`TOY`, or the local folder of `model` (a folder, or a Hub id from huggingface_hub: its cache when offline)."""
    if model == TOY:
        return TOY
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CaptionerError(f"--model {model}: a captioner is a folder (config.json, or model.onnx + tags)")
        return path
    if not HUB_ID.match(model):
        raise CaptionerError(f"--model {model}: no such folder, and not a Hub id (owner/name); or use --model toy")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model))
    except LocalEntryNotFoundError:
        raise CaptionerError(
            f"--model {model}: not in the Hugging Face cache and the Hub cannot be reached (offline); "
            "download it once online, or pass a local folder"
        ) from None
    except HfHubHTTPError as exc:
        raise CaptionerError(f"--model {model}: the Hub refused it ({str(exc).splitlines()[0]})") from None


def model_family(folder: Path) -> str:
    """The family of a model folder, or a `CaptionerError` naming the file it lacks."""
    config = folder / "config.json"
    if list(folder.glob("*.onnx")) or (folder / "selected_tags.csv").is_file():
        return "wd14"
    if not config.is_file():
        raise CaptionerError(
            f"{folder}: not a captioner: no config.json (a transformers captioner) and no model.onnx + "
            "selected_tags.csv (a WD14 tagger)"
        )
    try:
        settings = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"{config}: not JSON ({exc})") from None
    kind = settings.get("model_type", "") if isinstance(settings, dict) else ""
    if "auto_map" in settings:  # its own modelling code: the native classes would load it with random weights
        raise CaptionerError(
            f"{config}: a checkpoint that needs trust_remote_code (auto_map); sdtune runs only transformers' own "
            "classes: use a copy converted to transformers' format"
        )
    if kind not in TRANSFORMERS_FAMILIES:
        known = ", ".join(TRANSFORMERS_FAMILIES)
        raise CaptionerError(
            f"{config}: model_type {kind!r} is not a captioner sdtune runs (it runs {known}; or a WD14 tagger)"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CaptionerError(f"{folder}: no weights: expected {WEIGHT_FILES[0]} (or {WEIGHT_FILES[2]})")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):  # the Hub's older name, or transformers 5's
        raise CaptionerError(f"{folder}: no {PROCESSOR_FILES[0]} (the processor, saved with the model)")
    return TRANSFORMERS_FAMILIES[kind].family


def load_captioner(model: str = TOY, tagger: TaggerOptions | None = None, device: str = "cpu") -> Captioner:
    """The captioner `model` names (see the module docstring).

    Raises:
        CaptionerError: one line naming the folder or file that is wrong, or what to install.
    """
    folder = resolve_model(model)
    if folder == TOY:
        return ToyCaptioner(TOY)
    family = model_family(folder)
    if family == "wd14":
        return WD14Tagger(folder, tagger or TaggerOptions())
    return TransformersCaptioner(folder, family, device)


# -- transformers captioners ----------------------------------------------------------------------------------------


class TransformersCaptioner(Captioner):
    """BLIP, BLIP-2 and Florence-2 captioning: the processor's pixels (and Florence-2's task prompt) into `generate`,
    beam search, special tokens dropped."""

    def __init__(self, folder: Path, family: str, device: str = "cpu"):
        super().__init__(str(folder))
        import torch
        import transformers

        self.kind = next(row for row in TRANSFORMERS_FAMILIES.values() if row.family == family)
        self.family, self.torch, self.device = family, torch, device
        try:
            self.processor = getattr(transformers, self.kind.processor).from_pretrained(folder)
            self.model = getattr(transformers, self.kind.model).from_pretrained(folder).to(device).eval()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a checkpoint of another layout or version
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptionerError(f"{folder}: not a {family} model transformers can load ({first})") from None

    def caption(self, images):
        rgb = [image.convert("RGB") for image in images]
        if self.kind.prompt is None:
            inputs = self.processor(images=rgb, return_tensors="pt")
            model_inputs = {"pixel_values": inputs["pixel_values"].to(self.device)}
        else:
            inputs = self.processor(text=[self.kind.prompt] * len(rgb), images=rgb, return_tensors="pt")
            model_inputs = {k: inputs[k].to(self.device) for k in ("input_ids", "pixel_values")}
        with self.torch.inference_mode():
            ids = self.model.generate(**model_inputs, **BLIP_GENERATE)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


# -- WD14 taggers ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_tags(path: Path) -> list[Tag]:
    """selected_tags.csv (tag_id,name,category,count): one row per output of the ONNX model, in order."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [Tag(row["name"], int(row["category"])) for row in rows]
    except FileNotFoundError:
        raise CaptionerError(
            f"{path.parent}: no selected_tags.csv beside the ONNX model (the tagger's tag names)"
        ) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise CaptionerError(f"{path}: not a WD14 tags file (columns tag_id,name,category,count): {exc}") from None


def clean_tag(name: str, underscores: bool = False) -> str:
    """Danbooru's `long_hair` as `long hair`; kaomoji (`^_^`) keep their underscores."""
    return name if underscores or name in KAOMOJI else name.replace("_", " ")


def select_tags(probabilities: np.ndarray, tags: Sequence[Tag], options: TaggerOptions) -> list[str]:
    """The tags of one image: characters first, then general tags, each by falling probability; rating tags never;
    blacklisted tags (either spelling) never."""
    banned = {clean_tag(t.strip()) for t in options.blacklist if t.strip()}
    kept = []
    for index in np.argsort(-probabilities, kind="stable"):
        tag, p = tags[index], float(probabilities[index])
        threshold = {GENERAL: options.general_threshold, CHARACTER: options.character_threshold}.get(tag.category)
        if threshold is None or p < threshold or clean_tag(tag.name) in banned:
            continue
        kept.append((tag.category != CHARACTER, clean_tag(tag.name, options.underscores)))
    return [name for _, name in sorted(kept, key=lambda row: row[0])]  # stable: each group keeps its order


class WD14Tagger(Captioner):
    """A WD14 tagger (SmilingWolf's): the image padded white to a square, resized to the model's side, BGR floats
    0-255 in NHWC, one probability per row of selected_tags.csv out."""

    family = "wd14"

    def __init__(self, folder: Path, options: TaggerOptions):
        super().__init__(str(folder))
        models = sorted(folder.glob("*.onnx"))
        if not models:
            raise CaptionerError(f"{folder}: no model.onnx beside selected_tags.csv (the WD14 tagger itself)")
        try:
            import onnxruntime
        except ImportError:
            raise CaptionerError(f"WD14 taggers run on onnxruntime, not installed here: {TAGGERS_EXTRA}") from None
        self.tags, self.options = read_tags(folder / "selected_tags.csv"), options
        try:
            self.session = onnxruntime.InferenceSession(str(models[0]), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise CaptionerError(f"{models[0]}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        self.side = self._check_signature(models[0])

    def _check_signature(self, path: Path) -> int:
        """The square side the model takes; a `CaptionerError` when it is not [batch, side, side, 3] float in and
        [batch, len(tags)] out."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = f"a WD14 tagger takes [batch, side, side, 3] floats and gives [batch, {len(self.tags)}] (the tags)"
        fine = len(inputs) == 1 and len(outputs) == 1
        shape = inputs[0].shape if fine else []
        fine = fine and inputs[0].type == "tensor(float)" and len(shape) == 4 and shape[3] == 3
        fine = fine and isinstance(shape[1], int) and shape[1] == shape[2]
        out = outputs[0].shape if fine else []
        fine = fine and len(out) == 2 and (not isinstance(out[1], int) or out[1] == len(self.tags))
        if not fine:
            got = ", ".join(f"{i.name} {i.shape}" for i in inputs) + " -> " + ", ".join(str(o.shape) for o in outputs)
            raise CaptionerError(f"{path.name}: wrong signature ({got}); {expected}")
        return shape[1]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[side, side, 3] float32 BGR 0-255: pad to a white square (the subject keeps its shape), then resize."""
        image = image.convert("RGB")
        square = Image.new("RGB", (max(image.size),) * 2, (255, 255, 255))
        square.paste(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))
        square = square.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def caption(self, images):
        batch = np.stack([self.pixels(image) for image in images])
        probabilities = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        if probabilities.shape[-1] != len(self.tags):
            raise CaptionerError(
                f"{Path(self.source).name}: the model gives {probabilities.shape[-1]} probabilities for "
                f"{len(self.tags)} tags in selected_tags.csv: the two do not belong together"
            )
        return [", ".join(select_tags(row, self.tags, self.options)) for row in probabilities]
