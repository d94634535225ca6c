"""The lock and pyproject.toml never drift apart, and `sdtune doctor` flags strays and known-broken combinations."""

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sdtune.studio import versions

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the set-up's Python

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for reqs in project.get("optional-dependencies", {}).values() for req in reqs]
    return [Requirement(req) for req in project["dependencies"] + extras]


@pytest.mark.parametrize("requirement", _pyproject_requirements(), ids=lambda r: r.name)
def test_lock_satisfies_pyproject_range(requirement):
    locked = versions.read_lock(LOCK)
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement.name} is in pyproject.toml but not in the lock: run .ci/lock"
    assert requirement.specifier.contains(locked[name], prereleases=True), (
        f"lock pins {requirement.name}=={locked[name]}, outside pyproject's '{requirement}': run .ci/lock"
    )


def test_lock_holds_no_known_broken_combination():
    locked = versions.read_lock(LOCK)
    assert [b.why for b in versions.KNOWN_BREAKS if b.hits(locked)] == []


def test_lock_pins_the_cpu_torch_of_the_setup():
    assert versions.read_lock(LOCK)["torch"].startswith("2.13.0")


def test_read_lock_refuses_a_range(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nnumpy==2.0.0\npeft>=0.17\n")
    with pytest.raises(ValueError, match=r"lock.txt:3: 'peft>=0.17' is not an exact pin"):
        versions.read_lock(lock)


LOCKED = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2", "diffusers": "0.42.1"}


@pytest.mark.parametrize(
    ("installed", "package", "problem"),
    [
        (LOCKED, "transformers", ""),
        ({**LOCKED, "torch": "2.13.0+cu128"}, "torch", ""),  # the same release built for CUDA
        ({**LOCKED, "torch": "2.13.0"}, "torch", ""),
        ({**LOCKED, "torch": "2.14.0"}, "torch", "differs from the lock -> pip install 'torch==2.13.0+cpu'"),
        ({**LOCKED, "diffusers": "0.43.0"}, "diffusers", "differs from the lock"),
        ({**LOCKED, "transformers": "5.24.0"}, "transformers", "known broken: CLIPTextModel.add_adapter"),
        ({**LOCKED, "transformers": "5.24.0", "peft": "0.22.0"}, "transformers", "differs from the lock"),
        ({k: v for k, v in LOCKED.items() if k != "peft"}, "peft", "missing -> make setup"),
    ],
)
def test_package_report_flags_what_strays(installed, package, problem):
    lines = {line.name: line for line in versions.package_report(installed, LOCKED, names=LOCKED)}
    if problem:
        assert problem in lines[package].problem
        assert "->" in lines[package].format(), "each flag says what to do"
    else:
        assert lines[package].problem == ""


def test_known_break_holds_without_a_lock():
    lines = versions.package_report({"transformers": "5.24.0", "peft": "0.21.2"}, None, names=["transformers"])
    assert "pip install 'transformers<5.24'" in lines[0].problem


def test_check_command_passes_on_the_set_up_venv_and_fails_on_a_stray_lock(tmp_path):
    check = [sys.executable, "-m", "sdtune.studio.versions", "--check"]
    ok = subprocess.run([*check, str(LOCK), "--ignore", "torch"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    stray = tmp_path / "lock.txt"
    stray.write_text(LOCK.read_text().replace("peft==", "peft==0.0.1\n# was peft=="))
    bad = subprocess.run([*check, str(stray)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "peft" in bad.stderr and "differs from the lock -> pip install 'peft==0.0.1'" in bad.stderr
