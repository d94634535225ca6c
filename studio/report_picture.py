"""The dataset report as one PNG: six panels a person can read at a glance (PIL only; no plotting dependency).

buckets (images each)     | image sizes (width x height) | caption lengths (CLIP tokens)
tags (captions with each) | duplicate groups (thumbnails) | what to fix (no caption, no mask, skipped)
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdtune.adapters.images import open_rgb
from sdtune.studio.dataset_report import CLIP_TOKENS, DatasetReport

PANEL_W, PANEL_H, HEADER, MARGIN = 520, 440, 56, 16
INK, GREY, BAR, WARN, BAD = (30, 30, 30), (150, 150, 150), (70, 110, 200), (230, 140, 30), (200, 50, 50)
THUMB = 72


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


FONT, SMALL, TITLE = _font(15), _font(13), _font(20)


def render_report(report: DatasetReport) -> bytes:
    """The report as PNG bytes."""
    image = Image.new("RGB", (3 * PANEL_W, HEADER + 2 * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    usable = len(report.sizes)
    draw.text(
        (MARGIN, 14),
        f"{Path(report.folder).name}: {usable} images, {len(report.skipped)} skipped, resolution {report.resolution}",
        fill=INK,
        font=_font(24),
    )
    panels = [_buckets, _sizes, _tokens, _tags, _duplicates, _problems]
    for index, panel in enumerate(panels):
        left, top = index % 3 * PANEL_W, HEADER + index // 3 * PANEL_H
        draw.rectangle((left + 4, top + 4, left + PANEL_W - 4, top + PANEL_H - 4), outline=(215, 215, 215))
        panel(image, draw, report, (left + MARGIN, top + MARGIN, left + PANEL_W - MARGIN, top + PANEL_H - MARGIN))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _title(draw: ImageDraw.ImageDraw, box, text: str, note: str = "", note_color=GREY) -> int:
    """Writes a panel's title (and a note under it); returns the y where its content starts."""
    draw.text((box[0], box[1]), text, fill=INK, font=TITLE)
    if note:
        draw.text((box[0], box[1] + 26), note, fill=note_color, font=FONT)
    return box[1] + (52 if note else 32)


