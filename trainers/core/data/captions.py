"""Captions as a training step sees them: the raw caption through the template, the tag shuffle and the dropout.

The rng is passed to each call, never the global one: the trainer derives it from (seed, epoch, index), so a
resumed run sees exactly the same captions.
"""

from __future__ import annotations

import random
import re

from sdtune.trainers.core.recipe import DataConfig

from .records import DataError


def tidy_caption(text: str) -> str:
    """Collapses whitespace and the empty comma slots an empty `{caption}` or `{trigger}` leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "sks, , a dog" -> "sks, a dog"
    text = re.sub(r"\s+,", ",", text)  # "sks , a dog" -> "sks, a dog"
    return text.strip(" ,")


class CaptionBuilder:
    """Builds the caption a training step sees from a raw caption: 1) template, 2) tag shuffle, 3) dropout.

    Args:
        cfg: the `data` section (caption_template, trigger_word, shuffle_caption, keep_tokens, caption_dropout_rate).

    The rng is passed to each call, never the global one: the trainer derives it from (seed, epoch, index), so a
    resumed run draws the same shuffles and dropouts as an uninterrupted one.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        try:
            cfg.caption_template.format(caption="", trigger="")
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(
                f"data.caption_template: {cfg.caption_template!r} is not a valid template ({exc!r}); "
                "use the placeholders {caption} and {trigger}"
            ) from None

    def template(self, raw_caption: str) -> str:
        """The templated, tidied caption (step 1 only)."""
        text = self.cfg.caption_template.format(caption=raw_caption, trigger=self.cfg.trigger_word or "")
        return tidy_caption(text)

    def __call__(self, raw_caption: str, rng: random.Random) -> str:
        text = self.template(raw_caption)
        if self.cfg.shuffle_caption:
            tags = [tag.strip() for tag in text.split(",") if tag.strip()]
            keep, rest = tags[: self.cfg.keep_tokens], tags[self.cfg.keep_tokens :]
            rng.shuffle(rest)
            text = ", ".join(keep + rest)
        if self.cfg.caption_dropout_rate > 0 and rng.random() < self.cfg.caption_dropout_rate:
            return ""
        return text

    @property
    def is_deterministic(self) -> bool:
        """True when a raw caption always gives the same text (no shuffle, no dropout)."""
        return not self.cfg.shuffle_caption and self.cfg.caption_dropout_rate == 0

    def fixed_captions(self, raw_captions) -> set[str]:
        """Every text a call can return for these raw captions; text embeddings of this set can be cached.

        Defined when tags are not shuffled: each templated caption, plus "" when caption dropout is on.
        """
        if self.cfg.shuffle_caption:
            raise ValueError("fixed_captions: with data.shuffle_caption the captions are not a fixed set")
        texts = {self.template(raw) for raw in raw_captions}
        if self.cfg.caption_dropout_rate > 0:
            texts.add("")
        return texts
