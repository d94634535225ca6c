"""The studio's dataset workspace (studio/datasets_store.py): uploads are checked before anything is written, bad
ones are refused with their reason, captions are edited atomically, and frozen versions never change.

No model here: PIL and zip files only.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.studio import api, datasets_store
from sdtune.studio.datasets_store import DatasetError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def png(color=(128, 0, 128), size=(64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A 60-byte PNG claiming width x height: valid signature, IHDR and CRCs, an IDAT of a few zero bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def declared_size_zip(actual: bytes, declared: int) -> bytes:
    """A zip whose one member holds `actual` (deflated) but whose headers declare `declared` bytes: a bomb's
    headers without writing the bomb."""
    data = bytearray(make_zip({"bomb.png": actual}))
    real = len(actual).to_bytes(4, "little")
    fake = declared.to_bytes(4, "little")
    # local header: uncompressed size at offset 22; central directory entry (PK\1\2): at offset 24
    assert data[22:26] == real
    data[22:26] = fake
    central = data.index(b"PK\x01\x02")
    assert data[central + 24 : central + 28] == real
    data[central + 24 : central + 28] = fake
    return bytes(data)


def truncated_jpeg() -> bytes:
    """A JPEG cut short: its header and most of its scan are there, so only a full decode finds it broken."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()[: len(out.getvalue()) * 6 // 10]


def png16() -> bytes:
    """A 16-bit grey PNG (PIL mode I;16), as saved from a uint16 array."""
    out = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def written_files(home: Path) -> list[Path]:
    root = home / "datasets"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


BAD_UPLOADS = [
    ("zip-slip", [("evil.zip", make_zip({"../../escape.png": png(), "ok.png": png()}))], "zip-slip"),
    ("absolute-path", [("evil.zip", make_zip({"/etc/escape.png": png()}))], "zip-slip"),
    ("empty-file", [("empty.png", b"")], "empty.png: empty file (0 bytes)"),
    ("text-as-png", [("notes.png", b"just some text, not pixels\n" * 10)], "notes.png: not an image"),
    ("huge-header", [("huge.png", png_header(20000, 20000))], "header claims 400,000,000 pixels"),
    ("big-header", [("big.png", png_header(9000, 100))], "header claims 9000x100 pixels"),
    # 2 MB of zeros deflate to ~2 KB: a ratio of ~1000, declared as 1 GB in the headers
    ("zip-bomb-1GB", [("bomb.zip", declared_size_zip(bytes(2 * 1024**2), 1024**3))], "zip bomb"),
    ("zip-bomb-ratio", [("bomb.zip", make_zip({"zeros.png": bytes(8 * 1024**2)}))], "zip bomb"),
    ("not-a-zip", [("broken.zip", b"PK\x03\x04 truncated")], "broken.zip: not a valid zip"),
    ("truncated-jpeg", [("cut.jpg", truncated_jpeg())], "cut.jpg: corrupt or truncated image"),
]


