"""A server's Hub cache within ``$DIM3_MAX_HUB_CACHE`` (``dim3/hubcache.py``), against a Hub on
loopback (``tests/hub_server.py``) and a real cache written by ``huggingface_hub``: the least
recently used checkpoints make room for a job's downloads; the job's own, those in use and the
current job's never do; a job that cannot fit is refused before anything is deleted or
downloaded; and nothing is ever deleted by a command, or where the variable is unset.

Each job runs in a process of its own (``huggingface_hub`` reads ``HF_HUB_CACHE`` and
``HF_ENDPOINT`` at import), as a server's would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hub_server import FakeHub, hub_env
from tests.test_hub import DEMO, ROOT, TRIO, dim3, repo

DAY = 86400

# A server's heavy job (engine.fetch_inputs with allowed roots, as the app's Merge calls it),
# after repos cached earlier were last used days ago (their files' times set back), with any
# repos held meanwhile (a chat loading its model) or a chat's own download after the job's.
# Prints what it downloaded, or the refusal; the server's log goes to stderr.
JOB = """
import json, logging, os, sys, time
from pathlib import Path
from huggingface_hub import snapshot_download
from dim3 import engine, hubcache
from dim3.checkpoints import CheckpointError, resolve
from dim3.recipe import Recipe, Source

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = json.loads(sys.argv[1])
cache = Path(os.environ["HF_HUB_CACHE"])
for repo_id, days in spec.get("cached", {}).items():  # downloaded by someone, days ago
    snapshot_download(repo_id)
    when = time.time() - days * 86400
    for blob in (cache / ("models--" + repo_id.replace("/", "--")) / "blobs").iterdir():
        os.utime(blob, (when, when))
roots = [spec["root"]]
recipe = Recipe(Source("demo/base"), [Source("demo/multilingual")], Source(spec["vlm"]))
try:
    with hubcache.hold(spec.get("held", [])):
        print("downloaded", engine.fetch_inputs(recipe, allowed_roots=roots))
        for other in spec.get("then", []):  # a chat's model, on another visitor's behalf
            resolve(other, allowed_roots=roots)
            print("resolved", other)
except CheckpointError as exc:
    print("refused:", exc)
