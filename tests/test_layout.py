"""The three packages and the rule between them (docs/architecture.md), read from the source, not from imports.

    sdtune.adapters   inference: imports neither sdtune.trainers nor sdtune.studio
    sdtune.trainers   training: may import sdtune.adapters, never sdtune.studio
    sdtune.studio     front ends: on top, may import both

Every module's AST is walked, imports inside functions included, so a lazy import cannot hide a wrong direction.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"adapters": "sdtune.adapters", "trainers": "sdtune.trainers", "studio": "sdtune.studio"}
FORBIDDEN = {
    "sdtune.adapters": ("sdtune.trainers", "sdtune.studio"),
    "sdtune.trainers": ("sdtune.studio",),
    "sdtune.studio": (),
}


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved against its package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from sdtune import trainers` names the package in the alias, not in the module
            found += [(node.lineno, f"{base}.{alias.name}" if base == "sdtune" else base) for alias in node.names]
    return found


def violations(path: Path) -> list[str]:
    own = module_name(path)
    package = next(p for p in FORBIDDEN if own == p or own.startswith(p + "."))
    return [
        f"{path.relative_to(ROOT)}:{line}: {package} must not import {name}"
        for line, name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]


SOURCES = sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def test_every_package_has_modules():
    for folder in PACKAGES:
        assert any(p.parent.relative_to(ROOT).parts[0] == folder for p in SOURCES), folder


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_imports_follow_the_dependency_direction(path):
    assert violations(path) == []


@pytest.mark.parametrize(
    "folder,source,offending",
    [
        ("adapters", "from sdtune.trainers.core.recipe import Recipe\n", "sdtune.trainers.core.recipe"),
        ("adapters", "def f():\n    import sdtune.studio.api\n", "sdtune.studio.api"),
        ("adapters", "from sdtune import trainers\n", "sdtune.trainers"),
        ("adapters", "from ..trainers import lora\n", "sdtune.trainers"),
        ("trainers", "from sdtune.studio.api import sample_images\n", "sdtune.studio.api"),
    ],
)
def test_a_wrong_import_fails_with_its_name(folder, source, offending, monkeypatch, tmp_path):
    """The checker itself: a planted module that breaks the rule is reported with the offending import."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    planted = tmp_path / folder / "planted.py"
    planted.parent.mkdir()
    planted.write_text(source)
    found = violations(planted)
    assert len(found) == 1 and found[0].endswith(f"must not import {offending}"), found


STUDIO_PAGES = sorted(p.stem for p in (ROOT / "studio" / "views").glob("*.py") if p.stem != "__init__")
API_MODULES = sorted(p.stem for p in (ROOT / "studio" / "api").glob("*.py") if p.stem != "__init__")


def test_every_page_is_checked():
    assert {"datasets", "train", "jobs", "registry", "ab", "publish"} <= set(STUDIO_PAGES)


def test_every_api_module_is_checked():
    assert {"errors", "render", "registry", "datasets", "training", "comparisons", "publishing"} <= set(API_MODULES)
    assert all(p in SOURCES for p in (ROOT / "studio" / "api").glob("*.py"))  # the import direction too


def test_cli_api_and_pages_import_without_torch():
    """The studio's pages, its API's modules and `sdtune --help` stay fast: torch loads only when a command needs a model.
    (tests/test_studio_pages.py also renders each page in a fresh process and checks torch stayed out.)"""
    pages = ", ".join(f"sdtune.studio.views.{name}" for name in STUDIO_PAGES)
    api = ", ".join(f"sdtune.studio.api.{name}" for name in API_MODULES)  # each module, not only what __init__ takes
    modules = (
        "sdtune.studio.cli, sdtune.studio.api, sdtune.studio.jobs, sdtune.studio.worker, sdtune.studio.launch, "
        f"sdtune.studio.datasets_store, {api}, {pages}"
    )
    code = f"import {modules}, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_commands_that_load_no_model_run_without_torch(tmp_path):
    """`sdtune ab vote/show/list`, `adapters list/show/...`, `jobs ...` read files and SQLite: they used to import
    diffusers and transformers (and torch with them) only to quiet those libraries' logs, 3-4 s before a line showed.
    Each command of `LOADS_NO_MODEL` runs here against an empty home and must leave torch unimported."""
    code = (
        "import sys; from sdtune.studio import cli\n"
        "for line in sys.argv[1:]:\n"
        "    try: cli.main(line.split())\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    commands = ["ab list", "ab show 1", "ab vote 1", "adapters list", "adapters show x", "adapters check", "jobs list",
                f"dataset dupes {ROOT / 'datasets' / 'purple-star'}", "recipe from-kohya missing.toml"]  # fmt: skip
    env = {**os.environ, "SDTUNE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code, *commands], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_listing_piped_into_a_reader_that_stops_ends_without_a_traceback(tmp_path):
    """`sdtune jobs list | head`: head exits after its lines; the listing then writes into a closed pipe."""
    sdtune = Path(sys.executable).parent / "sdtune"
    env = {**os.environ, "SDTUNE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sdtune, "jobs", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read()
    assert proc.wait() == 141 and stderr == "", stderr


# -- sizes (issue 21) ------------------------------------------------------------------------------------------------

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_TRAINER_MAIN_LINES = 80  # a trainer script's `main` is its table of contents, the loop written out


def size_violations(path: Path, root: Path = ROOT) -> list[str]:
    """Lines over the limits in one source file: the file itself, and every function (nested ones too, `def` line to
    last line); `main` of a trainer script (trainers/<method>.py) gets the larger limit."""
    text = path.read_text()
    where = path.relative_to(root)
    found = [f"{where}: {n} lines > {MAX_FILE_LINES}" for n in [len(text.splitlines())] if n > MAX_FILE_LINES]
    trainer = where.parent == Path("trainers")
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            limit = MAX_TRAINER_MAIN_LINES if trainer and node.name == "main" else MAX_FUNCTION_LINES
            if lines > limit:
                found.append(f"{where}:{node.lineno}: {node.name} is {lines} lines > {limit}")
    return found


def test_files_and_functions_stay_small():
    """No source file over 500 lines, no function over 60 (a trainer's `main` 80): over that, a concept is missing."""
    assert [line for path in SOURCES for line in size_violations(path)] == []


def _function(name: str, lines: int, indent: str = "") -> str:
    return f"{indent}def {name}():\n" + f"{indent}    x = 1\n" * (lines - 2) + f"{indent}    return x\n"


@pytest.mark.parametrize(
    "where,source,found",
    [
        ("adapters/m.py", _function("f", 60), []),
        ("adapters/m.py", _function("f", 61), ["adapters/m.py:1: f is 61 lines > 60"]),
        ("adapters/m.py", "class C:\n" + _function("f", 61, "    "), ["adapters/m.py:2: f is 61 lines > 60"]),
        ("trainers/lora.py", _function("main", 80), []),
        ("trainers/lora.py", _function("main", 81), ["trainers/lora.py:1: main is 81 lines > 80"]),
        ("trainers/core/loop.py", _function("main", 61), ["trainers/core/loop.py:1: main is 61 lines > 60"]),
        ("studio/m.py", "x = 1\n" * 500, []),
        ("studio/m.py", "x = 1\n" * 501, ["studio/m.py: 501 lines > 500"]),
    ],
)
def test_the_size_check_names_what_is_over(where, source, found, tmp_path):
    """The checker itself, on planted files: the limits are inclusive, and a trainer's larger limit is its `main`'s."""
    planted = tmp_path / where
    planted.parent.mkdir(parents=True)
    planted.write_text(source)
    assert size_violations(planted, tmp_path) == found
