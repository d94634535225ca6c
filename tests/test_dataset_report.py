"""Preparing a dataset (issue 24, items 2, 3 and 5): the perceptual hash and its threshold measured on toy images,
exact and near-duplicate groups, the tag table and tag edits, the training caption preview, the dataset report's
numbers on a built toy dataset, the preflight's duplicate line, and `sdtune dataset report|dupes` in a subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from sdtune.adapters import caption_tags, duplicates, toyworld
from sdtune.adapters.duplicates import COLOR_THRESHOLD, PHASH_THRESHOLD, find_duplicates, hamming, hash_image
from sdtune.studio import api

ROOT = Path(__file__).resolve().parents[1]
Scene = toyworld.Scene
PURPLE_CIRCLE = Scene(color="purple", shape="circle", radius=14, cx=32, cy=30)


def edited(image: Image.Image) -> Image.Image:
    """The same picture as a user's second copy: 1.5x larger, 10% brighter, saved as JPEG quality 70."""
    bigger = image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    ImageEnhance.Brightness(bigger).enhance(1.1).save(out, format="JPEG", quality=70)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def photo(seed: int, side: int = 256) -> Image.Image:
    """A smooth photo-like image: random colours at 8x8, upscaled and blurred."""
    cells = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((side, side), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))


def distances(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    ha, hb = hash_image(a), hash_image(b)
    return hamming(ha.phash, hb.phash), float(duplicates.color_distance(ha.colors, hb.colors))


# -- the hash and its thresholds ------------------------------------------------------------------------------------


def test_the_dct_is_the_dct_ii_basis_and_the_hash_has_64_bits():
    """Rows of the basis are orthogonal (a DCT-II), row 0 is constant; a hash is 64 bits, half of them set or close
    (each bit is one coefficient against the median of the 64)."""
    gram = duplicates.DCT @ duplicates.DCT.T
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9)
    assert np.allclose(duplicates.DCT[0], 1)
    bits = duplicates.phash(photo(1))
    assert 0 <= bits < 2**64 and 28 <= bits.bit_count() <= 36


def test_the_threshold_separates_an_edited_copy_from_another_picture():
    """The distances the module docstring states, measured: the edited copy of a toy image is 4 bits away (of the
    10 allowed) with its colour layout within 0.06 (of 0.08); another shape is 28 bits away; the same circle in
    another colour has nearly the same grey hash, and only the colour layout (0.96) tells them apart."""
    original = toyworld.render(PURPLE_CIRCLE)
    copy_bits, copy_colour = distances(original, edited(original))
    assert copy_bits <= 4 < PHASH_THRESHOLD and copy_colour <= 0.06 < COLOR_THRESHOLD
    shape_bits, _ = distances(
        original, toyworld.render(Scene(color="purple", shape="square", radius=14, cx=32, cy=30))
    )
    assert shape_bits >= 2 * PHASH_THRESHOLD
    colour_bits, colour = distances(
        original, toyworld.render(Scene(color="green", shape="circle", radius=14, cx=32, cy=30))
    )
    assert colour_bits <= PHASH_THRESHOLD and colour >= 0.5 > COLOR_THRESHOLD
    moved_bits, moved = distances(
        original, toyworld.render(Scene(color="purple", shape="circle", radius=14, cx=36, cy=30))
    )
    assert moved > 2 * COLOR_THRESHOLD  # a few pixels further: another image, though its grey hash is close
    for seed in range(3):  # photo-like images: the edit moves the hash by 0-2 bits, another photo 28 or more
        bits, colour = distances(photo(seed), edited(photo(seed)))
        assert bits <= 2 and colour <= 0.06
        assert distances(photo(seed), photo(seed + 10))[0] >= 20


def save(folder: Path, name: str, image: Image.Image, caption: str | None = None, **options) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def test_groups_an_edited_copy_and_exact_copies_but_not_another_shape_or_colour(tmp_path):
    original = toyworld.render(PURPLE_CIRCLE)
    save(tmp_path, "a.png", original)
    save(tmp_path, "a-copy.jpg", edited(original))
    save(tmp_path, "a-same.webp", original, lossless=True)  # other bytes, same pixels
    save(tmp_path, "b.png", photo(3))
    save(tmp_path, "b.bmp", photo(3))
    save(tmp_path, "green.png", toyworld.render(Scene(color="green", shape="circle", radius=14, cx=32, cy=30)))
    save(tmp_path, "square.png", toyworld.render(Scene(color="purple", shape="square", radius=14, cx=32, cy=30)))
    found = find_duplicates(sorted(tmp_path.iterdir()), names=lambda p: Path(p).name)
    assert [g.files for g in found.groups] == [["a-copy.jpg", "a-same.webp", "a.png"], ["b.bmp", "b.png"]]
    near, exact = found.groups
    assert not near.exact and near.same_pixels == [["a-same.webp", "a.png"]] and 0 < near.distance <= 4
    assert exact.exact and exact.distance == 0
    assert found.lines()[1] == "group 2, exact (same pixels): b.bmp, b.png"
    strict = find_duplicates(sorted(tmp_path.iterdir()), threshold=0, names=lambda p: Path(p).name)
    assert [g.files for g in strict.groups] == [["a-same.webp", "a.png"], ["b.bmp", "b.png"]]


