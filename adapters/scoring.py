"""Measuring what a model draws on the toy base: sample prompts with fixed seeds, read them with the toy scorer.

This is how sdtune proves a fine-tune learned something (and how the toy base is held to its bar): the same
prompts and seeds, rendered by `sampling.generate`, judged by `toyworld.score_image` (hue and geometry, no
learned model).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    return TargetScores(toyworld.score_images(images, expected), samples, [toyworld.score_image(i) for i in images])
