"""Publishing a registered adapter to the Hugging Face Hub: a model card, both LoRA formats (or the ControlNet / full
model files), sample images, through `huggingface_hub` (`create_repo`, `upload_folder`).

The repo folder is built locally first (`--dry-run DIR` stops there and leaves it for inspection):

    README.md                          the model card: YAML metadata (base_model, license, tags, instance_prompt,
                                       widget), trigger words, usage for diffusers and A1111/ComfyUI, the recipe,
                                       the dataset fingerprint, the scores
    pytorch_lora_weights.safetensors   diffusers/PEFT (what `load_lora_weights` reads)
    <name>.safetensors                 kohya/A1111 (AUTOMATIC1111/Forge models/Lora, ComfyUI models/loras)
    images/NN.png                      the widget samples, rendered now (seed 0 per prompt), and the run's grids
                                       (a ControlNet: its validation conditions too, images/condition-N.png)

Before anything is uploaded, every text in the folder (the card, JSON, PNG text chunks, safetensors metadata) is
scanned: a local absolute path or anything token-shaped refuses the publish. The recipe and dataset sections are
written with local paths replaced by `<local: name>`, so the scan only catches what slipped through.

Upload order: weights and images in one commit, the card in a second, so a repo never shows a card whose files are
missing. An upload cut off midway is resumed by running the same command again: the Hub reports the files it
already holds (same content hash) and only the rest is sent. The token comes from `token=`, `HF_TOKEN` or the
`hf auth login` cache, and is only ever handed to `huggingface_hub`: it is never written to a file, log or card.
`HF_ENDPOINT` (read at call time) points the upload at another Hub, e.g. a local test server.

The card is `model_card.py`; what counts as a leak, and the redaction, `leaks.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.errors import SdtuneError
from sdtune.adapters.leaks import drop_local_origins, first_leak
from sdtune.adapters.manifest import LYCORIS_KINDS, adapter_kind, control_pairs
from sdtune.adapters.model_card import WIDGET_IMAGES, card_text, widget_prompts

CARD = "README.md"
IMAGES = "images"
DEFAULT_LICENSE = "creativeml-openrail-m"  # Stable Diffusion v1-5's license, which adapters of it inherit
STATE_KEY = "published"  # registry.json sidecar: where this adapter was published, and whether it finished


class PublishError(SdtuneError, ValueError):
    """A publish that cannot go ahead (no token, repo exists, a leak found, the network failed); one line."""


class NetworkFailure(PublishError):
    """The connection to the Hub failed or dropped: trying again may get through. The message says how to try again
    in the CLI's words; a front end with other words (the studio's button) asks for `message(retry)`."""

    def __init__(self, repo: str, cause: str, retry: str = "run the same command again"):
        self.repo, self.cause = repo, cause
        super().__init__(self.message(retry))

    def message(self, retry: str) -> str:
        return (
            f"network failure while uploading to {self.repo} ({self.cause}); {retry} to resume: files already on "
            "the Hub are not sent again"
        )


@dataclass
class RepoFolder:
    """The folder as it will appear on the Hub, and its card."""

    folder: Path
    card: str
    files: list[str]
    widget: list[dict]


def scan_folder(folder: Path, secrets: tuple[str, ...] = ()) -> None:
    """Raises PublishError naming the file and what leaked, for the first file that would publish a local path or a
    token."""
    leak = first_leak(folder, secrets)
    if leak is not None:
        path, what = leak
        raise PublishError(
            f"{path} contains {what!r}: refusing to publish a local path or a token; remove it from the adapter's "
            "metadata (or rename the run) and try again"
        )


# -- the repo folder ------------------------------------------------------------------------------------------------


def build_repo_folder(
    name: str,
    repo: str,
    out: Path,
    *,
    registry=None,
    license: str = DEFAULT_LICENSE,
    render: bool = True,
    secrets: tuple[str, ...] = (),
) -> RepoFolder:
    """Writes the exact repo folder of adapter `name` into `out` (an empty or new folder). `render=False` plans the
    widget images without rendering them (a preview: the card is the same, the images are missing)."""
    from sdtune.adapters.registry import Registry, copy_into

    registry = registry or Registry()
    manifest = registry.manifest(name)
    folder = registry.get(name).folder
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise PublishError(f"--dry-run {out}: the folder is not empty; give a new or empty folder")
    files = {fmt: file for fmt, file in manifest.files.items()}
    for file in files.values():
        copy_into(folder / file, out / file)
    drop_local_origins(out)
    prompts = widget_prompts(manifest)
    if manifest.method == "controlnet":  # each widget image needs its condition: as many as the run kept
        prompts = [prompt for prompt, _ in control_pairs(manifest)[:WIDGET_IMAGES]]
    widget = [{"text": p, "output": {"url": f"{IMAGES}/{i:02d}.png"}} for i, p in enumerate(prompts)]
    for label, grid in manifest.samples.items():
        if (folder / grid).is_file():
            copy_into(folder / grid, out / IMAGES / f"{label}.png")
    card = card_text(manifest, repo, files, widget, license)
    (out / CARD).write_text(card)
    if render:
        scan_folder(out, secrets)  # a leak fails before minutes of rendering
        if prompts:  # none: a ControlNet registered without its validation conditions (before sdtune kept them)
            render_widget(manifest, folder, prompts, out / IMAGES)
    listed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    if not render:
        listed = sorted({*listed, *(w["output"]["url"] for w in widget)})
    return RepoFolder(out, card, listed, widget)


_RENDERED: dict[tuple, list[bytes]] = {}  # widget PNGs already rendered in this process (a retry, a preview)


def render_widget(manifest, folder: Path, prompts: list[str], out: Path) -> None:
    """One image per prompt (seed 0) with the adapter at weight 1 (a ControlNet at its training scale, steered by
    the condition each prompt was validated with), at the recipe's sampling settings. The PNGs are kept for this
    process, so a retry after a failed upload sends the same bytes without rendering again."""
    import io
    from dataclasses import replace

    from sdtune.adapters.ab import ControlUse, Renderer, Settings, Side
    from sdtune.adapters.compose import AdapterUse, PipelineSpec

    validation = manifest.recipe.get("validation") or {}
    settings = Settings(
        prompts, [0], steps=validation.get("num_inference_steps", 25), guidance=validation.get("guidance_scale")
    )
    renderer = Renderer()
    if manifest.method == "controlnet":  # each prompt steered by the condition it was validated with
        scale = (manifest.recipe.get("method") or {}).get("conditioning_scale", 1.0)
        base = PipelineSpec(manifest.base.name_or_path)
        sides = [Side(base, [ControlUse(str(folder), scale, str(folder / condition))])
                 for _, condition in control_pairs(manifest)[: len(prompts)]]  # fmt: skip
        each = [(side, replace(settings, prompts=[prompt])) for side, prompt in zip(sides, prompts)]
    elif "diffusers" in manifest.files:  # a full fine-tune (its extracted LoRA aside): it is the base
        each = [(Side(PipelineSpec(str(folder / manifest.files["diffusers"]))), settings)]
    else:  # a LoRA and/or an embedding (textual inversion; a pivotal-tuning LoRA has both); a LoHa/LoKr renders
        # from its folder: compose loads its LyCORIS file as the LoRA of the same update
        lycoris = adapter_kind(manifest) in LYCORIS_KINDS
        peft = [AdapterUse(str(folder / manifest.files["peft"]))] if "peft" in manifest.files else []
        loras = [AdapterUse(str(folder))] if lycoris else peft
        embeddings = [str(folder / manifest.files["embedding"])] if "embedding" in manifest.files else []
        spec = PipelineSpec(manifest.base.name_or_path, loras, embeddings=embeddings)
        each = [(Side(spec), settings)]
    key = (str(folder), (folder / "adapter.json").stat().st_mtime_ns, repr(settings))
    if key not in _RENDERED:
        pngs = []
        for sample in [sample for side, some in each for sample in renderer.render(side, some)]:
            buffer = io.BytesIO()
            sample.image.save(buffer, format="PNG")  # no PNG text: the parameters may name local paths
            pngs.append(buffer.getvalue())
        _RENDERED[key] = pngs
    out.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(_RENDERED[key]):
        (out / f"{i:02d}.png").write_bytes(png)


# -- uploading ----------------------------------------------------------------------------------------------------


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    return token


def _hub_error(exc, repo: str, private: bool) -> PublishError:
    """huggingface_hub's HTTP errors as one line that says what to do."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    server = (getattr(exc, "server_message", None) or "").strip().splitlines()
    detail = f" (the Hub said: {server[0]})" if server else ""
    if status == 401:
        return PublishError(f"the Hub rejected the token{detail}: run `hf auth login` again or check HF_TOKEN")
    if status == 403:
        kind = "a private repo" if private else "a repo"
        return PublishError(
            f"the token may not create {kind} {repo}{detail}: use a token with write access to that namespace"
            + (" that may create private repos" if private else "")
        )
    if status == 409:
        return PublishError(
            f"{repo} already exists on the Hub{detail}: choose another --repo, or pass --update to upload into it"
        )
    return PublishError(f"upload to {repo} failed{detail}: {type(exc).__name__} {status or ''}".strip())


