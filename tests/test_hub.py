"""Hub ids, end to end, against a Hub on loopback (``tests/hub_server.py``): the real
``huggingface_hub`` client in the real command (``python -m dim3``) and app, no network.

What a user meets: a merge from Hub ids that downloads only what it reads; the Hub's refusals
(a missing repo or revision, a gated repo, pickle-only weights) as one line with the fix; and
downloads sized before the first byte, refused when they pass the server's limit or the disk.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dim3 import engine
from dim3.recipe import Recipe, Source
from dim3.sizes import human_size
from tests.hub_server import FakeHub, hub_env

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
TRIO = ("--base", "demo/base", "--multilingual", "demo/multilingual")


def dim3(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dim3", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def repo(tmp: Path, role: str, name: str | None = None) -> Path:
    """A copy of the demo trio's ``role`` model, to serve (and add files to)."""
    folder = tmp / "repos" / (name or role)
    shutil.copytree(DEMO / role, folder)
    return folder


def sparse_weights(folder: Path, size: int) -> None:
    """Replace ``folder``'s weights by one shard of ``size`` bytes that take no room on disk:
    what the Hub says of a checkpoint larger than this disk. Nothing reads it."""
    (folder / "model.safetensors").unlink()
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(size)


@contextlib.contextmanager
def slow_hub(tmp: Path, *roles: str) -> Iterator[FakeHub]:
    """A Hub serving at 2 MB/s the demo trio's ``roles`` (``demo/<role>``) and ``slow/vlm``, a
    VLM of 400 MB (200 s at that rate) that takes no room on disk."""
    with FakeHub(rate=2e6) as hub:
        for role in roles:
            hub.add(f"demo/{role}", repo(tmp, role))
        slow = repo(tmp, "multimodal", "slow")
        sparse_weights(slow, 400 * 10**6)
        hub.add("slow/vlm", slow)
        yield hub


