"""Tests of the training-data pipeline: layouts, bad files, captions, buckets, sampler, pixels, fingerprint.

Every test writes real files into tmp_path (PIL-generated images, caption files, saved HF datasets); nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from sdtune.trainers.core.data import (
    BucketBatchSampler,
    CaptionBuilder,
    DataError,
    ImageRecord,
    assign_bucket,
    bucket_for,
    cover_crop,
    format_preflight,
    load_pixels,
    make_buckets,
    scan_dataset,
)
from sdtune.trainers.core.recipe import DataConfig

# -- helpers --------------------------------------------------------------------------------------------------------


def cfg_for(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


def write_image(path, size=(320, 320), color=(200, 40, 40), mode="RGB", fmt=None, **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "RGBA" else color + (255,)).save(path, format=fmt, **save_kwargs)
    return path


def noise_image(path, size=(320, 320), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def save_hf_dataset(path, captions, column_names=("image", "text"), as_dict=False):
    import datasets

    images = [Image.new("RGB", (320, 256 + 16 * i), (10 * i, 100, 200)) for i in range(len(captions))]
    dataset = datasets.Dataset.from_dict({column_names[0]: images, column_names[1]: list(captions)})
    dataset = dataset.cast_column(column_names[0], datasets.Image())
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(path))
    return path


def key_of(record: ImageRecord) -> str:
    return record.path.rsplit("/", 1)[-1] if record.path else f"[{record.index}]"


# -- layouts --------------------------------------------------------------------------------------------------------


def layout_plain(root):
    write_image(root / "a.png")
    write_text(root / "a.txt", "a red circle\n")
    write_image(root / "b.jpg", fmt="JPEG")  # no caption file -> ""
    write_image(root / "sub" / "c.webp", fmt="WEBP")
    write_text(root / "sub" / "c.txt", "in a subfolder")
    write_text(root / "notes.txt", "not a caption of anything")  # not candidates, not "skipped":
    (root / "cache.npz").write_bytes(b"\0" * 10)
    write_image(root / ".hidden.png")
    return (
        cfg_for(train_data_dir=str(root)),
        "folder",
        {"a.png": ("a red circle", 1), "b.jpg": ("", 1), "c.webp": ("in a subfolder", 1)},
    )


def layout_kohya(root):
    write_image(root / "3_sks dog" / "x.png")  # caption from the folder name
    write_image(root / "3_sks dog" / "y.png")
    write_text(root / "3_sks dog" / "y.txt", "sks dog, sitting")  # .txt wins
    write_image(root / "1_dog" / "z.bmp", fmt="BMP")
    write_image(root / "loose.png")  # top level: plain rules and data.repeats
    write_text(root / "loose.txt", "loose image")
    expected = {
        "x.png": ("sks dog", 3),
        "y.png": ("sks dog, sitting", 3),
        "z.bmp": ("dog", 1),
        "loose.png": ("loose image", 2),
    }
    return cfg_for(train_data_dir=str(root), repeats=2), "kohya", expected


def layout_imagefolder(root):
    write_image(root / "one.png")
    write_image(root / "imgs" / "two.jpg", fmt="JPEG")
    rows = [{"file_name": "one.png", "text": "first"}, {"file_name": "imgs/two.jpg", "text": "second"}]
    write_text(root / "metadata.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    write_text(root / "one.txt", "ignored: imagefolder captions come from the metadata")
    return cfg_for(train_data_dir=str(root)), "imagefolder", {"one.png": ("first", 1), "two.jpg": ("second", 1)}


def layout_hf_saved(root):
    save_hf_dataset(root / "saved", ["a cat", "a dog", None])
    return (
        cfg_for(dataset_name=str(root / "saved")),
        "hf_saved",
        {"[0]": ("a cat", 1), "[1]": ("a dog", 1), "[2]": ("", 1)},
    )


def layout_hf_saved_dict(root):
    save_hf_dataset(root / "saved", ["a cat"], as_dict=True)
    return cfg_for(dataset_name=str(root / "saved")), "hf_saved", {"[0]": ("a cat", 1)}


@pytest.mark.parametrize(
    "layout", [layout_plain, layout_kohya, layout_imagefolder, layout_hf_saved, layout_hf_saved_dict]
)
def test_layouts_find_images_captions_and_repeats(tmp_path, layout):
    cfg, kind, expected = layout(tmp_path / "data")
    scan = scan_dataset(cfg)
    assert scan.kind == kind
    assert {key_of(r): (r.caption, r.repeats) for r in scan.records} == expected
    assert scan.skipped == []
    for record in scan.records:
        assert (record.path is None) == (record.index is not None)
        if record.path:  # the cache key is the hash of the file's bytes
            assert record.content_hash == hashlib.sha256(open(record.path, "rb").read()).hexdigest()


def test_kohya_sources_tag_frequency_and_dataset_dirs(tmp_path):
    cfg, _, _ = layout_kohya(tmp_path / "data")
    scan = scan_dataset(cfg)
    assert {key_of(r): r.source.rsplit("/", 1)[-1] for r in scan.records} == {
        "x.png": "3_sks dog",
        "y.png": "3_sks dog",
        "z.bmp": "1_dog",
        "loose.png": "data",
    }
    assert scan.tag_frequency() == {
        "1_dog": {"dog": 1},
        "3_sks dog": {"sks dog": 2, "sitting": 1},
        "data": {"loose image": 1},
    }
    assert scan.dataset_dirs() == {
        "1_dog": {"n_repeats": 1, "img_count": 1},
        "3_sks dog": {"n_repeats": 3, "img_count": 2},
        "data": {"n_repeats": 2, "img_count": 1},
    }
    assert scan.bucket_counts() == {(320, 320): 3 + 3 + 1 + 2}


def test_imagefolder_reports_unlisted_missing_and_escaping_files(tmp_path):
    root = tmp_path / "data"
    write_image(root / "listed.png")
    write_image(root / "extra.png")
    write_image(tmp_path / "outside.png")
    rows = [
        {"file_name": "listed.png", "text": "x"},
        {"file_name": "gone.png", "text": "y"},
        {"file_name": "../outside.png", "text": "z"},
    ]
    write_text(root / "metadata.jsonl", "\n".join(json.dumps(row) for row in rows))
    scan = scan_dataset(cfg_for(train_data_dir=str(root)))
    assert [(key_of(r), r.caption) for r in scan.records] == [("listed.png", "x")]
    reasons = {s.file.rsplit("/", 1)[-1]: s.reason for s in scan.skipped}
    assert reasons == {
        "gone.png": "listed in metadata.jsonl but not found",
        "outside.png": "file_name in metadata.jsonl must be a relative path inside its folder",
        "extra.png": "not listed in the metadata file (imagefolder trains listed files only)",
    }


def test_imagefolder_reads_metadata_csv_with_another_caption_column(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    write_text(root / "metadata.csv", 'file_name,prompt\na.png,"a red, round thing"\n')
    scan = scan_dataset(cfg_for(train_data_dir=str(root), caption_column="prompt"))
    assert [(key_of(r), r.caption) for r in scan.records] == [("a.png", "a red, round thing")]


def test_hub_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables at import time: set their module constants too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # the id must not exist as a local path
    with pytest.raises(DataError) as info:
        scan_dataset(cfg_for(dataset_name="someone/not-cached-dataset"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.dataset_name: hub dataset 'someone/not-cached-dataset' is not available offline")
    assert "data.train_data_dir" in message and "save_to_disk" in message


# -- bad files ------------------------------------------------------------------------------------------------------


def bad_zero_byte(root):
    (root / "bad.png").write_bytes(b"")
    return "empty file (0 bytes)"


def bad_text_named_png(root):
    (root / "bad.png").write_text("this is not a picture")
    return "not an image (PIL cannot identify it)"


def bad_truncated_png(root):
    data = noise_image(root / "full.png", seed=1).read_bytes()
    (root / "full.png").unlink()
    (root / "bad.png").write_bytes(data[: len(data) // 2])
    return "corrupt or truncated image"


def bad_truncated_jpeg(root):
    data = noise_image(root / "full.jpg", seed=2, fmt="JPEG").read_bytes()
    (root / "full.jpg").unlink()
    (root / "bad.jpg").write_bytes(data[: len(data) // 2])
    return "corrupt or truncated image"


def bad_too_small(root):
    write_image(root / "bad.png", size=(600, 200))  # shorter side 200 < 512 // 2
    return "too small: 600x200, shorter side < data.min_image_size 256"


def bad_caption_not_utf8(root):
    write_image(root / "bad.png")
    (root / "bad.txt").write_bytes(b"caf\xe9 \xff")
    return "caption file bad.txt is not UTF-8 text"


@pytest.mark.parametrize(
    "make_bad",
    [bad_zero_byte, bad_text_named_png, bad_truncated_png, bad_truncated_jpeg, bad_too_small, bad_caption_not_utf8],
)
def test_bad_file_is_skipped_with_its_reason(tmp_path, make_bad):
    root = tmp_path / "data"
    write_image(root / "good.png")
    expected = make_bad(root)
    scan = scan_dataset(cfg_for(train_data_dir=str(root)))
    assert [key_of(r) for r in scan.records] == ["good.png"]
    assert len(scan.skipped) == 1
    assert scan.skipped[0].file.rsplit("/", 1)[-1].startswith("bad.")
    assert scan.skipped[0].reason.startswith(expected)
    assert scan.skipped[0].file in format_preflight(scan, 512)


def error_all_bad(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    bad_zero_byte(root)
    bad_truncated_jpeg(root)
    return cfg_for(
        train_data_dir=str(root)
    ), rf"^data.train_data_dir: no usable images in {root} \(2 skipped: bad\.\w+: "


def error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return cfg_for(
        train_data_dir=str(tmp_path / "empty")
    ), r"no usable images in .*empty \(0 skipped: no files ending in"


def error_missing_folder(tmp_path):
    return cfg_for(train_data_dir=str(tmp_path / "nope")), rf"^data.train_data_dir: folder not found: {tmp_path}/nope$"


def error_data_dir_is_a_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    return cfg_for(
        train_data_dir=str(tmp_path / "a.png")
    ), rf"^data.train_data_dir: a file, not a folder: {tmp_path}/a.png$"


def error_both_sources(tmp_path):
    return cfg_for(train_data_dir=str(tmp_path), dataset_name="x/y"), r"^data: set exactly one of .* got both$"


def error_no_source(tmp_path):
    return cfg_for(), r"^data: set exactly one of data.train_data_dir .* got neither$"


def error_missing_caption_column(tmp_path):
    save_hf_dataset(tmp_path / "saved", ["a"])
    cfg = cfg_for(dataset_name=str(tmp_path / "saved"), caption_column="caption")
    return cfg, r"^data.caption_column: column 'caption' is not in dataset .*saved \(columns: image, text\)$"


def error_missing_image_column(tmp_path):
    save_hf_dataset(tmp_path / "saved", ["a"], column_names=("picture", "text"))
    cfg = cfg_for(dataset_name=str(tmp_path / "saved"))
    return cfg, r"^data.image_column: column 'image' is not in dataset .* \(columns: picture, text\)$"


def error_not_a_saved_dataset(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    return cfg_for(
        dataset_name=str(tmp_path / "imgs")
    ), r"not a folder written by Dataset.save_to_disk .*train_data_dir"


def error_metadata_without_caption_key(tmp_path):
    write_image(tmp_path / "d" / "a.png")
    write_text(tmp_path / "d" / "metadata.jsonl", '{"file_name": "a.png", "prompt": "x"}\n')
    return cfg_for(
        train_data_dir=str(tmp_path / "d")
    ), r"^data.caption_column: 'text' is not a key of .* \(keys: file_name, prompt\)$"


def error_bad_template(tmp_path):
    write_image(tmp_path / "d" / "a.png")
    cfg = cfg_for(train_data_dir=str(tmp_path / "d"), caption_template="{trigger} {subject}")
    return cfg, r"^data.caption_template: .* use the placeholders \{caption\} and \{trigger\}$"


@pytest.mark.parametrize(
    "case",
    [
        error_all_bad,
        error_empty_folder,
        error_missing_folder,
        error_data_dir_is_a_file,
        error_both_sources,
        error_no_source,
        error_missing_caption_column,
        error_missing_image_column,
        error_not_a_saved_dataset,
        error_metadata_without_caption_key,
        error_bad_template,
    ],
)
def test_unusable_data_is_a_one_line_error(tmp_path, case):
    cfg, pattern = case(tmp_path)
    with pytest.raises(DataError) as info:
        scan_dataset(cfg)
    assert "\n" not in str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_preflight_lists_counts_buckets_and_caps_skipped(tmp_path):
    root = tmp_path / "data"
    write_image(root / "2_toy" / "wide.png", size=(1024, 512))
    write_image(root / "2_toy" / "square.png", size=(512, 512))
    for i in range(25):
        (root / f"empty{i:02d}.png").write_bytes(b"")
    scan = scan_dataset(cfg_for(train_data_dir=str(root)))
    text = format_preflight(scan, 512)
    assert text.splitlines()[0] == "data: 2 images (4 per epoch with repeats), layout kohya"
    assert "  2_toy: 2 images x 2 repeats" in text
    assert "  512x512 (aspect 1.00): 2" in text and "  704x320 (aspect 2.20): 2" in text
    assert "skipped 25 files:" in text and "  ... and 5 more" in text
    assert sum("empty file (0 bytes)" in line for line in text.splitlines()) == 20


# -- captions -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, trigger, raw, expected",
    [
        ("{caption}", None, "a red circle", "a red circle"),
        ("{trigger}, {caption}", "sks", "a dog", "sks, a dog"),
        ("{trigger}, {caption}", "sks", "", "sks"),  # no dangling ", "
        ("{trigger}, {caption}", None, "a dog", "a dog"),  # no leading ", "
        ("a photo of {trigger} {caption}", "sks", "", "a photo of sks"),
        ("{caption}, {trigger}", "sks", "a , , b", "a, b, sks"),
        ("{caption}", None, "  two   spaces\tand tab ", "two spaces and tab"),
        ("{caption} {{literal}}", None, "x", "x {literal}"),
    ],
)
def test_caption_template_and_tidy(template, trigger, raw, expected):
    builder = CaptionBuilder(cfg_for(caption_template=template, trigger_word=trigger))
    assert builder(raw, random.Random(0)) == expected


def test_shuffle_keeps_first_tags_and_is_reproducible():
    cfg = cfg_for(caption_template="{trigger}, {caption}", trigger_word="sks", shuffle_caption=True, keep_tokens=2)
    builder = CaptionBuilder(cfg)
    raw = "dog, on grass, sunny, red collar, sitting, close-up"
    outputs = [builder(raw, random.Random(seed)) for seed in range(30)]
    for text in outputs:
        tags = text.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags[2:]) == sorted(["on grass", "sunny", "red collar", "sitting", "close-up"])
    assert len(set(outputs)) > 10  # it does shuffle
    assert [builder(raw, random.Random(seed)) for seed in range(30)] == outputs  # same rng seed -> same text


def test_caption_dropout_rate_is_measured():
    builder = CaptionBuilder(cfg_for(caption_dropout_rate=0.3))
    rng = random.Random(1234)
    draws = [builder("a red circle", rng) for _ in range(4000)]
    assert set(draws) == {"", "a red circle"}
    assert abs(draws.count("") / len(draws) - 0.3) < 0.03  # 4 sigma of a binomial(4000, 0.3) share


@pytest.mark.parametrize(
    "kwargs, deterministic, fixed",
    [
        ({}, True, {"sks a", "sks b"}),
        ({"caption_dropout_rate": 0.1}, False, {"sks a", "sks b", ""}),
        ({"shuffle_caption": True}, False, None),
    ],
)
def test_caption_cacheability(kwargs, deterministic, fixed):
    builder = CaptionBuilder(cfg_for(caption_template="{trigger} {caption}", trigger_word="sks", **kwargs))
    assert builder.is_deterministic is deterministic
    if fixed is None:
        with pytest.raises(ValueError):
            builder.fixed_captions(["a", "b"])
    else:
        assert builder.fixed_captions(["a", "b", "a"]) == fixed
        rng = random.Random(0)
        assert {builder(raw, rng) for raw in ["a", "b"] * 100} <= fixed


# -- buckets --------------------------------------------------------------------------------------------------------


def test_make_buckets_follow_the_kohya_rules():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (704, 320) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    ratios = [w / h for w, h in buckets]
    assert len(set(ratios)) == len(ratios)  # one bucket per aspect ratio
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= w <= 1024 and 256 <= h <= 1024 and w * h <= 512 * 512
        assert (h, w) in buckets  # symmetric
    assert make_buckets(64, 256, 1024, 64) == [(64, 64)]  # a toy resolution: only the square fits the area


def test_wide_image_gets_a_wide_bucket_and_only_the_rounding_is_cropped():
    buckets = make_buckets(512, 256, 1024, 64)
    bucket = assign_bucket(1024, 512, buckets, 64)
    bw, bh = bucket
    assert bw * bh <= 512 * 512 and 1.8 <= bw / bh <= 2.3
    nearest = min(abs(math.log(w / h / 2)) for w, h in buckets)
    assert abs(math.log(bw / bh / 2)) == nearest
    (rw, rh), (left, top) = cover_crop(1024, 512, bucket)
    assert rw / rh == pytest.approx(2.0, abs=0.01)  # resized keeping the aspect ratio
    assert (rw, rh) == (704, 352) and (left, top) == (0, 16)  # only the ratio mismatch is cropped, centered
    kept = (bw * bh) / (rw * rh)
    assert kept == pytest.approx(min(bw / bh, 2.0) / max(bw / bh, 2.0), abs=0.01)


@pytest.mark.parametrize(
    "size, min_image_size, enable_bucket, expected",
    [
        ((100, 100), 50, True, (64, 64)),  # never upscaled: 100 -> rounded down to the step
        ((300, 200), 100, True, (256, 192)),
        ((1024, 512), None, False, (512, 512)),  # enable_bucket false: the square
        ((300, 200), 100, False, (192, 192)),  # ... the largest square that fits a small image
        ((2000, 1000), None, True, (704, 320)),
    ],
)
def test_bucket_for_never_upscales(tmp_path, size, min_image_size, enable_bucket, expected):
    cfg = cfg_for(train_data_dir=str(tmp_path), min_image_size=min_image_size, enable_bucket=enable_bucket)
    assert bucket_for(*size, cfg) == expected
    write_image(tmp_path / "img.png", size=size)
    (record,) = scan_dataset(cfg).records
    assert record.bucket == expected
    assert tuple(load_pixels(record, cfg).shape) == (3, expected[1], expected[0])


def test_no_bucket_ever_needs_upscaling():
    buckets = make_buckets(512, 256, 1024, 64)
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(64, 2500), rng.randint(64, 2500)
        bw, bh = assign_bucket(w, h, buckets, 64)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert max(bw / w, bh / h) <= 1.0, (w, h, bw, bh)


# -- sampler --------------------------------------------------------------------------------------------------------


def fake_records(specs):
    return [
        ImageRecord(None, i, "", repeats, 64, 64, bucket, f"h{i}", "s") for i, (bucket, repeats) in enumerate(specs)
    ]


def test_sampler_epoch_covers_everything_once_in_single_bucket_batches():
    records = fake_records([((64, 64), 1)] * 5 + [((128, 64), 3)] * 2 + [((64, 128), 1)])
    sampler = BucketBatchSampler(records, batch_size=2, seed=7)
    expanded = sampler.expanded()
    assert len(expanded) == 5 + 6 + 1 and expanded.count(5) == 3
    orders = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 3 + 1  # the 1-image bucket and the odd 5th image still train
        assert sorted(p for batch in batches for p in batch) == list(range(len(expanded)))
        for batch in batches:
            assert len({records[expanded[p]].bucket for p in batch}) == 1
        orders[epoch] = batches
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]
    assert list(BucketBatchSampler(records, batch_size=2, seed=7)) == orders[0]  # a pure function of (seed, epoch)
    assert orders[1] != orders[0]
    assert list(BucketBatchSampler(records, batch_size=2, seed=8)) != orders[0]


def test_sampler_drop_last_keeps_only_full_batches():
    records = fake_records([((64, 64), 1)] * 5 + [((64, 128), 1)])
    sampler = BucketBatchSampler(records, batch_size=2, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and all(len(b) == 2 for b in batches)


# -- pixels ---------------------------------------------------------------------------------------------------------


def test_load_pixels_composites_transparency_on_white(tmp_path):
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black
    image.paste((255, 0, 0, 255), (0, 0, 32, 64))  # left half: opaque red
    image.save(tmp_path / "rgba.png")
    cfg = cfg_for(train_data_dir=str(tmp_path), resolution=64)
    (record,) = scan_dataset(cfg).records
    pixels = load_pixels(record, cfg)
    assert tuple(pixels.shape) == (3, 64, 64) and pixels.dtype.is_floating_point
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, :32].flatten(1).mean(1).tolist() == pytest.approx([1.0, -1.0, -1.0])  # red
    assert pixels[:, :, 32:].flatten(1).mean(1).tolist() == pytest.approx([1.0, 1.0, 1.0])  # white, not black


def test_load_pixels_applies_exif_rotation_and_center_crop(tmp_path):
    # stored 128 wide x 64 high, left half black; EXIF orientation 6 = shown rotated 90 degrees clockwise
    image = Image.new("RGB", (128, 64), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.png", exif=exif)
    cfg = cfg_for(train_data_dir=str(tmp_path), resolution=64, min_image_size=32)
    (record,) = scan_dataset(cfg).records
    assert (record.width, record.height) == (64, 128)  # the size as displayed
    assert record.bucket == (64, 64) and record.crop == (0, 32)  # the square's center crop
    pixels = load_pixels(record, cfg)
    assert tuple(pixels.shape) == (3, 64, 64)
    # displayed: black on top (the stored left half), white below; the center crop shows both halves
    assert pixels[:, :30].mean().item() == pytest.approx(-1.0, abs=0.02)
    assert pixels[:, 34:].mean().item() == pytest.approx(1.0, abs=0.02)


def test_load_pixels_of_hf_rows_needs_the_dataset(tmp_path):
    save_hf_dataset(tmp_path / "saved", ["a", "b"])
    cfg = cfg_for(dataset_name=str(tmp_path / "saved"), resolution=256)
    scan = scan_dataset(cfg)
    record = scan.records[1]
    assert (record.width, record.height, record.bucket) == (320, 272, (256, 256))
    pixels = load_pixels(record, cfg, scan.dataset)
    assert tuple(pixels.shape) == (3, 256, 256)
    assert pixels[:, 0, 0].tolist() == pytest.approx([10 / 127.5 - 1, 100 / 127.5 - 1, 200 / 127.5 - 1], abs=1e-3)
    with pytest.raises(ValueError, match="pass dataset=scan.dataset"):
        load_pixels(record, cfg)


# -- fingerprint ----------------------------------------------------------------------------------------------------


def test_fingerprint_follows_content_and_captions_not_paths(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png", color=(1, 2, 3))
    write_text(root / "a.txt", "first")
    write_image(root / "b.png", color=(4, 5, 6))
    cfg = cfg_for(train_data_dir=str(root))
    base = scan_dataset(cfg).fingerprint()
    assert scan_dataset(cfg).fingerprint() == base  # stable

    (root / "a.png").rename(root / "renamed.png")
    (root / "a.txt").rename(root / "renamed.txt")
    assert scan_dataset(cfg).fingerprint() == base  # renaming keeps it: same bytes, same captions

    write_text(root / "renamed.txt", "second")
    changed_caption = scan_dataset(cfg).fingerprint()
    assert changed_caption != base

    write_image(root / "b.png", color=(4, 5, 7))
    assert scan_dataset(cfg).fingerprint() not in (base, changed_caption)
