"""The registry store: atomic adds, list filters, tags, rm, export, index/folder agreement, concurrent adders.

No model here: the store handles folders and an index whatever the weights are (tests/test_compose.py and
tests/test_import.py put real LoRAs through it).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdtune.adapters.manifest import AdapterManifest, BaseRef, read_manifest, write_manifest
from sdtune.adapters.registry import Registry, RegistryError, sdtune_home

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, name="toy-purple", method="lora", base="toy", trigger="purple") -> Path:
    """A run folder as a trainer leaves it: adapter.json, both weight files, a grid, and a checkpoint to leave out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"peft")
    (folder / f"{name}.safetensors").write_bytes(b"kohya")
    (folder / "ab_grid.png").write_bytes(b"png")
    (folder / "export_check.png").write_bytes(b"png")
    (folder / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    manifest = AdapterManifest(
        name=name,
        method=method,
        created_at="2026-11-24T19:00:00+0000",
        base=BaseRef(base, "toy", "ab" * 32),
        trigger_words=[trigger] if trigger else [],
        dataset={},
        training={"steps": 1},
        files={"peft": "pytorch_lora_weights.safetensors", "kohya": f"{name}.safetensors"},
        samples={"ab_grid": "ab_grid.png"},
        scores=None,
        export_check={"ok": True, "images": {"strip": "export_check.png"}},
        recipe={},
    )
    write_manifest(folder, manifest)
    return folder


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "home")


def test_home_comes_from_sdtune_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "h"))
    assert sdtune_home() == tmp_path / "h" and Registry().home == tmp_path / "h"
    monkeypatch.delenv("SDTUNE_HOME")
    assert sdtune_home() == Path.home() / ".sdtune"


def test_every_front_end_finds_the_one_absolute_home(monkeypatch, tmp_path):
    """A relative or `~` SDTUNE_HOME names one absolute folder, the same for the registry, the A/B store, the job
    queue, the datasets and the studio's token: the worker starts trainers in other folders, and a relative home
    would be another folder there (the registry's copy of sdtune_home returned it relative)."""
    from sdtune.adapters import ab, registry, workspace
    from sdtune.studio import access, datasets_store, jobs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDTUNE_HOME", "work/home")
    home = tmp_path / "work" / "home"
    assert sdtune_home() == home and sdtune_home().is_absolute()
    assert Registry().home == home and ab.ABStore().home == home and jobs.sdtune_home() == home
    assert datasets_store.datasets_root() == home / "datasets" and access.token_path() == home / "studio" / "token"
    assert Registry("elsewhere").home == tmp_path / "elsewhere"  # a home given as an argument too
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("SDTUNE_HOME", "~/sd")
    assert sdtune_home() == tmp_path / "user" / "sd"
    assert registry.sdtune_home is jobs.sdtune_home is workspace.sdtune_home  # one function, not copies


def test_register_run_copies_weights_grids_and_manifest_not_checkpoints(registry, tmp_path):
    entry = registry.register_run(fake_run(tmp_path / "run"))
    assert entry.name == "toy-purple" and entry.method == "lora" and entry.origin == "trained"
    files = sorted(p.name for p in entry.folder.iterdir())
    assert files == [
        "ab_grid.png", "adapter.json", "export_check.png", "pytorch_lora_weights.safetensors", "registry.json",
        "toy-purple.safetensors",
    ]  # fmt: skip
    manifest = read_manifest(entry.folder)
    assert manifest.origin == {"kind": "trained", "run_dir": str((tmp_path / "run").resolve())}
    assert registry.file("toy-purple", "kohya").read_bytes() == b"kohya"
    with sqlite3.connect(registry.index_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_list_filters_by_base_method_tag_and_trigger(registry, tmp_path):
    registry.register_run(fake_run(tmp_path / "a", name="purple", trigger="purple"))
    registry.register_run(fake_run(tmp_path / "b", name="star", trigger="star", base="/models/sd15.safetensors"))
    registry.register_run(fake_run(tmp_path / "c", name="cn", method="controlnet", trigger=None))
    registry.tag("star", add=["shapes", "v1"])
    names = lambda **kw: sorted(e.name for e in registry.list(**kw))  # noqa: E731
    assert names() == ["cn", "purple", "star"]
    assert names(method="lora") == ["purple", "star"]
    assert names(method="controlnet") == ["cn"]
    assert names(tag="shapes") == ["star"] and names(tag="nope") == []
    assert names(trigger="PURPLE") == ["purple"]
    assert names(base="sd15.safetensors") == ["star"] and names(base="toy") == ["cn", "purple"]
    assert names(base="abab") == ["cn", "purple", "star"]  # a hash prefix
    assert names(method="lora", trigger="star", tag="v1") == ["star"]


def test_tags_live_in_the_folder_too_and_survive_an_index_rebuild(registry, tmp_path):
    registry.register_run(fake_run(tmp_path / "a"))
    assert registry.tag("toy-purple", add=["a", "b"]) == ["a", "b"]
    assert registry.tag("toy-purple", remove=["a"]) == ["b"]
    registry.index_path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(registry.index_path) + suffix).unlink(missing_ok=True)
    report = registry.check(repair=True)
    assert report.not_indexed == ["toy-purple"] and report.repaired
    assert registry.get("toy-purple").tags == ["b"] and registry.check().ok
    with pytest.raises(RegistryError, match="tag 'x,y'"):
        registry.tag("toy-purple", add=["x,y"])


