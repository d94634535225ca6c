"""Every studio page's main flow through `streamlit.testing.v1.AppTest`, on a temporary SDTUNE_HOME.

The pages are driven the way a user would (upload, type, click) and the outcome is read back from the workspace
(dataset files, the job queue, the registry), not from the page alone. No page may import torch just by rendering
(checked in a fresh process). Rendering images (merge preview, A/B) runs on the toy base.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image
from streamlit.testing.v1 import AppTest

from sdtune.studio import api, jobs

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("datasets", "train", "jobs", "sweeps", "registry", "ab", "publish")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)  # jobs record the submitter's directory; the templates' data paths are relative to it
    return tmp_path / "home"


def page(name: str) -> AppTest:
    at = AppTest.from_string(
        f"from sdtune.studio.views import {name}\n{name}.render()\n", default_timeout=600
    )  # a loaded CI machine renders slowly
    return at.run()


def png(color=(128, 0, 128)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def texts(at: AppTest, kind: str) -> list[str]:
    return [element.value for element in getattr(at, kind)]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_the_app_has_the_seven_pages(home):
    """The menu the app renders lists the seven pages in order, and each one, opened from it, renders its title."""
    from sdtune.studio import access

    at = AppTest.from_file(str(ROOT / "studio" / "app.py"), default_timeout=600)  # 600: a loaded machine
    at.query_params["token"] = access.studio_token()  # tests/test_studio_access.py: without it, a refusal
    at = at.run()
    assert not at.exception
    assert at.title[0].value == "Datasets"  # the default page
    # AppTest has no public view of st.navigation's menu: `_registered_pages` is its record of the pages the last
    # run registered (what its own switch_page resolves against), and `_page_hash` the page the next run opens.
    # The root is a hidden page that switches to Datasets (app.START): the menu is every other page.
    menu = [(info["page_name"], h) for h, info in at._registered_pages.items() if info["page_name"] != "sdtune studio"]
    assert [title for title, _ in menu] == ["Datasets", "Train", "Jobs", "Sweeps", "Registry", "A/B", "Publish"]
    for title, page_hash in menu:
        at._page_hash = page_hash
        at.run()
        assert not at.exception, (title, at.exception)
        assert at.title[0].value == title


@pytest.mark.parametrize("flags,host,warned", [([], "127.0.0.1", False), (["--expose"], "0.0.0.0", True)])
def test_sdtune_studio_binds_locally_unless_exposed_with_a_warning(flags, host, warned, monkeypatch, capsys):
    from sdtune.studio import cli, launch

    started = []

    class Recorder:
        def __init__(self, command, cwd, env=None):
            started.append(command)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Recorder)
    assert cli.main(["studio", "--port", "8599", *flags]) == 0
    [command] = started
    assert command[command.index("--server.address") + 1] == host and "8599" in command
    assert ("WARNING: the studio listens on 0.0.0.0" in capsys.readouterr().err) == warned


@pytest.mark.parametrize("name", PAGES)
def test_rendering_a_page_imports_no_torch(name, tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["SDTUNE_HOME"] = {str(tmp_path / "home")!r}
        from streamlit.testing.v1 import AppTest
        # AppTest's own limit is 3 s, which a first render in a fresh process can pass on a loaded machine
        at = AppTest.from_string("from sdtune.studio.views import {name}\\n{name}.render()\\n").run(timeout=600)
        assert not at.exception, at.exception
        assert "torch" not in sys.modules, "rendering the {name} page imported torch"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_datasets_page_upload_captions_versions(home):
    api.create_dataset("purple")
    at = page("datasets")
    at.file_uploader(key="upload-files").set_value(
        [("a.png", png(), "image/png"), ("a.txt", b"a circle", "text/plain"), ("bad.png", b"", "image/png")]
    )
    at = at.button(key="FormSubmitter:upload-Add to dataset").click().run()
    assert "added 1 images and 1 captions" in texts(at, "success")
    assert any("rejected 1 files" in w for w in texts(at, "warning"))
    assert sorted(p.name for p in (home / "datasets/purple/work/images").iterdir()) == ["a.png", "a.txt"]
    # bulk: the trigger word goes into every caption, and the editor shows the new text at once
    bulk = next(t for t in at.text_input if t.label.startswith("Trigger word"))
    bulk.set_value("purple")
    at = at.button(key="FormSubmitter:bulk-Apply to all captions").click().run()
    assert "1 captions changed" in texts(at, "success")
    assert api.dataset_images("purple")[0]["caption"] == "purple, a circle"
    assert [t.value for t in at.text_area if t.label == "Caption"] == ["purple, a circle"]
    # one caption edited by hand
    next(t for t in at.text_area if t.label == "Caption").set_value("purple, a big circle")
    at = at.button(key="FormSubmitter:captions-Save captions").click().run()
    assert "saved 1 captions" in texts(at, "success")
    assert (home / "datasets/purple/work/images/a.txt").read_text() == "purple, a big circle"
    at = button(at, "Freeze a version now").click().run()
    assert any(s.startswith("v1: 1 images") for s in texts(at, "success"))
    assert api.dataset_info("purple")["versions"][0]["images"] == 1
    # an upload over a hand-edited caption says so (the frozen v1 keeps the old one); applying bulk edits cleared the
    # form, so a second click applies nothing
    at.file_uploader(key="upload-files").set_value([("a.txt", b"a circle", "text/plain")])
    at = at.button(key="FormSubmitter:upload-Add to dataset").click().run()
    assert (
        texts(at, "warning")[0]
        == "added 0 images and 1 captions; 1 replaced a different file of the same name (a.txt)"
    )
    at = at.button(key="FormSubmitter:bulk-Apply to all captions").click().run()
    assert "0 captions changed" in texts(at, "success")


def test_datasets_page_conditioning_preview(home):
    api.upload_to_dataset("shapes", [("a.png", png()), ("b.png", png((0, 200, 0)))])
    at = page("datasets")
    at.selectbox(key="annotate-kind").set_value("canny")
    at = button(at, "Make conditioning images").click().run()
    assert "2 canny conditioning images written" in texts(at, "success")
    assert sorted(p.name for p in (home / "datasets/shapes/work/conditioning").iterdir()) == ["a.png", "b.png"]
    captions = [c for image in at.image for c in image.captions]
    assert len(at.image) == 6 and captions.count("conditioning") == 2  # 2 thumbnails + 2 pairs in the preview


def test_datasets_page_survives_a_16_bit_png_and_shows_a_broken_file_with_its_reason(home):
    """A 16-bit PNG (mode I;16) shows as it trains; a file that cannot be decoded is a warning in its place, and
    every tab still renders."""
    from test_datasets_store import png16

    api.upload_to_dataset("grey", [("a.png", png()), ("deep.png", png16())])
    at = page("datasets")
    assert not at.exception, at.exception  # was: OSError: cannot write mode I;16 as JPEG
    assert [c for image in at.image for c in image.captions] == ["a.png", "deep.png"]
    (home / "datasets/grey/work/images/broken.png").write_bytes(png()[:100])  # damaged on disk after the upload
    at = at.run()
    assert not at.exception, at.exception
    assert [c for image in at.image for c in image.captions] == ["a.png", "deep.png"]
    [warning] = texts(at, "warning")
    assert warning.startswith("broken.png: cannot be shown (OSError:") and "truncated" in warning
    at = button(at, "Freeze a version now").click().run()  # the Versions tab, below the grid, still works
    assert any(s.startswith("v1: 3 images") for s in texts(at, "success"))


def test_datasets_page_keeps_a_kohya_zip_and_shows_its_folders_and_refusals(home):
    from test_datasets_store import KOHYA_ZIP, make_zip

    api.create_dataset("shapes")
    at = page("datasets")
    at.file_uploader(key="upload-files").set_value([("shapes.zip", make_zip(KOHYA_ZIP), "application/zip")])
    at = at.button(key="FormSubmitter:upload-Add to dataset").click().run()
    assert "added 3 images (into 10_purple circle, 5_purple square) and 2 captions" in texts(at, "success")
    [rejected] = [t.value for t in at.table if "file" in t.value.columns]
    assert list(rejected["file"]) == ["5_purple square/003.jpg"]
    assert "corrupt or truncated image" in rejected["reason"][0]
    [folders] = [t.value for t in at.table if "repeats" in t.value.columns]
    assert folders[["folder", "repeats", "images"]].values.tolist() == [
        ["10_purple circle", "10", 1],
        ["5_purple square", "5", 2],
    ]
    assert "3 images in 2 folders" in at.caption[0].value
    at.selectbox(key="grid-folder-shapes").set_value("5_purple square")
    at = at.run()
    assert [c for image in at.image for c in image.captions] == ["5_purple square/001.png", "5_purple square/002.png"]
    assert [t.value for t in at.text_area if t.label == "Caption"] == ["a purple square", ""]


def test_datasets_page_reads_each_folder_as_a_subset_one_of_them_regularization(home):
    """A dataset in folders, as `data.subsets`: a table of the subsets (repeats from the kohya folder name, its concept
    for uncaptioned images, the folders picked as is_reg), the recipe lines, and a preflight over those subsets."""
    from test_datasets_store import make_zip

    folders = {
        "10_purple circle/001.png": png(),
        "10_purple circle/001.txt": b"a purple circle",
        "5_purple square/001.png": png((0, 0, 255)),
        "5_purple square/002.png": png((0, 0, 200)),
        "1_circle/001.png": png((0, 200, 0)),
    }
    api.upload_to_dataset("shapes", [("shapes.zip", make_zip(folders))])
    at = page("datasets")
    assert not [t for t in at.table if "subset" in t.value.columns]  # images/ as one folder unless asked
    at = at.checkbox(key="as-subsets-shapes").check().run()
    at = at.multiselect(key="reg-folders-shapes").select("1_circle").run()
    [table] = [t.value for t in at.table if "subset" in t.value.columns]
    assert table.values.tolist() == [
        ["10_purple circle", 1, "10", "", "purple circle"],
        ["1_circle", 1, "1", "yes", "circle"],
        ["5_purple square", 2, "5", "", "purple square"],
    ]
    [lines] = [c.value for c in at.code if c.language == "yaml"]
    assert yaml.safe_load(lines)["data"]["subsets"][1] == {
        "image_dir": str(home / "datasets/shapes/work/images/1_circle"),
        "num_repeats": 1,
        "class_tokens": "circle",
        "is_reg": True,
    }
    at = button(at, "Run preflight").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [report] = [c.value for c in at.code if c.value.startswith("data: ")]
    assert "data: 3 images (20 per epoch with repeats), layout subsets" in report
    assert "1_circle (is_reg): 1 images x 1 repeats" in report
    assert "5_purple square: 2 images x 5 repeats = 10 (50%)" in report


def test_train_page_validates_live_and_launch_queues_a_job_on_a_frozen_version(home):
    api.upload_to_dataset("purple", [("a.png", png()), ("a.txt", b"a purple circle")])
    at = page("train")
    assert at.selectbox(key="train-template").value == "quickstart.yaml"
    assert any(s.startswith("recipe valid: lora 'toy-purple'") for s in texts(at, "success"))
    yaml_box = at.text_area(key="yaml-quickstart.yaml")
    yaml_box.set_value(yaml_box.value.replace("learning_rate:", "lerning_rate:"))
    at = at.run()
    cli_message = "recipe.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)"
    assert texts(at, "error") == [cli_message]
    assert button(at, "Launch").disabled
    assert button(at, "Preflight: data, time and memory").disabled
    yaml_box = at.text_area(key="yaml-quickstart.yaml")
    yaml_box.set_value(yaml_box.value.replace("lerning_rate:", "learning_rate:"))
    at.selectbox(key="train-dataset").set_value("purple")
    next(n for n in at.number_input if n.label == "Max train steps").set_value(3)
    at = at.button(key="FormSubmitter:form-quickstart.yaml-Apply").click().run()
    at = button(at, "Preflight: data, time and memory").click().run()
    [report] = [c.value for c in at.code if c.value.startswith("data: ")]
    assert report.startswith("data: 1 images (1 per epoch with repeats), layout folder")
    assert "plan: 3 steps x 8 images/step" in report and "estimated:" in report and "for 3 steps" in report
    at = button(at, "Launch").click().run()
    assert not at.exception and not texts(at, "error")
    [job] = jobs.list_jobs()
    assert job.state == "queued" and job.name == "toy-purple"
    resolved = job.recipe.read_text()
    version = api.dataset_info("purple")["versions"][0]
    assert f"train_data_dir: {version['path']}/images" in resolved and "max_train_steps: 3" in resolved


def test_train_form_shows_the_yaml_it_trains_and_its_changes_win(home):
    at = page("train")
    yaml_box = at.text_area(key="yaml-quickstart.yaml")
    yaml_box.set_value(yaml_box.value.replace("rank: 8", "rank: 4").replace("learning_rate: 1.0e-3", "lr: 5.0e-7"))
    at = at.run()
    knob = {widget.label: widget for widget in [*at.number_input, *at.text_input]}
    assert knob["Rank"].value == 4 and knob["Learning rate"].value == "5e-07"  # the YAML's values, no override
    assert not [c.value for c in at.code if "method.rank" in c.value]
    knob["Rank"].set_value(16)
    knob["Learning rate"].set_value("2e-4")
    at = at.button(key="FormSubmitter:form-quickstart.yaml-Apply").click().run()
    [shown] = [c.value for c in at.code if "method.rank" in c.value]
    assert shown == "method.rank=16 train.learning_rate=0.0002"
    # a DreamBooth recipe's form has its method section: prompts, prior preservation, LoRA or the whole UNet
    at.selectbox(key="train-method").set_value("dreambooth")
    at = at.run()
    labels = {widget.label for widget in [*at.number_input, *at.text_input, *at.checkbox]}
    assert {"Instance prompt", "Class prompt", "With prior preservation"} <= labels
    assert not next(c for c in at.checkbox if c.label == "LoRA").value  # sd15-dreambooth-default: the whole UNet


def test_train_launch_refuses_bad_data_and_a_second_click(home):
    api.upload_to_dataset("tiny", [("a.png", png()), ("a.txt", b"a purple circle")])
    at = page("train")
    at.selectbox(key="train-dataset").set_value("tiny")
    yaml_box = at.text_area(key="yaml-quickstart.yaml")
    yaml_box.set_value(yaml_box.value.replace("resolution: 64", "resolution: 512"))  # a 64 px image: too small
    at = button(at.run(), "Launch").click().run()
    [error] = texts(at, "error")
    assert error.startswith("data.train_data_dir: no usable images in") and "too small" in error
    assert jobs.list_jobs() == [] and api.dataset_info("tiny")["versions"] == []  # nothing queued, nothing frozen
    yaml_box = at.text_area(key="yaml-quickstart.yaml")
    yaml_box.set_value(yaml_box.value.replace("resolution: 512", "resolution: 64"))
    at = button(at.run(), "Launch").click().run()
    assert not texts(at, "error") and len(jobs.list_jobs()) == 1
    at = button(at, "Launch").click().run()
    assert texts(at, "error") == ["this recipe is already job 1: change something, or cancel that job"]
    jobs.cancel(1)
    at = button(at, "Launch").click().run()
    assert not texts(at, "error") and len(jobs.list_jobs()) == 2


def test_jobs_page_shows_progress_and_cancels(home):
    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml")
    (job.run_dir).mkdir(parents=True)
    (job.run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "total_steps": 4, "loss": 0.5, "eta": 30, "seconds_per_step": 1.0}\n'
        '{"step": 2, "total_steps": 4, "loss": 0.25, "eta": 20, "seconds_per_step": 1.0}\n'
    )
    at = page("jobs")
    assert any("No worker runs this queue" in w for w in texts(at, "warning"))
    bar = at.get("progress")[0]
    assert bar.proto.value == 50 and "queued: step 2 / 4" in bar.proto.text and "loss 0.2500" in bar.proto.text
    assert button(at, "Resume").disabled and not button(at, "Cancel").disabled
    at = button(at, "Cancel").click().run()
    assert jobs.get(job.id).state == "cancelled"
    assert f"job {job.id}: cancel requested" in texts(at, "success")
    assert not button(at, "Resume").disabled


def test_jobs_page_sample_save_resume_retry_follow_the_state(home):
    """Each action button is enabled in the states it applies to, and a click does what the queue API does: sample
    now / save now leave a request for the trainer, resume queues a cancelled job to continue from its checkpoint,
    retry queues a finished one afresh with its old run folder set aside."""
    from sdtune.studio.worker import Worker, WorkerConfig
    from sdtune.trainers.core.run_files import request_path

    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml")
    worker = Worker(WorkerConfig(home=home))
    worker.register()  # a live worker row, then the job claimed: running, as a worker leaves it before its trainer
    assert worker.claim().id == job.id
    at = page("jobs")
    assert not texts(at, "warning")  # a worker runs the queue
    enabled = {b.label for b in at.button if not b.disabled}
    assert enabled == {"Cancel", "Sample now", "Save now"}
    at = button(at, "Sample now").click().run()
    assert request_path(job.run_dir, "sample").is_file() and f"job {job.id}: sample now requested" in texts(
        at, "success"
    )
    at = button(at, "Save now").click().run()
    assert request_path(job.run_dir, "save").is_file()

    worker.finish(job.id, "cancelled", -15, None)  # the trainer saved on SIGTERM and stopped
    at = at.run()
    assert {b.label for b in at.button if not b.disabled} == {"Resume", "Retry"}
    at = button(at, "Resume").click().run()
    resumed = jobs.get(job.id)
    assert (resumed.state, resumed.resume) == ("queued", 1)

    assert worker.claim().id == job.id
    worker.finish(job.id, "done", 0, None)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    at = button(at.run(), "Retry").click().run()
    retried = jobs.get(job.id)
    assert (retried.state, retried.resume) == ("queued", 0)
    assert job.run_dir.with_name("run.attempt-2").is_dir() and not job.run_dir.exists()
    worker.unregister()


def test_jobs_page_shows_a_dead_worker_gone_and_its_job_interrupted(home):
    """Issue 20: a worker killed mid-job used to stay listed, its job "running" and frozen. The page shows it gone
    at once and, its trainer stopped, the job interrupted and resumable, with no worker running."""
    from sdtune.studio.worker import Worker, WorkerConfig

    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml")
    dead = subprocess.Popen([sys.executable, "-c", "from sdtune.studio.worker import Worker, WorkerConfig\n"
                             f"w = Worker(WorkerConfig(home={str(home)!r})); w.register(); w.claim()"])  # fmt: skip
    assert dead.wait(timeout=120) == 0  # registered, claimed the job, then gone without a word
    at = page("jobs")
    assert [e for e in texts(at, "error") if " is gone (last heartbeat" in e]
    assert any("No worker runs this queue" in w for w in texts(at, "warning"))
    assert jobs.get(job.id).state == "interrupted" and "interrupted: step 0" in at.get("progress")[0].proto.text
    assert not button(at, "Resume").disabled
    later = Worker(WorkerConfig(home=home))  # a worker started later clears the dead one's row
    later.register()
    later.recover_orphans()
    assert not [e for e in texts(at.run(), "error") if " is gone" in e]


def registered_fake(home: Path, name: str) -> None:
    """A run folder as a trainer leaves it, with a real grid PNG, registered (the page reads, tags, deletes)."""
    from test_registry import fake_run

    from sdtune.adapters.registry import Registry

    run = fake_run(home.parent / "runs" / name, name=name)
    Image.new("RGB", (128, 64), (200, 0, 200)).save(run / "ab_grid.png")
    Registry().register_run(run)


def test_registry_page_browse_tag_delete(home):
    registered_fake(home, "toy-purple")
    at = page("registry")
    assert at.selectbox(key="reg-selected").value == "toy-purple"
    assert len(at.image) == 1 and at.image[0].captions == ["ab_grid"]
    downloads = [d.proto.label for d in at.get("download_button")]
    assert downloads == ["Download pytorch_lora_weights.safetensors (peft)", "Download toy-purple.safetensors (kohya)"]
    at.text_input(key="tags-add-toy-purple").set_value("favourite colour")
    at = at.button(key="FormSubmitter:tags-toy-purple-Update tags").click().run()
    assert api.show_adapter("toy-purple")["tags"] == ["colour", "favourite"]
    assert button(at, "Delete adapter").disabled  # not without the confirmation
    at.checkbox(key="del-sure-toy-purple").check()
    at = at.run()
    at = button(at, "Delete adapter").click().run()
    assert api.list_adapters() == []
    assert "deleted toy-purple" in texts(at, "success")


def test_registry_page_checks_then_imports_a_kohya_file_and_refuses_a_pickle(home, toy_pipe):
    """Upload a kohya LoCon file written with sd-scripts' conventions: Check shows the import report and registers
    nothing; Import registers it with that report. A pickle is refused with its reason and nothing is registered."""
    import json

    import safetensors.torch
    import torch
    from test_import import SD_SCRIPTS_METADATA, golden_tensors

    data = safetensors.torch.save(golden_tensors(toy_pipe), metadata=SD_SCRIPTS_METADATA)
    at = page("registry")
    at.file_uploader(key="import-file").set_value([("golden_locon.safetensors", data, "application/octet-stream")])
    at = at.run()
    at = at.button(key="import-check").click().run()
    assert not texts(at, "error"), texts(at, "error")
    report = json.loads(at.json[0].proto.body)
    assert report["format"] == "kohya" and report["ok"] and report["matched"] == report["modules"]
    assert api.list_adapters() == []  # a check registers nothing
    at = at.button(key="import-go").click().run()
    assert "imported golden_locon" in texts(at, "success")
    manifest = api.show_adapter("golden_locon")["manifest"]
    assert manifest["origin"]["kind"] == "imported" and manifest["trigger_words"] == ["zkz", "golden"]

    pickled = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickled)
    at.file_uploader(key="import-file").set_value([("old.pt", pickled.getvalue(), "application/octet-stream")])
    at = at.run()
    at = at.button(key="import-go").click().run()
    [error] = texts(at, "error")
    assert "old.pt" in error and "pickle" in error, error
    assert [a["name"] for a in api.list_adapters()] == ["golden_locon"]


def test_registry_page_leaves_no_upload_behind(home):
    """The uploaded file is staged for the importer only while Check or Import runs: a refused one is gone after."""
    at = page("registry")
    at.file_uploader(key="import-file").set_value([("junk.safetensors", b"not weights", "application/octet-stream")])
    at = at.run()
    for key in ("import-check", "import-go"):
        at = at.button(key=key).click().run()
        [error] = texts(at, "error")
        assert "junk.safetensors: not a readable safetensors file" in error, error
        assert not [p for p in (home / "studio" / "uploads").rglob("*") if p.is_file()]


def test_registry_page_imports_a_controlnet_folder_by_path(home, controlnet_short_run, monkeypatch):
    """A folder cannot be uploaded: typed as a path, a diffusers ControlNet folder is checked and imported, once
    it lies where the studio may read (the run is outside $SDTUNE_HOME: the operator lists its folder)."""
    folder = controlnet_short_run[1] / "controlnet"
    at = page("registry")
    at.text_input(key="import-path").set_value(str(home / "nowhere"))
    at = at.run()
    at = at.button(key="import-check").click().run()
    [error] = texts(at, "error")
    assert "nowhere" in error and "\n" not in error, error
    at.text_input(key="import-path").set_value(str(folder))
    at = at.run()
    at = at.button(key="import-check").click().run()
    assert texts(at, "error") == [f"path: {folder} is outside the folders the studio may read ($SDTUNE_HOME, the "
                                  "repository's datasets/ or a folder listed in SDTUNE_ALLOWED_DIRS or "
                                  "$SDTUNE_HOME/studio/allowed_dirs); use the CLI for other places"]  # fmt: skip
    monkeypatch.setenv("SDTUNE_ALLOWED_DIRS", str(controlnet_short_run[1]))
    at.text_input(key="import-name").set_value("masks")
    at = at.run()
    at = at.button(key="import-check").click().run()
    assert json.loads(at.json[0].proto.body)["format"] == "controlnet" and api.list_adapters() == []
    at = at.button(key="import-go").click().run()
    assert "imported masks" in texts(at, "success")
    [entry] = api.list_adapters()
    assert entry["method"] == "controlnet" and api.show_adapter("masks")["manifest"]["origin"]["kind"] == "imported"


def test_registry_page_merges_two_loras_with_a_preview(home, quickstart_run, cyan_run):
    from sdtune.adapters.registry import Registry

    for run in (quickstart_run[0], cyan_run):
        Registry().register_run(run)
    at = page("registry")
    at.multiselect(key="merge-parents").set_value(["toy-purple", "toy-cyan"])
    at.text_input(key="merge-name").set_value("purple-cyan")
    at.text_input(key="merge-prompt").set_value("a cyan square")
    at = at.button(key="FormSubmitter:merge-Merge and preview").click().run()
    assert not texts(at, "error"), texts(at, "error")
    assert "registered purple-cyan (svd merge of toy-purple, toy-cyan)" in texts(at, "success")
    origin = api.show_adapter("purple-cyan")["manifest"]["origin"]
    assert origin["parents"] == ["toy-purple", "toy-cyan"] and origin["merge_method"] == "svd"
    assert [c for image in at.image for c in image.captions][-1] == "purple-cyan: a cyan square"
    grid = home / "studio" / "previews" / "purple-cyan" / "grid.png"
    with Image.open(grid) as opened:
        assert opened.width >= 4 * 64  # four seeds of the merged LoRA, side by side
    # the registry keeps a picture of it (its export-check strip), and its card tells how it was made
    detail = api.show_adapter("purple-cyan")
    assert (Path(detail["folder"]) / detail["manifest"]["samples"]["export_check"]).is_file()
    card = api.publish_preview("purple-cyan", "me/purple-cyan")["card"]
    assert "made by sdtune (svd of `toy-purple` x 1, `toy-cyan` x 1) for the sdtune toy base" in card
    assert "- parents: toy-purple (weight 1), toy-cyan (weight 1)\n" in card and "- rank: 8\n" in card
    assert "Recipe:" not in card and "Dataset fingerprint" not in card  # a merge has neither
    assert 'from_pretrained("path/to/sdtune/adapters/toy_base"' in card


def test_ab_page_blind_vote_tally_history_and_checkpoints(home, quickstart_run):
    from sdtune.adapters.registry import Registry

    Registry().register_run(quickstart_run[0])
    at = page("ab")
    assert at.multiselect(key="ab-B-adapters").value == ["toy-purple"]  # A: the base alone, B: base + the LoRA
    at.text_area(key="ab-prompts").set_value("a purple circle")
    at.text_input(key="ab-seeds").set_value("0 1")
    at.number_input(key="ab-steps").set_value(10)
    at = at.button(key="FormSubmitter:ab-settings-Render A and B").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [comparison] = api.ab_history()
    cid = comparison["id"]
    assert comparison["sides"] == {"a": "toy", "b": "toy+toy-purple:1"} and comparison["blind"]
    assert [c for image in at.image for c in image.captions] == ["left", "right", "left", "right"]  # sides hidden
    at = at.button(key=f"vote-{cid}-0-left").click().run()
    tally = api.ab_tally(cid)
    assert (tally["n"], tally["remaining"]) == (1, 1)
    assert "pair 1: voted left" in texts(at, "success")
    # sealed until the last vote: no side named, no A/B split (it would tell which side the vote went to)
    assert [c for image in at.image for c in image.captions] == ["left", "right", "left", "right"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Pairs voted": "1 / 2", "Pairs left": "1"}, metrics
    at = at.button(key=f"vote-{cid}-1-tie").click().run()
    revealed = [c for image in at.image for c in image.captions][:2]  # every pair voted: the sides show
    assert sorted(revealed) == ["left = A", "right = B"] or sorted(revealed) == ["left = B", "right = A"]
    tally = api.ab_tally(cid)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Votes A / B / tie"] == f"{tally['a']} / {tally['b']} / 1"
    assert metrics["95% interval"] == f"{tally['ci_low']:.0%} - {tally['ci_high']:.0%}"
    assert at.selectbox(key="ab-history-open").options == [cid]
    # the run's checkpoints (100, 200 and the final LoRA) scored on one prompt: the page names the best
    at.text_input(key="ckpt-run-dir").set_value(str(quickstart_run[0]))
    at.text_area(key="ckpt-prompts").set_value("a purple circle")
    at.number_input(key="ckpt-steps").set_value(10)
    at = at.button(key="FormSubmitter:ab-checkpoints-Compare checkpoints").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [best] = [s for s in texts(at, "success") if s.startswith("best: ")]
    stored = api.ab_history()[0]
    assert stored["kind"] == "checkpoints"
    assert best == f"best: {api.ab_get(stored['id'])['best']}"


def test_ab_page_controlnet_with_a_control_image_per_side(home, quickstart_run, controlnet_short_run):
    """B = the LoRA steered by a registered ControlNet through a mask: the spec the page builds, the comparison it
    stores, and the control image shown beside the pairs."""
    from sdtune.adapters.registry import Registry

    Registry().register_run(quickstart_run[0])
    Registry().register_run(controlnet_short_run[1])
    at = page("ab")
    assert at.selectbox(key="ab-B-cn").options == ["(none)", "toy-masks"]
    at = at.selectbox(key="ab-B-cn").set_value("toy-masks").run()
    at.slider(key="ab-B-cn-scale").set_value(0.8)
    at = at.selectbox(key="ab-B-cn-image").set_value("toy-masks/square-mask.png").run()
    mask = ROOT / "datasets" / "toy-masks" / "validation" / "square-mask.png"
    assert f"toy+toy-purple:1+controlnet=toy-masks:0.8@{mask}" in texts(at, "code")
    at.text_area(key="ab-prompts").set_value("a purple square")
    at.text_input(key="ab-seeds").set_value("0")
    at.number_input(key="ab-steps").set_value(4)
    at.checkbox(key="ab-blind").uncheck()
    at = at.button(key="FormSubmitter:ab-settings-Render A and B").click().run()
    assert not texts(at, "error"), texts(at, "error")
    [comparison] = api.ab_history()
    assert comparison["sides"]["b"] == f"toy+toy-purple:1+controlnet=toy-masks:0.8@{mask}"
    stored = api.ab_get(comparison["id"])
    assert (
        stored["control_images"]["a"] == []
        and Path(stored["control_images"]["b"][0]).read_bytes() == mask.read_bytes()
    )
    captions = [c for image in at.image for c in image.captions]
    assert "control image of B" in captions and "A: no ControlNet" in texts(at, "caption")
    assert "A" in captions and "A = A" not in captions  # an open comparison: no vote panel, no riddles
    assert not [m for m in at.metric if m.label.startswith("Votes")]


def test_control_image_uploads_are_checked_and_kept_once(home):
    """An upload is kept as a PNG named by its file and content (an @ or + would break a SPEC, so they go); the same
    upload twice is one file; a bad one is refused with its reason and writes nothing."""
    path = api.save_control_image("my mask@1+2.png", png((255, 255, 255)))
    assert Path(path).parent == home / "ab" / "inputs" and not {"@", "+", " "} & set(Path(path).name)
    assert api.save_control_image("my mask@1+2.png", png((255, 255, 255))) == path
    listed = [c["path"] for c in api.control_images()]
    assert listed[0] == path and listed.count(path) == 1
    bundled = [c["name"] for c in api.control_images()][1:]
    assert bundled == [f"toy-masks/{shape}-mask.png" for shape in ("circle", "square", "triangle")]
    before = sorted((home / "ab" / "inputs").iterdir())
    with pytest.raises(api.StudioError, match="control image notes.png: not an image"):
        api.save_control_image("notes.png", b"just text")
    assert sorted((home / "ab" / "inputs").iterdir()) == before


def test_publish_page_card_dry_run_and_token_rules(home, quickstart_run):
    from sdtune.adapters.registry import Registry

    Registry().register_run(quickstart_run[0])
    at = page("publish")
    at.text_input(key="pub-repo-toy-purple").set_value("someone/toy-purple")
    at = at.run()
    card = [m.value for m in at.markdown if "toy-purple" in m.value]
    assert card and "purple" in card[0]
    header = [c.value for c in at.code if c.language == "yaml"]  # the YAML header shown as YAML, not as markdown
    assert header and "tags:" in header[0] and "instance_prompt: purple" in header[0], header
    assert "instance_prompt" not in card[0], card[0][:300]
    at = button(at, "Dry run: write the upload folder").click().run()
    assert not texts(at, "error"), texts(at, "error")
    assert any(s.startswith("dry run: nothing uploaded") for s in texts(at, "success"))
    [folder] = (home / "studio" / "publish").glob("toy-purple-*")
    assert (folder / "README.md").read_text().strip() and list(folder.glob("*.safetensors"))
    at = at.button(key="FormSubmitter:pub-push-Push to the Hub").click().run()
    assert texts(at, "error") == ["token: paste a Hugging Face write token to push (or use the dry run)"]
    # another adapter gets its own repo id, not the one typed for the first
    Registry().register_run(quickstart_run[0], name="other")
    at = at.run()
    assert at.selectbox(key="pub-name").value == "toy-purple"
    at = at.selectbox(key="pub-name").set_value("other").run()
    assert at.text_input(key="pub-repo-other").value == "your-name/other"
    assert any('load_lora_weights("your-name/other"' in m.value for m in at.markdown)


def test_publish_page_network_failure_says_what_to_do_on_the_page(home, quickstart_run, monkeypatch):
    """The push's network error names the page's button, not the CLI's "run the same command again"."""
    from sdtune.adapters import publish as pub
    from sdtune.adapters.registry import Registry

    def dropped(name, repo, options, registry):
        raise pub._network_error(ConnectionResetError(), repo)

    Registry().register_run(quickstart_run[0])
    monkeypatch.setattr(pub, "publish", dropped)
    at = page("publish")
    next(t for t in at.text_input if t.label.startswith("Hugging Face token")).set_value("hf_" + "x" * 34)
    at = at.button(key="FormSubmitter:pub-push-Push to the Hub").click().run()
    assert texts(at, "error") == [
        "network failure while uploading to your-name/toy-purple (ConnectionResetError); paste the token and press "
        "“Push to the Hub” again to resume: files already on the Hub are not sent again"
    ]


