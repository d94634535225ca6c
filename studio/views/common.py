"""Helpers every page shares: one-line errors shown instead of tracebacks, and reading uploads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import streamlit as st

from sdtune.adapters.errors import SdtuneError


@contextlib.contextmanager
def shown_errors() -> Iterator[None]:
    """Turns a user-fixable error (any SdtuneError: StudioError, JobError, DatasetError...) into `st.error`, one
    line."""
    try:
        yield
    except SdtuneError as exc:
        st.error(str(exc))


def uploads(files) -> list[tuple[str, bytes]]:
    """(name, bytes) of Streamlit UploadedFiles."""
    return [(f.name, f.getvalue()) for f in files or []]


def flash(message: str, kind: str = "success"):
    """A message that survives the rerun an action triggers (shown once by `show_flash`)."""
    st.session_state["_flash"] = (kind, message)


def show_flash():
    kind, message = st.session_state.pop("_flash", (None, None))
    if message:
        getattr(st, kind)(message)