def _network_error(exc, repo: str) -> NetworkFailure:
    return NetworkFailure(repo, type(exc).__name__)


def _is_network_error(exc: BaseException) -> bool:
    """A connection that failed or dropped: OSError, or the HTTP client's transport errors (httpx's TransportError,
    which huggingface_hub raises once its own retries are spent), matched by name to avoid importing the client."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "NetworkError", "TimeoutException"})


def _chain(exc: BaseException):
    """`exc` and what it was raised from: huggingface_hub wraps a failed LFS upload in a RuntimeError ("Error
    while uploading 'x' to the Hub.") whose cause is the HTTP or network error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _hub(repo: str, private: bool, function, /, *args, **kwargs):
    """Runs one huggingface_hub call; its HTTP and network errors become one-line `PublishError`s."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return function(*args, **kwargs)
    except Exception as exc:
        for cause in _chain(exc):
            if isinstance(cause, HfHubHTTPError):
                raise _hub_error(cause, repo, private) from None
            if _is_network_error(cause):
                raise _network_error(cause, repo) from None
        raise


UPLOAD_ATTEMPTS = 3  # per upload_folder call, on network failures only
RETRY_SECONDS = 2.0  # before the second attempt; doubled before each next one


def _upload_folder_retrying(api, repo: str, private: bool, **kwargs):
    """`upload_folder`, run again after a network failure. Safe to repeat: huggingface_hub asks the Hub which files
    it already has (and which LFS objects) and sends only the rest. It retries its own requests, but not a commit
    whose connection dropped (a commit is not idempotent to it), so without this one dropped commit fails a publish."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            return _hub(repo, private, api.upload_folder, repo_id=repo, **kwargs)
        except NetworkFailure:
            if attempt == UPLOAD_ATTEMPTS:
                raise
            time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))


