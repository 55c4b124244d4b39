"""A Hugging Face Hub on loopback, for tests: the HTTP API that ``huggingface_hub`` speaks,
serving model repositories from local folders. No network is reached: a test points
``HF_ENDPOINT`` at it (a command in a subprocess, whose ``huggingface_hub`` reads it at import).

It answers what ``snapshot_download`` (and its dry run) and ``HfApi.list_repo_files`` ask:

- ``GET /api/models/<repo>/revision/<rev>``: the repo's info (id, commit, files);
- ``GET /api/models/<repo>/tree/<rev>[/<path>]``: the file listing (``recursive``), with the
  sizes, git blob ids and, for weights, LFS ids and sizes;
- ``HEAD`` and ``GET /<repo>/resolve/<rev>/<file>``: a file's metadata in the headers the Hub
  sends (``X-Repo-Commit``, ``ETag``; ``X-Linked-Etag`` and ``X-Linked-Size`` for an LFS file)
  and its bytes (or a ``Range`` of them: a resumed download's, a header's).

And the Hub's errors, with its ``X-Error-Code``: a missing repo (401 ``RepoNotFound``, as the Hub
answers a caller without a token), a gated repo asked without a token (401 ``GatedRepo``), a
missing revision (404 ``RevisionNotFound``), a missing file (404 ``EntryNotFound``).

Every request is logged (``requests``; ``log`` with the times each began and ended, once it
has; ``begun`` as it begins), so a test can tell what was downloaded, and when. ``rate`` (bytes a second) slows the files' bytes down, as
a slow link would; no file is sent beyond ``max_send`` bytes (``MAX_SEND``) over all requests. Files are served
as they are on disk, the LFS ones (weights, pickles) with a SHA-256 id; a file over
``HASHED_UP_TO`` bytes (a sparse file standing for a checkpoint larger than the disk) gets an id
from its name, size and modification time instead of its bytes' hash: nothing reads it whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack")
HASHED_UP_TO = 256 * 2**20
CHUNK = 1 << 20
# The most the hub sends of one file, over all requests (a client resumes a cut-off download):
# a sparse stand-in for a checkpoint larger than the disk is never sent whole, so a test of its
# refusal that regresses fails on a refused download instead of filling the disk it runs on.
MAX_SEND = 2**30


@dataclass
class Repo:
    """A model repo: its files are those under ``folder``; one commit, named by ``sha``."""

    folder: Path
    gated: bool = False
    sha: str = ""
    _ids: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for path in self.files():
                st = (self.folder / path).stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            self.sha = digest.hexdigest()

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()
        )

    def ids(self, path: str) -> tuple[str, str | None]:
        """(git blob id, LFS SHA-256 or None) of a file."""
        if path not in self._ids:
            file = self.folder / path
            size = file.stat().st_size
            lfs = path.endswith(LFS_SUFFIXES)
            if size > HASHED_UP_TO:
                st = file.stat()
                content = hashlib.sha256(f"{path}\0{size}\0{st.st_mtime_ns}".encode()).hexdigest()
            else:
                digest = hashlib.sha256() if lfs else hashlib.sha1(f"blob {size}\0".encode())
                with open(file, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                content = digest.hexdigest()
            if lfs:
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\noid sha256:{content}\n"
                    f"size {size}\n"
                ).encode()
                blob = hashlib.sha1(f"blob {len(pointer)}\0".encode() + pointer).hexdigest()
                self._ids[path] = (blob, content)
            else:
                self._ids[path] = (content, None)
        return self._ids[path]


class FakeHub:
    """The server: ``with FakeHub() as hub: hub.add("org/name", folder)``; ``hub.url`` is the
    endpoint. ``requests`` logs (method, path) of every request answered."""

    def __init__(self, rate: float | None = None, max_send: int = MAX_SEND) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.log: list[tuple[str, str, float, float]] = []  # method, path, began, ended
        self.begun: list[tuple[str, str]] = []  # requests begun, answered or not
        self.rate, self.max_send = rate, max_send
        self.sent: dict[str, int] = {}  # bytes sent per file path, over all requests
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path, *, gated: bool = False) -> Repo:
        repo = Repo(Path(folder), gated=gated)
        self.repos[repo_id] = repo
        return repo

    def downloads(self) -> list[str]:
        """The paths of the files whose bytes were asked for (GET on ``resolve``; a part of one,
        such as a safetensors header, is logged as ``GET range``)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rest>.+)$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass  # quiet: the test reads ``requests``

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        began = time.monotonic()
        self.hub.begun.append((self.command, unquote(urlsplit(self.path).path)))
        try:
            self._route(body)
        finally:
            path = unquote(urlsplit(self.path).path)
            self.hub.log.append((self.command, path, began, time.monotonic()))

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        ranged = " range" if self.headers.get("range") else ""
        self.hub.requests.append((self.command + ranged, path))
        if m := API.match(path):
            repo = self._repo(m["repo"])
            if repo is None:
                return
            rev, _, sub = m["rest"].partition("/")
            if not self._revision(repo, rev):
                return
            if m["what"] == "revision":
                info = {
                    "id": m["repo"],
                    "modelId": m["repo"],
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "siblings": [{"rfilename": f} for f in repo.files()],
                }
                return self._json(info, body)
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            return self._json(self._tree(repo, sub, recursive), body)
        if m := RESOLVE.match(path):
            repo = self._repo(m["repo"])
            if repo is None or not self._revision(repo, m["rev"]):
                return
            return self._file(repo, m["path"], body)
        self._error(404, None, "Not found")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and not self.headers.get("authorization"):
            self._error(
                401, "GatedRepo", "Access to model is restricted. You must have access to it."
            )
            return None
        return repo

    def _revision(self, repo: Repo, rev: str) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    def _tree(self, repo: Repo, sub: str, recursive: bool) -> list[dict]:
        entries, dirs = [], set()
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        for path in repo.files():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")
            for i in range(1, len(parts)):
                dirs.add(prefix + "/".join(parts[:i]))
            size = (repo.folder / path).stat().st_size
            blob, lfs = repo.ids(path)
            entry: dict = {"type": "file", "oid": blob, "size": size, "path": path}
            if lfs is not None:
                entry["lfs"] = {"oid": lfs, "size": size, "pointerSize": 134}
            entries.append(entry)
        folders = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in dirs]
        return sorted(folders, key=lambda e: e["path"]) + entries

    def _file(self, repo: Repo, path: str, body: bool) -> None:
        file = repo.folder / path
        if not file.is_file() or ".." in path.split("/"):
            self._error(404, "EntryNotFound", f"{path} does not exist", commit=repo.sha)
            return
        size = file.stat().st_size
        blob, lfs = repo.ids(path)
        key = f"{repo.folder}/{path}"
        if body and self.hub.sent.get(key, 0) >= self.hub.max_send:
            self._error(403, None, f"{path}: this test's hub sends no more of it", repo.sha)
            return
        start, stop = 0, size  # stop: past the last byte sent
        ranged = self.headers.get("range")
        if ranged and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())):
            start = min(int(m[1]), size)
            stop = min(int(m[2]) + 1, size) if m[2] else size
        self.send_response(206 if ranged else 200)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{lfs or blob}"')
        if lfs is not None:
            self.send_header("X-Linked-Etag", f'"{lfs}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Content-Length", str(stop - start))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        rate, sent, began = self.hub.rate, 0, time.monotonic()
        with open(file, "rb") as f:
            f.seek(start)
            while chunk := f.read(min(CHUNK if rate is None else 64 * 1024, stop - start - sent)):
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client stopped the download
                sent += len(chunk)
                self.hub.sent[key] = self.hub.sent.get(key, 0) + len(chunk)
                if self.hub.sent[key] >= self.hub.max_send:
                    self.close_connection = True  # cut off: the client sees a short body
                    return
                if rate is not None:
                    time.sleep(max(0.0, began + sent / rate - time.monotonic()))

    def _json(self, data: object, body: bool) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)

    def _error(self, status: int, code: str | None, message: str, commit: str = "") -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


def hub_env(hub: FakeHub, cache: Path) -> dict[str, str]:
    """The environment of a command that downloads from ``hub`` into ``cache``: no token, no
    telemetry, no Xet (the files are served over plain HTTP, as the Hub does for a client
    without Xet)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env
