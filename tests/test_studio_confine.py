"""Where the studio's jobs and imports may read and write (studio/confine.py): the recipe keys that name local paths
come from the schema; `..` and symlinks cannot lead out; the CLI is not confined; an import by path tells nothing
about places outside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel

from sdtune.adapters.base import LocalPath, PathText
from sdtune.studio import api, confine, jobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(confine.ALLOWED_ENV, raising=False)
    monkeypatch.chdir(ROOT)  # as the studio runs: the templates' data paths are relative to the repository
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_the_path_keys_come_from_the_schema():
    keys = confine.path_keys()
    assert {k for k, writes in keys.items() if writes} == {"output.dir", "data.cache_dir"}
    for key in ("data.train_data_dir", "method.class_data_dir", "method.validation_image", "base.config"):
        assert keys[key] is False

    class Extra(BaseModel):  # a key a later issue adds is confined without touching confine.py
        name: str = ""
        folder: PathText | None = None
        out: list[PathText] = []

    class Top(BaseModel):
        extra: Extra | None = None
        written: PathText = "x"

    assert confine.path_keys(Top) == {"extra.folder": False, "extra.out": False, "written": False}

    class Written(BaseModel):
        out: Annotated[PathText, LocalPath(writes=True)] = "x"

    assert confine.path_keys(Written) == {"out": True}


def recipe(**sections) -> dict:
    base = {"base": {"pretrained_model_name_or_path": "toy"}, "data": {"train_data_dir": "datasets/quickstart-purple"}}
    for key, value in sections.items():
        section, name = key.split("__")
        base.setdefault(section, {})[name] = value
    return base


def test_the_studio_folders_and_the_repository_data_are_allowed(home, tmp_path, monkeypatch):
    (home / "datasets" / "purple").mkdir(parents=True)
    confine.check_recipe(recipe())  # the templates' data: the repository's datasets/, read only
    inside = {"data__train_data_dir": str(home / "datasets" / "purple"), "data__cache_dir": str(home / "cache")}
    confine.check_recipe(recipe(**inside, output__dir="/anywhere"))  # output.dir: the queue sets it
    confine.check_recipe(recipe(base__pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    with pytest.raises(confine.ConfineError, match=r"^data.cache_dir: datasets/cache is outside the folders the "
                                                   r"studio may write \(\$SDTUNE_HOME or a folder listed in"):  # fmt: skip
        confine.check_recipe(recipe(data__cache_dir="datasets/cache"))
    scratch = recipe(data__cache_dir=str(tmp_path / "scratch" / "latents"))
    with pytest.raises(confine.ConfineError, match="^data.cache_dir: "):
        confine.check_recipe(scratch)
    monkeypatch.setenv(confine.ALLOWED_ENV, os.pathsep.join(["/nonexistent", str(tmp_path / "scratch")]))
    confine.check_recipe(scratch)  # the operator's setting
    monkeypatch.delenv(confine.ALLOWED_ENV)
    (home / "studio").mkdir()
    (home / "studio" / "allowed_dirs").write_text(f"# scratch space\n{tmp_path / 'scratch'}  # fast disk\n")
    confine.check_recipe(scratch)  # or the file in the workspace


@pytest.mark.parametrize(
    "key, value",
    [
        ("data__cache_dir", "{home}/../../../../../../../tmp/escape"),  # `..` out of the workspace
        ("data__cache_dir", "/tmp/latents"),
        ("data__train_data_dir", "/etc"),
        ("data__train_data_dir", "{home}/link/images"),  # a symlink inside the workspace to a folder outside
        ("method__class_data_dir", "../outside"),
        ("base__pretrained_model_name_or_path", "/root/models/sd15"),
        ("method__validation_image", ["{home}/a.png", "/etc/passwd"]),
        ("train__resume", "{home}/link"),
        ("data__mask_dir", "/etc"),
        ("data__subsets", [{"image_dir": "{home}/a"}, {"image_dir": "/etc", "is_reg": True}]),  # inside a list
    ],
)
def test_a_path_outside_is_refused_in_one_line_naming_its_key(home, tmp_path, key, value):
    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    (home / "link").symlink_to(tmp_path / "elsewhere")
    if key == "data__subsets":
        value = [{**v, "image_dir": v["image_dir"].format(home=home)} for v in value]
    else:
        value = [v.format(home=home) for v in value] if isinstance(value, list) else value.format(home=home)
    with pytest.raises(confine.ConfineError) as caught:
        confine.check_recipe(recipe(**{key: value}))
    message = str(caught.value)
    named = "data.subsets.image_dir" if key == "data__subsets" else key.replace("__", ".")
    assert message.startswith(named + ": ") and "\n" not in message, message


def test_the_studio_queues_no_job_that_writes_outside_but_the_cli_does(home, tmp_path):
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    escape = f"data.cache_dir={home}/../escape"
    with pytest.raises(api.StudioError, match=r"^data.cache_dir: .*/home/../escape is outside the folders"):
        api.submit_job(text, [escape])
    with pytest.raises(api.StudioError, match="^data.cache_dir: "):  # nor preflight it (the scan reads the data)
        api.check_data(text, [escape])
    assert jobs.list_jobs() == []
    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml", [escape])  # `sdtune jobs submit`: the operator
    assert job.state == "queued"
    assert api.submit_job(text, ["train.max_train_steps=2"])["state"] == "queued"  # the template as it is


def test_import_by_path_tells_nothing_about_places_outside(home, tmp_path):
    secret = tmp_path / "private"
    secret.mkdir(mode=0o700)
    (secret / "lora.safetensors").write_bytes(b"x")
    (secret / "lora.safetensors").chmod(0)
    messages = []
    for path in (secret / "lora.safetensors", secret / "missing.safetensors", tmp_path / "elsewhere"):
        for dry_run in (True, False):
            with pytest.raises(api.StudioError) as caught:
                api.import_adapter(path, dry_run=dry_run, confined=True)
            messages.append(str(caught.value).replace(str(path), "PATH"))
    assert len(set(messages)) == 1 and messages[0].startswith("path: PATH is outside the folders the studio may read")
    with pytest.raises(api.StudioError, match="not found|no such|does not exist"):  # inside: the importer's own word
        api.import_adapter(home / "missing.safetensors", dry_run=True, confined=True)