def test_an_unreadable_image_is_one_line_with_its_reason(tmp_path):
    save(tmp_path, "a.png", photo(1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    found = find_duplicates(sorted(tmp_path.iterdir()), names=lambda p: Path(p).name)
    assert found.groups == [] and [f for f, _ in found.unreadable] == ["broken.png"]
    assert found.lines() == [f"skipped broken.png: {found.unreadable[0][1]}"]
    assert "cannot be read" in found.lines()[0]


def test_hashes_are_cached_per_file_until_it_changes(tmp_path, monkeypatch):
    path = save(tmp_path, "a.png", photo(1))
    opened = []
    real = duplicates.open_rgb
    monkeypatch.setattr(duplicates, "open_rgb", lambda p, *side: opened.append(p) or real(p, *side))
    duplicates._hash_file.cache_clear()
    first = duplicates.hash_file(path)
    assert duplicates.hash_file(path) is first and len(opened) == 1  # the second look decodes nothing
    save(tmp_path, "a.png", photo(2))
    os.utime(path, ns=(1, 1))  # a new mtime even where the clock is coarse
    assert duplicates.hash_file(path).phash != first.phash and len(opened) == 2


# -- tags and the caption preview ------------------------------------------------------------------------------------


def test_tag_table_counts_tags_or_words():
    table = caption_tags.tag_frequency(["sks, purple, circle", "sks, purple hair", "sks", ""])
    assert table.kind == "tags" and table.captions == 3
    assert table.counts == [("sks", 3), ("circle", 1), ("purple", 1), ("purple hair", 1)]
    words = caption_tags.tag_frequency(["A purple circle.", "a circle on a white background"])
    assert words.kind == "words" and words.counts[:2] == [("a", 2), ("circle", 2)]


@pytest.mark.parametrize(
    ("caption", "old", "new", "as_tags", "expected"),
    [
        ("sks, kitty, cat", "kitty", "cat", True, "sks, cat"),  # a tag renamed into one already there: kept once
        ("sks, purple hair, purple", "purple", "violet", True, "sks, purple hair, violet"),  # whole tags only
        ("sks, purple, circle", "purple", "", True, "sks, circle"),  # removed
        ("sks,purple", "circle", "x", True, "sks,purple"),  # untouched: written as it was
        ("A purple circle, purpleish", "purple", "violet", False, "A violet circle, purpleish"),  # whole words
        ("a purple circle", "Purple", "", False, "a circle"),
    ],
)
def test_rename_tag(caption, old, new, as_tags, expected):
    assert caption_tags.rename_tag(caption, old, new, as_tags) == expected


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def png_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def test_tags_of_a_workspace_dataset_renamed_and_removed_through_the_store(home):
    files = [("a.png", png_bytes(photo(1))), ("b.png", png_bytes(photo(2))), ("c.png", png_bytes(photo(3)))]
    files += [("a.txt", b"sks, kitty, white"), ("b.txt", b"sks, cat"), ("c.txt", b"kitty")]
    api.upload_to_dataset("set", files)
    version = api.freeze_dataset("set")
    assert api.dataset_tags("set")["rows"][:2] == [
        {"tag": "kitty", "captions": 2, "share": "67%"},
        {"tag": "sks", "captions": 2, "share": "67%"},
    ]
    assert api.rename_tag("set", "kitty", "cat") == 2
    assert api.rename_tag("set", "kitty", "cat") == 0  # nothing left to rename
    assert api.rename_tag("set", "white") == 1
    assert {i["file"]: i["caption"] for i in api.dataset_images("set")} == {
        "a.png": "sks, cat",
        "b.png": "sks, cat",
        "c.png": "cat",
    }
    assert (Path(version["images_path"]) / "a.txt").read_text() == "sks, kitty, white"  # the frozen version kept it
    with pytest.raises(api.StudioError, match="name the tag"):
        api.rename_tag("set", " ")


def test_caption_preview_is_the_trainers_shuffle_keeping_the_first_tags():
    caption = "sks, purple, circle, white background, flat, centered"
    plain = api.caption_preview(caption)
    assert plain == [caption] * 3
    shuffled = api.caption_preview(caption, shuffle_caption=True, keep_tokens=1, samples=4)
    assert all(s.startswith("sks, ") and sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert len(set(shuffled)) > 1  # the rest moves
    assert api.caption_preview(caption, shuffle_caption=True, keep_tokens=1, samples=4) == shuffled  # seeded
    templated = api.caption_preview("purple", caption_template="{trigger}, {caption}", trigger_word="sks", samples=1)
    assert templated == ["sks, purple"]
    with pytest.raises(api.StudioError, match="keep_tokens: Input should be greater than or equal to 0"):
        api.caption_preview(caption, shuffle_caption=True, keep_tokens=-1)
    with pytest.raises(api.StudioError, match="keep_tokens only applies with shuffle_caption"):
        api.caption_preview(caption, keep_tokens=1)


def test_dropping_all_but_one_of_a_group_goes_through_the_store(home):
    original = toyworld.render(PURPLE_CIRCLE)
    files = [("a.png", png_bytes(original)), ("a-copy.jpg", png_bytes(edited(original), format="JPEG", quality=70))]
    files += [("b.png", png_bytes(photo(1))), ("a.txt", b"sks"), ("a-copy.txt", b"sks, copy")]
    api.upload_to_dataset("set", files)
    version = api.freeze_dataset("set")
    groups = api.dataset_duplicates("set")["groups"]
    assert [g["files"] for g in groups] == [["a-copy.jpg", "a.png"]]
    with pytest.raises(api.StudioError, match="not in the group"):
        api.drop_duplicates("set", "b.png", groups[0]["files"])
    assert api.drop_duplicates("set", "a.png", groups[0]["files"]) == ["a-copy.jpg"]
    assert sorted(i["file"] for i in api.dataset_images("set")) == ["a.png", "b.png"]
    work = Path(api.dataset_info("set")["work_dir"]) / "images"
    assert not (work / "a-copy.txt").exists()  # its caption went with it
    assert (Path(version["images_path"]) / "a-copy.jpg").is_file()  # the frozen version is untouched
    assert api.dataset_duplicates("set")["groups"] == []


# -- the report -----------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_set(tmp_path) -> Path:
    """Seven files: a 512 square with its JPEG copy, a wide and a tall image, one smaller than its bucket (300x400 at
    resolution 512), a long caption, one too small and one broken."""
    folder = tmp_path / "set"
    square = toyworld.render(PURPLE_CIRCLE).resize((512, 512))
    save(folder, "a.png", square, "sks, purple, circle")
    save(folder, "a-copy.jpg", edited(square), "sks, purple circle", quality=70)
    long = "sks, green, square, " + ", ".join(f"detail {i}" for i in range(30))
    save(folder, "wide.png", photo(1).resize((768, 512)), long)
    save(folder, "tall.png", photo(2).resize((512, 768)), "sks, tall")
    save(folder, "small.png", photo(3).resize((300, 400)))  # no caption file
    save(folder, "tiny.png", photo(4).resize((100, 100)), "sks")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    masks = tmp_path / "masks"
    for name, size in (("a.png", (512, 512)), ("wide.png", (768, 512)), ("tall.png", (100, 100))):
        save(masks, name, Image.new("L", size, 255))
    return folder


def test_the_report_numbers_on_a_built_toy_dataset(toy_set):
    from sdtune.studio.dataset_report import build_report

    report = build_report(toy_set, 512, mask_dir=toy_set.parent / "masks")
    assert sorted(report.sizes) == ["a-copy.jpg", "a.png", "small.png", "tall.png", "wide.png"]
    assert report.buckets == {(256, 384): 1, (384, 640): 1, (512, 512): 2, (640, 384): 1}
    [small] = report.smaller
    assert (small.file, small.size, small.bucket, small.trained_at) == (
        "small.png",
        (300, 400),
        (448, 576),
        (256, 384),
    )
    assert dict(report.skipped).keys() == {"broken.png", "tiny.png"}
    assert "shorter side < data.min_image_size 256" in dict(report.skipped)["tiny.png"]
    assert report.over_limit == {"wide.png": report.tokens["wide.png"]} and report.tokens["wide.png"] > 75
    assert report.tokens["a.png"] == 5  # sks , purple , circle: CLIP's BPE, without start and end tokens
    assert report.uncaptioned == ["small.png"]
    assert report.tags.counts[0] == ("sks", 4)
    assert [g.files for g in report.duplicates.groups] == [["a-copy.jpg", "a.png"]]
    assert len(report.masks) == 3  # a-copy and small have none, tall's is 100x100
    assert any(line.startswith("small.png: no mask") for line in report.masks)
    text = report.text()
    for line in (
        "images: 5 usable, 2 skipped",
        "  small.png: 300x400, bucket 448x576, trained at 256x384",
        "  without a caption file: small.png",
        "1 over 75 (cut in training)",
        "duplicates: 1 group of near-duplicates (0 exact)",
        "masks: 2 of 5 images have a usable mask in",
        "skipped broken.png: not an image",
    ):
        assert line in text, line


def test_the_report_picture_has_its_six_panels(toy_set):
    from sdtune.studio.dataset_report import build_report
    from sdtune.studio.report_picture import PANEL_H, PANEL_W, render_report

    image = Image.open(io.BytesIO(render_report(build_report(toy_set, 512))))
    assert image.size[0] == 3 * PANEL_W and image.size[1] > 2 * PANEL_H
    pixels = np.asarray(image.convert("RGB"))
    # every panel drew something beyond its frame and title (bars, dots, thumbnails, text)
    for row in range(2):
        for column in range(3):
            top = image.size[1] - (2 - row) * PANEL_H
            panel = pixels[top + 80 : top + PANEL_H - 20, column * PANEL_W + 20 : (column + 1) * PANEL_W - 20]
            assert (panel.sum(axis=2) < 600).mean() > 0.002, (row, column)


# -- the preflight and the command ----------------------------------------------------------------------------------


def test_the_preflight_names_the_groups_of_near_duplicates(toy_set, tmp_path):
    from sdtune.trainers.core.data import format_preflight, scan_dataset
    from sdtune.trainers.core.recipe import DataConfig

    text = format_preflight(scan_dataset(DataConfig(train_data_dir=str(toy_set), resolution=512)), 512)
    assert "duplicates: 1 group of near-duplicates (`sdtune dataset dupes` shows them):\n  a-copy.jpg, a.png" in text
    (toy_set / "a-copy.jpg").unlink()
    assert "near-duplicates" not in format_preflight(scan_dataset(DataConfig(train_data_dir=str(toy_set))), 512)


def sdtune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdtune.studio.cli", *args], capture_output=True, text=True, env=env)


def test_sdtune_dataset_report_and_dupes(toy_set, tmp_path):
    out = tmp_path / "report.png"
    proc = sdtune("dataset", "report", str(toy_set), "--resolution", "512", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images: 5 usable, 2 skipped" in proc.stdout and f"wrote {out}" in proc.stdout
    assert Image.open(out).format == "PNG"
    proc = sdtune("dataset", "dupes", str(toy_set))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("group 1, near (pHash distance <= ") and lines[0].endswith("): a-copy.jpg, a.png")
    assert lines[1].startswith("skipped broken.png: cannot be read (") and lines[-1] == "1 group of near-duplicates"
    assert "a-copy.jpg" not in sdtune("dataset", "dupes", str(toy_set), "--threshold", "0").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dupes", "missing"), "sdtune dataset: missing: folder not found"),
        (("dupes", ".", "--threshold", "65"), "--threshold 65: a pHash distance is 0 to 64 bits"),
        (("report", "missing"), "data.train_data_dir: folder not found"),
    ],
)
def test_sdtune_dataset_bad_input_is_one_line(tmp_path, args, message, monkeypatch, capsys):
    from sdtune.studio import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(["dataset", *args])
    printed = capsys.readouterr().err  # argparse prints its error and exits 2; sdtune's own errors are the exit text
    shown = printed if isinstance(exited.value.code, int) else printed + exited.value.code
    assert exited.value.code != 0 and message in shown and len(shown.strip().splitlines()) == 1, shown


def test_the_preparation_modules_import_without_torch():
    """The page's tag preview and duplicate panel import these: torch must stay out (the trainers' data package
    loads its modules on first use)."""
    modules = (
        "sdtune.trainers.core.data.captions, sdtune.trainers.core.data.buckets, sdtune.adapters.duplicates, "
        "sdtune.adapters.caption_tags, sdtune.studio.dataset_report, sdtune.studio.report_picture"
    )
    code = f"import {modules}, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_preflight_tells_apart_duplicates_of_the_same_name_in_two_subsets(tmp_path):
    # The same picture under the same name in two subsets' folders was listed as "0000.png, 0000.png".
    from PIL import ImageDraw

    from sdtune.trainers.core.data import format_preflight, scan_dataset
    from sdtune.trainers.core.recipe import DataConfig

    image = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(image).ellipse((60, 60, 190, 190), fill="purple")
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        image.save(tmp_path / folder / "0000.png")
    subsets = [{"image_dir": str(tmp_path / "one")}, {"image_dir": str(tmp_path / "two")}]
    text = format_preflight(scan_dataset(DataConfig(subsets=subsets, resolution=256)), 256)
    assert "shows them):\n  one/0000.png, two/0000.png" in text
