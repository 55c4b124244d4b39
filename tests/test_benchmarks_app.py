"""Benchmarks in the running app (offline, demo trio): the Evaluate flow through gradio_client on a
local xGQA copy, its downloaded predictions rescored here, and "Draw a question" in the Chat tab in
a real browser (the demo probe, then the local xGQA copy), with the gold answer under the pair."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.benchmark_data import build_xgqa

gradio_client = pytest.importorskip("gradio_client")
CHROMIUM = os.environ.get("DIM3_CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 120_000  # ms, replies on a busy 2-core machine


@pytest.fixture(scope="module")
def xgqa_folder(tmp_path_factory) -> Path:
    """A local xGQA copy under the session's temporary folder (an allowed root of the app)."""
    return build_xgqa(tmp_path_factory.mktemp("bench") / "xgqa", languages=("de", "zh"), n=6)


@pytest.mark.slow
def test_evaluate_flow_on_a_local_benchmark_through_the_api(app_server, xgqa_folder):
    url, _ = app_server
    client = gradio_client.Client(url, verbose=False)
    job = client.submit(
        methods=["dim3"],
        source="xgqa",
        languages=["de", "zh"],
        probe=str(xgqa_folder),
        questions_per_language=3,
        api_name="/evaluate",
    )
    status, table, _chart, download = job.result(timeout=600)
    assert status.startswith("✅ 6 questions, 2 models, xGQA exact match"), status
    shown = [out[0] for out in job.outputs() if out and isinstance(out[0], str)]
    assert any("**original**" in s and "▰" in s for s in shown), shown  # a bar per model
    assert any("per question" in s and "× 2 models" in s for s in shown), shown  # the estimate
    assert table["headers"] == ["model", "de", "zh", "overall"]
    rows = {row[0]: dict(zip(table["headers"][1:], row[1:], strict=True)) for row in table["data"]}
    assert list(rows) == ["original", "dim3"]
    record = json.loads(Path(download).read_text(encoding="utf-8"))
    assert record["benchmark"] == "xgqa" and len(record["items"]) == 6
    for model, scores in rows.items():  # rescored from the predictions, by the definition
        for lang in ("de", "zh"):
            marks = [
                r["gold"][0].strip().lower() in r["predictions"][model].strip().lower()
                for r in record["items"]
                if r["language"] == lang
            ]
            assert scores[lang] == pytest.approx(round(sum(marks) / 3, 3))


def test_evaluate_refuses_a_benchmark_folder_outside_the_allowed_ones(app_server, tmp_path):
    url, _ = app_server
    outside = Path("/") / "etc"
    status, *_ = gradio_client.Client(url, verbose=False).predict(
        methods=[],
        source="xgqa",
        languages=["de"],
        probe=str(outside),
        questions_per_language=2,
        api_name="/evaluate",
    )
    assert status.startswith("❌") and "lies outside the folders" in status, status


def test_evaluate_names_a_language_the_local_copy_lacks(app_server, xgqa_folder):
    url, _ = app_server
    status, *_ = gradio_client.Client(url, verbose=False).predict(
        methods=[],
        source="xgqa",
        languages=["ko"],
        probe=str(xgqa_folder),
        questions_per_language=2,
        api_name="/evaluate",
    )
    assert status.startswith("❌") and "has no split 'ko'" in status and "de, zh" in status, status


@pytest.mark.slow
@pytest.mark.browser
def test_draw_a_question_then_see_the_gold_answer_under_the_pair(app_server, xgqa_folder):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    playwright = pytest.importorskip("playwright.sync_api")
    url, _ = app_server
    # the server's temporary folder is this process's (the same environment): each draw writes
    # its picture there for the box, and removes it once Gradio has it
    temporary = Path(tempfile.gettempdir())
    before = set(temporary.glob("dim3-draw-*"))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        page.wait_for_selector("#dim3-merge")
        page.click("#dim3-tab-chat-button")
        page.click("#dim3-draw-panel button.label-wrap")

        # The demo probe is offered first: a German question about a picture.
        page.click("#dim3-draw")
        page.wait_for_selector("#dim3-box .thumbnail-item")
        drawn = page.input_value("#dim3-box textarea")
        assert drawn.strip() and "🎲" in page.inner_text("#dim3-gold")
        page.press("#dim3-box textarea", "Enter")
        gold = page.locator("#dim3-gold").filter(has_text="Gold answer")
        gold.wait_for()
        text = gold.inner_text()
        assert "Original:" in text and "Merged:" in text and "exact match" in text, text
        assert page.locator("#dim3-original [data-testid='user']").last.inner_text().strip() == (
            drawn.strip()
        )

        # A local xGQA copy: the reference prompt goes into the box, the gold answer comes after.
        page.click("#dim3-draw-source")
        page.get_by_role("option", name="xGQA").click()
        page.wait_for_function(  # the language list follows the source; German is kept
            "() => document.querySelector('#dim3-draw-language input').value === 'de'"
        )
        page.fill("#dim3-draw-dataset textarea", str(xgqa_folder))
        page.click("#dim3-draw")
        page.wait_for_function(
            "() => document.querySelector('#dim3-box textarea').value.endsWith("
            "'Answer the question using a single word or phrase in English.')"
        )
        page.wait_for_selector("#dim3-box .thumbnail-item")
        page.get_by_text("Generation settings").click()  # the benchmark's generation length
        assert page.input_value("#dim3-max-new-tokens input[type=number]") == "4"
        page.press("#dim3-box textarea", "Enter")
        gold = page.locator("#dim3-gold").filter(has_text="xGQA")
        gold.filter(has_text="Gold answer").wait_for()
        text = gold.inner_text()
        assert any(c in text for c in ("red", "blue", "green")), text
        assert ("✅" in text or "❌" in text) and "exact match" in text, text
        browser.close()
    assert set(temporary.glob("dim3-draw-*")) <= before  # two pictures drawn, none left behind
