"""The studio API's one error type and its one translator.

Below the API, each module raises its own typed error (`RecipeError`, `RegistryError`, `DatasetError`...), all
derived from `sdtune.adapters.errors.SdtuneError`. Every public function of the API goes through `translated`, so a
caller (the `sdtune` command, a page) catches one type, `StudioError`, and shows its one line. Anything else, a bug,
keeps its type and its traceback.
"""

from __future__ import annotations

import contextlib

from sdtune.adapters.errors import SdtuneError

# The file errors a user can fix: a path they gave is missing, or would be overwritten.
USER_ERRORS = (SdtuneError, FileNotFoundError, FileExistsError)


class StudioError(SdtuneError, ValueError):
    """Input the user can fix (a missing file, a bad base); the message is one line."""


class translated(contextlib.ContextDecorator):  # lower case, as contextlib.suppress: `with translated():`
    """Turns a user-fixable error raised inside into a `StudioError` with one line; lets every other error through.

    As a decorator on each public API function (`@translated()`), and as a context manager around a call that
    needs its own `retry` words. Only a `SdtuneError` or a file error is the user's: a plain `ValueError` from
    below is a bug (the module that meant it for a user raises its own `SdtuneError` class), so it keeps its type.

    Args:
        retry: how the caller's user tries again after an error that says so (the Hub's `NetworkFailure`), in the
            caller's words; None keeps the error's own.
    """

    def __init__(self, *, retry: str | None = None):
        self.retry = retry

    def __enter__(self) -> translated:
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or isinstance(exc, StudioError) or not isinstance(exc, USER_ERRORS):
            return False  # nothing raised, already one line (a ConfineError keeps its type), or a bug: unchanged
        raise StudioError(one_line(exc, self.retry)) from None

    def __call__(self, function):
        wrapped = super().__call__(function)
        wrapped.translates_errors = True  # tests/test_studio_api.py checks every public function has it
        return wrapped


def one_line(exc: BaseException, retry: str | None = None) -> str:
    """The message a user sees: the error's own line; an OS error names its file first (`x.png: No such file...`)."""
    if retry is not None and callable(getattr(exc, "message", None)):
        return exc.message(retry)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
