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
    assert sorted(report.written) == ["a.png", "b.png"] and report.captions == ["a.txt"]
    reasons = {r.file: r.reason for r in report.rejected}
    assert reasons == {
        "readme.md": "not an image: use .png .jpg .jpeg .webp .bmp (captions: same-name .txt)",
        "c.png": "empty file (0 bytes)",
        "orphan.txt": "caption without an image of the same name",
    }
    folder = home / "datasets" / "purple" / "work" / "images"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert not list(home.rglob("*.tmp"))


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
