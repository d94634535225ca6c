"""Pivotal tuning against a LoRA alone (and textual inversion alone) on a concept the toy base lacks.

Usage:
    OMP_NUM_THREADS=1 python bench/pivotal_curves.py --out /tmp/pivotal [--concept star|colour] [--steps 300
        --every 50 --seeds 8] [--preset locon] [--kinds lora pivotal] [--extra method.initializer_token=blue ...]

`--concept star` (the default): 16 purple stars, every caption "a <ps>", judged on "a <ps>" (purple, and a star by
its geometry). `--concept colour`: 16 purple circles, squares and triangles captioned "a <ps> circle" and so on, judged
on "a <ps> circle/square/triangle" (purple, and the shape asked): a colour the base lacks, on shapes it knows.
The runs share the data and the quickstart recipe's settings (rank 8, lr 1e-3, batch 8): the LoRA alone reads <ps> as
the rare pieces "<", "ps", ">"; pivotal tuning adds <ps> as a new token (2 vectors, at the LoRA's lr, starting at
"object") that trains alone for 50 steps, then with the LoRA (for the colour: 1 vector starting at "blue", with the
LoRA from step 1; `--extra` overrides any of that, for every run: `train.seed=1`, `method.embedding_lr=1e-4`, ...);
textual inversion trains the same new token alone (recipes/textual_inversion.yaml's settings). Every `--every` steps a
checkpoint holds the files; each is loaded the way `sdtune sample` loads it (`compose.build`), every judged prompt is
rendered at `--seeds` seeds and read by the toy-world scorer (colour and shape: both). Prints the curves as a Markdown
table (appended to bench/RESULTS.md by hand, with the machine). `--preset locon` gives the lora and pivotal runs
recipes/toy-lora-star.yaml's layers, which can draw the star.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.toyworld import BASE_SHAPES

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["validation.prompts=[]", "validation.toy_score=[]",
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


@dataclass(frozen=True)
class Concept:
    """What the runs learn: their images (a toy-world dataset), how its captions hold <ps>, and what is scored."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    caption_template: str  # data.caption_template: {caption} is the image's "a {color} {shape}"
    judged: tuple[tuple[str, str, str], ...]  # (prompt, colour, shape): each rendered at every seed
    token: tuple[str, ...] = ()  # the new token's settings, for the pivotal and textual-inversion runs
    pivotal: tuple[str, ...] = ()  # more settings of the pivotal run


CONCEPTS = {
    # A shape and a colour the base lacks, every caption the bare token: <ps> must come to mean "purple star".
    "star": Concept(("purple",), ("star",), "a <ps>", (("a <ps>", "purple", "star"),)),
    # A colour the base lacks on the shapes it knows: <ps> stands where a colour word stands ("a <ps> circle"), and
    # must bind to purple while the shape words keep their meaning. The new token is one vector that starts at a
    # colour the base knows near purple (blue), and trains with the LoRA from step 1.
    "colour": Concept(
        ("purple",),
        BASE_SHAPES,
        "",  # the captions are rewritten when the data is written (see `write_data`)
        tuple((f"a <ps> {shape}", "purple", shape) for shape in BASE_SHAPES),
        token=("method.num_vectors=1", "method.initializer_token=blue"),
        pivotal=("method.embedding_only_steps=0",),
    ),
}


def write_data(folder: Path, concept: Concept) -> None:
    from sdtune.adapters import toyworld

    toyworld.write_dataset(folder, 16, seed=5, colors=list(concept.colors), shapes=list(concept.shapes))
    if not concept.caption_template:  # the colour word becomes the token: "a purple circle" -> "a <ps> circle"
        for caption in folder.glob("*.txt"):
            caption.write_text(caption.read_text().replace(concept.colors[0], "<ps>"))


def train(
    kind: str, data: Path, out: Path, steps: int, every: int, extra: list[str], preset: str | None, concept: Concept
) -> Path:
    script, recipe, overrides = RUNS[kind]
    if preset and kind != "textual_inversion":  # the LoRA side's layers; textual inversion has none
        overrides = [*overrides, f"method.preset={preset}"]
    if kind != "lora":
        overrides = [*overrides, *concept.token, *(concept.pivotal if kind == "pivotal" else ())]
    run = out / kind
    args = [f"data.train_data_dir={data}", f"output.dir={run}", f"train.max_train_steps={steps}",
            f"train.checkpointing_steps={every}", *COMMON, *overrides, *extra]  # fmt: skip
    # the captions as written ({caption}) unless the concept sets a template (the TI recipe's own is "a <zq>")
    args.append(f"data.caption_template='{concept.caption_template or '{caption}'}'")
    subprocess.run([sys.executable, script, recipe, *args], cwd=ROOT, check=True, capture_output=True)
    return run


def score(folder: Path, kind: str, seeds: int, concept: Concept) -> float:
    """The share of samples (every judged prompt at every seed) that show the colour and the shape asked, with the
    files in `folder` loaded as sdtune sample loads them."""
    from sdtune.adapters import compose, sampling, toyworld

    loras = [compose.AdapterUse(str(folder))] if kind != "textual_inversion" else []
    embeddings = [str(folder)] if kind != "lora" else []
    composer = compose.build(compose.PipelineSpec("toy", loras, embeddings=embeddings, device="cpu"))
    judged = [(prompt, color, shape, seed) for prompt, color, shape in concept.judged for seed in range(seeds)]
    settings = [sampling.SampleSettings(prompt, seed, steps=25, guidance=3.0) for prompt, _, _, seed in judged]
    images = [s.image for s in sampling.generate(composer.pipe, settings)]
    return toyworld.score_images(images, [(color, shape) for _, color, shape, _ in judged]).both


def curve(run: Path, kind: str, steps: int, every: int, seeds: int, concept: Concept) -> dict[int, float]:
    points = {step: run / "checkpoints" / f"checkpoint-{step}" for step in range(every, steps, every)}
    points[steps] = run
    return {step: score(folder, kind, seeds, concept) for step, folder in points.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--kinds", nargs="*", default=list(RUNS))
    parser.add_argument("--concept", choices=CONCEPTS, default="star")
    parser.add_argument("--seeds", type=int, default=8, help="Samples per checkpoint (seeds 0..N-1)")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="More overrides for every run, e.g. method.embedding_lr=1e-3"
    )
    parser.add_argument(
        "--preset",
        help="The LoRA side's layers for the lora and pivotal runs, e.g. locon (recipes/toy-lora-star.yaml)",
    )
    args = parser.parse_args(argv)
    from sdtune.adapters import quiet_libraries

    quiet_libraries()
    concept = CONCEPTS[args.concept]

    data = args.out / "data"
    if not data.is_dir():
        write_data(data, concept)
    curves = {}
    for kind in args.kinds:
        run = train(kind, data, args.out, args.steps, args.every, args.extra, args.preset, concept)
        curves[kind] = curve(run, kind, args.steps, args.every, args.seeds, concept)
        print(kind, curves[kind], flush=True)
    steps = sorted(next(iter(curves.values())))
    print("\n| steps | " + " | ".join(curves) + " |\n| --- |" + " --- |" * len(curves))
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{curves[k][step]:.2f}" for k in curves) + " |")
    return curves


if __name__ == "__main__":
    main()
