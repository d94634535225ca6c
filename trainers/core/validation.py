"""Validation during and after training: fixed prompts x fixed seeds, base vs adapter, as labelled grids.

Images are rendered by `sampling.generate`, the code behind `sdtune sample`, so a preview equals what inference
gives later. Base images do not change during a run, so they are rendered once. On the toy base, `toy_score`
targets are also measured with the toy-world scorer, for the base and for the adapter: the manifest's proof.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from sdtune.adapters import contact_sheet, sampling, scoring
from sdtune.adapters.base import recommended_guidance
from sdtune.adapters.manifest import CONDITION_SAMPLE, condition_file, pair_prompts
from sdtune.trainers.core.progress import progress_event
from sdtune.trainers.core.recipe import Recipe, SamplePrompt, ValidationConfig
from sdtune.trainers.core.trackers import log_grid


@contextlib.contextmanager
def adapters_disabled(*models):
    """Temporarily runs peft-adapted models as their frozen base."""
    adapted = [m for m in models if m is not None and getattr(m, "_hf_peft_config_loaded", False)]
    for model in adapted:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in adapted:
            model.enable_adapters()


@contextlib.contextmanager
def as_at_inference(*models):
    """Eval mode and the models' own forward: under mixed precision Accelerate wraps a prepared model's forward to
    return fp32, which a loaded pipeline does not do; previews must compute exactly as inference will."""
    states = [(m, m.training, m.__dict__.get("forward")) for m in models if m is not None]
    for model, _, _ in states:
        model.eval()
        if "_original_forward" in model.__dict__:
            model.forward = model._original_forward
    try:
        yield
    finally:
        for model, mode, forward in states:
            model.train(mode)
            if forward is not None:
                model.forward = forward


def save_and_log(accelerator, image, path: Path, step: int, samples: Path | None = None) -> Path:
    """Saves a validation grid, reports it (and the folder of its sample files) to metrics.jsonl and logs it to the
    image-taking trackers (TensorBoard, wandb)."""
    contact_sheet.save_grid(image, path)
    progress_event(accelerator, "validation", step, grid=path, **({"samples": samples} if samples else {}))
    log_grid(accelerator, image, step)
    return path


def prompt_settings(
    prompt: SamplePrompt, v: ValidationConfig, guidance: float, zero_terminal_snr: bool, **control
) -> list[sampling.SampleSettings]:
    """A validation prompt's images, one per seed (its own seed, else the section's seeds), each with the prompt's
    own settings where it has them and the section's elsewhere."""
    common = dict(
        negative_prompt=v.negative_prompt, steps=v.num_inference_steps, guidance=guidance, scheduler=v.scheduler,
        zero_terminal_snr=zero_terminal_snr, **control,
    )  # fmt: skip
    return sampling.prompt_row(prompt.prompt, list(v.seeds), prompt.model_dump(exclude={"prompt"}), **common)


def own_settings(prompt: SamplePrompt, sample: sampling.Sample, seeded: bool) -> str:
    """A grid row's label: the prompt, then what it sets itself (size, seed if `seeded`, steps, CFG, negative)."""
    own = prompt.model_dump(exclude_none=True, exclude={"prompt", *(() if seeded else ("seed",))})
    return contact_sheet.row_label(prompt.prompt, own, sample.image.size)


def two_sides_grid(
    first, second, rows: list[list], prompts: list[SamplePrompt], title: str, sides=("base", "adapter")
):
    """First vs second side of every prompt's images (one row per prompt, sides alternating per seed). Rows may
    differ in seeds and sizes: the cells fit each image whatever its size, and where the prompts do not share their
    seeds the columns are numbered and each row names its own seed."""
    columns, shared = side_columns(rows, sides)
    cells, labels, start = [], [], 0
    for prompt, row in zip(prompts, rows):
        pairs = [(first[start + j].image, second[start + j].image) for j in range(len(row))]
        cells.append([image for pair in pairs for image in pair])
        labels.append(own_settings(prompt, first[start], seeded=not shared))
        start += len(row)
    return contact_sheet.make_grid(cells, labels, columns, title)


def side_columns(rows: list[list[sampling.SampleSettings]], sides: tuple[str, ...]) -> tuple[list[str], bool]:
    """Column labels of a grid whose rows hold each side per seed: `base  seed 3`, or, where the rows do not share
    their seeds, `base  1` (each row then names its seed); and whether they share them."""
    seeds = [[s.seed for s in row] for row in rows]
    shared = all(row_seeds == seeds[0] for row_seeds in seeds)
    widest = max(len(row) for row in rows)
    return [f"{side}  {f'seed {seeds[0][j]}' if shared else j + 1}" for j in range(widest) for side in sides], shared


def save_samples(samples: list[sampling.Sample], folder: Path) -> Path:
    """Each sample as `NNNN-seedS.png` with its A1111 parameters, as `sdtune sample` names them."""
    for index, sample in enumerate(samples):
        sampling.save_png(sample, folder / f"{index:04d}-seed{sample.settings.seed}.png")
    return folder


