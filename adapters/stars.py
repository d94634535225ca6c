"""The held-out star read strictly, by its geometry: one piece, five deep points, filled, whole.

`toyworld.classify_shape` calls anything concave a star, so the broken or partial outlines a fine-tune draws on its
way to a new shape pass it. A fine-tune that learned the star draws one filled piece with five points, and this is
what `bench/shape_table.py` and tests/test_shapes.py count (README, "A new shape, not only a new colour").

Example:

```py
>>> from sdtune.adapters import stars, toyworld
>>> stars.star_geometry(toyworld.render(toyworld.Scene("purple", "star"))).is_star
True
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The toy world's own segmentation and colour reading, so that both scorers see the same shape.
from sdtune.adapters.toyworld import Score, _away_from_background, _components, _rgb64, score_image

PROFILE_SECTORS = 48  # 7.5 degrees each: a star point (36 degrees wide at half height) spans several
MIN_PIECE = 8  # pixels: a smaller speck of foreground is sampling haze, not a piece of the shape
STAR_POINTS = 5
STAR_MIN_FILL = 0.8  # drawn stars measure 0.85-0.93; outlines (0.4-0.75) and gapped outlines fall short
STAR_MAX_SOLIDITY = 0.8  # `toyworld.classify_shape`'s star: points that go in deep, not bumps on a blob
STAR_MIN_INNER = 0.33  # drawn stars 0.43 or more; a notch, a missing part or a cut reaches in to 0-0.29


@dataclass
class StarGeometry:
    """What the star check saw in one image (`star_geometry`)."""

    pieces: int  # foreground components of at least MIN_PIECE pixels: one for a whole shape
    points: int  # outward points of the largest piece's outline, seen from its centroid
    fill: float  # its area / the area its radial profile encloses: ~0.9 filled, low for an outline or an open arc
    solidity: float  # its area / its convex hull's (`Detection.solidity`): ~0.6 for a star, ~1 for a blob
    inner: float  # its shortest radius / its longest: a whole star keeps its valleys out at ~0.45 of its points
    color: str | None  # as `score_image` names it

    @property
    def is_star(self) -> bool:
        five_points = self.points == STAR_POINTS and self.solidity < STAR_MAX_SOLIDITY
        whole = self.pieces == 1 and self.fill >= STAR_MIN_FILL and self.inner >= STAR_MIN_INNER
        return bool(whole and five_points)


def radial_profile(piece: np.ndarray, sectors: int = PROFILE_SECTORS) -> np.ndarray:
    """The outline of a boolean mask as seen from its centroid: in each of `sectors` equal angles, the distance of
    its farthest point (0 where a sector holds none). Each pixel counts as its 4 quarter-pixel centres, so sectors
    near the centre are not left empty by the pixel grid."""
    ys, xs = np.nonzero(piece)
    offsets = np.array([-0.25, 0.25])
    dy = (ys[:, None, None] + offsets[:, None] - ys.mean()).repeat(2, axis=2).ravel()
    dx = (xs[:, None, None] + offsets[None, :] - xs.mean()).repeat(2, axis=1).ravel()
    sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * sectors).astype(int) % sectors
    profile = np.zeros(sectors)
    np.maximum.at(profile, sector, np.hypot(dy, dx) + 0.25)  # + 0.25: to the quarter-pixel's outer edge
    return profile


def count_points(profile: np.ndarray, min_prominence: float = 0.12) -> int:
    """Outward points of a radial profile: its peaks that stand at least `min_prominence` x its largest radius
    above the deeper of the two valleys that part them from a higher peak (a peak's topographic prominence, going
    round the circle).

    A round shape has none; a square 4 (its sides come in to 0.71 of its corners), a triangle 3 (0.5), the toy star
    5 (0.45). A ragged edge (a pixel or so on a radius of 10-20) stays under the bar; a sampled star's blunt points
    (0.6-0.7) stay over it.
    """
    radii = np.roll(profile, -int(np.argmax(profile))).tolist()  # the highest peak first: no peak straddles the wrap
    n, bar = len(radii), min_prominence * radii[0]
    points = 0
    for i in range(n):
        if radii[i] < radii[i - 1] or radii[i] < radii[(i + 1) % n] or (i and radii[i] == radii[i - 1]):
            continue  # not a peak (a flat top counts once, at its first sector)
        if i == 0:
            points += radii[0] - min(radii) >= bar
            continue
        left = min(_walk_to_higher(radii, i, -1))
        right = min(_walk_to_higher(radii, i, +1))
        points += radii[i] - max(left, right) >= bar
    return points


def _walk_to_higher(radii: list[float], i: int, step: int) -> list[float]:
    """The radii met going from sector i round the circle by `step` until one higher than radii[i]."""
    met, k = [], (i + step) % len(radii)
    while radii[k] <= radii[i] and k != i:
        met.append(radii[k])
        k = (k + step) % len(radii)
    return met or [radii[i]]


def star_geometry(image: Image.Image) -> StarGeometry:
    """Reads the geometry a star must have: one piece, five deep points, filled (see `StarGeometry`)."""
    rgb = _rgb64(image)
    labels, sizes = _components(_away_from_background(rgb))
    pieces = sum(size >= MIN_PIECE for size in sizes)
    if not pieces:
        return StarGeometry(0, 0, 0.0, 0.0, 0.0, None)
    piece = labels == 1 + int(np.argmax(sizes))
    profile = radial_profile(piece)
    enclosed = float((profile**2).sum() * np.pi / len(profile))  # sum of sector areas r^2 * dtheta / 2
    fill = float(piece.sum()) / max(enclosed, 1.0)
    seen = score_image(image)  # the same largest piece: its solidity and colour
    inner = float(profile.min() / profile.max())
    return StarGeometry(pieces, count_points(profile), fill, seen.solidity, inner, seen.color)


def score_stars(images: Sequence[Image.Image], color: str) -> Score:
    """Shares of images that show `color`, a star by its geometry (`StarGeometry.is_star`), and both."""
    found = [star_geometry(image) for image in images]
    n = max(len(found), 1)
    stars, colored = [g.is_star for g in found], [g.color == color for g in found]
    both = sum(s and c for s, c in zip(stars, colored))
    return Score(sum(colored) / n, sum(stars) / n, both / n, len(found))
