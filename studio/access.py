"""Who may open the studio: a token, as Jupyter does it.

`sdtune studio` prints the studio's URL with its token (`http://127.0.0.1:8501/?token=...`). The token is random
(`secrets.token_urlsafe`, 256 bits), made at the first start and kept in `$SDTUNE_HOME/studio/token`, readable by
its owner only (0600), so a bookmarked URL keeps working across restarts; delete the file to make a new one. A file
that other accounts could read, or that another account owns, is replaced at the next start.

Why: the studio listens on 127.0.0.1, but every account of a shared machine can reach that address. Without the
token a page shows one line of refusal and nothing else: no page runs, so no widget exists and no action (train,
delete, publish) can be triggered. `--no-token` switches this off (with a loud warning); `--expose` refuses it.

Streamlit's own endpoints are outside the app script and so outside the token, and that is safe: `/_stcore/health`
and `/_stcore/host-config` tell nothing; `/_stcore/upload_file/<session>/<file>` keeps bytes in the memory of that
one browser session, and only a page's file uploader (which a refused session never renders) hands them to sdtune;
`/media/<id>` serves the images and downloads that admitted sessions rendered, under names that are hashes of their
content, which a visitor cannot list or guess.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from sdtune.adapters.atomic import write_private
from sdtune.adapters.workspace import sdtune_home

TOKEN_FILE = Path("studio") / "token"  # under $SDTUNE_HOME
NO_TOKEN_ENV = "SDTUNE_STUDIO_NO_TOKEN"  # "1": `sdtune studio --no-token` told the app to ask for no token
MIN_LENGTH = 32
REFUSAL = (
    "This studio needs its token: open the URL that `sdtune studio` printed (…/?token=…); the token is also in "
    "$SDTUNE_HOME/studio/token."
)


def token_path(home: str | Path | None = None) -> Path:
    return sdtune_home(home) / TOKEN_FILE


def studio_token(home: str | Path | None = None) -> str:
    """The studio's token: the one kept in `token_path()`, or a new one written there (0600) when there is none,
    or when the file is not private to this account (then the old token may have been read by someone else)."""
    path = token_path(home)
    for _ in range(2):  # a second pass reads the token another process wrote first
        kept = _private_token(path)
        if kept:
            return kept
        new = secrets.token_urlsafe(32)
        if write_private(path, new.encode(), replace=path.exists()):
            return new
    raise OSError(f"{path}: cannot read or create the studio's token; remove the file and start again")


def _private_token(path: Path) -> str | None:
    try:
        info = path.stat()
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    private = info.st_uid == os.getuid() and info.st_mode & 0o077 == 0
    return text if private and len(text) >= MIN_LENGTH else None


def token_required() -> bool:
    """False only when `sdtune studio --no-token` started the app."""
    return os.environ.get(NO_TOKEN_ENV) != "1"


def same_token(given: str | None, expected: str) -> bool:
    """A constant-time comparison: how long it takes says nothing about how much of the token was right."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
