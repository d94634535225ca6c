"""A held-out shape, not only a held-out colour: how well each method and layer set learns "a purple star".

Usage:
    OMP_NUM_THREADS=1 python bench/shape_table.py --out /tmp/shapes [--runs lora-attn-r8 loha ...]
        [--steps 300 --every 100] [--extra train.learning_rate=2e-3] [--table bench/shape_table.md]

Every run trains on `datasets/purple-star` (16 toy-world purple stars, each captioned "a purple star"; the toy base
never saw purple nor a star) with the shipped toy recipe of its method and the overrides in `RUNS`, one run at a
time. Every `--every` steps a checkpoint is loaded the way `sdtune sample` loads it (`compose.build`; full DreamBooth:
its final pipeline only), "a purple star" is rendered at 12 fixed seeds (25 steps, guidance 3), and each image is
read by the toy world's geometry check (`stars.star_geometry`: one piece, five deep points, filled, whole) and
its colour.
Each run's scores land in OUT/<run>/scores.json: a run with one is not trained again, its saved images are read
again (so a change to the scorer needs no training). The Markdown table of all runs is printed and written to
--table: method, layers, rank, steps, star, colour, both, training time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "purple-star"
PROMPT, SEEDS = "a purple star", tuple(range(12))
QUIET = ["validation.prompts=[]", "validation.toy_score=[]", "validation.validation_steps=0",
         "output.report_to=none", "output.register=false", "train.checkpoints_total_limit=100"]  # fmt: skip
DREAMBOOTH = ["method.identifier=purple", "method.instance_prompt='a purple star'",
              "method.with_prior_preservation=false", "method.class_prompt=null"]  # fmt: skip


def lora(layers: str, rank: int) -> list[str]:
    return [f"method.preset={layers}", f"method.rank={rank}", f"method.lora_alpha={rank}"]


def dreambooth_lora(layers: str) -> list[str]:
    """The toy DreamBooth recipe as a LoRA at the LoRA recipes' learning rate."""
    return [*DREAMBOOTH, "method.lora=true", "train.learning_rate=1e-3", f"method.preset={layers}"]