def test_name_clash_is_refused_unless_unique(registry, tmp_path):
    run = fake_run(tmp_path / "a")
    registry.register_run(run, unique=False)
    with pytest.raises(RegistryError, match="name clash: an adapter named 'toy-purple' is already registered"):
        registry.register_run(run, unique=False)
    assert registry.register_run(run).name == "toy-purple-2"  # trainers' default: a rerun does not replace
    assert read_manifest(registry.get("toy-purple-2").folder).name == "toy-purple-2"
    with pytest.raises(RegistryError, match="adapter name 'bad name'"):
        registry.register_run(run, name="bad name")


def test_rm_and_unknown_names(registry, tmp_path):
    entry = registry.register_run(fake_run(tmp_path / "a"))
    registry.remove("toy-purple")
    assert not entry.folder.exists() and registry.list() == [] and registry.check().ok
    with pytest.raises(RegistryError, match="no adapter named 'toy-purple'"):
        registry.get("toy-purple")


def test_export_one_format_or_the_whole_folder(registry, tmp_path):
    registry.register_run(fake_run(tmp_path / "a"))
    [kohya] = registry.export("toy-purple", tmp_path, fmt="kohya")
    assert kohya == tmp_path / "toy-purple.safetensors" and kohya.read_bytes() == b"kohya"
    written = registry.export("toy-purple", tmp_path / "out")
    assert (tmp_path / "out" / "adapter.json") in written
    with pytest.raises(RegistryError, match="exists and is not an empty folder"):
        registry.export("toy-purple", tmp_path / "out")
    with pytest.raises(RegistryError, match="has no 'controlnet' file"):
        registry.export("toy-purple", tmp_path, fmt="controlnet")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(
        RegistryError, match=f"export: {notes} already exists; choose another path or pass --overwrite"
    ):
        registry.export("toy-purple", notes, fmt="peft")
    with pytest.raises(RegistryError, match="toy-purple.safetensors already exists"):  # into a folder holding it
        registry.export("toy-purple", tmp_path, fmt="kohya")
    assert notes.read_text() == "my notes"
    assert (
        registry.export("toy-purple", notes, fmt="peft", overwrite=True) == [notes] and notes.read_bytes() == b"peft"
    )
    new_folder = f"{tmp_path}/new/"  # a path ending in "/" is a folder, made if missing
    assert registry.export("toy-purple", new_folder, fmt="kohya") == [tmp_path / "new" / "toy-purple.safetensors"]


def test_a_failing_add_leaves_nothing(registry, tmp_path):
    def fill(staging: Path):
        (staging / "half.safetensors").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.add("half", fill)
    assert registry.list() == [] and not (registry.adapters_dir / "half").exists()
    assert list(registry.staging_dir.iterdir()) == [] and registry.check().ok


def test_an_index_failure_moves_the_folder_back(registry, tmp_path, monkeypatch):
    """Interrupted between the rename and the commit (in-process): the folder goes back out, the index rolls back."""

    def interrupted(self, db, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "_index_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.register_run(fake_run(tmp_path / "a"))
    monkeypatch.undo()
    assert registry.list() == [] and list(registry.adapters_dir.iterdir()) == [] and registry.check().ok


def test_check_reports_and_repairs_what_killed_processes_leave(registry, tmp_path):
    """A SIGKILL can leave: a complete folder the index never got (killed after the rename), a staging folder of
    a dead process (killed while copying), an index row whose folder was deleted by hand, an edited adapter.json."""
    registry.register_run(fake_run(tmp_path / "a", name="kept"))
    registry.register_run(fake_run(tmp_path / "b", name="deleted"))
    other = Registry(tmp_path / "other")
    shutil.move(other.register_run(fake_run(tmp_path / "c", name="lost")).folder, registry.adapters_dir / "lost")
    (registry.staging_dir / "999999999-0123").mkdir()  # pid 999999999 is not running
    shutil.rmtree(registry.adapters_dir / "deleted")
    time.sleep(0.01)
    (registry.adapters_dir / "kept" / "adapter.json").touch()

    report = registry.check()
    assert report.not_indexed == ["lost"] and report.missing_folder == ["deleted"]
    assert report.out_of_date == ["kept"] and report.stale_staging == ["999999999-0123"]
    assert not report.ok and "folder not in the index: lost" in report.summary() and "--repair" in report.summary()
    assert sorted(e.name for e in registry.list()) == ["deleted", "kept"]  # check alone changes nothing

    repaired = registry.check(repair=True)
    assert repaired.repaired and "repaired" in repaired.summary()
    assert registry.check().ok and sorted(e.name for e in registry.list()) == ["kept", "lost"]
    assert list(registry.staging_dir.iterdir()) == []


def test_two_processes_registering_at_once_both_succeed(tmp_path):
    """Two interpreters register at the same moment (the same name too): both finish, no row or folder is lost."""
    home = tmp_path / "home"
    runs = [fake_run(tmp_path / f"run{i}", name="same") for i in range(2)]
    others = [fake_run(tmp_path / f"other{i}", name=f"other{i}") for i in range(2)]
    go = tmp_path / "go"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from sdtune.adapters.registry import Registry
        go, home, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
        while not go.exists():
            time.sleep(0.005)
        registry = Registry(home)
        print(",".join(registry.register_run(run).name for run in runs))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), str(home), str(runs[i]), str(others[i])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    names = sorted(n for out, _ in results for n in out.strip().split(","))
    assert names == ["other0", "other1", "same", "same-2"]
    registry = Registry(home)
    assert sorted(e.name for e in registry.list()) == names and registry.check().ok
    assert json.loads((registry.adapters_dir / "same-2" / "adapter.json").read_text())["name"] == "same-2"


