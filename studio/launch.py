"""`sdtune studio`: starts the Streamlit app (studio/app.py), optionally with a training worker beside it.

Usage:
    sdtune studio                          # http://127.0.0.1:8501/?token=...: this machine only
    sdtune studio --worker --port 8600     # a worker (`sdtune worker`) runs the queued jobs while the studio is up
    sdtune studio --expose                 # every network interface, with a warning (needs the token)
    sdtune studio --no-token               # no token asked: every account on this machine gets in (warned)

The studio binds to 127.0.0.1 unless told otherwise: it can start training, delete adapters and publish to the Hub.
Other accounts of the machine can reach 127.0.0.1 too, so it asks for a token (studio/access.py): the printed URL
carries it. It runs from the repository root, where the recipe templates' relative data paths point.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from sdtune.studio import access

APP = Path(__file__).resolve().parent / "app.py"
ROOT = APP.parents[1]
MAX_UPLOAD_MB = 500  # Streamlit's own cap per upload; studio/datasets_store.py checks the same total
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EXPOSE_WARNING = (
    "WARNING: the studio listens on {host}: anyone who can reach this port and holds the URL's token can train, "
    "delete adapters and publish, and the token crosses the network in clear text. Use it on a trusted network "
    "only (or an SSH tunnel: ssh -L 8501:127.0.0.1:8501 host)."
)
NO_TOKEN_WARNING = (
    "WARNING: --no-token: the studio asks for no token. Every account on this machine can open it, train, make a "
    "job read and write wherever the studio's folders allow, delete adapters and publish with your Hub token."
)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: local only).")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--expose", action="store_true", help="Listen on every interface (0.0.0.0), with a warning.")
    parser.add_argument(
        "--no-token", action="store_true", help="Ask for no token (every account on this machine gets in); local only."
    )
    parser.add_argument("--worker", action="store_true", help="Also run a training worker until the studio stops.")
    parser.add_argument(
        "--worker-args", default="", help='Passed to the worker (shell-quoted), e.g. "--poll 0.5 --grace 120".'
    )
    return parser


def streamlit_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--server.maxUploadSize", str(MAX_UPLOAD_MB), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
        "--logger.hideWelcomeMessage", "true",  # its "URL: http://..." lacks the token: only ours is printed
    ]  # fmt: skip


def run_studio(args: argparse.Namespace) -> int:
    host = "0.0.0.0" if args.expose else args.host
    if host not in LOCAL_HOSTS:
        if args.no_token:
            raise SystemExit(f"sdtune studio: --no-token on {host} would let the whole network in; drop --no-token")
        print(EXPOSE_WARNING.format(host=host), file=sys.stderr, flush=True)
    if args.no_token:
        print(NO_TOKEN_WARNING, file=sys.stderr, flush=True)
        url, env = f"http://{host}:{args.port}", {**os.environ, access.NO_TOKEN_ENV: "1"}
    else:  # made (or read) before the app starts, so the printed URL and the app agree
        url, env = f"http://{host}:{args.port}/?token={access.studio_token()}", {**os.environ}
        env.pop(access.NO_TOKEN_ENV, None)
    children = []
    # SIGTERM (a service manager, a test) stops the studio like Ctrl-C: the children are stopped, never orphaned.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.worker:
            worker = [sys.executable, "-m", "sdtune.studio.worker", *shlex.split(args.worker_args)]
            children.append(subprocess.Popen(worker, cwd=ROOT))
        print(f"sdtune studio: {url}", flush=True)
        children.insert(0, subprocess.Popen(streamlit_command(host, args.port), cwd=ROOT, env=env))
        return children[0].wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for child in children:  # the worker gets SIGTERM: it stops its trainers gracefully, their jobs stay resumable
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