LORA, DREAMBOOTH_PY = "trainers/lora.py", "trainers/dreambooth.py"
QUICKSTART, TOY_DREAMBOOTH = "recipes/quickstart.yaml", "recipes/toy-dreambooth.yaml"
# name: (method, layers, rank, trainer, recipe, overrides). Layers and rank are what the run trains with, given
# here for the table (the recipe's own where the overrides leave them). `loha` and `lokr` are the recipes as they
# ship; the other rows name what they change, so they mean the same whatever the recipes' defaults become.
RUNS = {
    "lora-attn-r8": ("LoRA", "attn", 8, LORA, QUICKSTART, lora("attn", 8)),
    "lora-attn-r16": ("LoRA", "attn", 16, LORA, QUICKSTART, lora("attn", 16)),
    "lora-attn+ff-r8": ("LoRA", "attn+ff", 8, LORA, QUICKSTART, lora("attn+ff", 8)),
    "lora-attn+ff-r16": ("LoRA", "attn+ff", 16, LORA, QUICKSTART, lora("attn+ff", 16)),
    "locon-r8": ("LoCon", "locon", 8, LORA, QUICKSTART, lora("locon", 8)),
    "loha": ("LoHa (recipes/loha.yaml)", "locon", 8, LORA, "recipes/loha.yaml", []),
    "lokr": ("LoKr (recipes/lokr.yaml, lr 3e-3)", "locon", 8, LORA, "recipes/lokr.yaml", []),
    "loha-attn-r4": ("LoHa", "attn", 4, LORA, "recipes/loha.yaml", lora("attn", 4)),
    "lokr-attn": ("LoKr", "attn", 8, LORA, "recipes/lokr.yaml", ["method.preset=attn", "train.learning_rate=1e-3"]),
    "loha-locon": ("LoHa", "locon", 4, LORA, "recipes/loha.yaml", lora("locon", 4)),
    "lokr-locon": ("LoKr", "locon", 8, LORA, "recipes/lokr.yaml", ["method.preset=locon", "train.learning_rate=1e-3"]),
    "loha-locon-r8": ("LoHa", "locon", 8, LORA, "recipes/loha.yaml", lora("locon", 8)),
    "lokr-locon-lr3e-3": (
        "LoKr (lr 3e-3)",
        "locon",
        8,
        LORA,
        "recipes/lokr.yaml",
        ["method.preset=locon", "train.learning_rate=3e-3"],
    ),  # fmt: skip
    "dreambooth-lora": ("DreamBooth-LoRA", "attn", 8, DREAMBOOTH_PY, TOY_DREAMBOOTH, dreambooth_lora("attn")),
    "dreambooth-lora-locon": ("DreamBooth-LoRA", "locon", 8, DREAMBOOTH_PY, TOY_DREAMBOOTH, dreambooth_lora("locon")),
    # The SD v1-5 DreamBooth recipes' LoRA side: their rank 16, with attn+ff or locon.
    "dreambooth-lora-attn+ff-r16": (
        "DreamBooth-LoRA",
        "attn+ff",
        16,
        DREAMBOOTH_PY,
        TOY_DREAMBOOTH,
        [*dreambooth_lora("attn+ff"), *lora("attn+ff", 16)],
    ),  # fmt: skip
    "dreambooth-lora-locon-r16": (
        "DreamBooth-LoRA",
        "locon",
        16,
        DREAMBOOTH_PY,
        TOY_DREAMBOOTH,
        [*dreambooth_lora("locon"), *lora("locon", 16)],
    ),  # fmt: skip
    # The toy DreamBooth recipe's LoRA side as it ships (preset: locon), at the LoRA recipes' learning rate.
    "dreambooth-lora-recipe": (
        "DreamBooth-LoRA (recipes/toy-dreambooth.yaml, lr 1e-3)",
        "locon",
        8,
        DREAMBOOTH_PY,
        TOY_DREAMBOOTH,
        [*DREAMBOOTH, "method.lora=true", "train.learning_rate=1e-3"],
    ),  # fmt: skip
    "dreambooth-shape": (
        "DreamBooth (full, recipes/toy-dreambooth-shape.yaml)",
        "whole UNet",
        None,
        DREAMBOOTH_PY,
        "recipes/toy-dreambooth-shape.yaml",
        ["method.save_single_file=false", "method.extract_lora_rank=null"],  # files the score does not read
    ),  # fmt: skip
    "dreambooth": (
        "DreamBooth (full)",
        "whole UNet",
        None,
        DREAMBOOTH_PY,
        TOY_DREAMBOOTH,
        [*DREAMBOOTH, "method.save_single_file=false", "method.extract_lora_rank=null"],
    ),  # fmt: skip
}


