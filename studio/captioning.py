"""Captioning a dataset: which images to caption under each write mode, in batches, and what each caption becomes.

Modes (what happens to a caption already there):

    replace   the new caption replaces it
    append    the new caption goes after it ("old, new")
    prefix    the trigger word, then the new caption, replace the old one (needs a trigger)
    missing   only images without a caption are captioned: a run stopped half-way picks up where it stopped

A trigger word given with any mode is put in front once (`datasets_store.add_trigger`: a caption that has it keeps
it where it is). Each batch is written before the next one is captioned, so a stopped run keeps what it wrote.
Writing is the caller's (`write(file, text)`): the datasets store for a workspace dataset, so a frozen version never
changes, or a `.txt` beside each image of a plain folder.

Imports no torch: the captioner loads it (adapters/captioners.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sdtune.adapters.captioners import Captioner, CaptionerError
from sdtune.adapters.images import open_rgb
from sdtune.studio.datasets_store import add_trigger

MODES = ("replace", "append", "prefix", "missing")


@dataclass
class Item:
    """One image to caption: its name for the user, its path, its caption now ("" = none) or why it is unreadable."""

    file: str
    path: str
    caption: str = ""
    caption_error: str | None = None


@dataclass
class CaptionRun:
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (file, old, new), written unless a dry run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    unchanged: int = 0  # captioned to what they already said
    kept: int = 0  # already captioned, left as they are in "missing" mode
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would change" if self.dry_run else "changed"
        out = [f"{file}: {old!r} -> {new!r}" for file, old, new in self.changes]
        out += [f"skipped {file}: {why}" for file, why in self.skipped]
        summary = f"{len(self.changes)} captions {verb}, {self.unchanged} unchanged"
        if self.kept:
            summary += f", {self.kept} already captioned (kept)"
        if self.skipped:
            summary += f", {len(self.skipped)} skipped"
        return [*out, summary + (" (dry run: nothing written)" if self.dry_run else "")]


def check_mode(mode: str, trigger: str) -> None:
    if mode not in MODES:
        raise CaptionerError(f"--mode {mode}: one of {', '.join(MODES)}")
    if mode == "prefix" and not trigger.strip():
        raise CaptionerError("--mode prefix: name the trigger word to put in front (--trigger WORD)")


def new_caption(old: str, generated: str, mode: str, trigger: str = "") -> str:
    """What the caption becomes under `mode` (see the module docstring)."""
    text = f"{old}, {generated}" if mode == "append" and old else generated
    return add_trigger(text, trigger) if trigger.strip() else text


def caption_items(
    items: list[Item],
    captioner: Captioner,
    *,
    mode: str = "missing",
    trigger: str = "",
    batch_size: int = 8,
    write: Callable[[str, str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CaptionRun:
    """Captions `items` in batches of `batch_size`; `write(file, text)` each changed caption (None: a dry run).
    `progress(done, total)` after each batch. An image that cannot be opened is skipped with its reason."""
    check_mode(mode, trigger)
    if batch_size < 1:
        raise CaptionerError(f"--batch-size {batch_size}: at least 1")
    run = CaptionRun(dry_run=write is None)
    todo = []
    for item in items:
        if item.caption_error:  # writing would replace a file nobody could read
            run.skipped.append((item.file, item.caption_error))
        elif mode == "missing" and item.caption:
            run.kept += 1
        else:
            todo.append(item)
    for start in range(0, len(todo), batch_size):
        _caption_batch(todo[start : start + batch_size], captioner, mode, trigger, write, run)
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    return run


def _caption_batch(batch: list[Item], captioner: Captioner, mode: str, trigger: str, write, run: CaptionRun):
    opened = []
    for item in batch:
        try:
            opened.append((item, open_rgb(item.path)))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            run.skipped.append((item.file, f"unreadable image ({type(exc).__name__}: {exc})"))
    if not opened:
        return
    captions = captioner.caption([image for _, image in opened])
    for (item, _), generated in zip(opened, captions):
        if not generated.strip():
            run.skipped.append((item.file, f"the {captioner.family} captioner found nothing to say"))
            continue
        text = new_caption(item.caption, generated.strip(), mode, trigger)
        if text == item.caption:
            run.unchanged += 1
            continue
        if write is not None:
            write(item.file, text)
        run.changes.append((item.file, item.caption, text))
