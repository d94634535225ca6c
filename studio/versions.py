"""Installed package versions against the lock and against version ranges known to break sdtune.

`make` installs the exact versions in `requirements-lock.txt`; `sdtune doctor` shows where an environment strays
from it. Importing this module imports no torch: it reads package metadata only.

Usage (the set-up's last step):
    python -m sdtune.studio.versions --check requirements-lock.txt [--ignore torch]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

KEY_PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "bitsandbytes", "streamlit")
# The checkout's lock; absent when sdtune was installed from a wheel rather than used from its checkout.
REPO_LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"


@dataclass(frozen=True)
class KnownBreak:
    """A combination of installed versions that breaks sdtune: `package` in `versions` while `unless` is not met."""

    package: str
    versions: str
    unless: str
    why: str
    fix: str

    def hits(self, installed: dict[str, str]) -> bool:
        version = installed.get(canonicalize_name(self.package))
        if version is None or not Requirement(f"{self.package}{self.versions}").specifier.contains(version, True):
            return False
        other = Requirement(self.unless)
        other_version = installed.get(canonicalize_name(other.name))
        return other_version is None or not other.specifier.contains(other_version, True)


KNOWN_BREAKS = (
    KnownBreak(
        package="transformers",
        versions=">=5.24",
        unless="peft>=0.22",
        why="CLIPTextModel.add_adapter demands peft>=0.22, so every text-encoder LoRA fails",
        fix="pip install 'transformers<5.24'",
    ),
)


@dataclass(frozen=True)
class PackageLine:
    name: str
    installed: str | None
    locked: str | None
    problem: str = ""

    def format(self) -> str:
        installed = self.installed or "not installed"
        locked = f"lock {self.locked}" if self.locked else "not in lock"
        text = f"  {self.name:14s}{installed:18s}{locked}"
        return f"{text}  <- {self.problem}" if self.problem else text


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` lines of a pip constraints file, keyed by canonical name."""
    pins = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        pinned = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if len(pinned) != 1:
            raise ValueError(f"{path}:{number}: '{line}' is not an exact pin (name==version)")
        pins[canonicalize_name(requirement.name)] = pinned[0]
    return pins


def installed_versions(names) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[canonicalize_name(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def same_release(installed: str, locked: str) -> bool:
    """Equal public versions: a local label (`+cpu`, `+cu128`) is the same release built for another device."""
    return Version(installed).public == Version(locked).public


def package_report(installed: dict[str, str], locked: dict[str, str] | None, names=KEY_PACKAGES) -> list[PackageLine]:
    """One line per package: its installed and locked versions, and what is wrong with it, if anything."""
    broken = {canonicalize_name(b.package): b for b in KNOWN_BREAKS if b.hits(installed)}
    lines = []
    for name in names:
        key = canonicalize_name(name)
        have, want = installed.get(key), (locked or {}).get(key)
        if key in broken:
            problem = f"known broken: {broken[key].why} -> {broken[key].fix}"
        elif have is None:
            problem = "missing -> make setup (or pip install -c requirements-lock.txt -e .)"
        elif want and not same_release(have, want):
            problem = f"differs from the lock -> pip install '{name}=={want}' (or rm -rf .venv && make setup)"
        else:
            problem = ""
        lines.append(PackageLine(name, have, want, problem))
    return lines


def versions_section(lock_path: Path = REPO_LOCK) -> list[str]:
    """The `sdtune doctor` section: key packages against the lock (when the checkout has one) and known breaks."""
    locked = read_lock(lock_path) if lock_path.is_file() else None
    where = f"lock: {lock_path.name}" if locked else "no lock found (installed outside its checkout)"
    lines = package_report(installed_versions(KEY_PACKAGES), locked)
    return [f"Packages ({where}):", *(line.format() for line in lines)]


def check_against_lock(lock_path: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Problems of every locked package in this environment; empty when it is exactly the lock."""
    locked = read_lock(lock_path)
    names = [name for name in locked if name not in {canonicalize_name(i) for i in ignore}]
    return [line.format().strip() for line in package_report(installed_versions(names), locked, names) if line.problem]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check this environment's packages against a lock.")
    parser.add_argument("--check", type=Path, required=True, metavar="LOCK", help="requirements-lock.txt")
    parser.add_argument("--ignore", action="append", default=[], help="Package not held to the lock (repeatable).")
    args = parser.parse_args(argv)
    problems = check_against_lock(args.check, tuple(args.ignore))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
