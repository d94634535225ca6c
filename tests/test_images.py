"""The one place image files are read (adapters/images.py): every PIL mode to 8-bit RGB as the trainers and the
Datasets page both see it, caption files (`a.TXT`, a UTF-8 BOM), and the trainer reading captions through it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdtune.adapters.images import caption_file, image_files, is_hidden, kohya_folder, open_rgb, read_caption, to_rgb


def grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4), value, dtype=np.uint16))  # mode I;16, as a 16-bit PNG opens


def paletted(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 40, 40] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1  # palette entry 1 is see-through: white after compositing
    return image


# (mode or a maker, the RGB a pixel of it must become). Transparent pixels land on white; 16-bit grey keeps its
# high byte (PIL's own convert would clip 40000 to 255, white).
MODES = [
    ("1", Image.new("1", (4, 4), 1), (255, 255, 255)),
    ("L", Image.new("L", (4, 4), 90), (90, 90, 90)),
    ("LA-opaque", Image.new("LA", (4, 4), (90, 255)), (90, 90, 90)),
    ("LA-transparent", Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    ("La-transparent", Image.new("La", (4, 4), (0, 0)), (255, 255, 255)),
    ("P", paletted(False), (200, 40, 40)),
    ("P-transparency", paletted(True), (255, 255, 255)),
    ("PA-transparent", Image.new("PA", (4, 4), (0, 0)), (255, 255, 255)),
    ("RGB", Image.new("RGB", (4, 4), (200, 40, 40)), (200, 40, 40)),
    ("RGBA-opaque", Image.new("RGBA", (4, 4), (200, 40, 40, 255)), (200, 40, 40)),
    ("RGBA-transparent", Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ("RGBa-transparent", Image.new("RGBa", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ("RGBX", Image.new("RGBX", (4, 4), (200, 40, 40, 0)), (200, 40, 40)),
    ("CMYK", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ("YCbCr", Image.new("YCbCr", (4, 4), (128, 128, 128)), (128, 128, 128)),
    ("HSV", Image.new("HSV", (4, 4), (0, 0, 77)), (77, 77, 77)),
    ("I;16", grey16(40000), (156, 156, 156)),
    ("I;16-white", grey16(65535), (255, 255, 255)),
    ("I;16B", grey16(40000).convert("I").convert("I;16B"), (156, 156, 156)),
    ("I", Image.new("I", (4, 4), 40000), (156, 156, 156)),
    ("I-negative", Image.new("I", (4, 4), -5), (0, 0, 0)),
    ("F", Image.new("F", (4, 4), 77.6), (77, 77, 77)),
]


@pytest.mark.parametrize("image,expected", [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_becomes_8_bit_rgb(image, expected):
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    assert out.getpixel((1, 1)) == expected


def test_rgb_and_rgba_train_exactly_as_before():
    """Ordinary images give the same bytes as before the shared function: RGB untouched, RGBA composited on white
    with PIL's alpha_composite."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgb = Image.fromarray(pixels[..., :3])
    assert to_rgb(rgb).tobytes() == rgb.tobytes()
    rgba = Image.fromarray(pixels)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    assert to_rgb(rgba).tobytes() == Image.alpha_composite(white, rgba).convert("RGB").tobytes()


@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("PNG", "LA"), ("PNG", "P"), ("JPEG", "CMYK"), ("BMP", "1")])
def test_files_of_every_mode_open_as_rgb_and_as_thumbnails(fmt, mode, tmp_path):
    source = {"I;16": grey16(30000).resize((600, 300))}.get(mode) or Image.new(mode, (600, 300))
    path = tmp_path / f"a.{fmt.lower()}"
    source.save(path, format=fmt)
    assert Image.open(path).mode == mode  # the file really holds that mode
    assert open_rgb(path).mode == "RGB" and open_rgb(path).size == (600, 300)
    small = open_rgb(path, max_side=100)
    assert small.mode == "RGB" and small.size == (100, 50)


def test_caption_files_upper_case_and_bom(tmp_path):
    image = tmp_path / "a.png"
    assert caption_file(image) == tmp_path / "a.txt"  # none yet: where a new one goes
    (tmp_path / "a.TXT").write_bytes("\ufeffsks, a dog".encode())
    assert caption_file(image) == tmp_path / "a.TXT"
    assert read_caption(caption_file(image)) == "sks, a dog"
    (tmp_path / "a.txt").write_text("exact")
    assert caption_file(image) == tmp_path / "a.txt"  # the exact name wins


def test_image_files_skip_hidden_files_and_folders(tmp_path):
    for name in ("a.png", "b.JPG", ".hidden.png", ".thumbs/c.png", "10_dog/d.webp", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == ["a.png", "b.JPG", "10_dog/d.webp"]
    assert is_hidden(".thumbs/c.png") and is_hidden(".hidden.png") and not is_hidden("10_dog/d.webp")
    assert kohya_folder("10_purple circle") == (10, "purple circle") and kohya_folder("dog") is None


def test_the_trainer_reads_upper_case_and_bom_captions(tmp_path):
    """The BOM would glue itself to the first tag ("\\ufeffsks"), and an `a.TXT` was not read at all."""
    from sdtune.trainers.core.data import scan_dataset
    from sdtune.trainers.core.recipe import DataConfig

    for stem, caption_name in (("a", "a.txt"), ("b", "b.TXT")):
        Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / f"{stem}.png")
        (tmp_path / caption_name).write_bytes("\ufeffsks, a dog\n".encode())
    scan = scan_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=64))
    assert [r.caption for r in scan.records] == ["sks, a dog", "sks, a dog"]
    assert scan.records[0].caption.split(",")[0] == "sks"


def test_a_16_bit_png_trains_on_its_high_byte(tmp_path):
    from sdtune.trainers.core.data import load_pixels, scan_dataset
    from sdtune.trainers.core.recipe import DataConfig

    out = io.BytesIO()
    grey16(40000).resize((64, 64)).save(out, format="PNG")
    (tmp_path / "a.png").write_bytes(out.getvalue())
    cfg = DataConfig(train_data_dir=str(tmp_path), resolution=64)
    [record] = scan_dataset(cfg).records
    pixels = load_pixels(record, cfg)
    assert float(pixels.min()) == float(pixels.max()) == pytest.approx(156 / 127.5 - 1.0)
