"""Layout IoU of toy ControlNets on outline conditions, at trained and held-out layouts, over conditioning scales.

    python bench/controlnet_edges.py RUN_OR_CHECKPOINT [...] [--scales 1.0,1.5] [--trained 6]

For each ControlNet (a run folder, or one of its `checkpoints/checkpoint-N` folders) and each scale, two figures:
"held-out", the recipe's own validation outlines (`recipes/controlnet-toy-edges.yaml`: corners, radius 7, 8 and 22),
and "trained", the first `--trained` pairs of `datasets/toy-edges` (scenes the ControlNet trained on); each image at
the scorer's seeds 0-3 (`scoring.BAR_SEEDS`) and the recipe's sampling settings, as the trainer scores a run. A
sweep's leaderboard reports the held-out figure at the recipe's scale for the final ControlNet; this also reads
checkpoints and other scales without training again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "controlnet-toy-edges.yaml"


def layout_pairs(trained: int):
    """{"held-out": [(Target, condition file)...], "trained": [...]} from the recipe and its training folder."""
    from sdtune.adapters import scoring, toyworld
    from sdtune.trainers.core.recipe.loader import load_recipe

    recipe = load_recipe(RECIPE)
    held = [(scoring.Target(t.prompt, t.color, t.shape), str(ROOT / c))
            for t, c in zip(recipe.validation.toy_score, recipe.method.validation_image)]  # fmt: skip
    data = ROOT / recipe.data.train_data_dir
    seen = []
    for i in range(trained):
        caption = (data / "images" / f"{i:04d}.txt").read_text().strip()  # "a {color} {shape}"
        _, color, shape = caption.split()
        assert color in toyworld.COLORS and shape in toyworld.SHAPES, caption
        seen.append((scoring.Target(caption, color, shape), str(data / "conditioning" / f"{i:04d}.png")))
    return recipe, {"held-out": held, "trained": seen}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("controlnets", nargs="+", help="run folders or checkpoint folders")
    parser.add_argument("--scales", default="1.0", help="conditioning scales, comma-separated")
    parser.add_argument("--trained", type=int, default=6, help="training pairs scored as 'trained'")
    args = parser.parse_args(argv)

    from sdtune.adapters import scoring
    from sdtune.adapters.base import load_pipeline
    from sdtune.adapters.sampling import ControlSpec, load_controlnets

    recipe, sets = layout_pairs(args.trained)
    common = dict(steps=recipe.validation.num_inference_steps, guidance=recipe.validation.guidance_scale)
    print("controlnet  scale  held-out IoU  trained IoU  held-out both")
    for path in args.controlnets:
        for scale in (float(s) for s in args.scales.split(",")):
            pipe = load_pipeline("toy")
            pipe.set_progress_bar_config(disable=True)
            pipe = load_controlnets(pipe, [ControlSpec(path, scale)])
            held, seen = (scoring.score_layout(pipe, sets[k], controlled=True, scale=scale, **common)
                          for k in ("held-out", "trained"))  # fmt: skip
            print(f"{path}  {scale}  {held.iou:.3f}  {seen.iou:.3f}  {held.score.both:.2f}", flush=True)


if __name__ == "__main__":
    main()
