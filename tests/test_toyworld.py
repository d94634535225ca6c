"""The toy world and its scorer: the scorer must read every rendered colour and shape correctly."""

from __future__ import annotations

import pytest
from PIL import Image

from sdtune.adapters import toyworld


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
