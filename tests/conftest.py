"""Shared fixtures: the bundled toy base, an isolated sdtune cache and registry, and no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.adapters.base import TOY_BASE

# The tests never touch the Hub: a hub id must fail fast with sdtune's own message, never start a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own latent/hash cache instead of ~/.cache/sdtune."""
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "sdtune-cache"))


@pytest.fixture(scope="session", autouse=True)
def isolated_registry(tmp_path_factory):
    """Trainers register their runs: into the session's own registry, never the user's ~/.sdtune. Session-scoped
    so it is in place before any session fixture (a training run) starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDTUNE_HOME", str(tmp_path_factory.getbasetemp() / "sdtune-home"))
        yield


@pytest.fixture(scope="session")
def toy_base():
    assert (TOY_BASE / "model_index.json").is_file(), f"toy base missing at {TOY_BASE}"
    return TOY_BASE


@pytest.fixture(scope="session")
def toy_pipe(toy_base):
    """The toy base pipeline, fp32 on the CPU, loaded once per session (tests must not modify it)."""
    from sdtune.adapters import quiet_libraries
    from sdtune.adapters.base import load_pipeline

    quiet_libraries()
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def train_toy_lora(out: Path, cache: Path, *overrides: str) -> Path:
    """A short quickstart-style LoRA run on the toy base (no validation grids or scores); returns the run folder."""
    args = [
        str(QUICKSTART),
        f"output.dir={out}",
        "train.checkpointing_steps=100000",
        "validation.validation_steps=0",
        "validation.prompts=[]",
        "validation.toy_score=[]",
        "output.register=false",
        *overrides,
    ]
    env = {**os.environ, "SDTUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "trainers/lora.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def two_toy_loras(tmp_path_factory):
    """Two LoRAs teaching the toy base two different things, trained once per session: a colour it never saw
    (purple, on the quickstart data) and a shape it never saw (star, in the base's own colours)."""
    from sdtune.adapters import toyworld

    root = tmp_path_factory.mktemp("two-loras")
    star_data = root / "star-data"
    toyworld.write_dataset(star_data, 16, seed=1, colors=list(toyworld.BASE_COLORS), shapes=["star"])
    steps = os.environ.get("SDTUNE_TEST_LORA_STEPS", "150")
    purple = train_toy_lora(root / "purple", root / "cache", f"train.max_train_steps={steps}")
    star = train_toy_lora(
        root / "star",
        root / "cache",
        f"train.max_train_steps={steps}",
        f"data.train_data_dir={star_data}",
        "data.trigger_word=star",
        "output.name=toy-star",
    )
    return {"purple": purple, "star": star}