def test_ab_page_shows_no_vote_buttons_once_the_comparison_is_revealed(home):
    """Blind votes change until every pair is voted; then the sides are shown and the buttons go (votes are final)."""
    from sdtune.adapters import ab

    def fill(folder):
        for name in ("000-left.png", "000-right.png", "001-left.png", "001-right.png"):
            (folder / name).write_bytes(png())
        rows = [ab.PairRow(i, "a purple circle", i, "ab"[i], f"00{i}-left.png", f"00{i}-right.png") for i in (0, 1)]
        return ab.NewComparison("ab", {"a": "toy", "b": "toy+x"}, {}, True, None, pairs=rows)

    cid = ab.ABStore().add(fill)
    at = AppTest.from_string("from sdtune.studio.views import ab\nab.render()\n", default_timeout=120)
    at.session_state["ab-current"] = cid
    at = at.run()
    at = at.button(key=f"vote-{cid}-0-left").click().run()
    at = at.button(key=f"vote-{cid}-0-right").click().run()  # changed before the reveal
    assert {b.key for b in at.button if b.key.startswith("vote-")} == {
        f"vote-{cid}-{pair}-{choice}" for pair in (0, 1) for choice in ("left", "tie", "right")
    }
    at = at.button(key=f"vote-{cid}-1-tie").click().run()
    assert not [b.key for b in at.button if b.key.startswith("vote-")]
    captions = texts(at, "caption")
    assert "Every pair is voted: the sides are revealed and the votes are final." in captions
    assert "voted right (changed from left)" in captions and "voted tie" in captions
    assert api.ab_get(cid)["pairs"][0]["votes"] == ["left", "right"]