def _hbars(draw: ImageDraw.ImageDraw, box, rows: list[tuple[str, int]], color=BAR, label_w: int = 150):
    """Horizontal bars: a label, a bar in proportion to the largest value, and the value."""
    if not rows:
        return
    step = min(26, (box[3] - box[1]) // len(rows))
    largest = max(value for _, value in rows) or 1
    width = box[2] - box[0] - label_w - 50
    for i, (label, value) in enumerate(rows):
        y = box[1] + i * step
        draw.text((box[0], y), _clip(label, 20), fill=INK, font=FONT)
        end = box[0] + label_w + max(2, round(width * value / largest))
        draw.rectangle((box[0] + label_w, y + 2, end, y + step - 4), fill=color)
        draw.text((end + 6, y), str(value), fill=INK, font=FONT)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _buckets(image, draw, report: DatasetReport, box):
    top = _title(draw, box, "Buckets", f"images each, area <= {report.resolution}x{report.resolution}")
    rows = [(f"{w}x{h}", n) for (w, h), n in sorted(report.buckets.items(), key=lambda item: -item[1])]
    shown = rows[:14]
    if len(rows) > len(shown):
        shown.append((f"+{len(rows) - len(shown)} more", sum(n for _, n in rows[len(shown) :])))
    _hbars(draw, (box[0], top, box[2], box[3]), shown)


def _sizes(image, draw, report: DatasetReport, box):
    small = {s.file for s in report.smaller}
    note = f"{len(small)} smaller than their bucket: trained smaller" if small else "all cover their bucket"
    top = _title(draw, box, "Image sizes", note, WARN if small else GREY)
    plot = (box[0] + 60, top + 30, box[2] - 10, box[3] - 28)
    sides = [side for size in report.sizes.values() for side in size] + [report.resolution]
    scale = max(sides) * 1.08
    draw.rectangle(plot, outline=GREY)

    def at(w, h):
        return plot[0] + (plot[2] - plot[0]) * w / scale, plot[3] - (plot[3] - plot[1]) * h / scale

    rx, ry = at(report.resolution, report.resolution)
    draw.rectangle((plot[0], ry, rx, plot[3]), outline=(120, 170, 120))
    draw.text((plot[0] + 4, ry + 4), f"{report.resolution}x{report.resolution}", fill=(80, 140, 80), font=SMALL)
    dots = Counter((size, file in small) for file, size in report.sizes.items())
    for ((w, h), is_small), count in dots.items():
        x, y = at(w, h)
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=WARN if is_small else BAR)
        if count > 1:  # images of the same size share a dot: say how many
            draw.text((x + 7, y - 7), f"x{count}", fill=INK, font=SMALL)
    draw.text((plot[0], top + 4), "dot: an image;", fill=INK, font=SMALL)
    draw.text((plot[0] + 100, top + 4), "covers its bucket", fill=BAR, font=SMALL)
    draw.text((plot[0] + 225, top + 4), "smaller than it", fill=WARN, font=SMALL)
    draw.text((box[0], plot[1]), f"{scale:.0f}", fill=GREY, font=SMALL)
    draw.text((box[0], (plot[1] + plot[3]) // 2), "height", fill=GREY, font=SMALL)
    draw.text((box[0] + 40, plot[3] + 6), "0", fill=GREY, font=SMALL)
    draw.text(((plot[0] + plot[2]) // 2 - 20, plot[3] + 6), "width", fill=GREY, font=SMALL)
    draw.text((plot[2] - 50, plot[3] + 6), f"{scale:.0f} px", fill=GREY, font=SMALL)


def _tokens(image, draw, report: DatasetReport, box):
    over = len(report.over_limit)
    note = f"{over} over {CLIP_TOKENS} (cut in training)" if over else f"none over {CLIP_TOKENS}"
    top = _title(draw, box, "Caption lengths (CLIP tokens)", note, BAD if over else GREY)
    counts = list(report.tokens.values())
    if not counts:
        return
    width = 5  # tokens per bar
    edge = max(max(counts), CLIP_TOKENS + width)
    bins = [0] * (edge // width + 1)
    for n in counts:
        bins[n // width] += 1
    plot = (box[0] + 30, top + 6, box[2] - 10, box[3] - 28)
    bar_w = (plot[2] - plot[0]) / len(bins)
    tallest = max(bins) or 1
    for i, n in enumerate(bins):
        x = plot[0] + i * bar_w
        height = (plot[3] - plot[1]) * n / tallest
        color = BAD if i * width > CLIP_TOKENS else BAR
        if n:
            draw.rectangle((x + 1, plot[3] - height, x + bar_w - 1, plot[3]), fill=color)
    limit = plot[0] + bar_w * CLIP_TOKENS / width
    draw.line((limit, plot[1], limit, plot[3]), fill=BAD, width=2)
    draw.text((limit + 4, plot[1]), str(CLIP_TOKENS), fill=BAD, font=SMALL)
    draw.line((plot[0], plot[3], plot[2], plot[3]), fill=GREY)
    draw.text((plot[0], plot[3] + 6), "0", fill=GREY, font=SMALL)
    draw.text(((plot[0] + plot[2]) // 2 - 60, plot[3] + 6), f"captions per {width} tokens", fill=GREY, font=SMALL)
    draw.text((plot[2] - 30, plot[3] + 6), str(len(bins) * width), fill=GREY, font=SMALL)
    draw.text((box[0], plot[1]), str(tallest), fill=GREY, font=SMALL)


def _tags(image, draw, report: DatasetReport, box):
    tags = report.tags
    top = _title(draw, box, f"Top {tags.kind}", f"captions with each, of {tags.captions}; {len(tags.counts)} in all")
    _hbars(draw, (box[0], top, box[2], box[3]), tags.counts[:15], label_w=190)


def _duplicates(image, draw, report: DatasetReport, box):
    groups = report.duplicates.groups
    note = f"{len(groups)} group{'s' if len(groups) > 1 else ''} ({sum(g.exact for g in groups)} exact)"
    top = _title(draw, box, "Duplicates", note if groups else "none found", WARN if groups else GREY)
    row_h = THUMB + 40
    for row, group in enumerate(groups[: (box[3] - top) // row_h]):
        y = top + row * row_h
        kind = "exact" if group.exact else f"near, {group.distance} bits"
        draw.text((box[0], y), f"{row + 1}. {kind}", fill=INK, font=SMALL)
        for column, file in enumerate(group.files[: (box[2] - box[0]) // (THUMB + 8)]):
            x = box[0] + column * (THUMB + 8)
            _paste_thumb(image, Path(report.folder) / file, (x, y + 18))
            draw.text((x, y + 20 + THUMB), _clip(Path(file).name, 10), fill=INK, font=SMALL)


def _paste_thumb(image: Image.Image, path: Path, at: tuple[int, int]):
    try:
        thumb = open_rgb(path, THUMB)
    except Exception:  # gone or unreadable since the scan: a grey square, the report stays whole
        thumb = Image.new("RGB", (THUMB, THUMB), (220, 220, 220))
    image.paste(thumb, at)


def _problems(image, draw, report: DatasetReport, box):
    lines: list[tuple[str, tuple]] = []
    if report.uncaptioned:
        lines.append((f"{len(report.uncaptioned)} without a caption file:", WARN))
        lines += [(f"  {file}", INK) for file in report.uncaptioned]
    if report.masks:
        lines.append((f"{len(report.masks)} without a usable mask:", WARN))
        lines += [(f"  {problem}", INK) for problem in report.masks]
    if report.skipped:
        lines.append((f"{len(report.skipped)} skipped:", BAD))
        lines += [(f"  {file}: {reason}", INK) for file, reason in report.skipped]
    title = "To fix" if lines else "Nothing to fix"
    note = "every image has a caption" + (" and a mask" if report.masks is not None else "") if not lines else ""
    top = _title(draw, box, title, note)
    room = (box[3] - top) // 19
    if len(lines) > room:
        lines = lines[: room - 1] + [(f"... {len(lines) - room + 1} more lines in the text report", GREY)]
    for i, (text, color) in enumerate(lines):
        draw.text((box[0], top + i * 19), _clip(text, 62), fill=color, font=SMALL)
