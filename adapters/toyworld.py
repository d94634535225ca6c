"""The toy world: procedurally generated, captioned 64x64 images of one flat shape on a light background.

It is what the bundled toy base was pretrained on, and it is how sdtune proves that a fine-tune learned something
without a learned judge: the scorer below reads colour by hue and shape by geometry, with numpy alone.

The world knows more than the toy base was taught. `BASE_COLORS` x `BASE_SHAPES` is the pretraining vocabulary;
the held-out colours and shapes (`purple`, `orange`, `star`, ...) exist so that fine-tuning has something new to
learn and the scorer can tell when it did.

Example:

```py
>>> from sdtune.adapters import toyworld
>>> scene = toyworld.Scene(color="red", shape="circle", radius=14, cx=32, cy=30)
>>> image = toyworld.render(scene)           # PIL.Image, 64x64 RGB
>>> toyworld.score_image(image).color, toyworld.score_image(image).shape
('red', 'circle')
```
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

# Reference RGB of each colour. Hues are spread so that the nearest-hue rule below separates them:
# red 0, orange ~28, yellow ~50, green ~130, cyan ~186, blue ~226, purple ~280 degrees.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (240, 128, 24),
    "yellow": (236, 200, 32),
    "green": (40, 168, 64),
    "cyan": (32, 178, 198),
    "blue": (40, 80, 216),
    "purple": (146, 56, 204),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# What the toy base was pretrained on; everything else is held out for fine-tuning.
BASE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

MIN_RADIUS, MAX_RADIUS = 10, 18


@dataclass(frozen=True)
class Scene:
    """One toy-world image: a flat `shape` of `color`, of circumradius `radius` px centred at (`cx`, `cy`)."""

    color: str
    shape: str
    radius: float = 14.0
    cx: float = 32.0
    cy: float = 32.0
    background: tuple[int, int, int] = (236, 236, 232)
    fill: tuple[int, int, int] | None = None  # exact RGB; None = the reference colour of `color`

    def caption(self, template: str = "a {color} {shape}") -> str:
        return template.format(color=self.color, shape=self.shape)


def sample_scene(
    rng: random.Random, colors: Sequence[str] = BASE_COLORS, shapes: Sequence[str] = BASE_SHAPES
) -> Scene:
    """Draws a random scene: colour and shape uniformly, size and position anywhere the shape fits, light background.

    The fill and background get a small jitter so that a model learns "red" as a hue range, not one RGB triple.
    """
    color, shape = rng.choice(list(colors)), rng.choice(list(shapes))
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    margin = radius + 2
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)
    grey = rng.randint(218, 246)
    background = tuple(min(255, max(0, grey + rng.randint(-6, 6))) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in COLORS[color])
    return Scene(color, shape, radius, cx, cy, background, fill)


def _polygon(shape: str, radius: float, cx: float, cy: float) -> list[tuple[float, float]]:
    if shape == "square":  # axis-aligned, same area as the circle of this radius
        half = radius * math.sqrt(math.pi) / 2
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # upright equilateral, circumradius scaled up so its area is not tiny
        r = radius * 1.2
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # five points, inner radius 0.45 of the outer
        r = radius * 1.15
        return [
            (
                cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE, *others: Scene) -> Image.Image:
    """Renders `scene` anti-aliased (4x supersampling) at `size` px. Coordinates are in 64 px units. `others` are
    drawn over it, on its background (scenes of several shapes)."""
    ss = 4 * size / IMAGE_SIZE
    canvas = Image.new("RGB", (4 * size, 4 * size), tuple(scene.background))
    draw = ImageDraw.Draw(canvas)
    for each in (scene, *others):
        if each.color not in COLORS:
            raise ValueError(f"unknown color {each.color!r}; known: {', '.join(COLORS)}")
        fill = tuple(each.fill) if each.fill is not None else COLORS[each.color]
        if each.shape == "circle":
            r, cx, cy = each.radius * ss, each.cx * ss, each.cy * ss
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            corners = _polygon(each.shape, each.radius, each.cx, each.cy)
            draw.polygon([(x * ss, y * ss) for x, y in corners], fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def generate(
    n: int, seed: int, colors: Sequence[str] = BASE_COLORS, shapes: Sequence[str] = BASE_SHAPES
) -> list[tuple[Image.Image, str, Scene]]:
    """`n` seeded (image, caption, scene) triples; the same seed always gives the same images."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, colors, shapes) for _ in range(n)]
    return [(render(s), s.caption(), s) for s in scenes]


