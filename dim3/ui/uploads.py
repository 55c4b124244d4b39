"""What visitors' uploads may hold on the server's disk and for how long, and how large a
request may be.

Gradio writes an upload into its cache folder before any handler sees it: up to
``max_file_size`` a file, up to 1,000 files in one request, and it keeps them until the server
stops. Every visitor of a Space may post to its upload route, with or without the page, so one
visitor could fill the disk that every visitor's Hub downloads and saves share. Here:

- ``RequestGuard``: an ASGI middleware. On Gradio's upload route a request must state its
  size (``Content-Length``; browsers and ``gradio_client`` do), may carry one file of the
  upload limit (each of the app's widgets takes one), and must fit in the room: what the app's
  cache holds (uploads, and files the app handed out) plus the uploads on their way, at most
  ``$DIM3_UPLOAD_CACHE`` (2 GB by default; 0: no limit). Where it would not fit, the oldest
  files (over ``UPLOAD_GRACE_S`` old, so that none is taken from under a handler about to open
  it) are deleted first; where that is not enough, the upload is refused (507) with a message
  that says so, and nothing of it is written. An upload whose request broke off counts until
  it is swept (no byte written to it for the grace).
  Any other request with a body must state its size and stay within ``$DIM3_MAX_REQUEST`` (1
  MiB): Gradio reads a request's JSON whole, and a queued event holds it, before any
  component's length limit is checked (a 400 MB message made a server 1.1 GB larger).
- ``StreamRefusals``: a logging filter. Gradio's queue stream (``GET /queue/data``, the REST
  API's ``GET /call/<name>/<event>``) refuses a session it does not hold by raising its 404 after
  the stream's first bytes went out, and uvicorn logs a 75-line traceback for each: one request
  naming a made-up session id, by anyone, one traceback. The filter makes them one line, at
  most one a minute, with how many came since.
- ``upload_ttl()``: files are deleted once ``$DIM3_UPLOAD_TTL`` seconds old (a day by default;
  0: kept until the server stops), by Gradio's own ``delete_cache``.

This module knows Gradio's upload route and its record of the files it made
(``Blocks.temp_file_sets``); it decides nothing about what a handler does with a file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.datastructures import Headers

from dim3.sizes import human_size, size_from_env
from dim3.ui.visitors import CURRENT_VISITOR, visitor_address

log = logging.getLogger("dim3.ui")

ENV_TTL = "DIM3_UPLOAD_TTL"
ENV_CACHE = "DIM3_UPLOAD_CACHE"
ENV_GRACE = "DIM3_UPLOAD_GRACE"
ENV_MAX_REQUEST = "DIM3_MAX_REQUEST"
DEFAULT_MAX_REQUEST = 2**20  # 1 MiB: the app's largest request in its tests is 10 kB
DEFAULT_TTL_S = 86_400
DEFAULT_CACHE = 2 * 10**9
UPLOAD_GRACE_S = 60.0  # a file younger than this is never deleted to make room ($DIM3_UPLOAD_GRACE)
MULTIPART_SLACK = 64 * 1024  # a request's bytes besides its file: the multipart headers
UPLOAD_PATH = "/gradio_api/upload"
DEEP_LINK = "/deep_link"
COMPONENT_SERVER = "/component_server"
STARTUP = "/startup-events"


STREAM_REFUSED = "Caught handled exception, but response already started"  # Starlette's words
REFUSALS_EVERY_S = 60.0


class StreamRefusals(logging.Filter):
    """On uvicorn's error logger: the traceback of a queue stream that Gradio refused once it
    had begun (a ``RuntimeError`` with Starlette's words, raised from an ``HTTPException``)
    becomes one warning line, at most one every ``every`` seconds, counting the ones left out.
    Every other record passes as it is. ``install()`` puts one on the logger, once."""

    LOGGER = "uvicorn.error"

    def __init__(self, every: float = REFUSALS_EVERY_S) -> None:
        super().__init__()
        self.every, self.count, self.next = every, 0, 0.0
        self.lock = threading.Lock()

    @classmethod
    def install(cls) -> StreamRefusals:
        logger = logging.getLogger(cls.LOGGER)
        for f in logger.filters:
            if isinstance(f, cls):
                return f
        f = cls()
        logger.addFilter(f)
        return f

    def filter(self, record: logging.LogRecord) -> bool:
        from starlette.exceptions import HTTPException

        exc = record.exc_info[1] if record.exc_info else None
        cause = getattr(exc, "__cause__", None)
        if not (
            isinstance(exc, RuntimeError)
            and str(exc).startswith(STREAM_REFUSED)
            and isinstance(cause, HTTPException)
        ):
            return True
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if now < self.next:
                return False
            count, self.count, self.next = self.count, 0, now + self.every
        record.msg = (
            "%d stream(s) refused after they began since the last such line, the last with %s "
            "(a queue stream for a session the server does not hold: a client that named a "
            "wrong or expired id)"
        )
        record.args = (count, cause.status_code)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def upload_ttl() -> int | None:
    """``$DIM3_UPLOAD_TTL`` in seconds (a day by default); None when 0 (no expiry)."""
    raw = os.environ.get(ENV_TTL, "").strip()
    try:
        ttl = int(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"${ENV_TTL}={raw!r} is not a number of seconds; use e.g. 86400") from None
    if ttl < 0:
        raise ValueError(f"${ENV_TTL} must be 0 (no expiry) or a number of seconds, got {ttl}")
    return ttl or None


def max_request() -> int | None:
    """``$DIM3_MAX_REQUEST``: the largest body of a request other than an upload (1 MiB; 0: no
    limit)."""
    return size_from_env(ENV_MAX_REQUEST, DEFAULT_MAX_REQUEST)


def delete_cache() -> tuple[int, int] | None:
    """``Blocks(delete_cache=...)``: every hour (or every TTL, if shorter), the files older than
    the TTL."""
    ttl = upload_ttl()
    return None if ttl is None else (min(ttl, 3600), ttl)


class UploadRoom:
    """The bytes Gradio's cache holds for this app, with the uploads under way reserved.

    ``reserve(blocks, n, folder)`` before an upload of ``n`` bytes is read; ``release(n)`` once the
    request is over (its files are then in Gradio's record and counted from there)."""

    def __init__(self, max_bytes: int | None, grace_s: float = UPLOAD_GRACE_S) -> None:
        self.max_bytes, self.grace_s = max_bytes, grace_s
        self._reserved = 0
        self._sizes: dict[str, int] = {}  # path -> bytes, of the files already counted
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> UploadRoom:
        """``$DIM3_UPLOAD_CACHE`` (2 GB; 0: no limit) and ``$DIM3_UPLOAD_GRACE`` (60 s)."""
        raw = os.environ.get(ENV_GRACE, "").strip()
        try:
            grace = float(raw) if raw else UPLOAD_GRACE_S
        except ValueError:
            grace = math.nan
        if not 0 <= grace < math.inf:
            raise ValueError(f"${ENV_GRACE}={raw!r} is not a number of seconds; use e.g. 60")
        return cls(size_from_env(ENV_CACHE, DEFAULT_CACHE), grace)

    def reserve(self, blocks: Any, n: int, folder: str | None = None) -> str | None:
        """Make room for ``n`` bytes (deleting the oldest files if need be) and hold it; or say
        why not, in words for the visitor. ``folder``: where Gradio writes uploads, whose
        unfinished ones are swept and counted (:meth:`_unfinished`)."""
        with self._lock:
            pending = self._unfinished(folder) if folder else 0
            if self.max_bytes is not None:
                need = self._held(blocks) + pending + self._reserved + n - self.max_bytes
                if need > 0:
                    need -= self._free(blocks, need)
                if need > 0:
                    return (
                        f"The server holds as many uploads as it can keep "
                        f"({human_size(self.max_bytes)}) and none is old enough to remove; "
                        "try again in a minute."
                    )
            self._reserved += n
            return None

    def release(self, n: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - n)

    def _unfinished(self, folder: str) -> int:
        """Bytes of the uploads Gradio is still writing, or left when their request broke off.

        Gradio's form parser streams each file into a temporary file (``tmp...``) in the upload
        folder and moves it into a folder of its own once the request is whole; a request that
        breaks off leaves it there, in no record, for good (5 MB of a 9 MB upload, three times,
        by hand). Those no byte was written to for the grace are deleted; the rest count (an
        upload under way counts twice, with its reservation: the safe side)."""
        pending = 0
        cutoff = time.time() - self.grace_s
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return 0
        for entry in entries:
            if not entry.name.startswith("tmp"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not entry.is_file(follow_symlinks=False):
                    continue
                if st.st_mtime < cutoff:
                    os.remove(entry.path)
                    log.info("uploads: removed a broken-off upload (%.1f MB)", st.st_size / 1e6)
                    continue
            except OSError:
                continue
            pending += st.st_size
        return pending

    def _files(self, blocks: Any) -> list[tuple[str, set]]:
        return [(f, s) for s in list(getattr(blocks, "temp_file_sets", [])) for f in list(s)]

    def _held(self, blocks: Any) -> int:
        sizes: dict[str, int] = {}
        for path, _ in self._files(blocks):
            if path in sizes:
                continue
            size = self._sizes.get(path)
            if size is None:
                try:
                    size = os.lstat(path).st_size
                except OSError:  # gone, or not yet moved into place: counted when it is
                    continue
            sizes[path] = size
        self._sizes = sizes
        return sum(sizes.values())

    def _free(self, blocks: Any, need: int) -> int:
        """Delete the oldest files (older than the grace, not kept by a component) until
        ``need`` bytes are free; the bytes freed."""
        keep: set[str] = set()
        for block in list(getattr(blocks, "blocks", {}).values()):
            keep.update(getattr(block, "keep_in_cache", set()))
        cutoff = time.time() - self.grace_s
        aged = []
        for path, owner in self._files(blocks):
            try:
                st = os.lstat(path)
            except OSError:
                owner.discard(path)
                continue
            if path not in keep and st.st_ctime < cutoff:
                aged.append((st.st_ctime, path, owner, st.st_size))
        freed = 0
        for _, path, owner, size in sorted(aged, key=lambda a: a[0]):
            if freed >= need:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            owner.discard(path)
            self._sizes.pop(path, None)
            freed += size
            try:
                Path(path).parent.rmdir()  # Gradio's folder for the file, if now empty
            except OSError:
                pass
        if freed:
            log.info("uploads: removed the oldest files (%.1f MB) to make room", freed / 1e6)
        return freed


def _plain(send: Callable, status: int, text: str):
    async def respond() -> None:
        body = text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return respond()


def _sessions(scope: dict) -> Any:
    """The app's ``SessionShare``, bound to its session store (``dim3.ui.visitors``); None for
    a request that is not HTTP or an app without one."""
    app = scope.get("app")
    if scope.get("type") != "http" or app is None or not hasattr(app, "state_holder"):
        return None
    share = getattr(app.get_blocks(), "dim3_sessions", None)
    if share is not None:
        share.bind(app.state_holder)
    return share


class RequestGuard:
    """ASGI middleware: Gradio's upload route only takes a request whose stated size fits one
    file of the app's upload limit (``Blocks.max_file_size``, as Gradio parsed it) and the room
    (``UploadRoom``); any other request with a body must state its size and keep within
    ``max_body`` (``$DIM3_MAX_REQUEST``), since Gradio reads a request's JSON whole, and a queued
    event keeps it, before any component's limit is checked. Gradio's deep-link and
    component-server routes answer 404 (unused here; both made a session for any id, and the
    first wrote it to disk). Every request is served with its visitor in
    ``dim3.ui.visitors.CURRENT_VISITOR``, so that a session Gradio makes while serving it is
    that visitor's (``SessionShare``)."""

    def __init__(self, app: Callable, room: UploadRoom, max_body: int | None) -> None:
        self.app, self.room, self.max_body = app, room, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        share = _sessions(scope)
        if share is None or scope.get("path", "").endswith(STARTUP):
            # the start-up request (the server's own) starts the queue's task, which would
            # inherit its visitor
            await self._guard(scope, receive, send)
            return
        client = scope.get("client") or (None, None)
        who = visitor_address(Headers(scope=scope), client[0], share.hops)
        token = CURRENT_VISITOR.set(who)  # whose a session made while serving this is
        try:
            await self._guard(scope, receive, send)
        finally:
            CURRENT_VISITOR.reset(token)

    async def _guard(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "").rstrip("/") if scope.get("type") == "http" else ""
        if path.endswith(DEEP_LINK):
            # a GET that writes: every session's settings into the cache folder, past the room
            await _plain(send, 404, "This app has no deep links.")
            return
        if path.endswith(COMPONENT_SERVER):
            # no component here has server functions; the route makes a session for any id
            await _plain(send, 404, "This app's components have no server functions.")
            return
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            length: int | None = int(headers.get(b"content-length", b""))
        except ValueError:
            length = None
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            length = -1  # any size: refused below
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith(
            UPLOAD_PATH
        ):
            await self._upload(scope, receive, send, length)
            return
        if length == -1:
            await _plain(send, 411, "A request must state its size (Content-Length).")
            return
        if self.max_body is not None and length is not None and length > self.max_body:
            await _plain(
                send,
                413,
                f"A request to this app is at most {self.max_body / 2**10:,.0f} KiB "
                f"(this one: {length / 2**10:,.0f} KiB); pictures go through the upload route.",
            )
            return
        await self.app(scope, receive, send)  # no stated size and not chunked: no body

    async def _upload(self, scope: dict, receive: Callable, send: Callable, length: int | None):
        if length is None or length < 0:
            await _plain(send, 411, "An upload must state its size (Content-Length).")
            return
        blocks = scope["app"].get_blocks()
        max_file = getattr(blocks, "max_file_size", None)
        if max_file is not None and length > max_file + MULTIPART_SLACK:
            await _plain(
                send,
                413,
                f"An upload is one file of at most {max_file / 2**20:.3g} MiB "
                f"(this request: {length / 2**20:.3g} MiB); upload a smaller file.",
            )
            return
        folder = getattr(scope["app"], "uploaded_file_dir", None)
        refused = await anyio.to_thread.run_sync(self.room.reserve, blocks, length, folder)
        if refused:
            await _plain(send, 507, refused)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.room.release(length)
