"""A held-out shape, not only a held-out colour (issue 23, item 7): a shipped preset, trained as it ships on 16
purple stars, draws "a purple star" that the toy world's geometry check reads as one filled piece with five deep
points (`stars.star_geometry`), at 12 fixed seeds. The scorer's own tests are in tests/test_toyworld.py; the
table over every method is `bench/shape_table.py` (README, "A new shape, not only a new colour")."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("run", ["loha", "lokr"])  # 0.83 each (README, "A new shape, not only a new colour")
def test_a_shipped_preset_learns_the_held_out_star(run, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from shape_table import RUNS, main

    recipe = yaml.safe_load((ROOT / RUNS[run][4]).read_text())
    steps = recipe["train"]["max_train_steps"]  # the preset's own length
    [result] = main(["--out", str(tmp_path), "--runs", run, "--steps", str(steps), "--every", str(steps)])
    assert result["curve"][steps]["both"] >= 0.8, result["curve"]
