"""Keeping local paths and secrets out of what is published: find them in text and files, and write them out of
JSON data (`<local: name>`) and of diffusers' model configs.

Every text of a repo folder is scanned before anything is uploaded (the card, JSON, PNG text chunks, safetensors
metadata): a local absolute path or anything token-shaped refuses the publish (`publish.scan_folder`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

# Token shapes of the services a user is likely to hold: Hugging Face, GitHub, OpenAI-style, Slack, AWS keys.
TOKEN_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)
# An absolute path: /a/b at a word start (not the // of a URL), ~/..., or C:\... ; file:// URLs too.
PATH_PATTERNS = (
    re.compile(r"(?:^|[\s\"'(\[=,;])(/[A-Za-z0-9._-]+/[^\s\"'<>]*)"),
    re.compile(r"(?:^|[\s\"'(\[=,;])(~/[^\s\"'<>]+)"),
    re.compile(r"\b([A-Za-z]:\\[^\s\"'<>]+)"),
    re.compile(r"(file://[^\s\"'<>]+)"),
)


def redact_paths(value, key: str = ""):
    """A copy of plain JSON data with every local path (absolute, ~, or existing on disk) as `<local: name>`."""
    if isinstance(value, dict):
        return {k: redact_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_paths(v, key) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return f"<local: {Path(value).name}>"
    return value


def drop_local_origins(folder: Path) -> list[Path]:
    """Removes diffusers' `_name_or_path` from the model configs under `folder` (model_index.json, each component's
    config.json) where it is a local path: `save_pretrained` records the folder a model was loaded from, and a
    full fine-tune of a local base would publish it. A Hub id stays. Returns the files changed."""
    changed = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and _is_local_path(str(data.get("_name_or_path", ""))):
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            changed.append(path)
    return changed


def _is_local_path(text: str) -> bool:
    if not text or "\n" in text or len(text) > 4096:
        return False
    if text.startswith(("/", "~", "./", "../", "file://")) or re.match(r"^[A-Za-z]:\\", text):
        return True
    return ("/" in text or os.sep in text) and Path(text).exists()


def find_leaks(text: str, secrets: tuple[str, ...] = ()) -> list[str]:
    """What in `text` must not be published: local absolute paths, this machine's home or working folder, token-
    shaped strings, and the given secrets (shown shortened, never in full)."""
    found = [m.group(1) for pattern in PATH_PATTERNS for m in pattern.finditer(text)]
    found += [p for p in {str(Path.home()), os.getcwd()} if len(p) > 1 and p in text]
    tokens = [m.group(0) for pattern in TOKEN_PATTERNS for m in pattern.finditer(text)]
    tokens += [s for s in secrets if s and s in text]
    return found + [f"a token-shaped string {t[:5]}..." for t in tokens]


def _texts(path: Path) -> list[str]:
    """The readable text of a file: all of a text file, a PNG's text chunks, a safetensors file's JSON header."""
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            return [str(v) for v in getattr(image, "text", {}).values()]
    if path.suffix == ".safetensors":
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            return [handle.read(min(size, 100_000_000)).decode("utf-8", "replace")]
    if path.suffix in (".md", ".json", ".txt", ".yaml", ".yml"):
        return [path.read_text(errors="replace")]
    return []


def first_leak(folder: Path, secrets: tuple[str, ...] = ()) -> tuple[Path, str] | None:
    """(relative file, what leaked) for the first file under `folder` that would publish a local path or a token."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        for text in _texts(path):
            leaks = find_leaks(text, secrets)
            if leaks:
                return path.relative_to(folder), leaks[0]
    return None