@pytest.mark.parametrize("files,message", [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_refused_with_their_reason_and_nothing_is_written(home, files, message):
    with pytest.raises(DatasetError) as refused:
        datasets_store.add_files("purple", files)
    assert message in str(refused.value) and "nothing written" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert written_files(home) == []


def test_a_member_inflating_past_its_declared_size_is_caught_while_reading(home):
    """Headers that under-declare: the ratio check sees nothing wrong, the read stops at the declared size."""
    data = bytearray(make_zip({"a.png": png()}))
    real = len(png()).to_bytes(4, "little")
    small = (len(png()) // 2).to_bytes(4, "little")
    central = data.index(b"PK\x01\x02")
    data[22:26], data[central + 24 : central + 28] = small, small
    assert data[central + 24 : central + 28] != real
    with pytest.raises(DatasetError, match="member 'a.png' is corrupt or not what its header declares"):
        datasets_store.add_files("purple", [("liar.zip", bytes(data))])
    assert written_files(home) == []


def test_a_mixed_upload_writes_the_good_files_and_lists_each_rejection(home):
    upload = [
        ("set.zip", make_zip({"shapes/a.png": png(), "shapes/a.txt": b"a purple circle", "readme.md": b"# hi"})),
        ("b.png", png((0, 0, 255))),
        ("c.png", b""),
        ("orphan.txt", b"no image of this name"),
    ]
    report = datasets_store.add_files("purple", upload)
    assert sorted(report.written) == ["b.png", "shapes/a.png"] and report.captions == ["shapes/a.txt"]
    reasons = {r.file: r.reason for r in report.rejected}
    assert reasons == {
        "readme.md": "not an image: use .png .jpg .jpeg .webp .bmp (captions: same-name .txt)",
        "c.png": "empty file (0 bytes)",
        "orphan.txt": "caption without an image of the same name",
    }
    folder = home / "datasets" / "purple" / "work" / "images"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == [
        "b.png",
        "shapes/a.png",
        "shapes/a.txt",
    ]
    assert not list(home.rglob("*tmp*"))


def test_an_upload_over_existing_files_says_which_it_replaced(home):
    datasets_store.add_files("set", [("a.png", png()), ("a.txt", b"my hand-edited caption"), ("b.png", png())])
    report = datasets_store.add_files("set", [("a.png", png()), ("a.txt", b"a circle"), ("b.png", png((0, 0, 255)))])
    assert sorted(report.written) == ["a.png", "b.png"] and report.replaced == ["b.png", "a.txt"]  # a.png: same bytes
    assert (home / "datasets" / "set" / "work" / "images" / "a.txt").read_text() == "a circle"


def test_caption_tools_edit_every_caption(home):
    datasets_store.add_files("set", [("one.png", png()), ("one.txt", b"a circle"), ("two.png", png())])
    assert api.bulk_captions("set", template="a photo of {name}, {caption}") == 2
    captions = {i["file"]: i["caption"] for i in api.dataset_images("set")}
    assert captions == {"one.png": "a photo of one, a circle", "two.png": "a photo of two,"}
    assert api.bulk_captions("set", find="a photo of", replace="a drawing of") == 2
    assert api.bulk_captions("set", trigger="sks") == 2
    assert api.bulk_captions("set", trigger="sks") == 0  # already there: not added twice
    api.set_caption("set", "two.png", "  sks, a square  ")
    captions = {i["file"]: i["caption"] for i in api.dataset_images("set")}
    assert captions == {"one.png": "sks, a drawing of one, a circle", "two.png": "sks, a square"}
    with pytest.raises(api.StudioError, match=r"template 'a \{colour\}': use the placeholders"):
        api.bulk_captions("set", template="a {colour}")
    with pytest.raises(api.StudioError, match="dataset name '../x'"):
        api.create_dataset("../x")


def test_versions_are_frozen_and_fingerprinted(home):
    datasets_store.add_files("set", [("one.png", png()), ("one.txt", b"a purple circle")])
    first = api.freeze_dataset("set")
    assert first["version"] == "v1" and first["images"] == 1
    assert api.freeze_dataset("set") == first  # nothing changed: the same version
    api.set_caption("set", "one.png", "a violet circle")
    second = api.freeze_dataset("set")
    assert second["version"] == "v2" and second["fingerprint"] != first["fingerprint"]
    # the edit went to the work copy only: v1 still holds what a job trained on
    assert (Path(first["images_path"]) / "one.txt").read_text() == "a purple circle"
    assert datasets_store.fingerprint(Path(first["path"])) == first["fingerprint"]
    assert [v["version"] for v in api.dataset_info("set")["versions"]] == ["v1", "v2"]


# -- folders, name clashes, captions, hidden files -------------------------------------------------------------------


def work_images(home: Path, name: str) -> Path:
    return home / "datasets" / name / "work" / "images"


def relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


KOHYA_ZIP = {
    "shapes/10_purple circle/001.png": png(),
    "shapes/10_purple circle/001.txt": b"a purple circle",
    "shapes/5_purple square/001.png": png((0, 0, 255)),
    "shapes/5_purple square/001.txt": b"a purple square",
    "shapes/5_purple square/002.png": png16(),
    "shapes/5_purple square/003.jpg": truncated_jpeg(),
}


def test_a_kohya_zip_keeps_its_subsets_and_repeats_as_the_trainer_reads_them(home):
    """The two `001.png` no longer overwrite each other: the folders stay (the one wrapping the zip goes), the
    count reported is the count written, and a frozen version trains with 10 and 5 repeats."""
    from sdtune.trainers.core.data import scan_dataset
    from sdtune.trainers.core.recipe import DataConfig

    report = datasets_store.add_files("shapes", [("shapes.zip", make_zip(KOHYA_ZIP))])
    assert report.written == ["10_purple circle/001.png", "5_purple square/001.png", "5_purple square/002.png"]
    assert report.captions == ["10_purple circle/001.txt", "5_purple square/001.txt"]
    assert [(r.file, r.reason.split(" (")[0]) for r in report.rejected] == [
        ("5_purple square/003.jpg", "corrupt or truncated image")
    ]
    assert relative_files(work_images(home, "shapes")) == sorted(report.written + report.captions)
    info = api.dataset_info("shapes")
    assert info["images"] == len(report.written) == 3
    assert [(f["folder"], f["repeats"], f["concept"], f["images"]) for f in info["folders"]] == [
        ("10_purple circle", 10, "purple circle", 1),
        ("5_purple square", 5, "purple square", 2),
    ]
    version = api.freeze_dataset("shapes")
    scan = scan_dataset(DataConfig(train_data_dir=version["images_path"], resolution=64))
    assert version["images"] == len(scan.records) == 3 and scan.kind == "kohya"
    trained = {
        Path(r.path).relative_to(version["images_path"]).as_posix(): (r.repeats, r.caption) for r in scan.records
    }
    assert trained == {
        "10_purple circle/001.png": (10, "a purple circle"),
        "5_purple square/001.png": (5, "a purple square"),
        "5_purple square/002.png": (5, "purple square"),  # no caption file: the folder's concept
    }


def test_a_zip_of_one_kohya_folder_keeps_it_and_a_zero_repeat_folder_is_refused(home):
    report = datasets_store.add_files(
        "set", [("set.zip", make_zip({"3_sks dog/a.png": png(), "0_unused/b.png": png(), "notes/c.png": png()}))]
    )
    assert sorted(report.written) == ["3_sks dog/a.png", "notes/c.png"]
    assert [(r.file, r.reason) for r in report.rejected] == [
        ("0_unused/b.png", "kohya folder '0_unused' asks for 0 repeats: the trainers skip its images")
    ]
    folders = {f["folder"]: f["repeats"] for f in api.dataset_info("set")["folders"]}
    assert folders == {"3_sks dog": 3, "notes": None}  # a plain folder takes data.repeats from the recipe


def test_name_clashes_are_refused_and_named_and_the_count_is_what_was_written(home):
    """Two files at one path in one upload, and `a.jpg` beside `a.png` (they would share `a.txt`), in the same
    upload or a later one. The same name in another folder is no clash."""
    first = datasets_store.add_files(
        "set",
        [
            ("set.zip", make_zip({"a.png": png(), "a.txt": b"a circle", "a.jpg": png(), "sub/a.jpg": png()})),
            ("a.png", png((0, 0, 255))),
        ],
    )
    assert first.written == ["a.png", "sub/a.jpg"] and first.captions == ["a.txt"]
    assert {r.file: r.reason for r in first.rejected} == {
        "a.jpg": "a.png has the same name: the two would share one caption a.txt; rename one of them",
        "a.png": "a second file at the same path in this upload (kept the first)",
    }
    later = datasets_store.add_files("set", [("a.webp", png()), ("a.txt", b"a square")])
    assert later.written == [] and [r.file for r in later.rejected] == ["a.webp"]
    assert later.captions == ["a.txt"] and later.replaced == ["a.txt"]  # the caption of the a.png kept
    assert relative_files(work_images(home, "set")) == ["a.png", "a.txt", "sub/a.jpg"]
    assert api.dataset_info("set")["images"] == 2
    blocked = datasets_store.add_files("set", [("z.zip", make_zip({"x.png": png(), "x.png/y.png": png()}))])
    assert blocked.written == ["x.png"] and [(r.file, r.reason) for r in blocked.rejected] == [
        ("x.png/y.png", "cannot be written (File exists)")
    ]


def test_upper_case_txt_captions_are_shown_edited_in_place_and_replaced_in_place(home):
    datasets_store.add_files("set", [("UPPER.png", png()), ("UPPER.TXT", b"a circle")])
    folder = work_images(home, "set")
    assert relative_files(folder) == ["UPPER.TXT", "UPPER.png"]
    assert api.dataset_images("set")[0]["caption"] == "a circle"
    assert api.bulk_captions("set", trigger="sks") == 1
    assert relative_files(folder) == ["UPPER.TXT", "UPPER.png"]  # no second caption file UPPER.txt
    assert (folder / "UPPER.TXT").read_text() == "sks, a circle"
    report = datasets_store.add_files("set", [("UPPER.txt", b"a square")])
    assert report.captions == ["UPPER.TXT"] and relative_files(folder) == ["UPPER.TXT", "UPPER.png"]
    twice = datasets_store.add_files("set", [("b.png", png()), ("b.txt", b"one"), ("b.TXT", b"two")])
    assert twice.captions == ["b.txt"] and [(r.file, r.reason) for r in twice.rejected] == [
        ("b.TXT", "a second caption for b.png in this upload (kept the first)")
    ]


def test_a_bom_is_dropped_so_the_trigger_is_not_added_twice(home):
    bom = "\ufeffsks, a circle".encode()
    datasets_store.add_files("set", [("a.png", png()), ("a.txt", bom), ("b.png", png())])
    folder = work_images(home, "set")
    assert (folder / "a.txt").read_bytes() == b"sks, a circle"  # written without it
    (folder / "b.txt").write_bytes(bom)  # one already on disk (written by another tool)
    assert [i["caption"] for i in api.dataset_images("set")] == ["sks, a circle", "sks, a circle"]
    assert api.bulk_captions("set", trigger="sks") == 0


def test_hidden_files_are_refused_and_what_is_counted_is_what_is_frozen(home):
    report = datasets_store.add_files(
        "set",
        [("a.png", png()), (".hidden.png", png()), ("z.zip", make_zip({".thumbs/b.png": png(), "c.png": png()}))],
    )
    assert sorted(report.written) == ["a.png", "c.png"]
    assert sorted(r.file for r in report.rejected) == [".hidden.png", ".thumbs/b.png"]
    assert all("hidden name" in r.reason for r in report.rejected)
    folder = work_images(home, "set")
    before = api.dataset_info("set")["fingerprint"]
    (folder / ".put-there.png").write_bytes(png())  # by hand, or another tool
    (folder / ".cache").mkdir()
    (folder / ".cache" / "d.png").write_bytes(png())
    info = api.dataset_info("set")
    version = api.freeze_dataset("set")
    assert info["images"] == len(api.dataset_images("set")) == version["images"] == 2
    assert info["fingerprint"] == before == version["fingerprint"]
    assert datasets_store.fingerprint(Path(version["path"])) == version["fingerprint"]
    assert relative_files(Path(version["images_path"])) == ["a.png", "c.png"]


def test_captions_removal_and_versions_work_on_images_in_folders(home):
    datasets_store.add_files("shapes", [("shapes.zip", make_zip(KOHYA_ZIP))])
    datasets_store.add_files("shapes", [("c.zip", make_zip({"10_purple circle/002.png": png()}))])
    api.set_caption("shapes", "5_purple square/002.png", "a grey square")
    folder = work_images(home, "shapes")
    assert (folder / "5_purple square" / "002.txt").read_text() == "a grey square"
    conditioning = folder.parent / "conditioning" / "10_purple circle"
    conditioning.mkdir(parents=True)
    (conditioning / "001.png").write_bytes(png())
    assert api.dataset_images("shapes")[0]["conditioning"] == str(conditioning / "001.png")
    v1 = api.freeze_dataset("shapes")
    api.remove_dataset_image("shapes", "10_purple circle/001.png")
    assert "10_purple circle/001.txt" not in relative_files(folder) and not (conditioning / "001.png").exists()
    assert "5_purple square/001.txt" in relative_files(folder)  # the other folder's 001 keeps its caption
    api.remove_dataset_image("shapes", "10_purple circle/002.png")
    assert not (folder / "10_purple circle").exists()  # emptied: gone, so no empty subset is listed
    assert [f["folder"] for f in api.dataset_info("shapes")["folders"]] == ["5_purple square"]
    v2 = api.freeze_dataset("shapes")
    assert (v1["images"], v2["images"]) == (4, 2) and v1["fingerprint"] != v2["fingerprint"]
    assert (Path(v1["images_path"]) / "10_purple circle" / "001.txt").read_text() == "a purple circle"
    for bad in ("../dataset.json", "/etc/passwd", "5_purple square/001.txt", "nope.png"):
        with pytest.raises(api.StudioError, match="not an image of dataset 'shapes'"):
            api.set_caption("shapes", bad, "x")


def test_removing_an_image_keeps_a_caption_another_image_still_uses(home):
    """A pair written before uploads refused it (`a.png` + `a.jpg` share `a.txt`): removing one keeps the caption."""
    datasets_store.add_files("set", [("a.png", png()), ("a.txt", b"a circle")])
    (work_images(home, "set") / "a.jpg").write_bytes(png())
    api.remove_dataset_image("set", "a.jpg")
    assert relative_files(work_images(home, "set")) == ["a.png", "a.txt"]


def test_an_unreadable_caption_is_reported_not_fatal_and_left_alone(home):
    datasets_store.add_files("set", [("a.png", png()), ("b.png", png())])
    (work_images(home, "set") / "a.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    items = {i["file"]: i for i in api.dataset_images("set")}
    assert items["a.png"]["caption_error"] == "caption file a.txt is not UTF-8 text (the trainers skip this image)"
    assert api.bulk_captions("set", trigger="sks") == 1  # b only: a's file is not overwritten
    assert (work_images(home, "set") / "a.txt").read_bytes() == b"caf\xe9"


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("1", "BMP")])
def test_images_of_every_mode_are_accepted_and_shown(home, mode, fmt):
    out = io.BytesIO()
    (Image.open(io.BytesIO(png16())) if mode == "I;16" else Image.new(mode, (64, 64))).save(out, format=fmt)
    report = datasets_store.add_files("set", [(f"a.{fmt.lower()}", out.getvalue())])
    [item] = api.dataset_images("set")
    assert report.written == [item["file"]]
    thumb = Image.open(io.BytesIO(api.dataset_thumbnail(item["path"])))
    assert thumb.format == "JPEG" and thumb.mode == "RGB" and thumb.size == (64, 64)


def test_a_file_that_cannot_be_shown_says_why(home):
    datasets_store.add_files("set", [("a.png", png())])
    broken = work_images(home, "set") / "b.png"
    broken.write_bytes(png()[:100])
    with pytest.raises(api.StudioError, match=r"^b.png: cannot be shown \(OSError: .*truncated"):
        api.dataset_thumbnail(broken)
