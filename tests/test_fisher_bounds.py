"""The Fishers a server keeps are bounded and shared across roles, and their estimation stops
within the job budget: on the demo's real checkpoints, and through a real running app."""

from __future__ import annotations

import json
import time

import pytest

from dim3.fisher import FISHER_FILE, FISHER_ROOT, fisher_bytes, fishers_for
from dim3.recipe import Source
from tests.app_server import ROOT, running_app

DEMO = ROOT / "assets" / "demo"
ML, MM = DEMO / "multilingual", DEMO / "multimodal"


def folders(root):
    path = root / FISHER_ROOT
    return sorted(path.iterdir()) if path.is_dir() else []


def test_same_model_in_several_roles_is_one_fisher(tmp_path):
    sources = {f"multilingual_{i}": Source(str(ML)) for i in (1, 2, 3)}
    out = fishers_for(sources, tmp_path, device="cpu", n=2, allowed_roots=[ROOT, tmp_path])
    assert len(set(out.values())) == 1 and len(folders(tmp_path)) == 1


def test_fishers_are_bounded_least_recently_used_deleted_first(tmp_path, monkeypatch):
    one = fisher_bytes(ML)
    assert 2 * 10**6 < one < 3 * 10**6  # the demo LLM's language tensors in float32
    monkeypatch.setenv("DIM3_MAX_FISHERS", str(int(2.5 * one)))
    kw = {"device": "cpu", "allowed_roots": [ROOT, tmp_path]}
    src = {"multilingual_1": Source(str(ML))}
    first = fishers_for(src, tmp_path, n=1, **kw)["multilingual_1"]
    second = fishers_for(src, tmp_path, n=2, **kw)["multilingual_1"]
    time.sleep(0.05)
    assert fishers_for(src, tmp_path, n=1, **kw)["multilingual_1"] == first  # reused: used now
    third = fishers_for(src, tmp_path, n=3, **kw)["multilingual_1"]
    # two fit: the least recently used (n=2) made room for n=3, the reused one stayed
    assert [str(f) for f in folders(tmp_path)] == sorted([first, third])
    assert second not in map(str, folders(tmp_path))
    # a Fisher larger than the whole allowance is refused before it is estimated
    monkeypatch.setenv("DIM3_MAX_FISHERS", str(one // 2))
    with pytest.raises(ValueError, match=r"does not fit the .*\$DIM3_MAX_FISHERS"):
        fishers_for(src, tmp_path, n=4, **kw)
    assert all(json.loads((f / FISHER_FILE).read_text())["n"] != 4 for f in folders(tmp_path))


def _app(tmp_path_factory, name: str, **env: str):
    """The app with ``env`` and a scratch folder of its own: yields (url, scratch)."""
    scratch = tmp_path_factory.mktemp(name)
    with running_app(scratch, [ROOT / "assets", scratch], **env) as url:
        yield url, scratch


@pytest.fixture(scope="module")
def tight_app(tmp_path_factory):
    """The app with a 4 s job budget."""
    yield from _app(tmp_path_factory, "tight", DIM3_JOB_BUDGET="4")


def test_app_fisher_estimation_stops_within_the_budget_and_keeps_nothing(tight_app):
    gradio_client = pytest.importorskip("gradio_client")
    url, scratch = tight_app
    c = gradio_client.Client(url, verbose=False)
    kw = {"method": "fisher", "fisher_data": "demo", "fisher_n": 512, "api_name": "/merge"}
    ml = {f"multilingual_{i}": str(ML) for i in (2, 3, 4)}
    start = time.monotonic()
    _plan, _log, status = c.predict(**kw, fisher_labels="sampled", **ml)
    took = time.monotonic() - start
    assert status.startswith("❌") and "would take about" in status, status
    assert took < 20, took
    assert folders(scratch / "outputs") == []  # "nothing it made was kept" holds
    # Evaluate reaches the same estimation: stopped likewise
    status, *_ = c.predict(
        methods=["fisher"], fisher_data="demo", fisher_n=512, probe="", api_name="/evaluate"
    )
    assert status.startswith("❌") and "would take about" in status, status
    assert folders(scratch / "outputs") == []


@pytest.fixture(scope="module")
def small_app(tmp_path_factory):
    """The app with 40 MB for saves (10 MB of Fishers) and no job budget: the merges below
    are not about time (under a 4 s budget one took 5 s in a CI run beside other work)."""
    yield from _app(tmp_path_factory, "small", DIM3_JOB_BUDGET="0", DIM3_MAX_SAVED="40MB")


def test_app_fishers_of_others_do_not_crowd_out_a_save(small_app):
    gradio_client = pytest.importorskip("gradio_client")
    url, scratch = small_app
    c = gradio_client.Client(url, verbose=False)
    ml = {f"multilingual_{i}": str(ML) for i in (2, 3, 4)}
    for n in (4, 5, 6, 7, 8):  # 3 new Fishers each (5 roles, 3 models): 7.7 MB
        *_, status = c.predict(method="fisher", fisher_n=n, api_name="/merge", **ml)
        assert status.startswith("✅ Merged"), status
    kept = folders(scratch / "outputs")
    assert sum(f.stat().st_size for d in kept for f in d.iterdir()) <= 10**7
    _, status, *_ = c.predict(method="task_arithmetic", folder="mine", api_name="/save")
    assert status.startswith("✅ Saved"), status


def test_a_stopped_call_deletes_the_fishers_it_finished_and_keeps_older_ones(tmp_path):
    from dim3.limits import BudgetExceeded, JobBudget

    kw = {"device": "cpu", "n": 2, "allowed_roots": [ROOT, tmp_path]}
    older = fishers_for({"multimodal": Source(str(MM))}, tmp_path, **kw)["multimodal"]
    budget = JobBudget(0.001, "merge")

    def progress(role, done, total, seconds):
        if role == "multilingual_1":  # the second model: past the budget
            time.sleep(0.01)
            budget.check()

    sources = {"multimodal": Source(str(MM)), "multilingual_1": Source(str(ML))}
    with pytest.raises(BudgetExceeded, match="Nothing it made was kept"):
        fishers_for(sources, tmp_path, progress=progress, **kw | {"n": 3})
    assert [str(f) for f in folders(tmp_path)] == [older]  # the n=3 multimodal one is gone
