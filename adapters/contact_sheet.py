"""Contact sheets: labelled grids of samples, for `sdtune sample --grid`, validation and the export check.

Small images (the toy base makes 64 px) are scaled up with nearest-neighbour so pixels stay honest.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdtune.adapters.sampling import Sample, save_png_atomic


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def make_grid(
    rows: list[list[Image.Image | None]],
    row_labels: list[str],
    col_labels: list[str],
    title: str = "",
    cell: int = 160,
) -> Image.Image:
    """A labelled contact sheet: one row per prompt, one column per seed (or per base/adapter pair); a None cell
    stays blank.

    Small images (the toy base makes 64 px) are scaled up with nearest-neighbour so pixels stay honest.
    """
    font, small = _font(14), _font(12)
    label_w, head_h = 200, 36 + (24 if title else 0)
    width = label_w + cell * max(len(r) for r in rows)
    sheet = Image.new("RGB", (width, head_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * cell + 6, head_h - 24), label, fill="black", font=small)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        y = head_h + r * cell
        for i, line in enumerate(_wrap(label, small, label_w - 12, draw)[:8]):
            draw.text((6, y + 6 + 15 * i), line, fill="black", font=small)
        for c, image in enumerate(images):
            if image is None:
                continue
            fitted = fit(image, cell - 4)
            x0, y0 = label_w + c * cell + 2 + (cell - 4 - fitted.width) // 2, y + 2 + (cell - 4 - fitted.height) // 2
            sheet.paste(fitted, (x0, y0))
    return sheet


def fit(image: Image.Image, box: int) -> Image.Image:
    """`image` scaled to fit a `box` x `box` cell, keeping its aspect ratio (a 512x768 sample stays portrait)."""
    scale = box / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def save_grid(image: Image.Image, path: str | Path):
    save_png_atomic(image, Path(path))


def row_label(prompt: str, own: dict, size: tuple[int, int]) -> str:
    """A grid row's label: the prompt, then what it sets itself (`own`: width/height, shown as the images' `size`,
    seed, steps, guidance_scale, negative_prompt), e.g. `a cat [32x40, seed 3, CFG 2]`."""
    parts = [f"{size[0]}x{size[1]}"] if own.get("width") or own.get("height") else []
    parts += [f"seed {own['seed']}"] if own.get("seed") is not None else []
    parts += [f"{own['steps']} steps"] if own.get("steps") else []
    parts += [f"CFG {own['guidance_scale']:g}"] if own.get("guidance_scale") is not None else []
    parts += [f"neg: {own['negative_prompt']}"] if own.get("negative_prompt") is not None else []
    return prompt + (f" [{', '.join(parts)}]" if parts else "")


def samples_grid(samples: list[Sample], prompts: list[str], seeds: list[int], title: str = "") -> Image.Image:
    """Grid of `grid_settings(prompts, seeds)` output: rows = prompts, columns = seeds."""
    rows = [[samples[i * len(seeds) + j].image for j in range(len(seeds))] for i in range(len(prompts))]
    return make_grid(rows, prompts, [f"seed {s}" for s in seeds], title)


def ab_grid(
    base: list[Sample],
    adapted: list[Sample],
    prompts: list[str],
    seeds: list[int],
    title: str = "",
    labels: tuple[str, str] = ("base", "adapter"),
    lead_rows: list[tuple[str, Image.Image | None, Image.Image | None]] = (),
):
    """Two sides (base vs adapter, or A vs B) for the same prompts and seeds: columns alternate the sides per seed.
    `lead_rows` (label, image of the first side, image of the second) go on top, repeated per seed: what steered
    each side, such as its control image."""
    rows, cols, row_labels = [], [], []
    for seed in seeds:
        cols += [f"{labels[0]}  seed {seed}", f"{labels[1]}  seed {seed}"]
    for label, first, second in lead_rows:
        rows.append([first, second] * len(seeds))
        row_labels.append(label)
    for i in range(len(prompts)):
        row = []
        for j in range(len(seeds)):
            row += [base[i * len(seeds) + j].image, adapted[i * len(seeds) + j].image]
        rows.append(row)
    return make_grid(rows, row_labels + list(prompts), cols, title)
