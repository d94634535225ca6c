"""One base for every error a user can fix (`sdtune.adapters.errors`), and one home for atomic writes.

A front end catches `SdtuneError` alone, so an error class outside it would reach the user as a traceback; and
every temp-then-rename write goes through `sdtune.adapters.atomic`, so the rules (same folder, readable mode, the
old version kept until the new one is whole) hold everywhere.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
from pathlib import Path

import pytest

from sdtune.adapters import atomic
from sdtune.adapters.errors import NotFoundError, SdtuneError

ROOT = Path(__file__).resolve().parents[1]


def error_classes(package: str) -> list[type]:
    """Every exception class defined in the modules of `package` (imported, so inherited bases count)."""
    root = importlib.import_module(package)
    found = []
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        module = importlib.import_module(info.name)
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__
        ]
    return found


# Exceptions used as control flow inside one module, caught there and never shown to a user.
OUTCOMES = {"sdtune.trainers.tools.kohya_rules.Skip"}  # a key the importer lists as ignored / not supported


@pytest.mark.parametrize("package", ["sdtune.adapters", "sdtune.trainers"])
def test_every_error_class_is_a_sdtune_error(package):
    classes = error_classes(package)
    assert len(classes) >= 3, classes  # the walk found the modules (RecipeError, DataError, TrainingDiverged...)
    names = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, SdtuneError)]
    assert [name for name in names if name not in OUTCOMES] == []


def test_error_classes_keep_their_builtin_base():
    """Code that caught the built-in type (a `ValueError`, a `FileNotFoundError`) still does."""
    from sdtune.adapters.export_check import ExportCheckError
    from sdtune.adapters.registry import RegistryError
    from sdtune.trainers.core.loop import TrainingDiverged
    from sdtune.trainers.core.recipe import RecipeError

    assert issubclass(RecipeError, ValueError) and issubclass(RegistryError, ValueError)
    assert issubclass(ExportCheckError, RuntimeError) and issubclass(TrainingDiverged, RuntimeError)
    assert issubclass(NotFoundError, FileNotFoundError)
    assert (
        str(NotFoundError("train.resume: x is not a checkpoint folder"))
        == "train.resume: x is not a checkpoint folder"
    )


def test_run_cli_turns_a_sdtune_error_into_one_line_and_lets_a_bug_through(capsys):
    from sdtune.trainers.core.runtime import run_cli

    def main(error):
        raise error

    assert run_cli(main, NotFoundError("base: x.safetensors not found")) == 2
    assert capsys.readouterr().err == "error: base: x.safetensors not found\n"
    with pytest.raises(KeyError):  # not the user's to fix: the traceback shows
        run_cli(main, KeyError("unet"))


# -- atomic writes ---------------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_atomic_folder_swaps_a_whole_folder_in_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()  # nothing at the name until the folder is whole
    assert (target / "a.txt").read_text() == "first" and mode(target) == 0o777 & ~atomic.UMASK
    with pytest.raises(RuntimeError), atomic.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("the save failed halfway")
    with atomic.atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left


def test_replace_folder_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "old").write_text("kept")
    (tmp_path / ".tmp-checkpoint-2").mkdir()
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_folder(tmp_path / ".tmp-checkpoint-2", tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / "old").read_text() == "kept"


def test_small_files_and_copies_are_written_whole_with_the_mode_open_gives(tmp_path):
    atomic.write_text_atomic(tmp_path / "a" / "request", "{}")
    atomic.write_bytes_atomic(tmp_path / "b.png", b"png")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.safetensors").write_bytes(b"w")
    atomic.copy_atomic(tmp_path / "src", tmp_path / "copy")
    atomic.copy_atomic(tmp_path / "b.png", tmp_path / "copy" / "c.png")
    assert (tmp_path / "a" / "request").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["c.png", "w.safetensors"]
    for path in (tmp_path / "a" / "request", tmp_path / "b.png", tmp_path / "copy" / "c.png"):
        assert mode(path) == 0o666 & ~atomic.UMASK, path
    assert not [p for p in tmp_path.rglob(".*")]  # no temp file left


def test_a_single_file_checkpoint_gets_the_mode_open_gives(tmp_path):
    """Written through its own temp-then-rename, a single-file checkpoint (and ControlNet's original-layout file)
    was 0600: an A1111 or ComfyUI running as another account could not read it."""
    from sdtune.adapters.base import TOY_BASE
    from sdtune.adapters.single_file import save_single_file

    out = save_single_file(TOY_BASE, tmp_path / "toy.safetensors", half=True)
    assert mode(out) == 0o666 & ~atomic.UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["toy.safetensors"]


# Hand-written renames outside sdtune.adapters.atomic. The registry's and the A/B store's are not writes: each moves
# a finished staging folder to the name it took inside a database transaction, and moves it back if the index fails;
# the registry's fourth renames a run-named file inside the staging folder, before anyone can see it. A job's retry
# sets its finished run folder aside (`run.attempt-N`); a dataset's freeze renames its checked copy to its version.
RENAMES_ALLOWED = {
    "adapters/registry.py": 4,
    "adapters/ab/store.py": 1,
    "studio/jobs.py": 1,
    "studio/datasets_store.py": 1,
}


@pytest.mark.parametrize("folder", ["adapters", "trainers", "studio"])
def test_temp_then_rename_writes_go_through_the_atomic_module(folder):
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path == ROOT / "adapters" / "atomic.py":
            continue
        text = path.read_text()
        count = len(re.findall(r"(?:os\.replace|os\.rename|\.rename|mkstemp)\(", text))
        if count:
            found[str(path.relative_to(ROOT))] = count
    assert found == {k: v for k, v in RENAMES_ALLOWED.items() if k.startswith(folder)}


# -- every user-facing refusal below a front end is a SdtuneError ----------------------------------------------------

# The plain raises left in adapters/: each is a programming error (a bad argument from our own code, an internal
# invariant) or a protocol's own type, never the user's to fix. A new user-facing refusal raises its module's class.
PLAIN_RAISES_ALLOWED = {
    "adapters/base.py": 1,  # a pydantic AfterValidator: pydantic wants a ValueError and words it as a RecipeError
    "adapters/kohya.py": 3,  # peft_to_kohya's and kohya_alphas_from_lora_config's arguments, from our own callers
    "adapters/lowrank.py": 2,  # factorize's shape and rank, checked by its callers (merge, extract) first
    "adapters/run_folder.py": 1,  # checkpoint_step of a folder list_checkpoints already matched
    "adapters/toyworld.py": 4,  # shapes, colours and condition kinds the callers take from toyworld's own lists; a length invariant
}


def test_user_facing_refusals_in_adapters_are_sdtune_errors():
    found = {}
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        count = len(re.findall(r"raise (?:ValueError|RuntimeError)\(", path.read_text()))
        if count:
            found[str(path.relative_to(ROOT))] = count
    assert found == PLAIN_RAISES_ALLOWED


def _sdxl_checkpoint(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, path)
    return path


def _pickle_checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    return tmp_path / "model.ckpt"


# (what the user gave, the API call, the same through the `sdtune` command, how the one line starts)
USER_ERRORS = [
    (
        "pickle",
        lambda tmp: _pickle_checkpoint(tmp),
        lambda api, src, tmp: api.convert_checkpoint(src, tmp / "out"),
        lambda src, tmp: ["convert", str(src), str(tmp / "out")],
        "{src}: expected a diffusers folder or a .safetensors checkpoint",
    ),
    (
        "layout",
        _sdxl_checkpoint,
        lambda api, src, tmp: api.convert_checkpoint(src, tmp / "out"),
        lambda src, tmp: ["convert", str(src), str(tmp / "out")],
        "{src}: an SDXL checkpoint",
    ),
    (
        "weight",
        lambda tmp: "toy-purple:nan",
        lambda api, src, tmp: api.bake_model(tmp / "baked", adapters=[src]),
        lambda src, tmp: ["bake", str(tmp / "baked"), "--adapter", src],
        "toy-purple:nan: the weight 'nan' is not a finite number",
    ),
]


@pytest.mark.parametrize("make, call, argv, start", [c[1:] for c in USER_ERRORS], ids=[c[0] for c in USER_ERRORS])
def test_a_user_error_reaches_the_api_and_the_command_as_one_line(
    tmp_path, monkeypatch, capsys, make, call, argv, start
):
    """Issue 21: single_file's and compose's refusals are their modules' SdtuneErrors, which the studio API turns
    into one StudioError line and the `sdtune` command into one `sdtune <command>: ...` line, with no traceback."""
    from sdtune.studio import api, cli

    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    src = make(tmp_path)
    line = start.format(src=src)
    with pytest.raises(api.StudioError) as caught:
        call(api, src, tmp_path)
    assert type(caught.value) is api.StudioError and str(caught.value).startswith(line), caught.value
    assert "\n" not in str(caught.value) and caught.value.__suppress_context__
    command = argv(src, tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(command)
    message = exited.value.code
    assert isinstance(message, str) and message.startswith(f"sdtune {command[0]}: {line}"), message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err


def test_a_file_that_holds_no_lora_is_one_line_naming_it(toy_pipe, tmp_path):
    """diffusers refuses such a file with a plain ValueError; the sampler says which file, as a SdtuneError."""
    import torch
    from safetensors.torch import save_file

    from sdtune.adapters import sampling

    bad = tmp_path / "not-a-lora.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(SdtuneError, match=r"^\S*not-a-lora.safetensors: not a LoRA file diffusers can load \(") as e:
        sampling.load_lora_file(toy_pipe, bad, "bad")
    assert "\n" not in str(e.value)
