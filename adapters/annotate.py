"""Conditioning images made offline from plain images: `sdtune annotate --kind KIND IN_DIR OUT_DIR`.

Kinds that need no downloaded weights (classical image processing, OpenCV):

    canny      Canny edges, white on black (thresholds as options), what ControlNet's canny models were trained on
    softedge   Sobel gradient magnitude of a blurred image, normalised: soft grey edges like HED/PiDiNet give
    scribble   thick binary strokes: Canny on a strongly blurred image, dilated (a classical stand-in for the
               HED-based fake scribbles of ControlNet's scribble training)
    mask       binary foreground mask: pixels far from the border's median colour (flat backgrounds), white on black

Kinds that need a detector's weights (`midas` depth, `hed` edges, `openpose`) are refused unless the user gives a
local weights file: sdtune never downloads them (controlnet_aux would, from the Hub). With `weights`, `midas` and
`hed` run the given network through OpenCV's DNN module (ONNX, or a Caffe model with its .prototxt beside it).
`openpose` needs keypoint grouping that sdtune does not ship, so it is always refused with what to do instead.

OpenCV is imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdtune.adapters.atomic import atomic_path
from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.images import IMAGE_EXTENSIONS, image_files, open_rgb, to_rgb
from sdtune.adapters.mask_edit import background_distance


class AnnotateError(SdtuneError, ValueError):
    """Input the user can fix (unknown kind, missing weights, bad folder); the message is one line."""


@dataclass(frozen=True)
class AnnotateOptions:
    """Options of the annotators; each kind reads the ones it needs."""

    low_threshold: int = 100  # canny, scribble: hysteresis low threshold
    high_threshold: int = 200  # canny, scribble: hysteresis high threshold
    mask_threshold: float = 0.18  # mask: min colour distance (0-1) from the background to count as foreground
    weights: str | None = None  # midas, hed: a local weights file


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise AnnotateError(f"annotating needs OpenCV ({exc}); pip install opencv-python-headless") from None
    return cv2


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _rgb(single: np.ndarray) -> Image.Image:
    return Image.fromarray(single.astype(np.uint8)).convert("RGB")


def canny(image: Image.Image, options: AnnotateOptions = AnnotateOptions()) -> Image.Image:
    """White Canny edges on black, as ControlNet's canny models expect."""
    cv2 = _cv2()
    return _rgb(cv2.Canny(_gray(image), options.low_threshold, options.high_threshold))


def softedge(image: Image.Image, options: AnnotateOptions = AnnotateOptions()) -> Image.Image:
    """Soft edges: Sobel gradient magnitude of a Gaussian-blurred image, scaled so the strongest edge is white."""
    cv2 = _cv2()
    gray = cv2.GaussianBlur(_gray(image).astype(np.float32), (0, 0), 1.0 + min(image.size) / 512)
    magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    peak = float(magnitude.max())
    return _rgb(np.zeros_like(magnitude) if peak == 0 else np.clip(magnitude / peak * 255, 0, 255))