def test_train_page_imports_a_kohya_preset_into_the_form(home):
    """The Train page's "Import a kohya config": the kohya_ss preset becomes a saved preset, opened in the form, with
    the importer's report; a DreamBooth config naming a folder outside the studio's is refused in one line."""
    golden = (ROOT / "tests" / "data" / "kohya" / "lora_preset.json").read_bytes()
    at = page("train")
    at.file_uploader(key="kohya-config").set_value(("my preset.json", golden, "application/json"))
    at.text_input(key="kohya-name").set_value("from-kohya")
    at = at.button(key="FormSubmitter:kohya-import-Import").click().run()
    assert not at.exception and not texts(at, "error"), texts(at, "error")
    assert at.selectbox(key="train-template").value == "saved:from-kohya"
    assert any(s.startswith("recipe valid: lora 'purple-lora'") for s in texts(at, "success"))
    [report] = [c for c in texts(at, "code") if c.startswith("mapped:")]
    assert "not supported: epoch (sdtune counts optimizer steps" in report
    saved = (home / "presets" / "from-kohya.yaml").read_text()
    assert saved.startswith("# Translated by `sdtune recipe from-kohya` from my preset.json.")
    db = b'train_data_dir = "/etc"\n'
    at.file_uploader(key="kohya-config").set_value(("db.toml", db, "application/toml"))
    at.text_input(key="kohya-name").set_value("db")
    at = at.button(key="FormSubmitter:kohya-import-Import").click().run()
    assert texts(at, "error") == [
        "db.toml: a path it names: /etc is outside the folders the studio may read ($SDTUNE_HOME, the repository's "
        "datasets/ or a folder listed in SDTUNE_ALLOWED_DIRS or $SDTUNE_HOME/studio/allowed_dirs); use the CLI for other "
        "places"
    ]


