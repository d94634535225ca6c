"""End to end in a real browser: `sdtune studio --worker` on localhost, driven by headless Chromium through Selenium.

The flow a user follows: create a dataset and upload the quickstart's purple shapes -> train the quickstart LoRA on
the toy base (4 steps) -> watch the job complete on the Jobs page -> a blind A/B (base vs the new LoRA) with one
vote recorded -> a dry-run publish. Each page is screenshotted into the test's tmp folder (printed at the end).

Uses Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver): browser downloads fail
here. Without them the test is skipped, unless SDTUNE_REQUIRE_BROWSER=1 (set by .ci/run), which makes it fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sdtune.studio import api, jobs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "quickstart-purple"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1800",
]  # fmt: skip
ACCELERATE_ARGS = "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
TRAIN_TIMEOUT = 420


def browser_or_skip():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        message = (
            f"no browser for the end-to-end test: {', '.join(missing)} (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("SDTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio(tmp_path, monkeypatch):
    """`sdtune studio --worker` on a free port with its own SDTUNE_HOME; yields (url, home, log, token): the
    token as the printed URL carries it (`sdtune studio: http://127.0.0.1:PORT/?token=...`)."""
    browser_or_skip()
    home, port, log = tmp_path / "home", free_port(), tmp_path / "studio.log"
    monkeypatch.setenv("SDTUNE_HOME", str(home))
    env = {**os.environ, "SDTUNE_HOME": str(home), "SDTUNE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [
        str(Path(sys.executable).parent / "sdtune"), "studio", "--port", str(port), "--worker",
        "--worker-args", f"--poll 0.3 --accelerate-args '{ACCELERATE_ARGS}'",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the studio did not answer within 60 s:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        [printed] = [line for line in log.read_text().splitlines() if line.startswith("sdtune studio: ")]
        assert printed.startswith(f"sdtune studio: {url}/?token="), printed
        yield url, home, log, printed.split("?token=", 1)[1]
    finally:
        children = child_pids(process.pid)
        process.terminate()  # the CLI stops the studio and its worker (SIGTERM: trainers save and stop)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        time.sleep(0.5)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "sdtune studio left its children"


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (the studio's streamlit and worker processes), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Small Selenium helpers for Streamlit's markup (widgets carry their label as aria-label or a <p>)."""

    def __init__(self, driver, url: str, shots: Path, query: str = ""):
        self.driver, self.url, self.shots, self.query = driver, url, shots, query

    def open(self, path: str):
        self.driver.get(f"{self.url}/{path}{self.query}")
        self.wait_for(lambda: self.driver.find_elements("css selector", "h1"), 60, f"the {path or 'main'} page")
        self.idle()

    def idle(self, timeout: float = 120):
        """Waits for the script run a page load or a widget started to end. Streamlit marks its root with the run
        state (`data-test-script-state`, as its own browser tests read it); typing into a page whose run is still
        going can be undone when the run ends and its widgets are redrawn, which a fixed sleep missed under load."""
        done = '[data-testid="stApp"][data-test-script-state="notRunning"]'
        self.wait_for(lambda: self.driver.find_elements("css selector", done), timeout, "the page's run to end")

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.time() + timeout
        while True:
            try:
                result = condition()
                if result:
                    return result
            except Exception:  # an element went stale during a rerun: look again
                pass
            if time.time() > deadline:
                self.shot(f"timeout-{int(time.time())}")
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; page text:\n{self.text()[-2000:]}"
                )
            time.sleep(0.3)

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def wait_text(self, text: str, timeout: float = 60):
        self.wait_for(lambda: text in self.text(), timeout, repr(text))

    def button(self, label: str, index: int = 0):
        xpath = f'//button[.//p[normalize-space(text())="{label}"]]'
        found = self.wait_for(lambda: self.driver.find_elements("xpath", xpath), 30, f"button {label!r}")
        return found[index]

    def click(self, label: str, index: int = 0):
        element = self.button(label, index)
        self.wait_for(element.is_enabled, 30, f"button {label!r} enabled")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()
        self.idle()

    def expand(self, label: str):
        """Opens the expander of that label and waits until it is open. A click that lands while a rerun redraws the
        page can be lost (the expander stays folded, its widgets hidden), so a folded one is clicked again."""
        xpath = f'//details[./summary//*[normalize-space(text())="{label}"]]'

        def opened():
            details = self.driver.find_elements("xpath", xpath)
            if details and details[0].get_attribute("open") is None:
                details[0].find_element("tag name", "summary").click()
                return False
            return bool(details)

        self.wait_for(opened, 60, f"the expander {label!r} to open")
        self.idle()

    def field(self, label: str):
        selector = f'input[aria-label="{label}"], textarea[aria-label="{label}"]'
        return self.wait_for(lambda: self.driver.find_elements("css selector", selector), 30, f"field {label!r}")[0]

    def type(self, label: str, text: str):
        from selenium.webdriver.common.keys import Keys

        element = self.field(label)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(text)

    def choose(self, label: str, option: str, index: int = 0):
        """A selectbox by its label (the `index`-th of that label): open it, pick the option by its text."""
        box = f'//div[@data-testid="stSelectbox"][.//label[normalize-space(.)="{label}"]]'
        found = self.wait_for(lambda: self.driver.find_elements("xpath", box)[index:], 30, f"selectbox {label!r}")
        found[0].click()
        options = f'//*[@role="option"][normalize-space(.)="{option}"]'
        self.wait_for(lambda: self.driver.find_elements("xpath", options), 30, f"option {option!r}")[0].click()
        self.idle()

    def untick(self, label: str):
        box = f'//*[@data-testid="stCheckbox"][.//*[normalize-space(text())="{label}"]]'
        element = self.wait_for(lambda: self.driver.find_elements("xpath", box), 30, f"checkbox {label!r}")[0]
        if element.find_element("css selector", "input").is_selected():
            element.find_element("css selector", "label").click()
            self.idle()
        assert not element.find_element("css selector", "input").is_selected(), f"checkbox {label!r} still ticked"

    def shot(self, name: str) -> Path:
        """A screenshot once the page has settled: Streamlit marks the elements of a rerun still on its way with
        data-stale, so waiting for none shows every element of one run (the job table beside its live view)."""
        settled = lambda: not self.driver.find_elements("css selector", '[data-stale="true"]')  # noqa: E731
        if not name.startswith("timeout-"):
            self.wait_for(settled, 30, "the page to settle")
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def test_upload_train_watch_vote_publish_in_a_browser(studio, browser, tmp_path, controlnet_short_run):
    url, home, log, token = studio
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, url, shots, f"?token={token}")

    # 0) Without the studio's token (or with a wrong one) a browser gets one line of refusal and nothing else
    from sdtune.studio.access import REFUSAL

    for query in ("", "?token=" + "x" * len(token)):
        browser.get(f"{url}/datasets{query}")
        page.wait_text(REFUSAL.split(":")[0])
        shown = browser.find_element("css selector", '[data-testid="stMain"]').text.strip()
        assert shown == REFUSAL.replace("`", "")  # the one line, its code span rendered
        assert not browser.find_elements("css selector", 'h1, input, textarea, [data-testid="stSidebarNav"]')
    page.shot("0-refused")

    # 1) Datasets, opened at its own URL: create one, upload the 16 purple shapes and their captions
    page.open("datasets")
    page.type("New dataset", "purple")
    page.click("Create")
    page.wait_text("fingerprint")
    files = sorted(DATA.glob("*.png")) + sorted(DATA.glob("*.txt"))
    browser.find_element("css selector", 'input[type="file"]').send_keys("\n".join(str(f) for f in files))
    page.wait_text(f"{files[0].name}")
    page.click("Add to dataset")
    page.wait_text("added 16 images and 16 captions")
    assert api.dataset_info("purple")["captioned"] == 16
    page.shot("1-datasets-upload")
    browser.find_element("xpath", '//*[@role="tab"][normalize-space(.)="Captions"]').click()
    page.wait_text("Save captions")
    page.shot("1-datasets-captions")
    browser.find_element("xpath", '//*[@role="tab"][normalize-space(.)="Buckets & preflight"]').click()
    page.click("Run preflight")
    page.wait_text("64x64 (aspect 1.00): 16", timeout=120)
    page.shot("1-datasets-preflight")

    # 2) Train: the quickstart template on that dataset, 4 steps; Launch queues job 1
    page.open("train")
    page.choose("Dataset (frozen as a version at launch)", "purple")
    browser.find_element("xpath", '//*[@role="tab"][normalize-space(.)="Train"]').click()  # the form's train tab
    page.type("Max train steps", "4")
    page.click("Apply")
    page.wait_text("train.max_train_steps=4")
    page.click("Launch")
    page.wait_text("job 1 queued: toy-purple (lora)")
    page.shot("2-train")
    [job] = jobs.list_jobs()
    assert "/datasets/purple/versions/v1/images" in job.recipe.read_text()

    # 3) Jobs: the live view follows the job to the end (the page refreshes itself)
    page.open("jobs")
    page.wait_text("done: step 4 / 4", timeout=TRAIN_TIMEOUT)
    page.wait_for(lambda: browser.find_elements("css selector", '[data-testid="stImage"] img'), 30, "the grid")
    page.shot("3-jobs")
    assert jobs.get(job.id).state == "done", jobs.log_tail(job.id)
    assert any(a["name"] == "toy-purple" for a in api.list_adapters())

    page.open("registry")
    page.wait_text("ab_grid")  # the selected adapter's A/B grid (the table itself is a canvas)
    page.shot("4-registry")

    # 4) A/B: the base against base + toy-purple, blind, one vote
    page.open("ab")
    page.type("Seeds", "0 1")
    page.click("Render A and B")
    page.wait_text("Left is better", timeout=600)
    page.click("Left is better")
    page.wait_text("pair 1: voted left")
    [comparison] = api.ab_history(5)
    assert api.ab_tally(comparison["id"])["n"] == 1
    page.shot("5-ab")

    # 4b) A/B, open: B steered by a registered ControlNet through a bundled mask, shown beside the pairs
    from sdtune.adapters.registry import Registry

    Registry(home).register_run(controlnet_short_run[1], name="toy-masks")
    page.open("ab")
    page.choose("ControlNet", "toy-masks", index=1)  # side B's
    page.choose("Control image", "toy-masks/square-mask.png")
    page.type("Prompts (one per line)", "a purple square")
    page.type("Seeds", "0")
    page.untick("Blind (shuffle sides, vote)")
    page.click("Render A and B")
    page.wait_text("control image of B", timeout=180)
    latest = api.ab_history(5)[0]
    assert "+controlnet=toy-masks:1@" in latest["sides"]["b"] and latest["sides"]["b"].endswith("square-mask.png")
    caption = browser.find_element("xpath", '//*[normalize-space(text())="control image of B"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", caption)
    page.shot("5-ab-controlnet")

    # 5) Publish: the card preview and a dry run (nothing leaves the machine)
    page.open("publish")
    page.choose("Adapter", "toy-purple")  # the LoRA trained above (the ControlNet was registered after it)
    page.wait_text("Model card")
    page.click("Dry run: write the upload folder")
    page.wait_text("dry run: nothing uploaded", timeout=120)
    page.shot("6-publish")
    [folder] = (home / "studio" / "publish").glob("toy-purple-*")
    assert (folder / "README.md").is_file()
    print(f"screenshots: {shots}")


def test_a_kohya_zip_with_a_16_bit_png_and_a_truncated_jpeg_in_a_browser(studio, browser, tmp_path):
    """Upload a zip in kohya layout (`10_purple circle/001.png`, `5_purple square/001.png` ...) holding a 16-bit PNG
    and a truncated JPEG: the page says what it kept, by folder with the repeats, and lists the JPEG as refused with
    its reason; the 16-bit PNG shows as a thumbnail and the page keeps working."""
    from test_datasets_store import KOHYA_ZIP, make_zip

    url, home, log, token = studio
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, url, shots, f"?token={token}")
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(make_zip(KOHYA_ZIP))
    page.open("")
    page.type("New dataset", "kohya")
    page.click("Create")
    page.wait_text("fingerprint")
    browser.find_element("css selector", 'input[type="file"]').send_keys(str(archive))
    page.wait_text("shapes.zip")
    page.click("Add to dataset")
    page.wait_text("added 3 images (into 10_purple circle, 5_purple square) and 2 captions")
    page.wait_text("rejected 1 files")
    page.wait_text("5_purple square/003.jpg")  # the refused file, in the table under the form, with its reason
    page.wait_text("corrupt or truncated image")
    page.wait_text("3 images in 2 folders")
    page.shot("k1-kohya-upload")
    folder = home / "datasets" / "kohya" / "work" / "images"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == [
        "10_purple circle/001.png", "10_purple circle/001.txt",
        "5_purple square/001.png", "5_purple square/001.txt", "5_purple square/002.png",
    ]  # fmt: skip

    browser.find_element("xpath", '//*[@role="tab"][normalize-space(.)="Captions"]').click()
    page.wait_text("caption if none")  # the folder table: repeats and the concept of uncaptioned images
    assert "purple square" in page.text()
    page.choose("Folder", "5_purple square (2 images)")
    page.wait_text("5_purple square/002.png")

    def two_decoded_thumbnails():  # the 16-bit PNG among them, decoded by the browser (a broken image is 0 wide)
        images = browser.find_elements("css selector", '[data-testid="stImage"] img')
        return len(images) == 2 and all(image.get_attribute("naturalWidth") == "64" for image in images)

    page.wait_for(two_decoded_thumbnails, 30, "the two thumbnails of 5_purple square")
    assert "cannot be shown" not in page.text() and "OSError" not in page.text()
    page.shot("k2-kohya-folders")
    print(f"screenshots: {shots}")


