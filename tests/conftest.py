"""Shared fixtures: the bundled toy base, an isolated sdtune cache and registry, and no network."""

from __future__ import annotations

import os

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
