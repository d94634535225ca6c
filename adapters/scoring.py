"""Measuring what a model draws on the toy base: sample prompts with fixed seeds, read them with the toy scorer.

This is how sdtune proves a fine-tune learned something (and how the toy base is held to its bar): the same
prompts and seeds, rendered by `sampling.generate`, judged by `toyworld.score_image` (hue and geometry, no
learned model; a star by `stars.star_geometry`, see `toyworld.shape_shown`).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdtune.adapters import toyworld
from sdtune.adapters.sampling import Sample, SampleSettings, generate

BAR_SEEDS = (0, 1, 2, 3)
BAR_STEPS = 25


@dataclass(frozen=True)
class Target:
    """A prompt and what the scorer should find in its images (None = not checked)."""

    prompt: str
    color: str | None = None
    shape: str | None = None


@dataclass
class TargetScores:
    score: toyworld.Score
    samples: list[Sample]
    detections: list[toyworld.Detection]
    hits: list[bool]  # per image: the asked colour and shape both found (`judge`)

    def as_dict(self) -> dict:
        return {"color": self.score.color, "shape": self.score.shape, "both": self.score.both, "n": self.score.n}


def bar_targets() -> list[Target]:
    """The toy base's bar: `a {color} {shape}` for the 4 base colours x 3 base shapes."""
    return [Target(p, c, s) for p, c, s in toyworld.bar_prompts()]


def score_targets(
    pipe,
    targets: list[Target],
    seeds=BAR_SEEDS,
    steps: int = BAR_STEPS,
    guidance: float = 7.5,
    scheduler: str = "default",
    negative_prompt: str = "",
) -> TargetScores:
    """Renders every target prompt once per seed and scores the images against the target colour and shape."""
    settings = [
        SampleSettings(
            prompt=t.prompt,
            seed=s,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            negative_prompt=negative_prompt,
        )
        for t in targets
        for s in seeds
    ]
    samples = generate(pipe, settings)
    expected = [(t.color, t.shape) for t in targets for _ in seeds]
    images = [s.image for s in samples]
    detections = [toyworld.score_image(i) for i in images]
    score, hits = toyworld.judge(images, expected, detections)
    return TargetScores(score, samples, detections, hits)


@dataclass
class LayoutScores:
    """Colour/shape scores plus where the shape stands: the IoU of each image's foreground with its condition."""

    score: toyworld.Score
    ious: list[float]
    samples: list[Sample]

    @property
    def iou(self) -> float:
        return sum(self.ious) / max(len(self.ious), 1)

    def as_dict(self) -> dict:
        s = self.score
        return {"color": s.color, "shape": s.shape, "both": s.both, "n": s.n, "iou": round(self.iou, 4)}


def score_layout(pipe, pairs: list[tuple[Target, str]], controlled: bool, seeds=BAR_SEEDS, scale=1.0, **common):
    """Renders every (target, conditioning image) pair once per seed; scores colour and shape, and the IoU between
    the shape the scorer finds and the region the condition asks for (`toyworld.condition_region`).

    Args:
        pipe: a ControlNet pipeline when `controlled` (one ControlNet, at `scale`); else any pipeline, whose IoU
            with the same conditions is the chance level a ControlNet must beat.
        pairs: a target prompt and a conditioning image file (a mask or a closed-outline edge map) to draw it in.
        common: the other `SampleSettings` (steps, guidance, scheduler, negative_prompt).
    """
    control = dict(control_scales=(scale,)) if controlled else {}
    settings = [
        SampleSettings(t.prompt, s, control_images=(c,) if controlled else (), **control, **common)
        for t, c in pairs
        for s in seeds
    ]
    samples = generate(pipe, settings)
    expected = [(t.color, t.shape) for t, _ in pairs for _ in seeds]
    regions = [toyworld.condition_region(Image.open(c)) for _, c in pairs for _ in seeds]
    ious = [toyworld.iou(toyworld.foreground_mask(s.image), r) for s, r in zip(samples, regions)]
    images = [s.image for s in samples]
    score, _ = toyworld.judge(images, expected)
    return LayoutScores(score, ious, samples)