def scribble(image: Image.Image, options: AnnotateOptions = AnnotateOptions()) -> Image.Image:
    """Thick binary strokes along the main contours: Canny on a strongly blurred image, then dilated."""
    cv2 = _cv2()
    size = max(1, min(image.size) // 64)
    blurred = cv2.GaussianBlur(_gray(image), (0, 0), 2.0 * size)
    edges = cv2.Canny(blurred, options.low_threshold // 2, options.high_threshold // 2)
    return _rgb(cv2.dilate(edges, np.ones((2 * size + 1, 2 * size + 1), np.uint8)))


def mask(image: Image.Image, options: AnnotateOptions = AnnotateOptions()) -> Image.Image:
    """White where the image differs from its background (the median colour of its border), black elsewhere."""
    return _rgb((background_distance(image) > options.mask_threshold) * 255)


def _dnn(weights: str, kind: str):
    """An OpenCV DNN network from a local file: ONNX, or Caffe (`x.caffemodel` with `x.prototxt` beside it)."""
    cv2 = _cv2()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise AnnotateError(f"--weights: {path} not found (a local {kind} model file)")
    try:
        if path.suffix == ".caffemodel":
            return cv2.dnn.readNetFromCaffe(str(path.with_suffix(".prototxt")), str(path))
        return cv2.dnn.readNet(str(path))
    except cv2.error as exc:
        first = str(exc).strip().splitlines()[-1][:200]
        raise AnnotateError(f"--weights: {path} is not a {kind} network OpenCV can read ({first})") from None


def _run_dnn(image: Image.Image, options: AnnotateOptions, kind: str, size: int, mean, scale: float) -> Image.Image:
    cv2 = _cv2()
    net = _dnn(options.weights, kind)
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    net.setInput(cv2.dnn.blobFromImage(bgr, scale, (size, size), mean, swapRB=kind == "midas", crop=False))
    out = np.squeeze(net.forward()).astype(np.float32)
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-6) * 255
    return _rgb(cv2.resize(out, image.size, interpolation=cv2.INTER_CUBIC).clip(0, 255))


def midas(image: Image.Image, options: AnnotateOptions) -> Image.Image:
    """Relative depth (near = white) from a local MiDaS ONNX model (e.g. midas_v21_small_256.onnx)."""
    return _run_dnn(image, options, "midas", 256, (123.675, 116.28, 103.53), 1 / 255.0)


def hed(image: Image.Image, options: AnnotateOptions) -> Image.Image:
    """Soft edges from a local HED network (hed_pretrained_bsds.caffemodel + deploy .prototxt, or ONNX)."""
    return _run_dnn(image, options, "hed", 512, (104.00699, 116.66877, 122.67892), 1.0)


KINDS = {"canny": canny, "softedge": softedge, "scribble": scribble, "mask": mask}
WEIGHTED_KINDS = {"midas": midas, "hed": hed}
REFUSED_KINDS = {
    "openpose": "openpose needs keypoint grouping that sdtune does not ship; make pose images with a pose tool "
    "(e.g. controlnet_aux's OpenposeDetector) and train or sample with them as conditioning images",
}


def annotator(kind: str, options: AnnotateOptions):
    """The function that annotates `kind`, or an `AnnotateError` saying why this kind cannot run here."""
    if kind in KINDS:
        return KINDS[kind]
    if kind in WEIGHTED_KINDS:
        if not options.weights:
            raise AnnotateError(
                f"--kind {kind} needs detector weights, which sdtune never downloads: pass a local model file with "
                f"--weights PATH, or use a kind without weights ({', '.join(KINDS)})"
            )
        return WEIGHTED_KINDS[kind]
    if kind in REFUSED_KINDS:
        raise AnnotateError(f"--kind {kind}: {REFUSED_KINDS[kind]}")
    known = ", ".join([*KINDS, *WEIGHTED_KINDS])
    raise AnnotateError(f"--kind {kind!r}: unknown kind; choose from {known}")


def annotate_image(image: Image.Image, kind: str, options: AnnotateOptions = AnnotateOptions()) -> Image.Image:
    """The `kind` conditioning image of `image` (EXIF-rotated first), RGB, at the image's size."""
    return annotator(kind, options)(to_rgb(ImageOps.exif_transpose(image)), options)


def annotate_folder(in_dir, out_dir, kind: str, options: AnnotateOptions = AnnotateOptions()) -> list[Path]:
    """Annotates every image under `in_dir` into `out_dir` as PNG, keeping relative paths and stems
    (`in/a/b.jpg` -> `out/a/b.png`): the `conditioning/` folder of the ControlNet folder convention.

    Raises:
        AnnotateError: an unknown kind, missing weights, a missing folder, no images, or an unreadable image.
    """
    run = annotator(kind, options)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise AnnotateError(f"IN_DIR: {in_dir} is not a folder")
    if out_dir.resolve() == in_dir.resolve():
        raise AnnotateError("OUT_DIR must differ from IN_DIR (conditioning images would replace the images)")
    # the images the trainer would pair (hidden files skipped), each seen as it trains (16-bit grey, alpha on white)
    sources = [p for p in image_files(in_dir) if not p.resolve().is_relative_to(out_dir.resolve())]
    if not sources:
        raise AnnotateError(f"IN_DIR: no images ({', '.join(IMAGE_EXTENSIONS)}) in {in_dir}")
    written = []
    for source in sources:
        try:
            result = run(open_rgb(source), options)
        except OSError as exc:
            raise AnnotateError(f"{source}: not a readable image ({exc})") from None
        target = out_dir / source.relative_to(in_dir).with_suffix(".png")
        with atomic_path(target, ".png") as tmp:
            result.save(tmp, format="PNG")
        written.append(target)
    return written
