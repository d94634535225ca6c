"""The toy world and its scorer: the scorer must read every rendered colour and shape correctly."""

from __future__ import annotations

import math

import pytest
from PIL import Image, ImageDraw

from sdtune.adapters import stars, toyworld


@pytest.mark.parametrize("color", list(toyworld.COLORS))
@pytest.mark.parametrize("shape", toyworld.SHAPES)
@pytest.mark.parametrize("radius", [toyworld.MIN_RADIUS, toyworld.MAX_RADIUS])
def test_scorer_reads_every_rendered_scene(color, shape, radius):
    scene = toyworld.Scene(color=color, shape=shape, radius=radius, cx=30, cy=34)
    found = toyworld.score_image(toyworld.render(scene))
    assert (found.color, found.shape) == (color, shape), found


def test_scorer_on_random_world_including_jitter_and_upscaled_images():
    data = toyworld.generate(300, seed=5, colors=tuple(toyworld.COLORS), shapes=toyworld.SHAPES)
    wrong = [
        (s, toyworld.score_image(im))
        for im, _, s in data
        if (toyworld.score_image(im).color, toyworld.score_image(im).shape) != (s.color, s.shape)
    ]
    assert not wrong, wrong[:3]
    big = toyworld.render(data[0][2], size=256)  # the scorer resizes any size to 64 px
    assert toyworld.score_image(big).shape == data[0][2].shape


def test_blank_image_has_no_shape():
    found = toyworld.score_image(Image.new("RGB", (64, 64), (235, 235, 235)))
    assert found.color is None and found.shape is None and found.area == 0


def test_grey_shape_has_no_colour():
    scene = toyworld.Scene("red", "square", 14, 32, 32, fill=(90, 90, 90))
    assert toyworld.score_image(toyworld.render(scene)).color is None


def test_generate_is_seeded_and_captions_follow_scenes():
    a, b = toyworld.generate(5, seed=1), toyworld.generate(5, seed=1)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(list(x[0].getdata()) == list(y[0].getdata()) for x, y in zip(a, b))
    assert all(caption == f"a {s.color} {s.shape}" for _, caption, s in a)
    assert {s.color for _, _, s in toyworld.generate(200, seed=2)} == set(toyworld.BASE_COLORS)


def test_score_images_counts_hits():
    red_circle = toyworld.render(toyworld.Scene("red", "circle"))
    score = toyworld.score_images(
        [red_circle] * 4, [("red", "circle"), ("red", "square"), ("blue", None), (None, "circle")]
    )
    assert (score.color, score.shape, score.both) == (0.75, 0.75, 0.5)


def test_write_dataset_writes_png_and_caption_pairs(tmp_path):
    names = toyworld.write_dataset(tmp_path, 3, seed=0, colors=["purple"])
    assert names == ["0000.png", "0001.png", "0002.png"]
    for name in names:
        caption = (tmp_path / name).with_suffix(".txt").read_text().strip()
        found = toyworld.score_image(Image.open(tmp_path / name))
        assert caption == f"a purple {found.shape}" and found.color == "purple"


def test_bar_prompts_are_the_twelve_required():
    prompts = toyworld.bar_prompts()
    assert len(prompts) == 12 and ("a red circle", "red", "circle") in prompts
    assert {c for _, c, _ in prompts} == {"red", "green", "blue", "yellow"}


# -- The star's geometry: what a sample must show to count as the held-out star (issue 23, item 7) ---------------


def drawn(scene, outline: int = 0, wedges=(), cuts=()) -> Image.Image:
    """`scene` drawn as `toyworld.render` does (4x supersampled), or only its outline `outline` px wide; then each
    (from, to) wedge in degrees around its centre painted over with the background (a partial shape, or gaps in an
    outline), and each cut, a background line 2 px wide through the centre at that angle (a shape in two pieces)."""
    big = toyworld.render(scene, 4 * toyworld.IMAGE_SIZE)
    draw = ImageDraw.Draw(big)
    corners = [(4 * x, 4 * y) for x, y in toyworld._polygon(scene.shape, scene.radius, scene.cx, scene.cy)]
    if outline:
        draw.polygon(corners, fill=scene.background, outline=toyworld.COLORS[scene.color], width=4 * outline)
    cx, cy, far = 4 * scene.cx, 4 * scene.cy, 4 * toyworld.IMAGE_SIZE
    for start, end in wedges:
        draw.pieslice([cx - far, cy - far, cx + far, cy + far], start, end, fill=scene.background)
    for angle in cuts:
        dx, dy = far * math.cos(math.radians(angle)), far * math.sin(math.radians(angle))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=scene.background, width=8)
    return big.resize((toyworld.IMAGE_SIZE,) * 2, Image.Resampling.BOX)


STARS = [toyworld.Scene("purple", "star", r, 32 + dx, 32 + dy) for r in (10, 14, 18) for dx, dy in ((0, 0), (-7, 5))]


@pytest.mark.parametrize("scene", STARS + [s for _, _, s in toyworld.generate(12, 5, ["purple"], ["star"])])
def test_a_drawn_star_is_one_filled_piece_with_five_points(scene):
    found = stars.star_geometry(toyworld.render(scene))
    assert (found.pieces, found.points, found.color) == (1, 5, "purple") and found.is_star, found