# ----------------------------------------------------------------------------------------------------------------
# Scorer: classical vision only. Segment the shape from the background, then colour by hue, shape by geometry.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Detection:
    """What the scorer saw in one image. `color`/`shape` are None when no shape stands out of the background."""

    color: str | None
    shape: str | None
    area: int  # pixels in the largest foreground component
    fill_ratio: float  # area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5
    solidity: float  # area / convex-hull area: ~1 for convex shapes, ~0.6 for a star
    hue: float | None  # degrees
    saturation: float

    def as_dict(self) -> dict:
        return asdict(self)


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """4-connected components of a boolean mask (iterative flood fill; images are 64x64): (labels, sizes), where
    label k + 1 has sizes[k] pixels and 0 is the background."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes: list[int] = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current = len(sizes) + 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        sizes.append(size)
    return labels, sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask."""
    labels, sizes = _components(mask)
    return labels == 1 + int(np.argmax(sizes)) if sizes else np.zeros_like(mask)


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (Andrew's monotone chain over pixel corners)."""
    corners = np.concatenate([points + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))]).astype(float)
    pts = sorted(set(map(tuple, corners)))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def _hue_of(pixels: np.ndarray) -> tuple[float | None, float]:
    """Saturation-weighted circular mean hue (degrees) and mean saturation of RGB pixels in [0, 1]."""
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    hue, sat = hsv[:, 0] * 2 * math.pi, hsv[:, 1]
    if sat.sum() < 1e-6:
        return None, 0.0
    mean = math.atan2((np.sin(hue) * sat).sum(), (np.cos(hue) * sat).sum())
    return math.degrees(mean) % 360, float(sat.mean())


def _nearest_color(hue: float, colors: Iterable[str]) -> str:
    def reference_hue(name):
        return colorsys.rgb_to_hsv(*(c / 255 for c in COLORS[name]))[0] * 360

    return min(colors, key=lambda name: min(abs(hue - reference_hue(name)), 360 - abs(hue - reference_hue(name))))


def classify_shape(fill_ratio: float, solidity: float) -> str:
    """Geometry -> shape name. Thresholds sit halfway between the shapes' ideal ratios (see `Detection`)."""
    if solidity < 0.8:
        return "star"
    if fill_ratio > 0.89:
        return "square"
    if fill_ratio > 0.64:
        return "circle"
    return "triangle"


def _rgb64(image: Image.Image) -> np.ndarray:
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def foreground_mask(image: Image.Image) -> np.ndarray:
    """The shape's pixels (64x64 bool): the largest component clearly away from the background colour (the median
    of the border); 0.18 ignores JPEG-ish noise and soft sampling haze."""
    return _largest_component(_away_from_background(_rgb64(image)))


def _away_from_background(rgb: np.ndarray) -> np.ndarray:
    """Every pixel clearly away from the background colour (the median of the border), whatever component."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.abs(rgb - np.median(border, axis=0)).max(axis=-1) > 0.18


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every pixel the outside cannot reach: a closed outline becomes the region it encloses."""
    padded = np.pad(~mask, 1, constant_values=True)
    outside = _largest_component(padded)  # the padding ring joins all the outside into one component
    return ~outside[1:-1, 1:-1]


