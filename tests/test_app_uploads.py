"""Visitors' uploads on the server's disk, and the size of a request: a real ``python app.py``
and real HTTP requests (as a browser or ``gradio_client`` sends them, and as a stranger could).

An upload must state its size and carry one file of the upload limit; all uploads together stay
within ``$DIM3_UPLOAD_CACHE``: the oldest files past their grace make room, and when none can,
the upload is refused before a byte of it is written. Uploads expire after ``$DIM3_UPLOAD_TTL``
(``dim3.ui.uploads``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from dim3.ui.uploads import UploadRoom, delete_cache, max_request, upload_ttl
from tests.app_server import ROOT, running_app

MB = 10**6


def files_in(cache: Path) -> dict[str, int]:
    """The uploads in Gradio's cache folder: name -> bytes (the demo's example pictures, which
    the app puts there itself, left out)."""
    return {p.name: p.stat().st_size for p in cache.rglob("*.bin") if p.is_file()}


def upload(url: str, *files: tuple[str, bytes]) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files=[("files", f) for f in files], timeout=60)


def broken_off_upload(url: str, cache: Path, declared: int, sent: int) -> None:
    """An upload request that states ``declared`` bytes, sends a file's first ``sent`` and
    hangs up (as a visitor who closes the tab, or on purpose); returns once the server has
    written what came into ``cache``."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    head = (
        b'--b0undary\r\nContent-Disposition: form-data; name="files"; '
        b'filename="cut.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n"
            + f"Content-Length: {len(head) + declared}\r\n\r\n".encode()
            + head
            + b"c" * sent
        )
        deadline = time.monotonic() + 30
        while sum(p.stat().st_size for p in cache.glob("tmp*")) < sent:
            assert time.monotonic() < deadline, "the server did not write the upload's start"
            time.sleep(0.2)