def test_train_page_names_a_broken_kohya_config_and_keeps_working(home):
    """A truncated kohya_ss preset is one error line naming the file; no preset is written and the form still
    renders."""
    at = page("train")
    at.file_uploader(key="kohya-config").set_value(
        ("broken.json", b'{"LoRA_type": "Standard", "network_dim": ', "application/json")
    )
    at.text_input(key="kohya-name").set_value("broken")
    at = at.button(key="FormSubmitter:kohya-import-Import").click().run()
    assert not at.exception
    [error] = texts(at, "error")
    assert error.startswith("broken.json") and "\n" not in error, error
    assert not (home / "presets" / "broken.yaml").exists()
    assert at.selectbox(key="train-template") is not None  # the form is still there


# -- dataset preparation panels (issue 24: tags, duplicates, the report) --------------------------------------------


def test_datasets_page_tags_panel_renames_removes_and_previews_a_training_caption(home):
    files = [("a.png", png()), ("b.png", png((0, 200, 0))), ("c.png", png((200, 0, 0)))]
    files += [("a.txt", b"sks, kitty, white"), ("b.txt", b"sks, cat"), ("c.txt", b"sks, one, two, three, four")]
    api.upload_to_dataset("set", files)
    at = page("datasets")
    [table] = [t.value for t in at.table if "tag" in t.value.columns]
    assert table[["tag", "captions"]].values.tolist()[0] == ["sks", 3]
    at.selectbox(key="tag-old").set_value("kitty")
    at.text_input(key="tag-new").set_value("cat")
    at = at.button(key="FormSubmitter:tag-edit-Rename in every caption").click().run()
    assert "kitty -> cat: 1 captions changed" in texts(at, "success")
    at.selectbox(key="tag-old").set_value("white")
    at = at.button(key="FormSubmitter:tag-edit-Remove from every caption").click().run()
    assert "white -> (removed): 1 captions changed" in texts(at, "success")
    assert {i["file"]: i["caption"] for i in api.dataset_images("set")}["a.png"] == "sks, cat"
    # the preview: the trainer's shuffle keeps the first tag (keep_tokens 1) and moves the rest
    at.selectbox(key="preview-caption").set_value("sks, one, two, three, four")
    at.checkbox(key="preview-shuffle").check()
    at = at.run()
    [preview] = [c.value for c in at.code]
    lines = preview.splitlines()
    assert len(lines) == 3 and all(line.startswith("sks, ") for line in lines)
    assert any(line != "sks, one, two, three, four" for line in lines)


