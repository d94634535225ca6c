"""Making comparisons: render two sides, or every checkpoint of a run, the `sdtune sample` way, then store them.

Rendering goes through `compose.build` and `sampling.generate`, the code path of `sdtune sample`; torch and the
pipelines are imported only when something renders.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

from sdtune.adapters.ab.spec import ABError, Scorer, Settings, Side, parse_spec, short_spec
from sdtune.adapters.ab.store import ABStore, NewComparison, PairRow
from sdtune.adapters.atomic import write_bytes_atomic


class Renderer:
    """Renders sides through `compose.build` + `sampling.generate` (`sdtune sample`'s path). Sides on the same base
    reuse its loaded pipeline: switching adapters is `Composer.set`, no reload; ControlNets are loaded once per base
    and set, over the same components (the LoRAs set on the base stay in effect)."""

    def __init__(self, device: str | None = None, dtype: str | None = None, registry=None):
        self.device, self.dtype, self.registry = device, dtype, registry
        self._composers: dict[str, object] = {}
        self._controlled: dict[tuple, object] = {}

    def check(self, side: Side) -> None:
        """Every adapter and ControlNet of `side` resolves, and its base is not a LoRA (`toy-purple` alone means
        `toy+toy-purple`)."""
        from sdtune.adapters.compose import resolve_adapter, resolve_controlnet, resolve_embedding
        from sdtune.adapters.registry import Registry

        spec = side.pipeline
        for use in spec.adapters:
            resolve_adapter(use.ref, self.registry)
        for ref in spec.embeddings:
            resolve_embedding(ref, self.registry)
        for control in side.controls:
            resolve_controlnet(control.ref, self.registry)
        registry = self.registry or Registry()
        if "/" not in spec.base and spec.base != "toy" and spec.base in registry:
            if not {"diffusers", "single_file"} & set(registry.manifest(spec.base).files):
                raise ABError(f"spec {spec.base!r}: a LoRA is no base; write BASE+{spec.base}, e.g. toy+{spec.base}")

    def composer(self, spec):
        from sdtune.adapters import compose

        key = spec.base
        if key not in self._composers:
            full = compose.PipelineSpec(base=spec.base, device=self.device, dtype=self.dtype)
            self._composers[key] = compose.build(full, self.registry)
        return self._composers[key].set(spec.adapters).set_embeddings(spec.embeddings)

    def controlled(self, side: Side, composer):
        """The ControlNet pipeline of `side` over `composer`'s components (its adapters already set)."""
        from sdtune.adapters.compose import resolve_controlnet
        from sdtune.adapters.sampling import ControlSpec, load_controlnets

        paths = tuple(resolve_controlnet(c.ref, self.registry) for c in side.controls)
        key = (side.pipeline.base, paths)
        if key not in self._controlled:  # the scales go with each sample, so one load serves every scale
            self._controlled[key] = load_controlnets(composer.pipe, [ControlSpec(path) for path in paths])
        return self._controlled[key]

    def render(self, side: Side, settings: Settings) -> list:
        """`Sample`s of prompts x seeds (row-major), each with its A1111 parameters."""
        from dataclasses import replace

        from sdtune.adapters import sampling
        from sdtune.adapters.base import recommended_guidance, resolve_base
        from sdtune.adapters.compose import resolve_base_ref

        composer = self.composer(side.pipeline)
        pipe = self.controlled(side, composer) if side.controls else composer.pipe
        base = resolve_base_ref(side.pipeline.base, self.registry)
        guidance = settings.guidance if settings.guidance is not None else recommended_guidance(base)
        lora = composer.lora_label()
        extra = {"Lora": lora} if lora else None
        each = settings.sample_settings(guidance)
        if side.controls:
            images = tuple(c.image for c in side.controls)
            scales = tuple(c.scale for c in side.controls)
            each = [replace(s, control_images=images, control_scales=scales) for s in each]
        return sampling.generate(pipe, each, model_name=resolve_base(base).name, extra_parameters=extra)


# -- making comparisons ---------------------------------------------------------------------------------------------


def compare(
    a: str,
    b: str,
    settings: Settings,
    *,
    blind: bool = False,
    score: str | None = None,
    store: ABStore | None = None,
    renderer: Renderer | None = None,
    rng: random.Random | None = None,
) -> str:
    """Renders both specs at the same prompts, seeds and settings, writes the pair images and a side-by-side grid,
    and stores the comparison. Returns its id.

    Raises:
        ABError: a bad spec, scorer or setting; compose.ComposeError / BaseLoadError: a side cannot be built.
    """
    side_a, side_b = parse_spec(a, "--a"), parse_spec(b, "--b")
    renderer = renderer or Renderer()
    for side in (side_a, side_b):  # a wrong name fails before either side renders
        renderer.check(side)
    scorer = Scorer.parse(score) if score else None
    if scorer:
        for prompt in settings.prompts:
            scorer.target(prompt)  # a prompt the scorer cannot read fails before any rendering
    store = store or ABStore()
    samples_a, samples_b = renderer.render(side_a, settings), renderer.render(side_b, settings)
    shuffle = rng or random.SystemRandom()  # blind order: unpredictable, recorded per pair

    def fill(folder: Path) -> NewComparison:
        controls = {"a": [_keep_control_image(c.image, folder) for c in side_a.controls],
                    "b": [_keep_control_image(c.image, folder) for c in side_b.controls]}  # fmt: skip
        pairs = _save_pairs(folder, samples_a, samples_b, blind, shuffle, scorer)
        result = {"grid": "grid.png"}
        if controls["a"] or controls["b"]:
            result["control_images"] = controls
        title = f"A: {short_spec(a)}  |  B: {short_spec(b)}"
        _save_grid(folder, pairs, (samples_a, samples_b), controls, blind, title, settings)
        if scorer:
            result["scores"] = {s: sum(getattr(p, f"score_{s}") for p in pairs) / len(pairs) for s in "ab"}
        return NewComparison("ab", {"a": a, "b": b}, asdict(settings), blind, score, result, pairs)

    return store.add(fill)


def _save_pairs(folder: Path, samples_a: list, samples_b: list, blind: bool, shuffle, scorer) -> list[PairRow]:
    """Writes each (prompt, seed)'s two images, in blind mode on a random side each, and scores them."""
    from sdtune.adapters.sampling import save_png, save_png_atomic

    pairs = []
    for i, (sa, sb) in enumerate(zip(samples_a, samples_b)):
        left = shuffle.choice("ab") if blind else "a"
        shown = (sa, sb) if left == "a" else (sb, sa)
        names = (f"{i:03d}-left.png", f"{i:03d}-right.png") if blind else (f"{i:03d}-a.png", f"{i:03d}-b.png")
        for sample, name in zip(shown, names):  # blind: no PNG parameters either, they name the LoRAs
            save_png_atomic(sample.image, folder / name) if blind else save_png(sample, folder / name)
        scores = [scorer.score(s.image, s.settings.prompt) if scorer else None for s in (sa, sb)]
        pairs.append(PairRow(i, sa.settings.prompt, sa.settings.seed, left, *names, *scores))
    return pairs


def _save_grid(
    folder: Path, pairs: list[PairRow], samples: tuple, controls: dict, blind: bool, title: str, settings: Settings
) -> None:
    """`grid.png`: blind, numbered pairs as shown (left, right) to vote from; else A beside B, titled by the specs.
    Control images lead the rows, in blind mode only when both sides share them (then they give nothing away)."""
    from sdtune.adapters import contact_sheet

    samples_a, samples_b = samples
    control_rows = _control_rows(controls, folder)
    if blind:
        rows = [[(sa, sb)[p.left_side == "b"].image, (sb, sa)[p.left_side == "b"].image]
                for p, sa, sb in zip(pairs, samples_a, samples_b)]  # fmt: skip
        labels = [f"pair {p.pair}: {p.prompt}, seed {p.seed}" for p in pairs]
        if controls["a"] == controls["b"]:
            rows, labels = [[ca, cb] for _, ca, cb in control_rows] + rows, [r[0] for r in control_rows] + labels
        grid = contact_sheet.make_grid(rows, labels, ["left", "right"])
    else:
        grid = contact_sheet.ab_grid(samples_a, samples_b, settings.prompts, settings.seeds, title,
                                     labels=("A", "B"), lead_rows=control_rows)  # fmt: skip
    contact_sheet.save_grid(grid, folder / "grid.png")


def _keep_control_image(path: str, folder: Path) -> str:
    """Copies a control image into the comparison as `control-<sha256 prefix><suffix>` (one copy per content);
    returns its name there."""
    import hashlib

    data = Path(path).read_bytes()
    name = f"control-{hashlib.sha256(data).hexdigest()[:12]}{Path(path).suffix.lower() or '.png'}"
    if not (folder / name).exists():
        write_bytes_atomic(folder / name, data)
    return name


def _control_rows(controls: dict, folder: Path) -> list[tuple]:
    """(label, image of A or None, image of B or None) per ControlNet position, for the grids."""
    from PIL import Image

    def opened(names: list[str], k: int):
        return Image.open(folder / names[k]).convert("RGB") if k < len(names) else None

    count = max(len(controls["a"]), len(controls["b"]))
    return [(f"control image {k}", opened(controls["a"], k), opened(controls["b"], k)) for k in range(count)]


# -- which checkpoint is best? --------------------------------------------------------------------------------------


def _candidate_label(run_dir: Path, path: Path) -> str:
    return "final" if path == run_dir else path.name


def compare_checkpoints(
    run_dir: str | Path,
    settings: Settings,
    *,
    score: str,
    base: str | None = None,
    store: ABStore | None = None,
    renderer: Renderer | None = None,
    rank_by: str = "score",
) -> str:
    """Renders every saved checkpoint of a LoRA run (and its final LoRA) at the same prompts and seeds, scores
    each, and stores the comparison with the best one named (ties: the earliest, the least drift from the base).
    `base` defaults to the one in the run's adapter.json. `rank_by`: "score" (the highest toy score) or
    "val_loss" (the lowest held-out validation loss the run recorded for the checkpoint's step, shown beside the
    score). Returns the comparison id."""
    from sdtune.adapters import contact_sheet
    from sdtune.adapters.compose import AdapterUse, PipelineSpec
    from sdtune.adapters.run_folder import PEFT_FILE, checkpoint_step, lora_checkpoints

    run_dir = Path(run_dir).resolve()
    candidates = lora_checkpoints(run_dir)
    if not candidates:
        raise ABError(f"--checkpoints {run_dir}: no checkpoints/checkpoint-N/{PEFT_FILE} and no final LoRA in it")
    base = base or run_base(run_dir)
    recorded = recorded_val_loss(run_dir, rank_by)
    scorer = Scorer.parse(score)
    for prompt in settings.prompts:
        scorer.target(prompt)
    store, renderer = store or ABStore(), renderer or Renderer()
    rendered, found = [], []
    for path in candidates:
        samples = renderer.render(Side(PipelineSpec(base, [AdapterUse(str(path / PEFT_FILE))])), settings)
        points = [scorer.score(s.image, s.settings.prompt) for s in samples]
        step = run_steps(run_dir) if path == run_dir else checkpoint_step(path)
        label = _candidate_label(run_dir, path)
        val_loss = recorded.get(str(step))
        found.append({"label": label, "step": step, "path": str(path), "score": sum(points) / len(points),
                      "val_loss": val_loss})  # fmt: skip
        rendered.append(samples)
    best = best_candidate(found, rank_by, run_dir)

    def fill(folder: Path) -> NewComparison:
        rows = [[s.image for s in samples] for samples in rendered]
        labels = [f"{c['label']} (step {c['step']}): score {c['score']:.2f}{_loss_text(c)}" for c in found]
        columns = [f"{p[:18]}, seed {s}" for p in settings.prompts for s in settings.seeds]
        title = f"{run_dir.name}: best {best['label']} ({'val_loss' if rank_by == 'val_loss' else scorer.text})"
        contact_sheet.save_grid(contact_sheet.make_grid(rows, labels, columns, title), folder / "grid.png")
        result = {"grid": "grid.png", "candidates": found, "best": best["label"], "registered": None,
                  "rank_by": rank_by}  # fmt: skip
        sides = {"run_dir": str(run_dir), "base": base, "labels": [c["label"] for c in found]}
        return NewComparison("checkpoints", sides, asdict(settings), False, score, result)

    return store.add(fill)


RANK_BY = ("score", "val_loss")


def recorded_val_loss(run_dir: Path, rank_by: str) -> dict[str, float]:
    """{step: val_loss} as the run's manifest recorded it (`training.val_loss.by_step`); ranking by it needs it."""
    from sdtune.adapters.manifest import ManifestError, read_manifest

    if rank_by not in RANK_BY:
        raise ABError(f"--rank-by {rank_by}: rank by one of {', '.join(RANK_BY)}")
    try:
        recorded = (read_manifest(run_dir).training.get("val_loss") or {}).get("by_step") or {}
    except ManifestError:
        recorded = {}
    if rank_by == "val_loss" and not recorded:
        raise ABError(
            f"--rank-by val_loss: {run_dir} recorded no held-out validation loss; train it with "
            "validation.loss_split or validation.loss_dir"
        )
    return recorded


def best_candidate(found: list[dict], rank_by: str, run_dir: Path) -> dict:
    """The highest score, or the lowest recorded val_loss (candidates without one are not ranked); the first of
    equals, i.e. the earliest checkpoint."""
    if rank_by == "score":
        return max(found, key=lambda c: c["score"])
    measured = [c for c in found if c["val_loss"] is not None]
    if not measured:
        raise ABError(f"--rank-by val_loss: none of the checkpoints of {run_dir} has a recorded val_loss")
    return min(measured, key=lambda c: c["val_loss"])


def _loss_text(candidate: dict) -> str:
    return "" if candidate.get("val_loss") is None else f", val_loss {candidate['val_loss']:.4f}"


def run_base(run_dir: Path) -> str:
    from sdtune.adapters.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run_dir).base.name_or_path
    except ManifestError:
        raise ABError(f"--checkpoints {run_dir}: no readable adapter.json to name the base; give --base") from None