@pytest.mark.parametrize(
    "how, spoil",
    [
        ("closed outline 2 px", dict(outline=2)),
        ("closed outline 3 px", dict(outline=3)),
        ("broken outline", dict(outline=2, wedges=[(10, 30), (150, 170), (260, 280)])),
        ("outline with one gap", dict(outline=3, wedges=[(80, 100)])),
        ("two points missing", dict(wedges=[(-20, 120)])),
        ("one point missing", dict(wedges=[(60, 115)])),
        ("half a star", dict(wedges=[(0, 180)])),
        ("cut in two", dict(cuts=[0])),
        ("cut in three", dict(cuts=[20, 100])),
    ],
)
@pytest.mark.parametrize("radius", [12, 18])
def test_broken_outlines_and_partial_stars_are_not_stars(how, spoil, radius):
    found = stars.star_geometry(drawn(toyworld.Scene("purple", "star", radius, 32, 32), **spoil))
    assert not found.is_star, (how, found)
    assert toyworld.score_image(drawn(toyworld.Scene("purple", "star", radius, 32, 32), **spoil)).color == "purple"


@pytest.mark.parametrize("shape, points", [("circle", 0), ("square", 4), ("triangle", 3)])
def test_the_other_shapes_are_not_stars_and_show_their_corners(shape, points):
    for radius in (10, 18):
        found = stars.star_geometry(toyworld.render(toyworld.Scene("purple", shape, radius, 30, 33)))
        assert (found.pieces, found.points, found.is_star) == (1, points, False), (shape, found)


def test_a_star_with_a_speck_beside_it_is_two_pieces_and_haze_does_not_count():
    scene = toyworld.Scene("purple", "star", 14, 30, 30)
    speck = toyworld.Scene("purple", "square", 2.5, 56, 56)  # ~20 px apart from the star: a second piece
    assert stars.star_geometry(toyworld.render(scene, 64, speck)).pieces == 2
    haze = toyworld.Scene("purple", "square", 1, 56, 56)  # ~3 px: haze
    assert stars.star_geometry(toyworld.render(scene, 64, haze)).is_star


def test_score_stars_counts_colour_shape_and_both():
    star, red_star = toyworld.Scene("purple", "star", 14), toyworld.Scene("red", "star", 14)
    images = [toyworld.render(star), toyworld.render(red_star), drawn(star, outline=2), Image.new("RGB", (64, 64))]
    score = stars.score_stars(images, "purple")
    assert (score.color, score.shape, score.both, score.n) == (0.5, 0.5, 0.25, 4)


def test_a_pentagon_has_five_corners_but_no_depth_so_it_is_not_a_star():
    big = Image.new("RGB", (256, 256), (236, 236, 232))
    corners = [
        (128 + 64 * math.cos(a), 128 + 64 * math.sin(a))
        for a in (-math.pi / 2 + k * 2 * math.pi / 5 for k in range(5))
    ]
    ImageDraw.Draw(big).polygon(corners, fill=toyworld.COLORS["purple"])
    found = stars.star_geometry(big.resize((64, 64), Image.Resampling.BOX))
    assert (found.pieces, found.points) == (1, 5) and found.solidity > 0.9 and not found.is_star, found


def lumpy_star(points: int = 4, inner: float = 0.5, radius: float = 18) -> Image.Image:
    """A filled star-like blob with `points` blunt points (valleys at `inner` x the radius): what an attention-only
    LoRA draws for "a purple star". Concave, so `toyworld.classify_shape` calls it a star."""
    big = Image.new("RGB", (256, 256), toyworld.Scene("purple", "star").background)
    corners = [
        (128 + 4 * r * math.cos(a), 128 + 4 * r * math.sin(a))
        for k in range(2 * points)
        for a, r in [(-math.pi / 2 + k * math.pi / points, radius if k % 2 == 0 else radius * inner)]
    ]
    ImageDraw.Draw(big).polygon(corners, fill=toyworld.COLORS["purple"])
    return big.resize((64, 64), Image.Resampling.BOX)


def test_a_runs_star_score_reads_the_geometry_not_any_concave_blob(monkeypatch):
    """The score a run writes into adapter.json (`scoring.score_targets`, per prompt `validation.per_target`) counts
    a star only when `stars.star_geometry` sees one: a lumpy blob with three or four blunt points is concave, not a
    star."""
    from sdtune.adapters import sampling, scoring
    from sdtune.trainers.core.validation import per_target

    star = toyworld.render(toyworld.Scene("purple", "star", 14))
    images = [star, lumpy_star(), lumpy_star(3, 0.4, 16), lumpy_star(4, 0.45, 12)]
    for image in images[1:]:  # the trap: concave, so the toy world's classifier reads a star
        assert toyworld.score_image(image).shape == "star" and not stars.star_geometry(image).is_star
    monkeypatch.setattr(
        scoring, "generate", lambda pipe, settings: [sampling.Sample(i, s, "") for i, s in zip(images, settings)]
    )
    targets = [scoring.Target("a purple star", "purple", "star")]
    found = scoring.score_targets(None, targets, seeds=(0, 1, 2, 3))
    assert (found.score.color, found.score.shape, found.score.both) == (1.0, 0.25, 0.25)
    assert found.hits == [True, False, False, False]
    assert per_target(found, targets) == [0.25]
    circles = scoring.score_targets(None, [scoring.Target("a purple circle", "purple", "circle")], seeds=(0, 1))
    assert circles.score.shape == 0.0  # the other shapes keep the toy world's reading
