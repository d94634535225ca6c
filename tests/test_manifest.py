"""`adapter.json`: the typed manifest round-trips, and a file with a missing or unknown key is refused by name."""

from __future__ import annotations

import json

import pytest

from sdtune.adapters.manifest import AdapterManifest, BaseRef, ManifestError, read_manifest, write_manifest


def _manifest() -> AdapterManifest:
    return AdapterManifest(
        name="toy-purple",
        method="lora",
        created_at="2026-11-24T19:00:00+0000",
        base=BaseRef("toy", "toy", "ab" * 32),
        trigger_words=["purple"],
        dataset={"fingerprint": "f", "images": 16},
        training={"steps": 300, "final_loss": 0.08},
        files={"peft": "pytorch_lora_weights.safetensors", "kohya": "toy-purple.safetensors"},
        samples={"ab_grid": "ab_grid.png"},
        scores=None,
        export_check={"ok": True},
        recipe={"method": {"rank": 8}},
    )


def test_write_then_read_gives_the_same_manifest_in_key_order(tmp_path):
    path = write_manifest(tmp_path, _manifest())
    assert path == tmp_path / "adapter.json"
    assert list(json.loads(path.read_text())) == [
        "name", "method", "created_at", "base", "trigger_words", "dataset",
        "training", "files", "samples", "scores", "export_check", "recipe", "origin", "preference",
    ]  # fmt: skip
    assert read_manifest(tmp_path) == _manifest() == read_manifest(path)
    assert read_manifest(tmp_path).base.hash == "ab" * 32


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("files"), "missing key 'files'"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d["base"].pop("kind"), "base: missing key 'kind'"),
        (lambda d: d.update(base="toy"), "base: expected a JSON object"),
    ],
)
def test_bad_manifest_is_one_line_naming_the_key(tmp_path, change, message):
    data = _manifest().to_dict()
    change(data)
    (tmp_path / "adapter.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path)
    (tmp_path / "adapter.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_origin_is_optional_so_older_manifests_still_read(tmp_path):
    data = _manifest().to_dict()
    data.pop("origin")
    (tmp_path / "adapter.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path).origin is None
    imported = AdapterManifest(**{**_manifest().__dict__, "origin": {"kind": "imported", "source": "x.safetensors"}})
    write_manifest(tmp_path, imported)
    assert read_manifest(tmp_path).origin == {"kind": "imported", "source": "x.safetensors"}