def train(name: str, out: Path, steps: int, every: int, extra: list[str]) -> tuple[Path, float]:
    """Trains run `name` into OUT/name; returns the folder and the training's wall time (loading included)."""
    _, _, _, script, recipe, overrides = RUNS[name]
    run = out / name
    args = [f"data.train_data_dir={DATA}", f"output.dir={run}", f"train.max_train_steps={steps}",
            f"train.checkpointing_steps={every}", *QUIET, *overrides, *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, script, recipe, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: training failed\n{done.stderr[-3000:]}")
    return run, time.perf_counter() - start


def score(folder: Path, full_model: bool) -> dict:
    """Renders PROMPT at SEEDS with the model in `folder` and reads each image: star (geometry), colour, both."""
    from sdtune.adapters import compose, sampling

    adapter = str(folder if full_model else adapter_file(folder))
    spec = compose.PipelineSpec(adapter, device="cpu") if full_model else compose.PipelineSpec(
        "toy", [compose.AdapterUse(adapter)], device="cpu"
    )  # fmt: skip
    pipe = compose.build(spec).pipe
    settings = [sampling.SampleSettings(PROMPT, seed, steps=25, guidance=3.0) for seed in SEEDS]
    for seed, sample in zip(SEEDS, sampling.generate(pipe, settings)):
        sample.image.save(folder / f"star-{seed:02d}.png")  # to look at, and to score again (`read`)
    return read(folder)


def adapter_file(folder: Path) -> Path:
    """The adapter `sdtune sample` would load from a run folder; in a LoHa/LoKr checkpoint, which has no adapter.json
    to name it, its LyCORIS file."""
    from sdtune.adapters.lycoris import is_lycoris_file

    if (folder / "adapter.json").is_file():
        return folder
    return next((p for p in sorted(folder.glob("*.safetensors")) if is_lycoris_file(p)), folder)


def read(folder: Path) -> dict:
    """The toy world's reading of the images `score` saved in `folder`: star (geometry), colour, both."""
    from PIL import Image

    from sdtune.adapters import stars

    found = stars.score_stars([Image.open(p) for p in sorted(folder.glob("star-*.png"))], "purple")
    return {"star": found.shape, "colour": found.color, "both": found.both, "n": found.n, "folder": str(folder)}


def full_model_folder(run: Path) -> Path:
    """The diffusers pipeline a full DreamBooth run writes (a folder with model_index.json)."""
    return next(p.parent for p in sorted(run.rglob("model_index.json")) if "checkpoints" not in p.parts)


def measure(name: str, out: Path, steps: int, every: int, extra: list[str]) -> dict:
    run, seconds = train(name, out, steps, every, extra)
    if RUNS[name][1] == "whole UNet":  # a full fine-tune: its final pipeline only
        curve = {steps: score(full_model_folder(run), full_model=True)}
    else:
        points = {s: run / "checkpoints" / f"checkpoint-{s}" for s in range(every, steps, every)}
        curve = {**{s: score(p, False) for s, p in points.items()}, steps: score(run, False)}
    result = {"name": name, "seconds": round(seconds, 1), "steps": steps, "extra": extra, "curve": curve}
    (run / "scores.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| method | layers | rank | steps | star | colour | both | training time |", "|---" * 8 + "|"]
    for r in results:
        method, layers, rank, *_ = RUNS[r["name"]]
        extra = f" ({', '.join(r['extra'])})" if r["extra"] else ""
        for step, s in sorted(r["curve"].items(), key=lambda kv: int(kv[0])):
            seconds = f"{r['seconds']:.0f} s" if int(step) == r["steps"] and r["seconds"] else ""
            lines.append(
                f"| {method}{extra} | {layers} | {rank or '-'} | {step} | {s['star']:.2f} | {s['colour']:.2f} | "
                f"{s['both']:.2f} | {seconds} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--extra", nargs="*", default=[], help="More overrides for every run, e.g. method.rank=4")
    parser.add_argument("--table", type=Path, help="Also write the Markdown table here")
    args = parser.parse_args(argv)
    from sdtune.adapters import quiet_libraries

    quiet_libraries()
    results = []
    for name in args.runs:
        saved = args.out / name / "scores.json"
        if saved.is_file():  # trained before: its saved images are read again, by the scorer as it is now
            result = json.loads(saved.read_text())
            result["curve"] = {step: read(Path(s["folder"])) for step, s in result["curve"].items()}
        else:
            result = measure(name, args.out, **vars_of(args))
        print(name, result["curve"], flush=True)
        results.append(result)
    text = table(results)
    print("\n" + text)
    if args.table:
        args.table.write_text(text + "\n")
    return results


def vars_of(args) -> dict:
    return {"steps": args.steps, "every": args.every, "extra": args.extra}


if __name__ == "__main__":
    main()
