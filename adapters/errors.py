"""The one base of every error a user can fix, so that a front end catches one type.

Each module keeps its own error class (`RecipeError`, `DataError`, `RegistryError`...), which names the concern in a
traceback and in a test; every one derives from `SdtuneError`. A front end (`trainers/core/runtime.run_cli`, the
`sdtune` command, the studio's pages) turns a `SdtuneError` into one line, and lets anything else, a bug, show its
traceback. Each class also keeps its built-in base (`ValueError`, `RuntimeError`, `FileNotFoundError`), so code
that caught those still does.
"""

from __future__ import annotations


class SdtuneError(Exception):
    """Input or a state the user can fix (a recipe key, a missing file, a diverged run); the message is one line
    that names the field or file and what to do."""


class NotFoundError(SdtuneError, FileNotFoundError):
    """A file or folder the user named is missing; the message names the option and what was expected there."""