def test_cli_list_show_tag_export_rm_check(tmp_path, monkeypatch, capsys):
    from sdtune.studio import cli

    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    Registry().register_run(fake_run(tmp_path / "a", name="toy-purple"))
    Registry().register_run(fake_run(tmp_path / "b", name="toy-star", trigger="star"))

    def run(*argv) -> str:
        assert cli.main(list(argv)) == 0
        return capsys.readouterr().out

    assert run("adapters", "tag", "toy-star", "shapes", "draft") == "draft shapes\n"
    assert run("adapters", "tag", "toy-star", "--remove", "draft") == "shapes\n"
    listed = run("adapters", "list", "--trigger", "star")
    header, row = listed.splitlines()
    assert header.split() == ["name", "method", "origin", "base", "triggers,", "#tags"]
    assert row.startswith("toy-star") and "#shapes" in row and "toy-purple" not in listed
    rows = json.loads(run("adapters", "list", "--method", "lora", "--json"))
    assert sorted(r["name"] for r in rows) == ["toy-purple", "toy-star"]
    shown = json.loads(run("adapters", "show", "toy-purple"))
    assert shown["manifest"]["files"]["kohya"] == "toy-purple.safetensors" and shown["origin"] == "trained"
    assert run("adapters", "export", "toy-purple", str(tmp_path), "--format", "kohya").strip() == str(
        tmp_path / "toy-purple.safetensors"
    )
    assert run("adapters", "rm", "toy-purple") == "removed toy-purple\n"
    assert run("adapters", "check") == "registry ok: index and folders agree\n"
    with pytest.raises(SystemExit, match="sdtune adapters: no adapter named 'toy-purple'"):
        cli.main(["adapters", "show", "toy-purple"])


def test_atomic_writes_get_the_mode_open_gives(tmp_path):
    """mkstemp's 0600 kept other accounts (an A1111 running as another user) from reading weights and images."""
    import os

    from PIL import Image

    from sdtune.adapters.atomic import UMASK
    from sdtune.adapters.lora_files import save_kohya
    from sdtune.adapters.sampling import save_png_atomic

    save_kohya(tmp_path / "a.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)}, {})
    save_png_atomic(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    for name in ("a.safetensors", "a.png"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~UMASK, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.safetensors"]  # no temp file left


def test_registered_copies_of_a_run_name_their_kohya_file_after_themselves(registry, tmp_path):
    """A1111 and ComfyUI list LoRAs by file name: `ui-run-1-2` and `-3` must not each bring another
    `ui-run-1.safetensors` into one models/Lora folder (issue 20). Fixed names (the PEFT file) stay."""
    run = fake_run(tmp_path / "run", name="ui-run-1")
    names = [registry.register_run(run).name for _ in range(3)] + [registry.register_run(run, name="mine").name]
    assert names == ["ui-run-1", "ui-run-1-2", "ui-run-1-3", "mine"]
    for name in names:
        kohya = registry.file(name, "kohya")
        assert kohya.name == f"{name}.safetensors" and kohya.read_bytes() == b"kohya"
        weights = {p.name for p in kohya.parent.glob("*.safetensors")}
        assert weights == {f"{name}.safetensors", "pytorch_lora_weights.safetensors"}
        assert registry.file(name, "peft").name == "pytorch_lora_weights.safetensors"
    exported = [registry.export(name, f"{tmp_path}/Lora/", fmt="kohya")[0].name for name in names]
    assert exported == [f"{name}.safetensors" for name in names]  # side by side in one folder
    assert (tmp_path / "run" / "ui-run-1.safetensors").is_file() and registry.check().ok  # the run is untouched


def test_find_run_names_the_adapter_registered_from_a_run_folder(registry, tmp_path):
    run = fake_run(tmp_path / "run")
    assert registry.find_run(run) is None
    registry.register_run(run)
    assert registry.find_run(run).name == "toy-purple"
    assert registry.find_run(fake_run(tmp_path / "other")) is None  # the same manifest from another folder