def upload(folder: Path, repo: str, *, token: str, private: bool, exist_ok: bool, on_created=None) -> dict:
    """create_repo, then upload_folder twice: weights and images, then the card. Returns {url, commit}.
    `on_created()` runs once the repo exists (the publish is noted as started then, so a retry resumes it)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    message = "Upload with sdtune"
    url = _hub(repo, private, api.create_repo, repo, private=private, exist_ok=exist_ok)
    if on_created is not None:
        on_created()
    for patterns in ({"ignore_patterns": [CARD]}, {"allow_patterns": [CARD]}):
        commit = _upload_folder_retrying(api, repo, private, folder_path=folder, commit_message=message, **patterns)
    return {"url": str(url), "commit": getattr(commit, "commit_url", None)}


@dataclass
class PublishOptions:
    """How to publish: the repo's visibility, a dry run into a folder, the token, whether an existing repo is ok."""

    private: bool = False  # create the repo private
    dry_run: bool = False  # build and scan the folder, upload nothing
    out_dir: str | Path | None = None  # dry run: keep the folder here (must be new or empty)
    token: str | None = None  # None: HF_TOKEN, then the `hf auth login` cache
    update: bool = False  # upload into a repo that already exists
    license: str = DEFAULT_LICENSE


def publish(name: str, repo: str, options: PublishOptions | None = None, registry=None) -> dict:
    """Builds the repo folder of adapter `name`, scans it, and (unless `options.dry_run`) uploads it to `repo`.

    A repo that exists is refused unless `options.update`, or unless an earlier publish of this adapter to the same
    repo did not finish (then this call resumes it). Returns {repo, folder, files, card, url, commit, dry_run}.
    """
    from sdtune.adapters.registry import Registry

    _check_repo_id(repo)
    registry = registry or Registry()
    o = options or PublishOptions()
    state = registry.sidecar(name).get(STATE_KEY, {})
    token = None if o.dry_run else resolve_token(o.token)
    keep = o.dry_run and o.out_dir is not None
    out = Path(o.out_dir) if keep else Path(tempfile.mkdtemp(prefix="sdtune-publish-"))
    try:
        secrets = (token,) if token else ()
        built = build_repo_folder(name, repo, out, registry=registry, license=o.license, secrets=secrets)
        scan_folder(out, secrets)
        result = {"repo": repo, "folder": str(out) if keep else None, "files": built.files, "card": built.card,
                  "url": None, "commit": None, "dry_run": o.dry_run}  # fmt: skip
        if o.dry_run:
            return result
        resuming = state.get("repo") == repo and state.get("state") == "started"
        started = {"repo": repo, "state": "started"}
        result.update(
            upload(out, repo, token=token, private=o.private, exist_ok=o.update or resuming,
                   on_created=lambda: registry.annotate(name, STATE_KEY, started))
        )  # fmt: skip
        registry.annotate(name, STATE_KEY, {"repo": repo, "state": "done", "commit": result["commit"]})
        return result
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def preview(name: str, repo: str, *, license: str = DEFAULT_LICENSE, registry=None) -> dict:
    """The card and file list `publish` would upload, without rendering or uploading: {repo, card, files}."""
    _check_repo_id(repo)
    with tempfile.TemporaryDirectory(prefix="sdtune-preview-") as tmp:
        built = build_repo_folder(name, repo, Path(tmp), registry=registry, license=license, render=False)
        scan_folder(Path(tmp))
        return {"repo": repo, "card": built.card, "files": built.files}


def _check_repo_id(repo: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", repo or ""):
        raise PublishError(f"--repo {repo!r}: give USER/NAME (or ORG/NAME), e.g. alice/toy-purple-lora")