def test_uploads_state_their_size_carry_one_file_and_share_a_bounded_room(tmp_path):
    cache = tmp_path / "gradio-cache"
    env = {
        "GRADIO_TEMP_DIR": str(cache),
        "DIM3_MAX_UPLOAD": "10mb",
        "DIM3_UPLOAD_CACHE": "30mb",
        "DIM3_UPLOAD_GRACE": "3",
        "DIM3_UPLOAD_TTL": "0",
    }
    with running_app(tmp_path, [ROOT / "assets"], **env) as url:
        # Two files of the limit in one request (Gradio alone takes up to 1,000): refused whole.
        r = upload(url, ("a.bin", b"a" * 9 * MB), ("b.bin", b"b" * 9 * MB))
        assert r.status_code == 413, r.text
        assert "one file of at most 10 MiB" in r.text and "17.2 MiB" in r.text
        # A body that does not state its size could be any size: refused before it is read.
        r = httpx.post(
            url + "gradio_api/upload",
            content=iter([b"--x\r\n", b"x" * 1000]),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 411 and "Content-Length" in r.text
        assert files_in(cache) == {}

        for i in range(3):  # 27 MB of the 30
            r = upload(url, (f"f{i}.bin", bytes([i]) * 9 * MB))
            assert r.status_code == 200, r.text
        first = Path(r.json()[0]).parent.parent  # Gradio's cache folder as the server names it
        assert first.resolve() == cache.resolve()
        assert set(files_in(cache)) == {"f0.bin", "f1.bin", "f2.bin"}

        # No room, and every file is within its grace (a handler may be about to open it).
        r = upload(url, ("g.bin", b"g" * 9 * MB))
        assert r.status_code == 507, r.text
        assert "as many uploads as it can keep (30 MB)" in r.text
        assert set(files_in(cache)) == {"f0.bin", "f1.bin", "f2.bin"}

        time.sleep(3.5)  # past the grace: the oldest upload makes room
        r = upload(url, ("g.bin", b"g" * 9 * MB))
        assert r.status_code == 200, r.text
        held = files_in(cache)
        assert set(held) == {"f1.bin", "f2.bin", "g.bin"}
        assert sum(held.values()) <= 30 * MB

        # An upload whose request breaks off: Gradio leaves what it had written in a temporary
        # file of no record; it counts until no byte was written to it for the grace, then goes.
        broken_off_upload(url, cache, declared=2 * MB, sent=MB)
        assert [p.stat().st_size for p in cache.glob("tmp*")] == [MB]
        time.sleep(3.5)
        assert upload(url, ("h.bin", b"h")).status_code == 200
        assert list(cache.glob("tmp*")) == []
        assert set(files_in(cache)) == {"f1.bin", "f2.bin", "g.bin", "h.bin"}

        # Any other request: its body stated and within 1 MiB. Gradio would read a JSON body
        # whole and keep it in its queue before a component's length limit is checked.
        message = {"data": ["x" * 2 * MB], "fn_index": 0, "session_hash": "s1"}
        r = httpx.post(url + "gradio_api/queue/join", json=message, timeout=60)
        assert r.status_code == 413, r.text
        assert "at most 1,024 KiB" in r.text and "(this one: 1,953 KiB)" in r.text
        r = httpx.post(
            url + "gradio_api/queue/join",
            content=iter([b'{"data": ["', b"x" * 1000, b'"]}']),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 411 and "Content-Length" in r.text

        # The app still answers as before.
        assert httpx.get(url + "config", timeout=30).status_code == 200
        from gradio_client import Client

        plan = Client(url, verbose=False).predict(api_name="/plan")
        assert "fit together" in str(plan)
    assert "removed the oldest files (9.0 MB)" in (tmp_path / "app.log").read_text()


def test_uploads_expire_after_their_time(tmp_path):
    cache = tmp_path / "gradio-cache"
    env = {"GRADIO_TEMP_DIR": str(cache), "DIM3_UPLOAD_TTL": "2"}
    with running_app(tmp_path, [ROOT / "assets"], **env) as url:
        r = upload(url, ("old.bin", b"o" * MB))
        assert r.status_code == 200, r.text
        assert "old.bin" in files_in(cache)
        deadline = time.monotonic() + 30  # Gradio looks every 2 s for files over 2 s old
        while "old.bin" in files_in(cache) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert files_in(cache) == {}
        examples = [p for p in cache.rglob("*.png")]
        assert examples, "the demo's example pictures stay: the app keeps them"


def test_upload_settings_are_read_and_checked(monkeypatch):
    monkeypatch.delenv("DIM3_UPLOAD_TTL", raising=False)
    monkeypatch.delenv("DIM3_UPLOAD_CACHE", raising=False)
    monkeypatch.delenv("DIM3_UPLOAD_GRACE", raising=False)
    monkeypatch.delenv("DIM3_MAX_REQUEST", raising=False)
    assert upload_ttl() == 86_400 and delete_cache() == (3600, 86_400)
    room = UploadRoom.from_env()
    assert (room.max_bytes, room.grace_s) == (2 * 10**9, 60.0)
    monkeypatch.setenv("DIM3_UPLOAD_TTL", "0")
    monkeypatch.setenv("DIM3_UPLOAD_CACHE", "0")
    assert delete_cache() is None and UploadRoom.from_env().max_bytes is None
    assert max_request() == 2**20
    monkeypatch.setenv("DIM3_MAX_REQUEST", "0")
    assert max_request() is None
    monkeypatch.setenv("DIM3_UPLOAD_TTL", "a day")
    with pytest.raises(ValueError, match=r"\$DIM3_UPLOAD_TTL='a day' is not a number of seconds"):
        upload_ttl()
    monkeypatch.setenv("DIM3_UPLOAD_TTL", "-5")
    with pytest.raises(ValueError, match="must be 0"):
        upload_ttl()
    for grace in ("soon", "-1", "nan"):
        monkeypatch.setenv("DIM3_UPLOAD_GRACE", grace)
        with pytest.raises(ValueError, match=r"\$DIM3_UPLOAD_GRACE="):
            UploadRoom.from_env()
