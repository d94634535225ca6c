"""Publishing a registered adapter to the Hugging Face Hub, or previewing what would be uploaded."""

from __future__ import annotations

from pathlib import Path

from sdtune.studio.api.errors import translated
from sdtune.studio.api.registry import open_registry


@translated()
def publish_preview(name: str, repo: str, *, private: bool = False, license: str | None = None) -> dict:
    """What `publish` would upload, without rendering or uploading: {repo, private, card, files}."""
    from sdtune.adapters import publish as pub

    preview = pub.preview(name, repo, license=license or pub.DEFAULT_LICENSE, registry=open_registry())
    return {**preview, "private": private}


@translated()
def publish(
    name: str,
    repo: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    out_dir: str | Path | None = None,
    token: str | None = None,
    update: bool = False,
    license: str | None = None,
    retry: str | None = None,
) -> dict:
    """Publishes a registered adapter to the Hub repo `repo` (USER/NAME): model card, both LoRA formats (or the
    ControlNet / full model files) and sample images; `dry_run` writes the exact repo folder into `out_dir` instead.
    The token comes from `token`, HF_TOKEN or `hf auth login`, and is never written anywhere. An existing repo is
    refused unless `update` (or this adapter's unfinished publish to it is being resumed). `retry`: how the caller's
    user tries again after a network failure, in its words (default: the CLI's "run the same command again").
    Returns {repo, folder, files, card, url, commit, dry_run}."""
    from sdtune.adapters import publish as pub

    options = pub.PublishOptions(private, dry_run, out_dir, token, update, license or pub.DEFAULT_LICENSE)
    with translated(retry=retry):  # a network failure says how to try again in the caller's words
        return pub.publish(name, repo, options, open_registry())
