"""Who gets into the studio: its token (studio/access.py), the printed URL, --no-token and --expose.

The app is driven through `streamlit.testing.v1.AppTest` from studio/app.py itself, gate included, and the real
server (`sdtune studio`) over Streamlit's websocket as a browser talks to it, forged messages included; the browser
test (tests/test_studio_e2e.py) opens it without the token too.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sdtune.studio import access

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "studio" / "app.py"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(access.NO_TOKEN_ENV, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


# -- the token ----------------------------------------------------------------------------------------------------


def test_the_token_is_made_once_kept_private_and_replaced_when_others_could_read_it(home):
    token = access.studio_token()
    path = home / "studio" / "token"
    assert len(token) >= 43 and path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert access.studio_token() == token  # kept: a bookmarked URL survives a restart
    path.chmod(0o644)  # readable by every account: it may have been read, so it is worth nothing now
    new = access.studio_token()
    assert new != token and path.read_text() == new and stat.S_IMODE(path.stat().st_mode) == 0o600


def app(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update(query or {})
    return at.run()


def shown(at: AppTest) -> list[str]:
    """Every element the run put on the page (main area and sidebar), by type."""
    found = []

    def walk(node):
        children = getattr(node, "children", None)
        if children is None:
            found.append(type(node).__name__)
        for child in (children or {}).values():
            walk(child)

    for block in (at.main, at.sidebar):
        walk(block)
    return found


@pytest.mark.parametrize("query", [{}, {"token": "x" * 43}, {"token": ""}], ids=["none", "wrong", "empty"])
def test_without_the_token_the_page_is_one_line_of_refusal(home, query):
    at = app(query)
    assert not at.exception
    assert shown(at) == ["Error"] and at.error[0].value == access.REFUSAL  # no title, no widget, no navigation
    assert "\n" not in access.REFUSAL


def test_the_token_opens_the_app_and_the_session_keeps_it(home):
    at = app({"token": access.studio_token()})
    assert not at.exception and [t.value for t in at.title] == ["Datasets"]  # the root opens the Datasets page
    assert at.button  # the page's own widgets
    at.query_params.clear()  # a page link that drops the query: the session was admitted already
    at = at.run()
    assert [t.value for t in at.title] == ["Datasets"] and at.query_params == {"token": access.studio_token()}


def test_no_token_admits_everyone_and_says_so_on_every_page(home, monkeypatch):
    monkeypatch.setenv(access.NO_TOKEN_ENV, "1")
    at = app()
    assert [t.value for t in at.title] == ["Datasets"]
    assert any("No token" in w.value for w in at.sidebar.warning)


class Recorder:
    """Stands in for subprocess.Popen: records what `sdtune studio` would start."""

    started: list = []

    def __init__(self, command, cwd, env=None):
        Recorder.started.append((command, env))

    def wait(self):
        return 0

    def poll(self):
        return 0


@pytest.fixture
def recorder(monkeypatch):
    from sdtune.studio import launch

    Recorder.started = []
    monkeypatch.setattr(launch.subprocess, "Popen", Recorder)
    return Recorder.started


def test_sdtune_studio_prints_the_url_with_its_token(home, recorder, capsys):
    from sdtune.studio import cli

    assert cli.main(["studio", "--port", "8599"]) == 0
    assert capsys.readouterr().out.strip() == f"sdtune studio: http://127.0.0.1:8599/?token={access.studio_token()}"
    [(command, env)] = recorder
    assert access.NO_TOKEN_ENV not in env


def test_no_token_is_loud_and_refused_on_the_network(home, recorder, capsys):
    from sdtune.studio import cli

    assert cli.main(["studio", "--port", "8599", "--no-token"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "sdtune studio: http://127.0.0.1:8599" and "WARNING: --no-token" in out.err
    assert recorder[0][1][access.NO_TOKEN_ENV] == "1"
    for flags in (["--expose"], ["--host", "192.168.1.5"]):
        with pytest.raises(SystemExit, match="--no-token on .* would let the whole network in; drop --no-token"):
            cli.main(["studio", "--no-token", *flags])
    assert len(recorder) == 1  # nothing more started


# -- the real server: what a visitor without the token can do over Streamlit's websocket ---------------------------


@pytest.fixture
def server(home, tmp_path):
    """`sdtune studio` on a free port; yields (port, token)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "studio.log"
    with log.open("w") as out:
        command = [str(Path(sys.executable).parent / "sdtune"), "studio", "--port", str(port)]
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        url = log.read_text().splitlines()[0].removeprefix("sdtune studio: ")
        assert url == f"http://127.0.0.1:{port}/?token={access.studio_token()}"
        assert "URL: http" not in log.read_text()  # no URL without the token (Streamlit's own) to click by mistake
        yield port, access.studio_token()
    finally:
        process.terminate()
        process.wait(timeout=60)