def condition_region(condition: Image.Image) -> np.ndarray:
    """The region (64x64 bool) a conditioning image asks for: its bright pixels with enclosed holes filled, so a mask
    gives itself and a closed edge map (canny, scribble) the shape it outlines."""
    bright = _rgb64(condition).mean(axis=-1) > 0.5
    return _fill_holes(bright)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def scene_mask(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene's shape as a binary mask image (white on black, RGB): a conditioning image of where it stands."""
    white = Scene("red", scene.shape, scene.radius, scene.cx, scene.cy, background=(0, 0, 0), fill=(255, 255, 255))
    return render(white, size).point(lambda v: 255 if v >= 128 else 0)


def score_image(image: Image.Image, colors: Iterable[str] = tuple(COLORS)) -> Detection:
    """Finds the one shape in a toy-world image and names its colour (nearest hue) and shape (geometry).

    Args:
        image: an RGB image of any size; it is resized to 64x64 first.
        colors: the colour names the hue may be matched to (default: every colour of the world).
    """
    rgb = _rgb64(image)
    mask = foreground_mask(image)
    area = int(mask.sum())
    if area < 12:
        return Detection(None, None, area, 0.0, 0.0, None, 0.0)
    ys, xs = np.nonzero(mask)
    fill_ratio = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / max(_convex_hull_area(np.stack([ys, xs], axis=1)), 1.0)
    # Colour from the shape's inner pixels: the anti-aliased rim is a blend with the background.
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    hue, saturation = _hue_of(rgb[inner if inner.sum() >= 4 else mask])
    color = _nearest_color(hue, colors) if hue is not None and saturation > 0.25 else None
    return Detection(color, classify_shape(fill_ratio, solidity), area, fill_ratio, solidity, hue, saturation)


def _pixel_hues(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue (degrees) and saturation of every pixel of an [h, w, 3] array in [0, 1] (HSV, vectorized)."""
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(high == r, (g - b) / safe % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue * 60.0, np.where(high > 0, chroma / np.where(high > 0, high, 1.0), 0.0)


def count_shapes(image: Image.Image, min_area: int = 12, colors: Iterable[str] = tuple(COLORS)) -> dict[str, int]:
    """How many shapes of each colour an image shows (colours with none are left out), for images of several shapes.

    Every foreground pixel (away from the border's median colour, as `foreground_mask`) that is saturated takes the
    colour of nearest hue; each 4-connected patch of one colour of at least `min_area` pixels is one shape. Two
    touching shapes of different colours count apart; sampling haze (small patches) does not count.
    """
    rgb = _rgb64(image)
    foreground = _away_from_background(rgb)
    hue, saturation = _pixel_hues(rgb)
    names = list(colors)
    references = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in COLORS[n]))[0] * 360 for n in names])
    distance = np.abs(hue[..., None] - references)
    nearest = np.minimum(distance, 360 - distance).argmin(axis=-1)
    counts = {}
    for k, name in enumerate(names):
        _, sizes = _components(foreground & (saturation > 0.25) & (nearest == k))
        if found := sum(size >= min_area for size in sizes):
            counts[name] = found
    return counts


@dataclass
class Score:
    """Fractions of images in which the scorer found the asked colour / shape / both."""

    color: float
    shape: float
    both: float
    n: int


def shape_shown(image: Image.Image, detection: Detection, shape: str | None) -> bool:
    """Whether an image shows `shape` (None: not checked). A star must pass `stars.star_geometry` (one piece, five
    deep points, filled, whole): `classify_shape` is sound for convex shapes but calls any concave blob a star, which
    would count the lumpy shapes a fine-tune draws before it has learned the star."""
    if shape is None:
        return True
    if shape == "star":
        from sdtune.adapters import stars  # built on this module's segmentation

        return stars.star_geometry(image).is_star
    return detection.shape == shape


def judge(
    images: Sequence[Image.Image],
    expected: Sequence[tuple[str | None, str | None]],
    detections: Sequence[Detection] | None = None,
) -> tuple[Score, list[bool]]:
    """Scores images against the (colour, shape) each was asked for (None: not checked): the shares of colour,
    shape and both right, and per image whether both were. `detections`: the images' `score_image`, if at hand."""
    detections = [score_image(i) for i in images] if detections is None else detections
    if not len(images) == len(detections) == len(expected):
        raise ValueError(f"{len(images)} images, {len(detections)} detections but {len(expected)} expectations")
    colors = [c is None or d.color == c for d, (c, _) in zip(detections, expected)]
    shapes = [shape_shown(i, d, s) for i, d, (_, s) in zip(images, detections, expected)]
    hits = [c and s for c, s in zip(colors, shapes)]
    n = max(len(images), 1)
    return Score(sum(colors) / n, sum(shapes) / n, sum(hits) / n, len(images)), hits


def score_images(images: Sequence[Image.Image], expected: Sequence[tuple[str | None, str | None]]) -> Score:
    """Scores images against the (colour, shape) each was asked for; a None in `expected` is not checked."""
    return judge(images, expected)[0]


def bar_prompts() -> list[tuple[str, str, str]]:
    """The 12 prompts the toy base is held to: (prompt, colour, shape) for every base colour x base shape."""
    return [(f"a {c} {s}", c, s) for c in BASE_COLORS for s in BASE_SHAPES]


def write_dataset(
    folder, n: int, seed: int, colors: Sequence[str], shapes: Sequence[str] = BASE_SHAPES, size: int = IMAGE_SIZE
) -> list[str]:
    """Writes `n` seeded toy-world images as `NNNN.png` with same-name `.txt` captions (the plain-folder format).

    Returns the written image names. Used to build the bundled datasets in `datasets/` (see datasets/README.md).
    """
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = []
    for i in range(n):
        scene = sample_scene(rng, colors, shapes)
        name = f"{i:04d}.png"
        render(scene, size).save(folder / name)
        (folder / f"{i:04d}.txt").write_text(scene.caption() + "\n")
        names.append(name)
    return names


def write_control_dataset(
    folder, n: int, seed: int, colors: Sequence[str] = BASE_COLORS, shapes=BASE_SHAPES, kind: str = "mask"
) -> None:
    """`n` seeded ControlNet triplets in the folder convention: `images/NNNN.png` with `images/NNNN.txt` captions,
    and `conditioning/NNNN.png`: the binary mask of where the shape stands (`kind="mask"`, `scene_mask`) or its 2 px
    outline (`kind="edges"`, `scene_edges`). The same seed gives the same scenes whatever the kind."""
    if kind not in CONDITION_KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(CONDITION_KINDS)}")
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditioning").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = sample_scene(rng, colors, shapes)
        render(scene).save(folder / "images" / f"{i:04d}.png")
        (folder / "images" / f"{i:04d}.txt").write_text(scene.caption() + "\n")
        CONDITION_KINDS[kind](scene).save(folder / "conditioning" / f"{i:04d}.png")


def _erode(mask: np.ndarray) -> np.ndarray:
    """One pixel off every side of `mask` (3x3 minimum; the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    return np.logical_and.reduce(
        [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )


def scene_edges(scene: Scene, size: int = IMAGE_SIZE, width: int = 2) -> Image.Image:
    """The scene's outline, `width` px wide, white on black (RGB): what a canny or scribble condition gives. It is
    `scene_mask` less its `width`-fold erosion, so the outline lies on the shape and `condition_region` of it (holes
    filled) gives the mask back."""
    mask = np.asarray(scene_mask(scene, size).convert("L")) > 127
    inner = mask
    for _ in range(width):
        inner = _erode(inner)
    return Image.fromarray(((mask & ~inner) * 255).astype(np.uint8)).convert("RGB")


# What a conditioning image of a scene shows: the filled shape, or its 2 px outline.
CONDITION_KINDS = {"mask": scene_mask, "edges": scene_edges}


def write_masked_dataset(folder, n: int, seed: int, subject=("purple", "circle"), distractor=("orange", "square")):
    """`n` seeded images for masked loss: `images/NNNN.png`, each the `subject` on one side (its caption, e.g.
    "a purple circle", in `images/NNNN.txt`) and the `distractor` on the other, never named; and `masks/NNNN.png`,
    white on the subject (a disk 3 px wider than it) and black elsewhere. Trained without the masks, "a purple circle"
    brings the orange square along; with them, only the circle is learned."""
    from pathlib import Path

    folder = Path(folder)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        left = rng.random() < 0.5  # the subject's side; the distractor takes the other
        x_subject, x_other = (17, 47) if left else (47, 17)
        grey = rng.randint(222, 242)
        background = (grey, grey, grey - 4)
        radius = rng.uniform(9, 12)
        main = Scene(*subject, radius, x_subject + rng.uniform(-2, 2), rng.uniform(16, 48), background)
        other = Scene(*distractor, rng.uniform(8, 10), x_other + rng.uniform(-2, 2), rng.uniform(16, 48), background)
        render(main, IMAGE_SIZE, other).save(folder / "images" / f"{i:04d}.png")
        (folder / "images" / f"{i:04d}.txt").write_text(main.caption() + "\n")
        disk = Scene("red", "circle", radius + 3, main.cx, main.cy)
        scene_mask(disk).save(folder / "masks" / f"{i:04d}.png")
