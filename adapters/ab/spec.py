"""A side of a comparison, written as a SPEC, and what both sides share: the settings and the scorer.

Torch-free: the compose module is imported only when a spec is parsed, so a studio page can read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.adapters.errors import SdtuneError

if TYPE_CHECKING:
    from sdtune.adapters.compose import PipelineSpec


class ABError(SdtuneError, ValueError):
    """A comparison that cannot be made or a vote that cannot be taken; the message is one line."""


CONTROL_PART = "controlnet="
EMBEDDING_PART = "emb="  # +emb=NAME_OR_FILE: a textual-inversion embedding on this side


@dataclass(frozen=True)
class ControlUse:
    """One ControlNet of a side: `ref` a registry name or a path, its scale, and the image it steers by."""

    ref: str
    scale: float
    image: str


@dataclass
class Side:
    """One side of a comparison: the base with its adapters (a `compose.PipelineSpec`) and its ControlNets."""

    pipeline: PipelineSpec
    controls: list[ControlUse] = field(default_factory=list)


def parse_spec(text: str, flag: str = "--a") -> Side:
    """`BASE[+ADAPTER[:WEIGHT]]...[+emb=EMBEDDING]...[+controlnet=REF[:SCALE]@IMAGE]...` -> a `Side`."""
    from sdtune.adapters.compose import PipelineSpec

    parts = [p.strip() for p in (text or "").split("+")]
    if not all(parts):
        raise ABError(f"{flag} {text!r}: an empty part; write BASE+ADAPTER[:WEIGHT]+..., e.g. toy+toy-purple:0.8")
    if parts[0].startswith(CONTROL_PART):
        raise ABError(f"{flag} {text!r}: a spec starts with its base, e.g. toy+{parts[0]}")
    adapters, controls, embeddings = [], [], []
    for part in parts[1:]:
        if part.startswith(EMBEDDING_PART):
            embeddings.append(_embedding_ref(part, flag))
            continue
        if not part.startswith(CONTROL_PART):
            adapters.append(_adapter_use(part, flag))
            continue
        ref_scale, at, image = part[len(CONTROL_PART) :].partition("@")  # an image path may hold an @ too
        if not (at and ref_scale and image):
            raise ABError(
                f"{flag} {part!r}: write {CONTROL_PART}NAME_OR_PATH[:SCALE]@CONTROL_IMAGE, "
                f"e.g. {CONTROL_PART}toy-masks:0.9@circle-mask.png"
            )
        if not Path(image).expanduser().is_file():
            raise ABError(f"{flag} {part!r}: control image {image} not found")
        named = _adapter_use(ref_scale, flag)  # NAME_OR_PATH[:NUMBER], as an adapter's weight is read
        controls.append(ControlUse(named.ref, named.weight, str(Path(image).expanduser())))
    return Side(PipelineSpec(base=parts[0], adapters=adapters, embeddings=embeddings), controls)


def _embedding_ref(part: str, flag: str) -> str:
    """`emb=NAME_OR_FILE` -> its reference; an embedding has no weight, so `:NUMBER` is refused."""
    ref = part[len(EMBEDDING_PART) :]
    if not ref:
        raise ABError(f"{flag} {part!r}: write {EMBEDDING_PART}NAME_OR_FILE, e.g. {EMBEDDING_PART}toy-zq")
    from sdtune.adapters.compose import split_number

    if split_number(ref, default=None)[1] is not None:
        raise ABError(f"{flag} {part!r}: an embedding has no weight; write {EMBEDDING_PART}{split_number(ref)[0]}")
    return ref


def _adapter_use(text: str, flag: str):
    """`NAME_OR_PATH[:NUMBER]` as an AdapterUse; a weight that is no finite number is the flag's error."""
    from sdtune.adapters.compose import AdapterUse

    try:
        return AdapterUse.parse(text)
    except ValueError as exc:
        raise ABError(f"{flag} {exc}") from None


def short_spec(text: str) -> str:
    """A SPEC for titles: each control image by its file name (`...@/long/path/mask.png` -> `...@mask.png`)."""
    parts = text.split("+")
    return "+".join(
        f"{p.partition('@')[0]}@{Path(p.partition('@')[2]).name}" if p.startswith(CONTROL_PART) and "@" in p else p
        for p in parts
    )


@dataclass
class Settings:
    """What every image of a comparison shares, besides the model: same prompts, seeds and sampler on each side."""

    prompts: list[str]
    seeds: list[int]
    steps: int = 25
    guidance: float | None = None  # None: the base's recommended scale (3 toy, 7.5 SD v1-5)
    scheduler: str = "default"
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""

    def __post_init__(self):
        if not self.prompts:
            raise ABError("--prompt: give at least one prompt")
        if not self.seeds:
            raise ABError("--seed: give at least one seed")
        if self.steps < 1:
            raise ABError(f"--steps: must be at least 1, got {self.steps}")

    def sample_settings(self, guidance: float) -> list:
        from sdtune.adapters.sampling import grid_settings

        common = dict(steps=self.steps, guidance=guidance, scheduler=self.scheduler, width=self.width)
        return grid_settings(
            self.prompts, self.seeds, height=self.height, negative_prompt=self.negative_prompt, **common
        )


@dataclass(frozen=True)
class Scorer:
    """The toy-world scorer with a target: `toy` reads colour and shape words from each prompt; `toy:COLOR` fixes
    the colour (shape from the prompt); `toy:COLOR:SHAPE` fixes both. An image scores 1 when the scorer finds the
    target colour and shape, else 0; a side's score is the mean over its images."""

    text: str
    color: str | None = None
    shape: str | None = None

    @classmethod
    def parse(cls, text: str) -> Scorer:
        from sdtune.adapters import toyworld

        kind, *target = text.split(":")
        if kind != "toy" or len(target) > 2:
            raise ABError(f"--score {text!r}: use toy, toy:COLOR or toy:COLOR:SHAPE (e.g. toy:purple)")
        color, shape = (target + [None, None])[:2]
        if color and color not in toyworld.COLORS:
            raise ABError(f"--score {text!r}: unknown colour {color!r}; one of {', '.join(toyworld.COLORS)}")
        if shape and shape not in toyworld.SHAPES:
            raise ABError(f"--score {text!r}: unknown shape {shape!r}; one of {', '.join(toyworld.SHAPES)}")
        return cls(text, color or None, shape or None)

    def target(self, prompt: str) -> tuple[str | None, str | None]:
        from sdtune.adapters import toyworld

        words = prompt.lower().replace(",", " ").split()
        color = self.color or next((w for w in words if w in toyworld.COLORS), None)
        shape = self.shape or next((w for w in words if w in toyworld.SHAPES), None)
        if color is None and shape is None:
            raise ABError(f"--score {self.text}: prompt {prompt!r} names no toy colour or shape; give toy:COLOR")
        return color, shape

    def score(self, image, prompt: str) -> float:
        from sdtune.adapters import toyworld

        color, shape = self.target(prompt)
        return toyworld.score_images([image], [(color, shape)]).both