def score_settings(recipe: Recipe, guidance: float) -> dict:
    """The seeds and sampling settings the toy scores are measured with: the validation's own."""
    v = recipe.validation
    return dict(
        seeds=tuple(v.toy_seeds),
        steps=v.num_inference_steps,
        guidance=guidance,
        scheduler=v.scheduler,
        negative_prompt=v.negative_prompt,
    )


class Validator:
    """Renders validation grids for one run; `pipe` shares its unet/text encoder with the training loop."""

    def __init__(self, recipe: Recipe, pipe, accelerator, output_dir: str | Path, model_name: str, loss=None):
        """`loss`: the run's held-out validation loss (`val_loss.held_out_loss`), None without one."""
        v = recipe.validation
        self.loss = loss
        self.recipe, self.pipe, self.accelerator, self.model_name = recipe, pipe, accelerator, model_name
        self.guidance = v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base)
        self.output_dir = Path(output_dir)
        self.prompts = v.sample_prompts()
        self.rows = [prompt_settings(p, v, self.guidance, recipe.train.zero_terminal_snr) for p in self.prompts]
        self.settings = [settings for row in self.rows for settings in row]
        self._base_samples = None
        self._base_scores = None
        # How the base is shown beside the adapter: peft's layers switched off; textual inversion sets its own (the
        # untrained token).
        self.without_adapter = lambda: adapters_disabled(pipe.unet, pipe.text_encoder)
        pipe.set_progress_bar_config(disable=True)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def keep_conditions(self, out_dir: Path) -> dict[str, str]:
        """Conditioning images to keep with the run: none without a ControlNet (see ControlValidator)."""
        return {}

    def _render(self, settings, adapter: bool):
        with torch.no_grad(), as_at_inference(self.pipe.unet, self.pipe.text_encoder), self.accelerator.autocast():
            if adapter:
                return sampling.generate(self.pipe, settings, self.model_name)
            with self.without_adapter():
                return sampling.generate(self.pipe, settings, self.model_name)

    def render_one(self, settings: sampling.SampleSettings) -> sampling.Sample:
        """One image with the adapter as it is now (the export check compares files against it)."""
        return self._render([settings], adapter=True)[0]

    def base_samples(self):
        if self._base_samples is None:
            self._base_samples = self._render(self.settings, adapter=False)
        return self._base_samples

    def grid(self, step: int, path: Path) -> Path | None:
        """Base vs current adapter for every prompt and seed, saved at `path` and logged to the trackers."""
        if not self.enabled:  # e.g. "sample now" on a recipe without validation prompts
            progress_event(
                self.accelerator, "validation", step, grid=None, note="the recipe has no validation.prompts"
            )
            return None
        adapted = self._render(self.settings, adapter=True)
        title = f"{self.model_name}: base vs adapter after {step} steps"
        image = two_sides_grid(self.base_samples(), adapted, self.rows, self.prompts, title)
        samples = save_samples(adapted, self.output_dir / "samples" / f"step-{step:06d}")
        return save_and_log(self.accelerator, image, path, step, samples)

    def _inference(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(as_at_inference(self.pipe.unet, self.pipe.text_encoder))
        stack.enter_context(self.accelerator.autocast())
        return stack

    def _targets(self) -> list[scoring.Target]:
        return [scoring.Target(t.prompt, t.color, t.shape) for t in self.recipe.validation.toy_score]

    def capture_base(self):
        """Renders and scores the base now. A full fine-tune changes the base's own weights (there is no adapter
        to switch off later), so it calls this before training; a LoRA run may call it any time."""
        if self.enabled:
            self.base_samples()
        if self._targets() and self._base_scores is None:
            with self._inference():
                common = score_settings(self.recipe, self.guidance)
                self._base_scores = scoring.score_targets(self.pipe, self._targets(), **common)

    def toy_scores(self) -> dict | None:
        """Toy-world scores of the base and of the adapter on `validation.toy_score` (None if none are set)."""
        targets = self._targets()
        if not targets:
            return None
        common = score_settings(self.recipe, self.guidance)
        with self._inference():
            if self._base_scores is None:
                with self.without_adapter():
                    self._base_scores = scoring.score_targets(self.pipe, targets, **common)
            adapted = scoring.score_targets(self.pipe, targets, **common)
        return {
            "targets": [t.__dict__ for t in targets],
            "seeds": list(common["seeds"]),
            "base": self._base_scores.as_dict(),
            "adapter": adapted.as_dict(),
            "per_prompt": {
                t.prompt: {"base": b, "adapter": a}
                for t, b, a in zip(targets, per_target(self._base_scores, targets), per_target(adapted, targets))
            },
        }


def per_target(scores: scoring.TargetScores, targets: list[scoring.Target]) -> list[float]:
    """The share of each target's images showing its colour and shape (`scores` holds targets x seeds, in order;
    judged as the run's score is, `toyworld.judge`)."""
    n = len(scores.hits) // len(targets)
    return [sum(scores.hits[i * n : (i + 1) * n]) / max(n, 1) for i in range(len(targets))]


class ControlValidator:
    """Validation of a ControlNet run: condition | base | controlled, per (prompt, condition) and seed.

    `pipe` is the frozen base the loop trains over; the ControlNet pipeline shares its components, so previews
    compute exactly what `sdtune sample --controlnet` computes later.
    """

    def __init__(
        self, recipe: Recipe, pipe, controlnet, accelerator, conditions: list[str], model_name: str, loss=None
    ):
        """`loss`: the run's held-out validation loss (`val_loss.held_out_loss`), None without one."""
        v = recipe.validation
        self.loss = loss
        self.recipe, self.pipe, self.controlnet, self.accelerator = recipe, pipe, controlnet, accelerator
        self.model_name, self.scale = model_name, recipe.method.conditioning_scale
        self.guidance = v.guidance_scale if v.guidance_scale is not None else recommended_guidance(recipe.base)
        prompts = v.sample_prompts()
        order = pair_prompts(list(range(len(prompts))), conditions) if prompts else []  # by index: texts may repeat
        self.pairs = [(prompts[i].prompt, c) for i, c in order]
        self.paired, self.conditions = [prompts[i] for i, _ in order], conditions
        zts, control = recipe.train.zero_terminal_snr, dict(control_scales=(self.scale,))
        self.base_rows = [prompt_settings(p, v, self.guidance, zts) for p in self.paired]
        self.control_rows = [
            prompt_settings(p, v, self.guidance, zts, control_images=(c,), **control)
            for p, (_, c) in zip(self.paired, self.pairs)
        ]
        self.base_settings = [settings for row in self.base_rows for settings in row]
        self.control_settings = [settings for row in self.control_rows for settings in row]
        self.control_pipe = sampling.controlnet_pipeline(pipe, controlnet)  # the base keeps its dtype
        pipe.set_progress_bar_config(disable=True)
        self._base_samples = None

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    def keep_conditions(self, out_dir: Path) -> dict[str, str]:
        """The validation conditions as files of the run, `samples/conditions/condition-N.png` (a given
        `method.validation_image` is copied there), listed in the manifest's samples: the registry keeps them with
        the ControlNet, and publishing renders its widget images from the same (prompt, condition) pairs."""
        kept = {}
        for index, condition in enumerate(self.conditions):
            name = condition_file(index)
            if Path(condition).resolve() != (out_dir / name).resolve():
                with Image.open(condition) as image:
                    sampling.save_png_atomic(image.convert("RGB"), out_dir / name)
            kept[f"{CONDITION_SAMPLE}{index}"] = name
        return kept

    def _render(self, pipe, settings):
        with torch.no_grad(), as_at_inference(self.pipe.unet, self.controlnet), self.accelerator.autocast():
            return sampling.generate(pipe, settings, self.model_name)

    def grid(self, step: int, path: Path) -> Path:
        """Condition | base | controlled for every pair and seed, saved at `path` and logged to the trackers."""
        if self._base_samples is None:  # the base does not change during the run
            self._base_samples = self._render(self.pipe, self.base_settings)
        controlled = self._render(self.control_pipe, self.control_settings)
        columns, shared = side_columns(self.base_rows, ("base", "controlnet"))
        rows, labels, start = [], [], 0
        for prompt, (_, condition), settings in zip(self.paired, self.pairs, self.base_rows):
            row = [Image.open(condition).convert("RGB")]
            for j in range(len(settings)):
                row += [self._base_samples[start + j].image, controlled[start + j].image]
            label = own_settings(prompt, controlled[start], seeded=not shared)
            start += len(settings)
            rows.append(row)
            labels.append(f"{label} | {Path(condition).name}")
        columns = ["condition", *columns]
        title = f"{self.model_name}: condition | base | ControlNet (scale {self.scale:g}) after {step} steps"
        image = contact_sheet.make_grid(rows, labels, columns, title)
        samples = save_samples(controlled, Path(self.recipe.output.dir) / "samples" / f"step-{step:06d}")
        return save_and_log(self.accelerator, image, path, step, samples)

    def toy_scores(self) -> dict | None:
        """Toy-world scores and layout IoU of the base and of the ControlNet on `validation.toy_score` x the
        validation conditions (None if no targets are set)."""
        targets = [scoring.Target(t.prompt, t.color, t.shape) for t in self.recipe.validation.toy_score]
        if not targets:
            return None
        # each target with the validation conditions its prompt is paired with (all of them if none is)
        pairs = [(t, c) for t in targets for p, c in self.pairs if p == t.prompt]
        pairs = pairs or [(t, c) for t in targets for c in self.conditions]
        common = score_settings(self.recipe, self.guidance)
        with torch.no_grad(), as_at_inference(self.pipe.unet, self.controlnet), self.accelerator.autocast():
            base = scoring.score_layout(self.pipe, pairs, controlled=False, **common)
            controlled = scoring.score_layout(self.control_pipe, pairs, controlled=True, scale=self.scale, **common)
        return {
            "targets": [t.__dict__ for t in targets],
            "pairs": [[t.prompt, Path(c).name] for t, c in pairs],
            "seeds": list(common["seeds"]),
            "base": base.as_dict(),
            "adapter": controlled.as_dict(),
        }
