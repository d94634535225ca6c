"""bench/train_preference.py: sdtune and diffusers' DPO example are handed the same votes. The A/B comparison sdtune
reads and the Pick-a-Pic parquet the example reads name the same winner for every prompt (the larger shape), so a
time ratio between them compares two trainers on one task."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from sdtune.adapters import toyworld
from sdtune.adapters.ab import ABStore
from sdtune.adapters.ab.votes import collect_votes

ROOT = Path(__file__).resolve().parents[1]


def area(image: Image.Image) -> int:
    return toyworld.score_image(image.convert("RGB")).area


def test_the_comparison_and_the_parquet_hold_the_same_winners(tmp_path):
    import datasets

    sys.path.insert(0, str(ROOT / "bench"))
    from train_preference import pick_a_pic_folder, stored_comparison, voted_pairs

    pairs = voted_pairs(6, 64)
    cid = stored_comparison(tmp_path / "home", pairs, "toy")
    assert stored_comparison(tmp_path / "home", pairs, "toy") == cid  # made once per workspace

    votes = collect_votes([cid], ABStore(tmp_path / "home"), min_pairs=6)
    ours = {t.prompt: (area(Image.open(t.winner)), area(Image.open(t.loser))) for t in votes.triples}
    assert votes.summary()["decisive"] == 6 and all(w > lose for w, lose in ours.values())
    assert {t.winner_side for t in votes.triples} == {"a"} and votes.sides[cid]["a"] == "toy"

    folder = pick_a_pic_folder(tmp_path / "parquet", pairs)
    rows = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    theirs = {}
    for row in rows:  # the example's rule: label_0 == 1 keeps jpg_0 first, the winner
        first, second = (Image.open(io.BytesIO(row[k])) for k in ("jpg_0", "jpg_1"))
        winner, loser = (first, second) if row["label_0"] == 1 else (second, first)
        theirs[row["caption"]] = (area(winner), area(loser))
    assert theirs == ours
