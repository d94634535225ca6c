"""Building the sdtune wheel: quiet, and with the bundled data (the toy base, the SD v1-5 configs) inside.

`make setup` once printed ~600 lines of setuptools warnings, one block per data folder, from the package
configuration in pyproject.toml; a real warning drowns in those.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_without_setuptools_warnings_and_ships_the_data(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("adapters", "trainers", "studio"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert not warnings, "\n".join(warnings)
    [wheel] = (tmp_path / "dist").glob("sdtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("toy_base/unet/diffusion_pytorch_model.safetensors", "sd15_config/unet/config.json"):
        assert f"sdtune/adapters/{data}" in names
    assert "sdtune/studio/api/__init__.py" in names and "sdtune/studio/api/errors.py" in names  # a subpackage


ENTRY_POINTS = {
    "sdtune": "from sdtune.studio.cli import main; main(['jobs', 'list'])",
    "a trainer": "from sdtune.trainers.core.runtime import run_cli; run_cli(lambda argv: 0)",
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_an_entry_point_freezes_the_heap_at_exit_instead_of_collecting_it(entry, tmp_path):
    """The last garbage collection over torch's, diffusers' and peft's objects cost ~2 s per process (see
    `skip_the_final_collection`); an exit hook registered before the entry point runs after its freeze."""
    probe = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
    proc = subprocess.run(
        [sys.executable, "-c", probe + ENTRY_POINTS[entry]],
        capture_output=True, text=True, env={**os.environ, "SDTUNE_HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("frozen True"), proc.stdout