def test_datasets_page_duplicates_panel_keeps_one_and_drops_the_others(home):
    from test_dataset_report import PURPLE_CIRCLE, edited, photo, png_bytes

    from sdtune.adapters import toyworld

    original = toyworld.render(PURPLE_CIRCLE)
    copy = png_bytes(edited(original), format="JPEG", quality=70)
    files = [("a.png", png_bytes(original)), ("a-copy.jpg", copy), ("b.png", png_bytes(photo(1)))]
    api.upload_to_dataset("set", files + [("a-copy.txt", b"sks")])
    version = api.freeze_dataset("set")
    at = page("datasets")
    at = at.toggle(key="dupes-set").set_value(True).run()
    assert any("Group 1" in m.value and "near" in m.value for m in at.markdown)
    shown = [c for image in at.image for c in image.captions]
    assert shown[:2] == ["a-copy.jpg", "a.png"]  # the group side by side, above the grid
    [keep] = [r for r in at.radio if r.label == "Keep"]
    keep.set_value("a.png")
    at = button(at, "Drop the others").click().run()
    assert "kept a.png; removed a-copy.jpg" in texts(at, "success")
    assert sorted(i["file"] for i in api.dataset_images("set")) == ["a.png", "b.png"]
    assert (Path(version["images_path"]) / "a-copy.jpg").is_file()  # the frozen version keeps it
    assert "No duplicates." in texts(at, "success")