def visit(port: int, page: str, query: str, widgets: list[tuple[str, str, object]] = ()) -> list[tuple[str, str]]:
    """One browser session as the frontend drives it: a rerun request for the URL `/page?query` with `widgets`
    ((id, field, value) as the frontend would send them); returns (element type, its proto text) of what the server
    put on the page, once the run (and the reruns it asked for) finished. "page_not_found" and "navigation"
    (with the pages' URLs) are listed too."""
    import asyncio

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async def session():
        request = BackMsg()
        request.rerun_script.query_string, request.rerun_script.page_name = query, page
        for widget_id, field, value in widgets:
            setattr(request.rerun_script.widget_states.widgets.add(id=widget_id), field, value)
        shown = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"]) as ws:
            await ws.send(request.SerializeToString())
            while True:
                message = ForwardMsg()
                message.ParseFromString(await asyncio.wait_for(ws.recv(), 120))
                kind = message.WhichOneof("type")
                if kind == "delta" and message.delta.WhichOneof("type") == "new_element":
                    element = message.delta.new_element
                    shown.append((element.WhichOneof("type"), str(getattr(element, element.WhichOneof("type")))))
                elif kind == "page_not_found":
                    shown.append(("page_not_found", ""))
                elif kind == "navigation":
                    shown.append(("navigation", " ".join(p.url_pathname for p in message.navigation.app_pages)))
                elif kind == "script_finished" and message.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                    return shown

    return asyncio.run(session())


def widget_id(shown: list[tuple[str, str]], kind: str, label: str) -> str:
    import re

    for element, text in shown:
        if element == kind and f'label: "{label}"' in text:
            return re.search(r'id: "([^"]+)"', text).group(1)
    raise AssertionError(f"no {kind} {label!r} on the page: {shown}")


def test_the_real_server_shows_a_visitor_without_the_token_nothing_and_does_nothing(server, home):
    port, token = server
    refused = [("alert", f'body: "{access.REFUSAL}"')]
    for page, query in [("", ""), ("datasets", ""), ("jobs", "token=" + "x" * 43), ("publish", "token=")]:
        assert [(kind, text.split("\n")[0]) for kind, text in visit(port, page, query)] == refused
    # with the token, every page opens at its own URL (/datasets was "Page not found": the default page is served
    # at the root URL only, so the root is a hidden page that switches to /datasets)
    titles = {"datasets": "Datasets", "train": "Train", "jobs": "Jobs", "sweeps": "Sweeps", "registry": "Registry",
              "ab": "A/B", "publish": "Publish", "": "Datasets"}  # fmt: skip
    for url, title in titles.items():
        page = visit(port, url, f"token={token}")
        assert ("page_not_found", "") not in page, url
        assert ("navigation", " datasets train jobs sweeps registry ab publish") in page
        assert [text for kind, text in page if kind == "heading"][0].startswith(f'tag: "h1"\nbody: "{title}"'), url
    # the ids of the Datasets page's "New dataset" form, as a browser has them
    page = visit(port, "datasets", f"token={token}")
    form = [(widget_id(page, "text_input", "New dataset"), "string_value", "sneaky"),
            (widget_id(page, "button", "Create"), "trigger_value", True)]  # fmt: skip
    visit(port, "datasets", "", form)  # a forged form submission without the token: refused, nothing made
    assert not (home / "datasets" / "sneaky").exists()
    visit(port, "datasets", f"token={token}", form)  # the same message with the token creates it
    assert (home / "datasets" / "sneaky").is_dir()