def run_steps(run_dir: Path) -> int | None:
    from sdtune.adapters.manifest import ManifestError, read_manifest

    try:
        return read_manifest(run_dir).training.get("steps")
    except ManifestError:
        return None


def register_best(comparison: dict, name: str, registry=None):
    """Registers the best checkpoint of a `compare_checkpoints` result under `name`, with the run's manifest and
    its provenance: which checkpoint of which run, picked by which comparison and score. Returns the entry."""
    from sdtune.adapters.manifest import ManifestError, read_manifest
    from sdtune.adapters.registry import Registry, copy_into

    registry = registry or Registry()
    run_dir = Path(comparison["run_dir"])
    best = next(c for c in comparison["candidates"] if c["label"] == comparison["best"])
    try:
        manifest = read_manifest(run_dir)
    except ManifestError as exc:
        raise ABError(f"--register: the run has no readable adapter.json to register from ({exc})") from None
    source = Path(best["path"])
    files = {fmt: file for fmt, file in manifest.files.items() if (source / file).is_file()}
    grid = Path(comparison["folder"]) / comparison["grid"]

    def fill(staging: Path):
        for file in files.values():
            copy_into(source / file, staging / file)
        copy_into(grid, staging / "ab_checkpoints.png")
        manifest.files, manifest.samples = files, {"ab_checkpoints": "ab_checkpoints.png"}
        if source != run_dir:  # the final run's check and loss do not describe an earlier checkpoint
            manifest.export_check = None
            manifest.training = {**manifest.training, "steps": best["step"], "final_loss": None,
                                 "run_steps": manifest.training.get("steps")}  # fmt: skip
        picked = {"comparison": comparison["id"], "score": comparison["score"], "candidates": comparison["candidates"]}
        manifest.scores = {**(manifest.scores or {}), "ab_checkpoints": picked}
        manifest.origin = {"kind": "trained", "run_dir": str(run_dir), "checkpoint": best["label"],
                           "step": best["step"], "selected_by": comparison["id"]}  # fmt: skip
        return manifest

    entry = registry.add(name, fill)
    store = ABStore(registry.home)
    store.update_result(comparison["id"], registered=entry.name)
    return entry
