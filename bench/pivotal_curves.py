"""Pivotal tuning against a LoRA alone (and textual inversion alone) on a concept the toy base lacks: a purple star.

Usage:
    OMP_NUM_THREADS=1 python bench/pivotal_curves.py --out /tmp/pivotal [--steps 300 --every 50] [--preset locon]

The three runs train on the same 16 purple stars (`toyworld.write_dataset(..., colors=["purple"], shapes=["star"])`),
every caption "a <ps>", with the quickstart recipe's settings (rank 8, lr 1e-3, batch 8): the LoRA alone reads <ps>
as the rare pieces "<", "ps", ">"; pivotal tuning adds <ps> as a new token (2 vectors, at the LoRA's lr) that trains
alone for 50 steps, then with the LoRA; textual inversion trains the same new token alone
(recipes/textual_inversion.yaml's settings). Every
`--every` steps a checkpoint holds the files; each is loaded the way `sdtune sample` loads it (`compose.build`) and
"a <ps>" is rendered at 8 seeds and read by the toy-world scorer (purple, and a star by its geometry: both). Prints
the curves as a Markdown table (appended to bench/RESULTS.md by hand, with the machine). `--preset locon` gives the
lora and pivotal runs recipes/toy-lora-star.yaml's layers, which can draw the star.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SEEDS = "a <ps>", tuple(range(8))
COMMON = ["data.caption_template='a <ps>'", "validation.prompts=[]", "validation.toy_score=[]",
          "validation.validation_steps=0", "output.report_to=none", "output.register=false",
          "train.checkpoints_total_limit=100"]  # fmt: skip
RUNS = {
    "lora": ("trainers/lora.py", "recipes/quickstart.yaml", []),
    "pivotal": (
        "trainers/lora.py",
        "recipes/quickstart.yaml",
        [
            "method.pivotal=true",
            "method.placeholder_token=<ps>",
            "method.num_vectors=2",
            "method.embedding_only_steps=50",
        ],
    ),  # fmt: skip
    "textual_inversion": (
        "trainers/textual_inversion.py",
        "recipes/textual_inversion.yaml",
        ["method.placeholder_token=<ps>"],
    ),  # fmt: skip
}


def train(kind: str, data: Path, out: Path, steps: int, every: int, extra: list[str], preset: str | None) -> Path:
    script, recipe, overrides = RUNS[kind]
    if preset and kind != "textual_inversion":  # the LoRA side's layers; textual inversion has none
        overrides = [*overrides, f"method.preset={preset}"]
    run = out / kind
    args = [f"data.train_data_dir={data}", f"output.dir={run}", f"train.max_train_steps={steps}",
            f"train.checkpointing_steps={every}", *COMMON, *overrides, *extra]  # fmt: skip
    subprocess.run([sys.executable, script, recipe, *args], cwd=ROOT, check=True, capture_output=True)
    return run


def score(folder: Path, kind: str) -> float:
    """The share of "a <ps>" samples that show a purple star, with the files in `folder` loaded as sdtune sample
    loads them."""
    from sdtune.adapters import compose, sampling, toyworld

    loras = [compose.AdapterUse(str(folder))] if kind != "textual_inversion" else []
    embeddings = [str(folder)] if kind != "lora" else []
    composer = compose.build(compose.PipelineSpec("toy", loras, embeddings=embeddings, device="cpu"))
    settings = [sampling.SampleSettings(PROMPT, seed, steps=25, guidance=3.0) for seed in SEEDS]
    images = [s.image for s in sampling.generate(composer.pipe, settings)]
    return toyworld.score_images(images, [("purple", "star")] * len(images)).both


def curve(run: Path, kind: str, steps: int, every: int) -> dict[int, float]:
    points = {step: run / "checkpoints" / f"checkpoint-{step}" for step in range(every, steps, every)}
    points[steps] = run
    return {step: score(folder, kind) for step, folder in points.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--kinds", nargs="*", default=list(RUNS))
    parser.add_argument(
        "--extra", nargs="*", default=[], help="More overrides for every run, e.g. method.embedding_lr=1e-3"
    )
    parser.add_argument(
        "--preset",
        help="The LoRA side's layers for the lora and pivotal runs, e.g. locon (recipes/toy-lora-star.yaml)",
    )
    args = parser.parse_args(argv)
    from sdtune.adapters import quiet_libraries, toyworld

    quiet_libraries()

    data = args.out / "data"
    if not data.is_dir():
        toyworld.write_dataset(data, 16, seed=5, colors=["purple"], shapes=["star"])
    curves = {}
    for kind in args.kinds:
        run = train(kind, data, args.out, args.steps, args.every, args.extra, args.preset)
        curves[kind] = curve(run, kind, args.steps, args.every)
        print(kind, curves[kind], flush=True)
    steps = sorted(next(iter(curves.values())))
    print("\n| steps | " + " | ".join(curves) + " |\n| --- |" + " --- |" * len(curves))
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{curves[k][step]:.2f}" for k in curves) + " |")
    return curves


if __name__ == "__main__":
    main()
