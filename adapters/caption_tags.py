"""Tags across a dataset's captions: their frequency, and renaming or removing one tag in every caption.

A caption is tags when it is a comma-separated list (`sks, purple, circle`, kohya/booru style); a prose caption
(`a purple circle on white`) is counted by word. A dataset is read one way for all its captions: tags when at least
half of its captions have a comma, else words, so the table never mixes "a purple circle" (a tag) with "purple" (a
word).

Renaming and removing follow the same reading: a tag is replaced only where it is a whole tag (`purple` does not
touch `purple hair`), a word only where it is a whole word. Torch-free, text only.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

WORD = re.compile(r"[\w'-]+")


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def split_words(caption: str) -> list[str]:
    """The words of a prose caption, lowercased (punctuation is not part of a word)."""
    return [word.lower() for word in WORD.findall(caption)]


def reads_as_tags(captions: list[str]) -> bool:
    """True when at least half of the non-empty captions are comma-separated lists."""
    written = [c for c in captions if c.strip()]
    return bool(written) and sum("," in c for c in written) * 2 >= len(written)


@dataclass
class TagTable:
    """How many captions hold each tag (or word), most frequent first; `kind` is "tags" or "words"."""

    kind: str
    counts: list[tuple[str, int]]
    captions: int  # non-empty captions counted

    def rows(self, limit: int | None = None) -> list[dict]:
        total = max(self.captions, 1)
        return [{"tag": t, "captions": n, "share": f"{n / total:.0%}"} for t, n in self.counts[:limit]]


def tag_frequency(captions: list[str]) -> TagTable:
    """Per tag (or word), the number of captions that have it at least once (kohya's `ss_tag_frequency` counts the
    same way)."""
    as_tags = reads_as_tags(captions)
    split = split_tags if as_tags else split_words
    counter: Counter = Counter()
    written = [c for c in captions if c.strip()]
    for caption in written:
        counter.update(set(split(caption)))
    counts = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return TagTable(kind="tags" if as_tags else "words", counts=counts, captions=len(written))


def rename_tag(caption: str, old: str, new: str, as_tags: bool) -> str:
    """`caption` with the tag (or word) `old` replaced by `new`; an empty `new` removes it.

    With tags, a tag equal to `old` is replaced, and a tag that then appears twice is kept once (renaming `kitty` to
    `cat` in `cat, kitty` gives `cat`). With words, a whole word equal to `old` (any case) is replaced.
    """
    old, new = old.strip(), new.strip()
    if not old:
        return caption
    if as_tags:
        tags, out = split_tags(caption), []
        for tag in tags:
            tag = new if tag == old else tag
            if tag and tag not in out:
                out.append(tag)
        return caption if out == tags else ", ".join(out)
    pattern = re.compile(rf"(?<![\w'-]){re.escape(old)}(?![\w'-])", re.IGNORECASE)
    text = pattern.sub(new, caption)
    return re.sub(r"\s{2,}", " ", text).strip() if text != caption else caption
