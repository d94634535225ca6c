#!/usr/bin/env python3
"""Catch the next incompatible release before users do: the fast tests on the newest versions the registry serves.

Builds a throwaway venv with the newest release of every dependency in pyproject.toml (ignoring its upper bounds:
the point is to learn whether they can be lifted), runs the fast tests there, and for each failure finds which
upgraded package broke it by putting that one package back to its locked version and running the failures again.
Not part of CI: run it by hand or on a schedule (`make check-latest`); it exits 1 when anything broke.

torch stays at the CPU build 2.13.0: the newest `torch` on the registry is a multi-GB CUDA build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(freeze_text: str) -> dict[str, str]:
    found = {}
    for line in freeze_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonical(name)] = version
    return found


def direct_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]
    return [NAME.match(r).group(0) for r in requirements]


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=check)


def failing_tests(python: str, cache: Path, rerun: bool = False) -> list[str]:
    """Node ids of the failing and erroring tests: all fast tests, or with `rerun` only those `cache` last saw fail."""
    select = ["--last-failed", "--last-failed-no-failures", "none"] if rerun else []
    result = run(python, "-m", "pytest", "-q", "-rfE", "-o", f"cache_dir={cache}", *select, check=False)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    if result.returncode not in (0, 1, 5) and not failed:
        sys.exit(f"check-latest: pytest could not run (exit {result.returncode}):\n{result.stdout[-3000:]}")
    return sorted(set(failed))


def main() -> int:
    locked = pins(LOCK.read_text())
    with tempfile.TemporaryDirectory(prefix="sdtune-latest-") as work:
        python = str(Path(work) / "venv" / "bin" / "python")
        run(sys.executable, "-m", "venv", str(Path(work) / "venv"))
        pip = (python, "-m", "pip", "--quiet", "--disable-pip-version-check", "install")
        print("check-latest: installing the newest release of every dependency (torch: CPU 2.13.0) ...")
        run(*pip, "--upgrade", "pip", "setuptools", "wheel")
        run(*pip, "torch==2.13.0")
        run(*pip, "--no-deps", "-e", ".")
        run(*pip, "--upgrade", *[name for name in direct_dependencies() if canonical(name) != "torch"])
        newest = pins(run(python, "-m", "pip", "freeze", "--exclude", "sdtune").stdout)
        changed = {
            name: (locked.get(name, "-"), version) for name, version in newest.items() if locked.get(name) != version
        }
        print("check-latest: upgraded against the lock:")
        for name, (old, new) in sorted(changed.items()):
            print(f"  {name:28s} {old:>14s} -> {new}")

        cache = Path(work) / "pytest-cache"
        failed = failing_tests(python, cache)
        if not failed:
            print(f"check-latest: the fast tests pass on the newest versions ({len(changed)} upgraded).")
            return 0
        print(f"check-latest: {len(failed)} tests fail on the newest versions; finding which package broke what ...")

        blamed: dict[str, list[str]] = {}
        suspects = [n for n in map(canonical, direct_dependencies()) if n in changed and changed[n][0] != "-"]
        for name in suspects:
            old, new = changed[name]
            run(*pip, "--no-deps", f"{name}=={old}")
            shutil.copytree(
                cache, Path(work) / name, dirs_exist_ok=True
            )  # each rerun starts from the full failure set
            fixed = sorted(set(failed) - set(failing_tests(python, Path(work) / name, rerun=True)))
            run(*pip, "--no-deps", f"{name}=={new}")
            if fixed:
                blamed[f"{name} {old} -> {new}"] = fixed
        print("check-latest: which package broke what (putting it back to the locked version fixes these):")
        explained = set()
        for upgrade, tests in blamed.items():
            explained.update(tests)
            print(f"  {upgrade}: {len(tests)} tests, e.g. {', '.join(tests[:3])}")
        unexplained = sorted(set(failed) - explained)
        if unexplained:
            print(f"  no single package explains {len(unexplained)} tests, e.g. {', '.join(unexplained[:3])}")
        print("check-latest: keep the lock; add an upper bound with its reason in pyproject.toml for each culprit.")
        return 1


if __name__ == "__main__":
    sys.exit(main())
