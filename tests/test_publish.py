"""Publishing to the Hub through huggingface_hub's real upload path, against a small local Hub that records what
arrives (HF_ENDPOINT=http://127.0.0.1:PORT): the files and the card, the dry-run folder equal to what is uploaded,
and one-line errors for no token, an existing repo, a private repo without permission, a leak, and a network failure
mid-upload that the next run resumes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sdtune.adapters import publish as pub
from sdtune.adapters.leaks import find_leaks
from sdtune.adapters.registry import Registry, copy_into

WRITE_TOKEN = "hf_" + "W" * 34  # token-shaped, so the leak scan would catch it anywhere it was written
PUBLIC_ONLY_TOKEN = "hf_" + "P" * 34  # may create public repos only


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


REGULAR_SUFFIXES = (".md", ".json", ".txt", ".yaml")  # text the Hub commits inline; everything else goes by LFS


class FakeHub:
    """Just enough of the Hub API for create_repo and upload_folder: repos/create, preupload, commit, repo info, and
    Git LFS (batch, upload, verify) for the binary files, as the Hub answers them.

    The Hub's newer Xet storage (chunked content-addressed uploads through `hf_xet`) is not faked: the `hub` fixture
    turns it off, so huggingface_hub takes its LFS path, as it does without `hf_xet`. sdtune calls `upload_folder`
    either way; which transfer carries the bytes is huggingface_hub's choice."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through the LFS batch API
        self.lfs_uploads: list[str] = []  # the oids PUT, in order
        self.requests: list[tuple[str, str]] = []
        self.commits: list[list[str]] = []  # the paths each successful commit carried
        self.drop_commits_with: str | None = None  # drop the connection of commits carrying this path...
        self.drops_left = 0  # ...this many times
        self.drop_uploads_of: str | None = None  # or drop the connection of LFS uploads of this oid
        self.auth_seen: set[str] = set()
        self.endpoint = ""
        self.validated: list[str] = []  # cards sent to /api/validate-yaml

    def handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, data: dict):
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _role(self):
                token = (self.headers.get("authorization") or "").removeprefix("Bearer ")
                hub.auth_seen.add(token)
                return {WRITE_TOKEN: "write", PUBLIC_ONLY_TOKEN: "public-only"}.get(token)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")  # api/models/NS/NAME[/revision/main]
                repo = "/".join(parts[2:4])
                if parts[:2] == ["api", "models"] and repo in hub.repos:
                    return self._reply(200, {"id": repo, "sha": "0" * 40, "private": hub.repos[repo]["private"]})
                self._reply(404, {"error": "Repository not found"})

            def do_PUT(self):  # LFS basic transfer: the object's bytes, to the href the batch answer gave
                hub.requests.append(("PUT", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                oid = self.path.rsplit("/", 1)[-1]
                if hub.drops_left and hub.drop_uploads_of == oid:
                    hub.drops_left -= 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 does not match the object id"})
                hub.lfs_objects[oid] = body
                hub.lfs_uploads.append(oid)
                self._reply(200, {})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/lfs-verify":
                    data = json.loads(body)
                    found = hub.lfs_objects.get(data["oid"])
                    ok = found is not None and len(found) == data["size"]
                    return self._reply(200 if ok else 404, {} if ok else {"error": "object not uploaded"})
                role = self._role()
                if role is None:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if path.endswith(".git/info/lfs/objects/batch"):
                    return self._lfs_batch(json.loads(body))
                if path == "/api/repos/create":
                    return self._create(json.loads(body), role)
                if path == "/api/validate-yaml":  # huggingface_hub checks a README's metadata before committing it
                    return self._validate(json.loads(body)["content"])
                parts = path.strip("/").split("/")  # api/models/NS/NAME/{preupload,commit}/main
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if parts[4] == "preupload":
                    return self._preupload(repo, json.loads(body))
                if parts[4] == "commit":
                    return self._commit(repo, body)
                self._reply(404, {"error": f"unknown endpoint {path}"})

            def _create(self, data, role):
                repo = f"{data['organization']}/{data['name']}"
                private = data.get("visibility") == "private" or data.get("private") is True
                if private and role != "write":
                    return self._reply(403, {"error": "You don't have the rights to create a private model here"})
                if repo in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": repo})
                hub.repos[repo] = {"private": private, "files": {}}
                self._reply(200, {"url": f"{hub.endpoint}/{repo}"})

            def _validate(self, card):
                hub.validated.append(card)
                try:
                    assert isinstance(yaml.safe_load(card.split("---\n")[1]), dict)
                except Exception as exc:
                    return self._reply(400, {"errors": [{"message": f"bad metadata: {exc}"}]})
                self._reply(200, {"warnings": []})

            def _preupload(self, repo, data):
                files = hub.repos[repo]["files"]

                def answer(path: str) -> dict:
                    regular = path.endswith(REGULAR_SUFFIXES)
                    known = files.get(path)
                    oid = (
                        None
                        if known is None
                        else git_blob_sha1(known)
                        if regular
                        else hashlib.sha256(known).hexdigest()
                    )
                    return {
                        "path": path,
                        "uploadMode": "regular" if regular else "lfs",
                        "shouldIgnore": False,
                        "oid": oid,
                    }

                self._reply(200, {"files": [answer(f["path"]) for f in data["files"]]})

            def _lfs_batch(self, data):
                assert data["operation"] == "upload" and data["hash_algo"] == "sha256"
                objects = []
                for obj in data["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs_objects:  # an object the Hub already has needs no upload
                        entry["actions"] = {
                            "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                            "verify": {"href": f"{hub.endpoint}/lfs-verify"},
                        }
                    objects.append(entry)
                self._reply(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo, body):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                inline = {x["value"]["path"]: x["value"] for x in lines if x["key"] == "file"}
                pointers = {x["value"]["path"]: x["value"] for x in lines if x["key"] == "lfsFile"}
                if hub.drops_left and hub.drop_commits_with in {**inline, **pointers}:
                    hub.drops_left -= 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # the network fails: no response at all
                    return
                if any(v["oid"] not in hub.lfs_objects for v in pointers.values()):
                    return self._reply(422, {"error": "an LFS pointer names an object that was never uploaded"})
                files = hub.repos[repo]["files"]
                files.update({path: base64.b64decode(v["content"]) for path, v in inline.items()})
                files.update({path: hub.lfs_objects[v["oid"]] for path, v in pointers.items()})
                hub.commits.append(sorted({**inline, **pointers}))
                oid = hashlib.sha1(body).hexdigest()
                url = f"{hub.endpoint}/{repo}/commit/{oid}"
                self._reply(200, {"commitUrl": url, "commitOid": oid, "success": True})

        return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub at HF_ENDPOINT, with a write token in HF_TOKEN and no `hf auth login` cache."""
    import huggingface_hub.constants as hf_constants

    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    fake.endpoint = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest keeps the suite offline; this is local
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # binary files by LFS, which FakeHub speaks
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-login" / "token"))
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # no backoff waits
    monkeypatch.setattr(pub, "RETRY_SECONDS", 0.0)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, quickstart_run):
    """A registry holding the quickstart's purple LoRA as `toy-purple`."""
    registry = Registry(tmp_path_factory.mktemp("publish-home"))
    registry.register_run(quickstart_run[0], name="toy-purple", unique=False)
    return registry


EXPECTED_FILES = {
    "README.md",
    "pytorch_lora_weights.safetensors",
    "toy-purple.safetensors",
    "images/00.png",
    "images/01.png",
    "images/02.png",
    "images/03.png",
    "images/ab_grid.png",
}


def _front_matter(card: str) -> dict:
    _, yaml_text, _ = card.split("---\n", 2)
    return yaml.safe_load(yaml_text)


def test_upload_sends_the_dry_run_folder(hub, registry, tmp_path):
    dry = tmp_path / "dry"
    pub.publish("toy-purple", "alice/toy-purple", pub.PublishOptions(dry_run=True, out_dir=dry), registry)
    assert hub.requests == []  # a dry run talks to nobody
    result = pub.publish("toy-purple", "alice/toy-purple", registry=registry)

    arrived = hub.repos["alice/toy-purple"]["files"]
    assert set(arrived) == EXPECTED_FILES == set(result["files"])
    for name, data in arrived.items():  # --dry-run wrote exactly what was uploaded, byte for byte
        assert (dry / name).read_bytes() == data, name
    assert hub.commits == [sorted(EXPECTED_FILES - {"README.md"}), ["README.md"]]  # the card last
    binary = {hashlib.sha256(data).hexdigest() for name, data in arrived.items() if name != "README.md"}
    assert set(hub.lfs_uploads) == binary  # weights and images by LFS, each object once; the card inline
    assert hub.repos["alice/toy-purple"]["private"] is False
    assert hub.auth_seen == {WRITE_TOKEN}

    card = arrived["README.md"].decode()
    assert set(hub.validated) == {card}  # huggingface_hub checks the metadata of the card it commits
    meta = _front_matter(card)
    assert meta["license"] == "creativeml-openrail-m" and "base_model" not in meta  # the toy base is not on the Hub
    assert {"lora", "stable-diffusion", "text-to-image", "diffusers"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "purple"
    assert [w["text"] for w in meta["widget"]] == ["a purple circle", "a purple square", "a purple triangle",
                                                   "a red circle"]  # fmt: skip
    assert all(w["output"]["url"] in arrived for w in meta["widget"])
    manifest = registry.manifest("toy-purple")
    assert manifest.dataset["fingerprint"] in card
    assert '"both"' in card and "<lora:toy-purple:1>" in card and 'load_lora_weights("alice/toy-purple"' in card
    assert "<local: quickstart-purple>" in card  # the recipe's data folder, without its path
    for data in arrived.values():  # the token is nowhere, in any file
        assert WRITE_TOKEN.encode() not in data
    assert registry.sidecar("toy-purple")["published"]["state"] == "done"


def test_a_controlnet_publishes_its_files_conditions_and_steered_widget_images(hub, registry, controlnet_short_run):
    """A ControlNet's repo: its diffusers folder and original-layout file, its validation conditions, and one widget
    image per (prompt, condition) pair, each what `sdtune sample` draws with that condition."""
    from sdtune.studio import api

    _, run, _, _ = controlnet_short_run
    registry.register_run(run, name="toy-masks", unique=False)
    result = pub.publish("toy-masks", "alice/toy-masks", registry=registry)
    arrived = hub.repos["alice/toy-masks"]["files"]
    assert set(arrived) == {
        "README.md", "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
        "toy-masks.safetensors", "images/ab_grid.png", "images/condition-0.png", "images/condition-1.png",
        "images/00.png", "images/01.png",
    } == set(result["files"])  # fmt: skip
    meta = _front_matter(arrived["README.md"].decode())
    assert "controlnet" in meta["tags"]
    assert meta["widget"] == [{"text": "a red circle", "output": {"url": f"images/{i:02d}.png"}} for i in range(2)]
    for i in range(2):  # the short run validates 2 steps at the toy's guidance; the widget renders the same way
        condition = registry.get("toy-masks").folder / f"samples/conditions/condition-{i}.png"
        assert arrived[f"images/condition-{i}.png"] == condition.read_bytes()
        [drawn] = api.sample_images(["a red circle"], registry.home / f"s{i}", steps=2, controlnets=[str(run)],
                                    control_images=[str(condition)])  # fmt: skip
        assert Image.open(io.BytesIO(arrived[f"images/{i:02d}.png"])).tobytes() == Image.open(drawn).tobytes()


def test_a_full_dreambooth_model_publishes_without_local_paths_and_loads(hub, registry, tmp_path):
    """A full fine-tune of a local base: diffusers' configs record the folder it was loaded from (`_name_or_path`);
    the published folder drops it, passes the leak scan, and what arrives loads as a pipeline and draws the widget
    image the card shows."""
    from conftest import ROOT, run_trainer

    from sdtune.adapters.base import load_pipeline
    from sdtune.adapters.sampling import SampleSettings, generate

    run = tmp_path / "db"
    args = [str(ROOT / "recipes" / "toy-dreambooth.yaml"), f"output.dir={run}", "train.max_train_steps=2",
            "method.with_prior_preservation=false", "validation.validation_steps=0", "validation.toy_score=[]",
            "output.register=false", "output.name=toy-db"]  # fmt: skip
    proc = run_trainer(args, tmp_path / "cache", script="trainers/dreambooth.py")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert str(ROOT) in (run / "diffusers" / "model_index.json").read_text()  # what diffusers wrote
    registry.register_run(run, name="toy-db", unique=False)
    pub.publish("toy-db", "alice/toy-db", registry=registry)
    arrived = hub.repos["alice/toy-db"]["files"]
    assert {"diffusers/model_index.json", "diffusers/unet/diffusion_pytorch_model.safetensors", "toy-db.safetensors",
            "pytorch_lora_weights.safetensors", "images/00.png"} <= set(arrived)  # fmt: skip
    downloaded = tmp_path / "downloaded"
    for name, data in arrived.items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    assert all(
        b"_name_or_path" not in arrived[n] for n in arrived if n.startswith("diffusers/") and n.endswith(".json")
    )
    pipe = load_pipeline(str(downloaded / "diffusers"))
    pipe.set_progress_bar_config(disable=True)
    meta = _front_matter(arrived["README.md"].decode())
    prompt = meta["widget"][0]["text"]
    [sample] = generate(pipe, [SampleSettings(prompt, 0, steps=25, guidance=3.0)])
    widget = Image.open(io.BytesIO(arrived["images/00.png"])).convert("RGB")
    assert sample.image.tobytes() == widget.tobytes()  # the card's image is what the published model draws


def test_existing_repo_is_refused_unless_update(hub, registry):
    hub.repos["alice/taken"] = {"private": False, "files": {"README.md": b"someone else's"}}
    with pytest.raises(pub.PublishError, match=r"alice/taken already exists on the Hub.*--update"):
        pub.publish("toy-purple", "alice/taken", registry=registry)
    assert hub.repos["alice/taken"]["files"] == {"README.md": b"someone else's"}
    with pytest.raises(pub.PublishError, match="already exists"):  # a refused publish is nothing to resume
        pub.publish("toy-purple", "alice/taken", registry=registry)
    pub.publish("toy-purple", "alice/taken", pub.PublishOptions(update=True), registry)
    assert set(hub.repos["alice/taken"]["files"]) == EXPECTED_FILES


def test_private_repo_without_permission(hub, registry, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PUBLIC_ONLY_TOKEN)
    with pytest.raises(pub.PublishError, match="may not create a private repo alice/secret.*write access"):
        pub.publish("toy-purple", "alice/secret", pub.PublishOptions(private=True), registry)
    assert "alice/secret" not in hub.repos
    pub.publish("toy-purple", "alice/secret", pub.PublishOptions(private=True, token=WRITE_TOKEN), registry)
    assert hub.repos["alice/secret"]["private"] is True


def test_no_token(hub, registry, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(pub.PublishError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        pub.publish("toy-purple", "alice/x", registry=registry)
    assert hub.requests == []


def test_bad_token(hub, registry):
    with pytest.raises(pub.PublishError, match="rejected the token"):
        pub.publish("toy-purple", "alice/x", pub.PublishOptions(token="hf_" + "Z" * 34), registry)


def test_network_failure_mid_upload_then_resume(hub, registry):
    """The card's commit loses its connection more often than huggingface_hub retries: the publish fails with a
    one-line error after the weights are in; running it again sends only what is missing."""
    hub.drop_commits_with, hub.drops_left = "README.md", 50
    with pytest.raises(pub.PublishError, match="network failure while uploading to alice/flaky.*run the same command"):
        pub.publish("toy-purple", "alice/flaky", registry=registry)
    assert set(hub.repos["alice/flaky"]["files"]) == EXPECTED_FILES - {"README.md"}
    assert registry.sidecar("toy-purple")["published"] == {"repo": "alice/flaky", "state": "started"}

    hub.drops_left = 0
    commits_before = len(hub.commits)
    pub.publish("toy-purple", "alice/flaky", registry=registry)  # no --update: it resumes its own upload
    assert hub.commits[commits_before:] == [["README.md"]]
    assert set(hub.repos["alice/flaky"]["files"]) == EXPECTED_FILES


def test_network_failure_during_an_lfs_upload_then_resume(hub, registry):
    """The weights' LFS upload keeps losing its connection: the publish fails with nothing committed; run again, it
    uploads only the objects the Hub does not have yet, then commits everything."""
    weights = hashlib.sha256(registry.file("toy-purple", "peft").read_bytes()).hexdigest()
    hub.drop_uploads_of, hub.drops_left = weights, 50
    with pytest.raises(pub.PublishError, match="network failure while uploading to alice/lfs-flaky"):
        pub.publish("toy-purple", "alice/lfs-flaky", registry=registry)
    assert hub.repos["alice/lfs-flaky"]["files"] == {} and weights not in hub.lfs_objects
    arrived_before = set(hub.lfs_uploads)

    hub.drops_left = 0
    count = len(hub.lfs_uploads)
    pub.publish("toy-purple", "alice/lfs-flaky", registry=registry)
    resent = hub.lfs_uploads[count:]
    assert weights in resent and not arrived_before & set(resent)
    assert set(hub.repos["alice/lfs-flaky"]["files"]) == EXPECTED_FILES


def test_a_dropped_connection_is_retried_within_one_publish(hub, registry):
    """Two dropped commits (huggingface_hub does not resend a commit): the publish tries again and gets through."""
    hub.drop_commits_with, hub.drops_left = "pytorch_lora_weights.safetensors", pub.UPLOAD_ATTEMPTS - 1
    pub.publish("toy-purple", "alice/retry", registry=registry)
    assert hub.drops_left == 0 and set(hub.repos["alice/retry"]["files"]) == EXPECTED_FILES


def _registered_variant(registry, name: str, **changes) -> str:
    """A copy of toy-purple whose manifest carries `changes` (e.g. a leaked path)."""

    def fill(staging: Path):
        manifest = registry.manifest("toy-purple")
        folder = registry.get("toy-purple").folder
        for file in [*manifest.files.values(), *manifest.samples.values()]:
            copy_into(folder / file, staging / file)
        for key, value in changes.items():
            setattr(manifest, key, value)
        return manifest

    if name not in registry:
        registry.add(name, fill)
    return name


@pytest.mark.parametrize(
    "changes, leak",
    [
        ({"trigger_words": ["/home/alice/photos/me"]}, "/home/alice/photos/me"),
        ({"trigger_words": ["hf_" + "k" * 30]}, "token-shaped"),
        ({"trigger_words": ["C:\\Users\\alice\\lora"]}, "'C:"),
    ],
)
def test_a_leak_refuses_the_publish(hub, registry, changes, leak, tmp_path):
    name = _registered_variant(registry, "leaky-" + hashlib.sha1(str(changes).encode()).hexdigest()[:8], **changes)
    with pytest.raises(pub.PublishError, match=f"README.md contains .*{leak}.*refusing to publish"):
        pub.publish(name, "alice/leaky", registry=registry)
    assert hub.requests == []
    with pytest.raises(pub.PublishError, match="refusing to publish"):
        pub.preview(name, "alice/leaky", registry=registry)


@pytest.mark.parametrize(
    "text, leaks",
    [
        ("see https://huggingface.co/alice/x and images/00.png", []),
        ("trained from /home/bob/data", ["/home/bob/data"]),
        ('"dir": "/tmp/run/checkpoints"', ["/tmp/run/checkpoints"]),
        ("weights at ~/models/x.safetensors", ["~/models/x.safetensors"]),
        ("file:///srv/x", ["file:///srv/x"]),
        ("token hf_abcdefghijklmnopqrstuvwxyz0123", ["a token-shaped string hf_ab..."]),
        ("key sk-abcdefghijklmnopqrstuvwx", ["a token-shaped string sk-ab..."]),
        ("<local: quickstart-purple> and a/b/c relative", []),
    ],
)
def test_find_leaks(text, leaks):
    assert find_leaks(text) == leaks


def test_cli_publish_in_a_new_process(hub, registry, tmp_path):
    """`sdtune publish` as a user runs it: HF_ENDPOINT and HF_TOKEN from the environment."""
    import os

    env = {**os.environ, "SDTUNE_HOME": str(registry.home), "HF_HUB_OFFLINE": "0",
           "HF_TOKEN_PATH": str(tmp_path / "none"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
    cli = [sys.executable, "-m", "sdtune.studio.cli", "publish", "toy-purple"]
    proc = subprocess.run([*cli, "--repo", "alice/cli", "--dry-run"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "instance_prompt: purple" in proc.stdout and "images/00.png" in proc.stdout and hub.requests == []
    proc = subprocess.run([*cli, "--repo", "alice/cli"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "published toy-purple to" in proc.stdout
    assert set(hub.repos["alice/cli"]["files"]) == EXPECTED_FILES
    assert WRITE_TOKEN not in proc.stdout + proc.stderr
