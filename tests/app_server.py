"""Start ``python app.py`` as users do, offline, on a free port (for browser and API tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHED = "To create a public link, set `share=True`"  # Blocks.launch, after its own check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(
    scratch: Path, roots: list[Path], *, argv: list[str] | None = None, **env: str
) -> Iterator[str]:
    """The app serving on 127.0.0.1 with ``roots`` allowed and outputs in ``scratch``; yields
    its URL. The server's log is ``scratch/app.log``. ``argv``: the interpreter's arguments
    (default ``app.py``, as users start it)."""
    port = free_port()
    full_env = os.environ | {
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "DIM3_ALLOWED_ROOTS": os.pathsep.join(str(r) for r in roots),
        "DIM3_OUTPUT_DIR": str(scratch / "outputs"),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    log_path = scratch / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *(argv or ["app.py"])],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        try:
            # Ready once launch() is past its own check: it asks for the page with a 3 s timeout
            # and ends the process if that fails, so a request sent as soon as the page answers
            # (a merge that holds the interpreter's lock) could make it fail (a CI run on
            # 2026-12-02 did). Gradio prints this line after that check.
            while LAUNCHED not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            urllib.request.urlopen(url, timeout=10)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