def test_datasets_page_shows_the_dataset_report(home):
    api.upload_to_dataset("set", [("a.png", png()), ("b.png", png((0, 200, 0))), ("a.txt", b"sks, purple")])
    at = page("datasets")
    images = len(at.image)
    at.number_input(key="report-resolution").set_value(64)
    at = button(at, "Make the report").click().run()
    assert not at.exception, at.exception
    assert len(at.image) == images + 1  # the picture
    [text] = [c.value for c in at.code if c.value.startswith("dataset report:")]
    assert "images: 2 usable, 0 skipped" in text and "without a caption file: b.png" in text


def test_the_tag_preview_and_duplicate_panels_import_no_torch(tmp_path):
    """With captions to preview and the duplicate search on, the Datasets page still renders without torch (the
    trainer's caption code and the hashes are torch-free); only the report's button loads it."""
    code = textwrap.dedent(f"""
        import io, os, sys
        os.environ["SDTUNE_HOME"] = {str(tmp_path / "home")!r}
        from PIL import Image
        from streamlit.testing.v1 import AppTest
        from sdtune.studio import api
        data = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 0, 128)).save(data, format="PNG")
        api.upload_to_dataset("set", [("a.png", data.getvalue()), ("b.png", data.getvalue()), ("a.txt", b"sks, a, b")])
        at = AppTest.from_string("from sdtune.studio.views import datasets\\ndatasets.render()\\n").run(timeout=600)
        at.checkbox(key="preview-shuffle").check()
        at = at.toggle(key="dupes-set").set_value(True).run(timeout=600)
        assert not at.exception, at.exception
        assert any("exact" in m.value for m in at.markdown), "no duplicate group shown"
        assert "torch" not in sys.modules, "the preparation panels imported torch"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_registry_page_lists_each_adapters_kind(home):
    """A LoHa (its recipe's method.algo) and a LoRA side by side: the table says which is which."""
    registered_fake(home, "toy-purple")
    registered_fake(home, "toy-loha")
    manifest = Path(api.show_adapter("toy-loha")["folder"]) / "adapter.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "recipe": {"method": {"type": "lora", "algo": "loha"}}}))
    at = page("registry")
    table = at.dataframe[0].value
    assert dict(zip(table["name"], table["kind"])) == {"toy-purple": "lora", "toy-loha": "loha"}