"""


def cached(cache: Path) -> set[str]:
    """The repos whose files the cache holds (a dry run to size a download leaves a folder
    with no files)."""
    return {
        p.name.removeprefix("models--").replace("--", "/")
        for p in cache.glob("models--*")
        if any(p.glob("blobs/*"))
    }


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture()
def hub(tmp_path):
    """The demo trio and three more VLMs (copies of the demo VLM)."""
    with FakeHub() as hub:
        for role in ("base", "multilingual", "multimodal"):
            hub.add(f"demo/{role}", repo(tmp_path, role))
        for name in ("old", "mid", "new"):
            hub.add(f"{name}/vlm", repo(tmp_path, "multimodal", name))
        yield hub


def fill(hub: FakeHub, cache: Path, ages: dict[str, float]) -> None:
    """Download ``ages``' repos into ``cache`` and set their files' times back so many days."""
    for repo_id, days in ages.items():
        fetch = f"from huggingface_hub import snapshot_download as s; s({repo_id!r})"
        subprocess.run([sys.executable, "-c", fetch], env=hub_env(hub, cache), check=True)
        when = time.time() - days * DAY
        for blob in (cache / f"models--{repo_id.replace('/', '--')}" / "blobs").iterdir():
            os.utime(blob, (when, when))


def run_job(hub: FakeHub, tmp_path: Path, spec: dict, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", JOB, json.dumps({"root": str(tmp_path), **spec})],
        cwd=ROOT,
        env=hub_env(hub, tmp_path / "cache") | env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_server_deletes_the_least_recently_used_checkpoints_its_job_does_not_need(hub, tmp_path):
    """The cache holds the job's VLM (used 4 days ago, the oldest), ``old/vlm`` (3 days) and
    ``mid/vlm`` (1 day); the job downloads the base and the multilingual model. With a limit
    that fits all but one 3.7 MB VLM, exactly ``old/vlm`` goes: the least recently used of
    those the job does not read (its own VLM stays, older though it is). The server's log names
    it; the cache then holds no more than the limit. The same job again downloads nothing and
    deletes nothing."""
    repos = tmp_path / "repos"
    one_vlm = size(repos / "multimodal")
    trio = sum(size(repos / r) for r in ("base", "multilingual", "multimodal"))
    limit = trio + one_vlm + one_vlm // 2  # the trio and mid/vlm, not old/vlm as well
    spec = {"vlm": "demo/multimodal", "cached": {"demo/multimodal": 4, "old/vlm": 3, "mid/vlm": 1}}
    done = run_job(hub, tmp_path, spec, DIM3_MAX_HUB_CACHE=str(limit))
    assert "downloaded" in done.stdout, done.stdout + done.stderr
    cache = tmp_path / "cache"
    assert cached(cache) == {"demo/base", "demo/multilingual", "demo/multimodal", "mid/vlm"}
    assert re.search(r"Hub cache: deleted old/vlm \(3\.\d+ MB, last used ", done.stderr), (
        done.stderr
    )
    assert done.stderr.count("Hub cache: deleted") == 1
    held = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and "blobs" in f.parts)
    assert held <= limit

    asked = len(hub.downloads())
    again = run_job(hub, tmp_path, {"vlm": "demo/multimodal"}, DIM3_MAX_HUB_CACHE=str(limit))
    assert "downloaded 0" in again.stdout and "deleted" not in again.stderr
    assert len(hub.downloads()) == asked
    assert cached(cache) == {"demo/base", "demo/multilingual", "demo/multimodal", "mid/vlm"}


def test_checkpoints_in_use_are_never_deleted_and_a_job_that_cannot_fit_is_refused_whole(
    hub, tmp_path
):
    """``mid/vlm`` held (a chat loading it) and ``old/vlm`` cached: a job that needs room for
    both to go is refused, before anything is deleted or downloaded, naming the limit; a job
    larger than the limit alone is refused so too. Then a job that fits by deleting
    ``old/vlm`` runs, and a chat's model downloaded after it (``new/vlm``) needs room that only
    the job's checkpoints could give: refused, the job's trio kept (it may still be reading
    them: a heavy job's checkpoints stay until the next heavy job downloads)."""
    repos = tmp_path / "repos"
    one_vlm = size(repos / "multimodal")
    trio = sum(size(repos / r) for r in ("base", "multilingual", "multimodal"))
    cache = tmp_path / "cache"
    spec = {"vlm": "demo/multimodal", "cached": {"old/vlm": 3, "mid/vlm": 1}, "held": ["mid/vlm"]}
    done = run_job(hub, tmp_path, spec, DIM3_MAX_HUB_CACHE=str(trio + one_vlm // 2))
    assert "refused: this job's downloads need" in done.stdout, done.stdout + done.stderr
    assert "cannot make room" in done.stdout and "($DIM3_MAX_HUB_CACHE)" in done.stdout
    assert cached(cache) == {"old/vlm", "mid/vlm"} and "deleted" not in done.stderr
    assert all("/demo/" not in p for p in hub.downloads())

    done = run_job(hub, tmp_path, {"vlm": "demo/multimodal"}, DIM3_MAX_HUB_CACHE=str(trio // 2))
    assert "refused: this job's downloads" in done.stdout and "are more than the" in done.stdout
    assert cached(cache) == {"old/vlm", "mid/vlm"}
    assert all("/demo/" not in p for p in hub.downloads())

    spec = {"vlm": "demo/multimodal", "then": ["new/vlm"]}
    done = run_job(hub, tmp_path, spec, DIM3_MAX_HUB_CACHE=str(trio + one_vlm // 2))
    lines = done.stdout.splitlines()
    assert lines[0].startswith("downloaded") and lines[1].startswith("refused:"), done.stdout
    assert "cannot make room" in lines[1]
    assert "Hub cache: deleted old/vlm" in done.stderr
    assert "Hub cache: deleted mid/vlm" in done.stderr  # no longer held
    assert cached(cache) == {"demo/base", "demo/multilingual", "demo/multimodal"}
    assert not [p for p in hub.downloads() if "/new/vlm/" in p]


def test_no_command_and_no_server_without_the_setting_deletes_anything(hub, tmp_path):
    """``$DIM3_MAX_HUB_CACHE`` unset, a server's job keeps every cached checkpoint however
    full; set, a command (``python -m dim3 merge``: the user's own cache) still does."""
    cache = tmp_path / "cache"
    spec = {"vlm": "demo/multimodal", "cached": {"old/vlm": 3}}
    done = run_job(hub, tmp_path, spec)
    assert "downloaded" in done.stdout and "deleted" not in done.stderr
    assert cached(cache) == {"old/vlm", "demo/base", "demo/multilingual", "demo/multimodal"}

    env = hub_env(hub, cache) | {"DIM3_MAX_HUB_CACHE": "1MB"}
    merged = dim3(env, "merge", *TRIO, "--multimodal", "new/vlm", "--out", str(tmp_path / "out"))
    assert merged.returncode == 0, merged.stderr
    assert "old/vlm" in cached(cache) and "new/vlm" in cached(cache)


def test_the_app_makes_room_in_its_hub_cache_for_a_visitors_merge(hub, tmp_path):
    """A Space with ``$DIM3_MAX_HUB_CACHE``: a visitor's merge from Hub ids, whose downloads do
    not fit beside the checkpoints an earlier visitor left, succeeds; the earlier visitor's
    least recently used checkpoint was deleted for it, the one used since was not."""
    from gradio_client import Client

    from tests.app_server import running_app

    cache = tmp_path / "cache"
    env = hub_env(hub, cache)
    fill(hub, cache, {"old/vlm": 3, "mid/vlm": 1})  # an earlier visitor's
    repos = tmp_path / "repos"
    one_vlm = size(repos / "multimodal")
    trio = sum(size(repos / r) for r in ("base", "multilingual", "multimodal"))
    served = {k: v for k, v in env.items() if k.startswith(("HF_", "DIM3_"))}
    served |= {"HF_HUB_OFFLINE": "0", "DIM3_MAX_HUB_CACHE": str(trio + one_vlm + one_vlm // 2)}
    with running_app(tmp_path, [DEMO], **served) as url:
        _, log, status = Client(url, verbose=False).predict(
            base="demo/base",
            multilingual="demo/multilingual",
            multimodal="demo/multimodal",
            api_name="/merge",
        )
    assert status.startswith("✅"), status + log
    assert cached(cache) == {"demo/base", "demo/multilingual", "demo/multimodal", "mid/vlm"}
    assert "old/vlm" not in log and str(tmp_path) not in log  # another visitor's, a server path
    server = (tmp_path / "app.log").read_text()  # the owner's log says what went, and the rule
    assert "Hub cache: kept within" in server and "Hub cache: deleted old/vlm (" in server


@pytest.mark.parametrize(
    "setting",
    [
        "DIM3_MAX_HUB_CACHE=lots",
        "DIM3_MAX_DOWNLOAD=-3GB",
        "DIM3_JOB_BUDGET=soon",
        "DIM3_UPLOAD_TTL=a day",
        "DIM3_MAX_FISHERS=lots",
        "DIM3_PROXY_HOPS=yes",
    ],
)
def test_a_server_with_a_mistyped_limit_does_not_start_and_says_which(tmp_path, setting):
    """A mistyped limit stops the server at start-up with one line naming the variable (it
    failed every visitor's job with it instead, or for the Hub cache each download)."""
    from tests.app_server import running_app

    name, value = setting.split("=")
    with pytest.raises(RuntimeError, match="the app did not start"):
        with running_app(tmp_path, [DEMO], **{name: value}):
            pass
    log = (tmp_path / "app.log").read_text()
    assert f"DiM3 Studio cannot start: ${name}" in log, log[-2000:]
    assert "Traceback" not in log


def test_on_a_space_the_least_recently_used_make_room_only_when_the_disk_is_short(
    hub, tmp_path, monkeypatch
):
    """The setting: a size bounds the cache; ``0`` and unset delete nothing, but unset on a
    Space (``$SPACE_ID``) the cache has no bound and its disk's free space is what counts: a
    job short of half a VLM's room deletes the least recently used and no more: a partial
    download a stopped job left (not of a repository in use), then a checkpoint; one short of
    more than all that could go is refused with nothing deleted."""
    from dim3 import hubcache
    from dim3.sizes import parse_size

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv(hubcache.ENV_MAX_HUB_CACHE, raising=False)
    assert hubcache.policy() is None
    monkeypatch.setenv(hubcache.ENV_MAX_HUB_CACHE, "100GB")
    assert hubcache.policy() == hubcache.Policy(parse_size("100GB"))
    monkeypatch.setenv("SPACE_ID", "someone/dim3-studio")
    monkeypatch.setenv(hubcache.ENV_MAX_HUB_CACHE, "0")
    assert hubcache.policy() is None
    monkeypatch.delenv(hubcache.ENV_MAX_HUB_CACHE)
    assert hubcache.policy() == hubcache.Policy(None)

    cache = tmp_path / "cache"
    fill(hub, cache, {"old/vlm": 3, "mid/vlm": 1, "new/vlm": 0.5})
    one_vlm = size(tmp_path / "repos" / "multimodal")
    # what a stopped download leaves (the blob's name is its ETag): one of a repository nobody
    # uses, written 5 days ago, and one of the repository a job reads
    stopped = partial(cache, "gone/vlm", one_vlm, days=5)
    resumed = partial(cache, "new/vlm", one_vlm, days=6)
    everything = {"old/vlm", "mid/vlm", "new/vlm", "gone/vlm"}
    with pytest.raises(hubcache.CacheFull, match="cannot make room"):
        hubcache.make_room(cache, 5 * one_vlm, ["new/vlm"], free=one_vlm, limit=None)
    assert cached(cache) == everything and stopped.exists()
    gone = hubcache.make_room(cache, one_vlm, ["new/vlm"], free=one_vlm // 2, limit=None)
    assert [(e.repo_id, e.partial, e.nbytes) for e in gone] == [("gone/vlm", True, one_vlm)]
    assert not stopped.exists() and resumed.exists()
    gone = hubcache.make_room(cache, one_vlm, ["new/vlm"], free=one_vlm // 2, limit=None)
    assert [(e.repo_id, e.partial) for e in gone] == [("old/vlm", False)]
    assert gone[0].nbytes >= one_vlm
    assert cached(cache) == {"mid/vlm", "new/vlm"} and resumed.exists()
    assert hubcache.make_room(cache, one_vlm, [], free=one_vlm, limit=None) == []


def partial(cache: Path, repo_id: str, nbytes: int, *, days: float) -> Path:
    """A partial download of ``repo_id`` as ``huggingface_hub`` leaves one when stopped:
    ``blobs/<etag>.incomplete`` in the repository's folder, last written ``days`` ago."""
    etag = hashlib.sha256(repo_id.encode()).hexdigest()
    path = cache / f"models--{repo_id.replace('/', '--')}" / "blobs" / f"{etag}.incomplete"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * nbytes)
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def test_what_the_server_remembers_of_use_stays_bounded_and_holds_are_released():
    """Visitors name any string, and each is held and remembered as used: the table keeps the
    most recent ``MAX_TRACKED`` (the one used again moves to the end, the oldest go), and every
    hold is released on the way out, an error's included."""
    from dim3 import hubcache

    names = [f"visitor/typo-{i}" for i in range(hubcache.MAX_TRACKED + 100)]
    with hubcache.hold(["kept/vlm"]):
        for name in names:
            with hubcache.hold([name]):
                pass
        with pytest.raises(RuntimeError), hubcache.hold(["failed/vlm"]):
            raise RuntimeError("a load that failed")
        assert set(hubcache._HELD) == {"kept/vlm"}  # noqa: SLF001 - the state under test
    used = hubcache._USED  # noqa: SLF001
    assert len(used) == hubcache.MAX_TRACKED and not hubcache._HELD  # noqa: SLF001
    assert list(used)[-2:] == ["failed/vlm", "kept/vlm"]  # in order of use, the last last
    assert names[-1] in used and names[0] not in used
