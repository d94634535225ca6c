"""ControlNet on outlines (issue 25, item 5): `recipes/controlnet-toy-edges.yaml` and its data, `datasets/toy-edges`.

The condition is the 2 px outline of the shape (what canny and scribble give), not the filled mask; the metric is the
layout IoU of the ControlNet's drawn shape against the region the outline encloses (`toyworld.condition_region`), at
positions and sizes the training set does not have. The fast tests check that the data and the recipe are what they
say; the slow one trains the recipe and holds it to IoU >= 0.6 there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT
from conftest import run_controlnet_trainer as run_trainer
from PIL import Image

from sdtune.adapters import toyworld
from sdtune.trainers.core.recipe.loader import load_recipe

RECIPE = ROOT / "recipes" / "controlnet-toy-edges.yaml"
EDGES = ROOT / "datasets" / "toy-edges"
MASKS = ROOT / "datasets" / "toy-masks"

# The held-out validation outlines: the training scenes have radius 10-18 px; these are smaller (7, 8), larger (22)
# or in a corner. (name, scene), in the order of the recipe's validation prompts.
HELD_OUT = [
    ("circle-small-corner", toyworld.Scene("red", "circle", 7, 11, 11)),
    ("square-large", toyworld.Scene("blue", "square", 22, 34, 30)),
    ("triangle-corner", toyworld.Scene("green", "triangle", 12, 50, 48)),
    ("circle-large", toyworld.Scene("yellow", "circle", 22, 30, 33)),
    ("square-small-corner", toyworld.Scene("red", "square", 8, 52, 13)),
    ("triangle-small-corner", toyworld.Scene("blue", "triangle", 8, 13, 51)),
]


def bright(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) > 127


def ring(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `mask` within `width` px (8-neighbourhood) of its outside: a `width` px outline."""
    inner = mask
    for _ in range(width):
        padded = np.pad(inner, 1)
        inner = np.logical_and.reduce([np.roll(np.roll(padded, dy, 0), dx, 1)[1:-1, 1:-1]
                                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)])  # fmt: skip
    return mask & ~inner


@pytest.mark.parametrize("width", [1, 2, 3])
def test_scene_edges_is_the_outline_of_the_mask_and_encloses_it(width):
    for _, _, scene in toyworld.generate(8, seed=3):
        mask = bright(toyworld.scene_mask(scene))
        edges = toyworld.scene_edges(scene, width=width)
        assert edges.mode == "RGB" and edges.size == (64, 64)
        assert np.array_equal(bright(edges), ring(mask, width))
        assert toyworld.iou(toyworld.condition_region(edges), mask) == 1.0  # the outline gives the region back
        assert bright(edges).sum() < 0.5 * mask.sum() * width  # a line, not a fill


def test_an_unknown_condition_kind_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="kind 'canny': one of mask, edges"):
        toyworld.write_control_dataset(tmp_path, 1, seed=0, kind="canny")


def test_the_edges_dataset_is_the_mask_dataset_with_2px_outlines(tmp_path):
    """datasets/toy-edges is `write_control_dataset(..., 96, seed=0, kind="edges")`: the images and captions of
    datasets/toy-masks, each condition the 2 px outline of its mask."""
    toyworld.write_control_dataset(tmp_path, 96, seed=0, kind="edges")
    names = sorted(p.name for p in (EDGES / "conditioning").iterdir())
    assert names == [f"{i:04d}.png" for i in range(96)]
    for name in names:
        stem = name[:-4]
        assert (EDGES / "images" / name).read_bytes() == (MASKS / "images" / name).read_bytes()
        assert (EDGES / "images" / f"{stem}.txt").read_text() == (MASKS / "images" / f"{stem}.txt").read_text()
        assert (EDGES / "conditioning" / name).read_bytes() == (tmp_path / "conditioning" / name).read_bytes()
        mask = bright(Image.open(MASKS / "conditioning" / name))
        assert np.array_equal(bright(Image.open(EDGES / "conditioning" / name)), ring(mask, 2))


def test_the_validation_outlines_are_held_out_and_drawn_from_their_scenes():
    train_radii = (toyworld.MIN_RADIUS, toyworld.MAX_RADIUS)
    for name, scene in HELD_OUT:
        held_size = not train_radii[0] <= scene.radius <= train_radii[1]
        corner = min(scene.cx, 64 - scene.cx) <= 14 and min(scene.cy, 64 - scene.cy) <= 16
        assert held_size or corner, name
        path = EDGES / "validation" / f"{name}.png"
        assert np.array_equal(bright(Image.open(path)), bright(toyworld.scene_edges(scene))), name


def test_the_recipe_trains_on_outlines_and_scores_the_held_out_layouts():
    recipe = load_recipe(RECIPE)
    assert recipe.data.train_data_dir.replace("\\", "/").endswith("datasets/toy-edges")
    images = [str(p).replace("\\", "/") for p in recipe.method.validation_image]
    assert images == [f"datasets/toy-edges/validation/{name}.png" for name, _ in HELD_OUT]
    scored = [(t.prompt, t.color, t.shape) for t in recipe.validation.toy_score]
    assert scored == [(s.caption(), s.color, s.shape) for _, s in HELD_OUT]
    assert list(recipe.validation.prompts) == [s.caption() for _, s in HELD_OUT]


@pytest.mark.slow
def test_the_edges_recipe_reaches_iou_0_6_at_held_out_layouts(tmp_path):
    """The recipe as a user runs it (grids left out; ~15 minutes on 2 CPU cores): the ControlNet's layout IoU on the
    6 held-out outlines x the scorer's seeds (`scoring.BAR_SEEDS`: 0-3), at the recipe's conditioning scale (3.0), is
    >= 0.6, with colour and shape right on at least 3/4 of the images; the base's is chance. At the masks recipe's
    learning rate (3e-3): 0.6007, colour+shape 0.58. At the recipe's 1.5e-3 (sweep edges-lr, README): 0.6345,
    colour+shape 0.79 (19/24), base IoU 0.118, measured by this test 2026-12-07 (2-core CPU, one thread); a run repeats
    exactly on one machine and thread count."""
    proc = run_trainer([str(RECIPE), f"output.dir={tmp_path / 'run'}", "validation.validation_steps=0"], tmp_path / "c",
                       timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scores = json.loads((tmp_path / "run" / "adapter.json").read_text())["scores"]
    print("edges recipe scores:", json.dumps(scores))
    assert scores["seeds"] == [0, 1, 2, 3] and scores["adapter"]["n"] == 24
    assert scores["base"]["iou"] <= 0.3, scores
    assert scores["adapter"]["iou"] >= 0.6, scores
    # scale 3 costs some colour/shape (0.58 at 3e-3); 1.5e-3 keeps more (0.79, one image of slack here)
    assert scores["adapter"]["both"] >= 0.75, scores