def test_a_worker_killed_mid_job_in_a_browser(studio, browser, tmp_path):
    """Issue 20: `kill -9` the studio's worker mid-job. Its trainer stops by itself (no orphan trains on and
    registers a copy); the Jobs page shows the worker gone and the job interrupted. A new worker and Resume on the
    page finish the job, and the registry holds exactly one adapter, its kohya file named after it."""
    import signal

    from sdtune.adapters.registry import Registry
    from sdtune.studio.processes import group_members

    url, home, log, token = studio
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, url, shots, f"?token={token}")
    small = [f"data.train_data_dir={DATA}", "train.train_batch_size=2", "train.max_train_steps=40",
             "train.checkpointing_steps=5", "validation.validation_steps=0", "validation.toy_score=[]",
             "output.report_to=none", "output.export_check=false"]  # fmt: skip
    job = jobs.submit(ROOT / "recipes" / "quickstart.yaml", small)
    page.open("jobs")
    page.wait_for(lambda: jobs.progress(job.id)["step"] >= 2, TRAIN_TIMEOUT, "the trainer's first steps")
    [worker] = jobs.workers()
    pgid = jobs.get(job.id).pgid
    os.kill(worker["pid"], signal.SIGKILL)

    page.wait_text(f"Worker {worker['id']} is gone", 30)
    page.wait_text("No worker runs this queue")
    page.wait_text("interrupted: step", 120)  # once the trainer has stopped at its next step
    assert group_members(pgid) == [], "the trainer outlived its worker"
    stopped = jobs.progress(job.id)["events"][-1]
    assert (stopped["event"], stopped["reason"]) == ("stopped", "its job worker is gone")
    assert Registry(home).list() == []
    page.shot("7-worker-killed")

    command = [sys.executable, "-m", "sdtune.studio.worker", "--poll", "0.3", "--accelerate-args", ACCELERATE_ARGS]
    with (tmp_path / "worker2.log").open("w") as out:
        env = {**os.environ, "SDTUNE_HOME": str(home), "SDTUNE_CACHE": str(tmp_path / "cache")}
        second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        page.wait_for(lambda: "No worker runs this queue" not in page.text(), 60, "the new worker on the page")
        page.click("Resume")
        page.wait_text("done: step 40 / 40", timeout=TRAIN_TIMEOUT)
        page.shot("7-worker-killed-resumed")
        [entry] = Registry(home).list()
        assert entry.name == "toy-purple" and Registry(home).file(entry.name, "kohya").name == "toy-purple.safetensors"
        starts = [e for e in jobs.progress(job.id)["events"] if e["event"] == "start"]
        assert [(s["resumed"], s["step"]) for s in starts] == [(False, 0), (True, stopped["step"])]
    finally:
        second.terminate()
        second.wait(timeout=120)
    print(f"screenshots: {shots}")


def test_a_broken_kohya_config_on_the_train_page_in_a_browser(studio, browser, tmp_path):
    """Import a truncated kohya_ss preset on the Train page: one error line naming the file, and the page (its form)
    keeps working."""
    url, home, log, token = studio
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = Page(browser, url, shots, f"?token={token}")
    broken = tmp_path / "broken.json"
    broken.write_text('{"LoRA_type": "Standard", "network_dim": ')
    page.open("train")
    page.expand("Import a kohya config")
    uploads = page.wait_for(lambda: browser.find_elements("css selector", 'input[type="file"][accept*=".json"]'), 30,
                            "the kohya config uploader")  # fmt: skip
    uploads[0].send_keys(str(broken))
    page.expand("Import a kohya config")
    page.wait_text("broken.json")
    browser.find_element("css selector", 'input[placeholder="my-kohya-lora"]').send_keys("broken")
    page.click("Import")
    page.wait_text("broken.json:")
    shot = page.shot("train-broken-kohya")
    assert "Traceback" not in page.text() and "Import a kohya config" in page.text()
    assert not (home / "presets" / "broken.yaml").exists()
    assert shot.is_file()