def blobs(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*/blobs/*") if p.is_file()]


@pytest.fixture()
def hub(tmp_path):
    with FakeHub() as hub:
        for role in ("base", "multilingual"):
            hub.add(f"demo/{role}", repo(tmp_path, role))
        yield hub


def test_a_merge_from_hub_ids_downloads_only_what_it_reads_and_equals_the_local_merge(
    hub, tmp_path
):
    """The command merges from Hub ids as from local folders (the same bytes out), fetches only
    safetensors, configs, tokenizer and card files (not a pickle or a Python file the repo also
    holds), records the commit it resolved to, and then plans again from the cache: online
    without reading a header or a tensor from the Hub, offline without asking it anything."""
    vlm = repo(tmp_path, "multimodal")
    (vlm / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be fetched")
    (vlm / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    served = hub.add("demo/multimodal", vlm)
    cache = tmp_path / "cache"
    env = hub_env(hub, cache)
    out = tmp_path / "merged"
    done = dim3(env, "merge", *TRIO, "--multimodal", "demo/multimodal", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "downloading: 100%" in done.stderr  # one bar, all three checkpoints
    fetched = {p.rsplit("/", 1)[-1] for p in hub.downloads() if "/demo/multimodal/" in p}
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert not fetched & {"pytorch_model.bin", "modeling_custom.py"}
    recipe = json.loads((out / "dim3_recipe.json").read_text())
    assert recipe["resolved"]["multimodal"] == served.sha
    local = engine.merge_to_folder(
        Recipe(
            base=Source(str(DEMO / "base")),
            multilingual=[Source(str(DEMO / "multilingual"))],
            multimodal=Source(str(DEMO / "multimodal")),
        ),
        tmp_path / "local",
    )
    a, b = load_file(out / "model.safetensors"), load_file(local.out_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    asked = len(hub.requests)
    again = dim3(env, "plan", *TRIO, "--multimodal", "demo/multimodal")
    assert again.returncode == 0, again.stderr
    # the weights are cached: the plan reads them there, with no header or range asked for
    assert not [p for m, p in hub.requests[asked:] if m.startswith("GET") and "safetensors" in p]
    asked = len(hub.requests)
    offline = dim3(env | {"HF_HUB_OFFLINE": "1"}, "plan", *TRIO, "--multimodal", "demo/multimodal")
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == asked  # sized only when the Hub can be asked


@pytest.mark.parametrize(
    ("multimodal", "expected"),
    [
        ("demo/nothing-here", "no model 'demo/nothing-here' on the Hub"),
        ("gated/vlm", "'gated/vlm' is gated on the Hub: accept its licence"),
        ("demo/multimodal@v9", "revision 'v9' does not exist in 'demo/multimodal'"),
        ("pickled/vlm", "'pickled/vlm' has only pickle weights (pytorch_model.bin)"),
    ],
)
def test_the_hubs_refusals_are_one_line_with_the_fix(hub, tmp_path, multimodal, expected):
    hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
    hub.add("gated/vlm", repo(tmp_path, "multimodal", "gated"), gated=True)
    pickled = repo(tmp_path, "multimodal", "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    hub.add("pickled/vlm", pickled)
    ref, _, revision = multimodal.partition("@")
    argv = ["--multimodal", ref] + (["--revision-multimodal", revision] if revision else [])
    done = dim3(hub_env(hub, tmp_path / "cache"), "plan", *TRIO, *argv)
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not [p for p in hub.downloads() if "model.safetensors" in p or ".bin" in p]


def test_a_hub_repos_shard_index_naming_files_outside_it_is_refused(hub, tmp_path):
    """A repository whose index places its tensors in a file outside the repository (here a
    real copy of its weights elsewhere on this machine): the merge is refused naming the index
    entry, and writes nothing. A visitor's repository could otherwise read any file of the
    server into a model it then saves and pushes."""
    from safetensors import safe_open

    evil = repo(tmp_path, "multimodal", "evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    (evil / "model.safetensors").rename(outside / "model.safetensors")
    shutil.copy(outside / "model.safetensors", evil / "decoy.safetensors")  # a repo's shard
    with safe_open(outside / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    index = {"weight_map": dict.fromkeys(keys, str(outside / "model.safetensors"))}
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add("evil/vlm", evil)
    out = tmp_path / "out"
    argv = ("--multimodal", "evil/vlm", "--out", str(out))
    done = dim3(hub_env(hub, tmp_path / "cache"), "merge", *TRIO, *argv)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "not a relative file name: an index names shards beside it" in done.stderr
    assert not out.exists()


def test_a_revision_or_a_cache_entry_leading_out_of_the_repository_is_refused(hub, tmp_path):
    """Offline, huggingface_hub reads the cache's ``refs/<revision>`` and goes to the snapshot
    it names, neither normalised. A revision through '..' to a file that holds a path (a save's
    copied side file, say) led a server to any folder: refused as no ref name. A cache entry
    that leads out of the repository's snapshots: refused, and the folder it names not read."""
    hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
    cache = tmp_path / "cache"
    env = hub_env(hub, cache)
    done = dim3(
        env, "merge", *TRIO, "--multimodal", "demo/multimodal", "--out", str(tmp_path / "m")
    )
    assert done.returncode == 0, done.stderr  # everything cached
    outside = tmp_path / "outside_model"
    shutil.copytree(DEMO / "multimodal", outside)
    (outside / "config.json").write_text("{ marker: read from outside")
    refs = cache / "models--demo--multimodal" / "refs"
    planted = tmp_path / "planted.txt"  # what a file the server can read holds
    planted.write_text(os.path.relpath(outside, refs.parent / "snapshots"))
    offline = env | {"HF_HUB_OFFLINE": "1"}
    for rev in (os.path.relpath(planted, refs), str(planted), "main/../main", "a b", "x~1"):
        argv = ("--multimodal", "demo/multimodal", "--revision-multimodal", rev)
        done = dim3(offline, "plan", *TRIO, *argv)
        assert done.returncode != 0 and "is not a branch, tag or commit name" in done.stderr, rev
    (refs / "main").write_text(planted.read_text())  # the cache's own entry, edited
    done = dim3(offline, "plan", *TRIO, "--multimodal", "demo/multimodal")
    assert done.returncode != 0 and "does not lead to one of its snapshots" in done.stderr
    assert "marker" not in done.stderr and "Traceback" not in done.stderr


def test_downloads_the_disk_has_no_room_for_are_refused_before_the_first_byte(hub, tmp_path):
    """A VLM that the Hub says is twice the free space of the cache's disk: refused with the
    sizes and the fix before any file is fetched, the base's and the multilingual model's
    included (they come first and would fit), and nothing is left in the cache."""
    free = shutil.disk_usage(tmp_path).free
    big = repo(tmp_path, "multimodal", "big")
    sparse_weights(big, 2 * free)
    hub.add("big/vlm", big)
    cache, out = tmp_path / "cache", tmp_path / "merged"
    done = dim3(hub_env(hub, cache), "merge", *TRIO, "--multimodal", "big/vlm", "--out", str(out))
    assert done.returncode != 0
    assert "downloading demo/base (" in done.stderr and "big/vlm (" in done.stderr
    assert f"file system of the Hub cache ({cache})" in done.stderr
    assert "point HF_HUB_CACHE at a disk with room, or give local folders" in done.stderr
    assert hub.downloads() == [] and blobs(cache) == [] and not out.exists()


def test_a_merge_whose_downloads_and_output_do_not_fit_together_is_refused_before_the_first_byte(
    hub, tmp_path
):
    """The downloads fit the disk, but not with the merged model the command will write beside
    them: refused before anything is downloaded, the output's size read from the VLM's header
    on the Hub (a float32 tensor of 0.7 × the free space, in a sparse file), not hours later
    by the writer."""
    free = shutil.disk_usage(tmp_path).free
    big = repo(tmp_path, "multimodal", "big")
    n = int(0.7 * free) // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-len(header) % 8)
    with open(big / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 4 * n)
    hub.add("big/vlm", big)
    cache, out = tmp_path / "cache", tmp_path / "merged"
    done = dim3(hub_env(hub, cache), "merge", *TRIO, "--multimodal", "big/vlm", "--out", str(out))
    assert done.returncode != 0
    assert f"and the merged model {human_size(4 * n)} more" in done.stderr, done.stderr
    assert f"the file system of the Hub cache ({cache}) and of {tmp_path} has" in done.stderr
    assert hub.downloads() == [] and blobs(cache) == [] and not out.exists()


def test_a_download_limit_refuses_a_job_before_the_first_byte_and_counts_only_what_is_missing(
    hub, tmp_path
):
    """``$DIM3_MAX_DOWNLOAD`` caps one job's downloads together (the demo trio: 2.6 + 2.6 + 3.7
    MB): a merge over it is refused before any file is fetched; once the VLM is in the cache,
    the same merge downloads only the other two, which fit."""
    hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
    total = sum(f.stat().st_size for f in (tmp_path / "repos").rglob("*") if f.is_file())
    cache = tmp_path / "cache"
    env = hub_env(hub, cache) | {"DIM3_MAX_DOWNLOAD": "6MB"}
    vlm = ("--multimodal", "demo/multimodal")
    refused = dim3(env, "merge", *TRIO, *vlm, "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0
    taken = f"would take {human_size(total)}, more than the 6 MB one job may download here"
    assert taken in refused.stderr, refused.stderr
    assert "($DIM3_MAX_DOWNLOAD)" in refused.stderr
    assert hub.downloads() == [] and blobs(cache) == []

    fetch = "from huggingface_hub import snapshot_download as s; s('demo/multimodal')"
    subprocess.run([sys.executable, "-c", fetch], env=env, check=True, timeout=120)
    assert all("/demo/multimodal/" in p for p in hub.downloads())
    fetched = len(hub.downloads())
    again = dim3(env, "merge", *TRIO, *vlm, "--out", str(tmp_path / "merged"))
    assert again.returncode == 0, again.stderr
    later = hub.downloads()[fetched:]
    assert later and not [p for p in later if "/demo/multimodal/" in p]


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--methods", "task_arithmetic"],
        ["sweep", "--json", "{out}/sweep.json"],
        ["represent", "--out", "{out}"],
        ["diagnose", "--out", "{out}"],
    ],
    ids=lambda c: c[0],
)
def test_a_command_that_loads_the_vlm_first_sizes_the_trios_downloads_together(
    hub, tmp_path, command
):
    """``eval``, ``sweep``, ``represent`` and ``diagnose`` from Hub ids under
    ``$DIM3_MAX_DOWNLOAD``: the trio (8.9 MB) is over the 6 MB, its VLM alone (3.7 MB) is not.
    Each is refused before the first byte, naming all three checkpoints, as ``merge`` is. The
    first three downloaded the VLM they load first alone (sized alone: it fit), and the trio was
    found not to fit only when the merge after it sized the rest; ``diagnose`` sized them
    together already (now with a bar)."""
    hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = hub_env(hub, cache) | {"DIM3_MAX_DOWNLOAD": "6MB"}
    argv = [a.format(out=out) for a in command]
    done = dim3(env, *argv, *TRIO, "--multimodal", "demo/multimodal")
    assert done.returncode != 0
    names = "downloading demo/base (2.63 MB), demo/multilingual (2.63 MB), demo/multimodal ("
    assert names in done.stderr, done.stderr[-2000:]
    assert "one job may download here ($DIM3_MAX_DOWNLOAD)" in done.stderr
    assert hub.downloads() == [] and blobs(cache) == []


def test_the_app_refuses_a_visitors_hub_download_over_its_limit_without_server_paths(tmp_path):
    """A Space's visitor names Hub ids: a merge over the server's download limit, and one its
    disk has no room for, are refused before anything is downloaded, each with a message that
    names the limit or the sizes but no server path (the cache appears as ``<hub cache>``); so
    is a fisher merge, whose models are downloaded before their Fishers are estimated."""
    from gradio_client import Client

    from tests.app_server import running_app

    free = shutil.disk_usage(tmp_path).free
    with FakeHub() as hub:
        for role in ("base", "multilingual"):
            hub.add(f"demo/{role}", repo(tmp_path, role))
        for name, size in (("big", 2 * free), ("huge", 8 * free)):
            folder = repo(tmp_path, "multimodal", name)
            sparse_weights(folder, size)
            hub.add(f"{name}/vlm", folder)
        cache = tmp_path / "cache"
        env = hub_env(hub, cache) | {"HF_HUB_OFFLINE": "0", "DIM3_MAX_DOWNLOAD": str(4 * free)}
        env = {k: v for k, v in env.items() if k.startswith(("HF_", "DIM3_MAX"))}
        with running_app(tmp_path, [DEMO], **env) as url:
            client = Client(url, verbose=False)
            messages = {}
            for name in ("big", "huge"):
                _, _, status = client.predict(
                    base="demo/base",
                    multilingual="demo/multilingual",
                    multimodal=f"{name}/vlm",
                    api_name="/merge",
                )
                messages[name] = html.unescape(status.replace("\\", ""))  # as shown
            # a fisher merge downloads before estimating: the trio sized together, not each
            # model its Fisher needs alone (demo/multilingual's would fit, and be downloaded)
            _, log, status = client.predict(
                base="demo/base",
                multilingual="demo/multilingual",
                multimodal="huge/vlm",
                method="fisher",
                fisher_data="demo",
                fisher_n=4,
                api_name="/merge",
            )
            messages["fisher"] = html.unescape(status.replace("\\", ""))
            assert "Fisher of" not in log
    assert "one job may download here ($DIM3_MAX_DOWNLOAD)" in messages["huge"]
    assert "one job may download here ($DIM3_MAX_DOWNLOAD)" in messages["fisher"]
    assert "the file system of the Hub cache (<hub cache>)" in messages["big"], messages["big"]
    for status in messages.values():
        assert str(tmp_path) not in status and os.sep + "cache" not in status
    assert hub.downloads() == [] and blobs(cache) == []


def _app_env(hub: FakeHub, cache: Path, **extra: str) -> dict[str, str]:
    env = hub_env(hub, cache) | {"HF_HUB_OFFLINE": "0"} | extra
    return {k: v for k, v in env.items() if k.startswith(("HF_", "DIM3_"))}


def test_the_app_shows_a_download_and_stops_it_when_it_would_pass_the_time_budget(tmp_path):
    """A visitor's merge from Hub ids over a slow link: the log shows the download's progress,
    and once the download alone projects past the job's time budget it is stopped where it is
    (the server's Hub connection closed, no whole weights file kept), with the budget's message,
    within seconds instead of holding the one merge slot for minutes."""
    from gradio_client import Client

    from tests.app_server import running_app

    with slow_hub(tmp_path, "base", "multilingual") as hub:
        cache = tmp_path / "cache"
        env = _app_env(hub, cache, DIM3_JOB_BUDGET="30")
        with running_app(tmp_path, [DEMO], **env) as url:
            client = Client(url, verbose=False)
            started = time.monotonic()
            _, log, status = client.predict(
                base="demo/base",
                multilingual="demo/multilingual",
                multimodal="slow/vlm",
                api_name="/merge",
            )
            took = time.monotonic() - started
    shown = html.unescape(status.replace("\\", ""))
    assert shown.startswith("❌") and "the merge would take about" in shown, shown
    assert "It was stopped" in shown
    assert "downloading demo/base, demo/multilingual, slow/vlm from the Hub" in log
    assert took < 25, took  # the budget is 30 s; the download alone would take 200
    sent = [e for m, p, _, e in hub.log if m == "GET" and "/resolve/" in p]
    begun = [p for m, p in hub.begun if m == "GET" and "/resolve/" in p]
    assert sent and len(sent) == len(begun)  # the server stopped sending too ...
    assert max(sent) - started < 25  # ... soon
    whole = [p for p in blobs(cache) if not p.name.endswith(".incomplete")]
    assert all(p.stat().st_size < 400 * 10**6 for p in whole)


def test_the_apps_diagnosis_shows_its_download_and_stops_it_at_the_time_budget(tmp_path):
    """The Analysis tab's diagnosis from Hub ids over a slow link: its progress bar follows the
    download, and a download that alone would pass the job's budget is stopped within seconds
    (it downloaded without progress and could not be stopped until it ended)."""
    from gradio_client import Client

    from tests.app_server import running_app

    with slow_hub(tmp_path, "base", "multilingual") as hub:
        cache = tmp_path / "cache"
        env = _app_env(hub, cache, DIM3_JOB_BUDGET="30")
        with running_app(tmp_path, [DEMO], **env) as url:
            job = Client(url, verbose=False).submit(
                base="demo/base",
                multilingual="demo/multilingual",
                multimodal="slow/vlm",
                api_name="/diagnose",
            )
            started, seen = time.monotonic(), set()
            while not job.done():
                for unit in job.status().progress_data or []:
                    seen.add(unit.desc)
                time.sleep(0.1)
            status = job.result()[0]
            took = time.monotonic() - started
    shown = html.unescape(status.replace("\\", ""))
    assert shown.startswith("❌") and "the diagnosis would take about" in shown, shown
    assert "It was stopped" in shown
    assert any(
        d and d.startswith("downloading demo/base, demo/multilingual, slow/vlm") for d in seen
    ), seen
    assert took < 25, took  # the budget is 30 s; the download alone would take 200
    sent = [e for m, p, _, e in hub.log if m == "GET" and "/resolve/" in p]
    assert sent and max(sent) - started < 25  # the server stopped sending soon


def test_two_jobs_of_one_process_download_one_after_the_other_so_each_fits_the_room_left(
    tmp_path,
):
    """Two jobs of one process (an app's merge and its showcase's start-up, say) fetch at once,
    each naming a VLM not in the cache: the second job's downloads begin only once the first
    job's are done, so the room each was sized against is the room it gets."""
    script = """
from concurrent.futures import ThreadPoolExecutor
from dim3 import engine
from dim3.recipe import Recipe, Source

def job(name):
    vlm = Source(name + "/vlm")
    recipe = Recipe(Source("demo/base"), [Source("demo/multilingual")], vlm)
    return engine.fetch_inputs(recipe)

with ThreadPoolExecutor(2) as pool:
    print([f.result() for f in [pool.submit(job, n) for n in ("one", "two")]])
"""
    with FakeHub(rate=4e6) as hub:
        for role in ("base", "multilingual"):
            hub.add(f"demo/{role}", repo(tmp_path, role))
        for name in ("one", "two"):
            hub.add(f"{name}/vlm", repo(tmp_path, "multimodal", name))
        env = hub_env(hub, tmp_path / "cache")
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    gets = [(p, b, e) for m, p, b, e in hub.log if m == "GET" and "/resolve/" in p]
    by_job = {
        name: [g for g in gets if g[0].startswith(f"/{name}/vlm/")] for name in ("one", "two")
    }
    assert by_job["one"] and by_job["two"]
    first, second = sorted(by_job.values(), key=lambda g: min(b for _, b, _ in g))
    shared = [g for g in gets if g[0].startswith("/demo/")]
    assert len(shared) == len({p for p, _, _ in shared})  # the base and multilingual model once
    assert max(e for _, _, e in first + shared) <= min(b for _, b, _ in second)


def test_a_plan_from_hub_ids_reads_the_headers_not_the_weights_and_equals_the_local_plan(
    hub, tmp_path
):
    """``plan`` from Hub ids downloads no weights: the configs and tokenizers, then each shard's
    header and the few tensors the plan compares, as ranges of the files (a 70B trio's plan
    reads tens of MB, not 400 GB). It says what the plan of the same folders says."""
    hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
    cache = tmp_path / "cache"
    done = dim3(hub_env(hub, cache), "plan", *TRIO, "--multimodal", "demo/multimodal")
    assert done.returncode == 0, done.stderr
    local = dim3(
        dict(os.environ),
        "plan",
        *("--base", str(DEMO / "base"), "--multilingual", str(DEMO / "multilingual")),
        *("--multimodal", str(DEMO / "multimodal")),
    )
    assert local.returncode == 0, local.stderr
    assert done.stdout == local.stdout and "Merged: " in done.stdout
    assert not [p for p in hub.downloads() if p.endswith(".safetensors")]
    ranged = {p.split("/")[1] for m, p in hub.requests if m == "GET range"}
    assert ranged == {"demo"} and len([m for m, _ in hub.requests if m == "GET range"]) >= 3
    assert list(cache.rglob("config.json")) and not list(cache.rglob("*.safetensors"))
    weights = sum(f.stat().st_size for f in (tmp_path / "repos").rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in blobs(cache)) < weights / 4
    # offline, the cache holds the configs the plan fetched but no weights: not in the cache,
    # as for a model never fetched (not "no safetensors weights", which would blame the repo)
    offline = hub_env(hub, cache) | {"HF_HUB_OFFLINE": "1"}
    for command in (["plan"], ["merge", "--out", str(tmp_path / "merged")]):
        refused = dim3(offline, *command, *TRIO, "--multimodal", "demo/multimodal")
        assert refused.returncode != 0
        assert "cannot download 'demo/base'" in refused.stderr
        assert "not in the local cache" in refused.stderr and "pickle" not in refused.stderr
    assert not (tmp_path / "merged").exists()


def test_a_visitors_plan_reads_headers_and_does_not_wait_for_anothers_download(tmp_path):
    """In the app, a visitor's Plan from Hub ids downloads no weights and does not queue behind
    another visitor's merge, whose download from a slow Hub goes on meanwhile."""
    from gradio_client import Client

    from tests.app_server import running_app

    with slow_hub(tmp_path, "base", "multilingual", "multimodal") as hub:
        env = _app_env(hub, tmp_path / "cache", DIM3_JOB_BUDGET="600")
        with running_app(tmp_path, [DEMO], **env) as url:
            merging = Client(url, verbose=False).submit(
                base="demo/base",
                multilingual="demo/multilingual",
                multimodal="slow/vlm",
                api_name="/merge",
            )
            deadline = time.monotonic() + 60
            while not [p for m, p in hub.begun if m == "GET" and p.startswith("/slow/vlm/")]:
                assert time.monotonic() < deadline, "the merge's download did not begin"
                time.sleep(0.2)
            plan, status = (
                Client(url, verbose=False)
                .submit(
                    base="demo/base",
                    multilingual="demo/multilingual",
                    multimodal="demo/multimodal",
                    api_name="/plan",
                )
                .result(timeout=90)  # the slow download alone takes 200 s
            )
            planned = time.monotonic()
            still = not merging.done()
            merging.cancel()
    assert status.startswith("✅"), status
    assert "Merged: 39 language-model tensors" in plan
    assert still  # the slow download was still going
    sent = [e for m, p, _, e in hub.log if m == "GET" and p.startswith("/slow/vlm/")]
    assert not sent or max(sent) > planned - 1
    full = [p for p in hub.downloads() if p.startswith("/demo/multimodal/")]
    assert full and not [p for p in full if p.endswith(".safetensors")]


def test_the_app_merges_fisher_from_hub_ids_downloading_the_trio_first(tmp_path):
    """A visitor's fisher merge from Hub ids: the trio is downloaded first (sized together,
    with its progress in the log), then each Fisher is estimated from the Hub cache (which lies
    outside the server's allowed folders) and says in its ``fisher.json`` which Hub id and commit
    it is of, not where the server keeps it."""
    from gradio_client import Client

    from dim3.fisher import FISHER_FILE
    from tests.app_server import running_app

    with FakeHub() as hub:
        served = {r: hub.add(f"demo/{r}", repo(tmp_path, r)) for r in ("base", "multilingual")}
        served["multimodal"] = hub.add("demo/multimodal", repo(tmp_path, "multimodal"))
        with running_app(tmp_path, [DEMO], **_app_env(hub, tmp_path / "cache")) as url:
            _, log, status = Client(url, verbose=False).predict(
                base="demo/base",
                multilingual="demo/multilingual",
                multimodal="demo/multimodal",
                method="fisher",
                fisher_data="demo",
                fisher_n=4,
                api_name="/merge",
            )
    assert status.startswith("✅ Merged"), status
    assert "downloading demo/base, demo/multilingual, demo/multimodal from the Hub" in log
    assert log.index("downloading demo/") < log.index("Fisher of multilingual")
    assert str(tmp_path) not in log
    metas = [json.loads(f.read_text()) for f in tmp_path.rglob(f"fisher/*/{FISHER_FILE}")]
    assert sorted((m["model"], m["commit"]) for m in metas) == [
        (f"demo/multilingual@{served['multilingual'].sha}", served["multilingual"].sha),
        (f"demo/multimodal@{served['multimodal'].sha}", served["multimodal"].sha),
    ]


def test_the_apps_evaluate_and_sweep_size_the_trios_downloads_together_before_the_first_byte(
    tmp_path,
):
    """Evaluate and Sweep from Hub ids download the trio as a merge does: sized together and
    refused over the server's limit before the first byte, even where the VLM alone would fit
    (they fetched the VLM alone first, then the LLMs)."""
    from gradio_client import Client

    from tests.app_server import running_app

    with FakeHub() as hub:
        hub.add("demo/multilingual", repo(tmp_path, "multilingual"))
        for role in ("base", "multimodal"):
            folder = repo(tmp_path, role, f"big-{role}")
            sparse_weights(folder, 60 * 10**6)
            hub.add(f"big/{role}", folder)
        cache = tmp_path / "cache"
        env = _app_env(hub, cache, DIM3_MAX_DOWNLOAD="100MB")
        trio = {"base": "big/base", "multilingual": "demo/multilingual"}
        with running_app(tmp_path, [DEMO], **env) as url:
            client = Client(url, verbose=False)
            evaluated, *_ = client.predict(
                **trio,
                multimodal="big/multimodal",
                methods=["task_arithmetic"],
                questions_per_language=1,
                probe="",
                api_name="/evaluate",
            )
            swept, *_ = client.predict(
                **trio,
                multimodal="big/multimodal",
                sweep_method="task_arithmetic",
                grid="scaling=0.5,1",
                per_language=8,
                references=False,
                probe="",
                api_name="/sweep",
            )
    for status in (evaluated, swept):
        shown = html.unescape(status.replace("\\", ""))
        assert "one job may download here ($DIM3_MAX_DOWNLOAD)" in shown, shown
        assert str(tmp_path) not in shown
    assert hub.downloads() == [] and blobs(cache) == []
