"""The app in a real browser: `python app.py` on a free port, driven by headless Chromium.

Merges the built-in offline trio, asks an image question and sees both panes answer; bad inputs
show their messages and the server keeps serving; two chats and a merge run at once. Saves a
small screenshot of each tab to assets/screenshots/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("DIM3_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "assets" / "screenshots"
IMAGE = ROOT / "assets" / "examples" / "red_circle.png"
TIMEOUT = 90_000  # ms, for a merge or a reply on a busy 2-core machine

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (set DIM3_CHROMIUM)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app as users start it, offline, with a scratch folder inside the allowed roots."""
    scratch = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = os.environ | {
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "DIM3_ALLOWED_ROOTS": os.pathsep.join(
            [str(ROOT / "assets"), str(tmp_path_factory.getbasetemp())]
        ),
        "DIM3_OUTPUT_DIR": str(scratch / "outputs"),
        "PYTHONUNBUFFERED": "1",
    }
    log = open(scratch / "app.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"the app did not start:\n{(scratch / 'app.log').read_text()[-3000:]}"
                ) from None
            time.sleep(0.5)
    yield url, scratch
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def open_app(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#dim3-merge")
    return page


def merge(page) -> str:
    page.click("#dim3-tab-merge-button")
    page.click("#dim3-merge")
    status = page.locator("#dim3-merge-status")
    status.filter(has_text="Merged").or_(status.filter(has_text="❌")).wait_for()
    return status.inner_text()


def ask(page, text: str, image: Path | None = None) -> None:
    page.click("#dim3-tab-chat-button")
    while page.locator("#dim3-box .delete-button").count():  # a file left from a refused question
        page.click("#dim3-box .delete-button")
    if image is not None:
        page.set_input_files("#dim3-box input[type=file]", str(image))
        page.wait_for_selector("#dim3-box .thumbnail-item")
    page.fill("#dim3-box textarea", text)
    page.press("#dim3-box textarea", "Enter")


def answers(page, turn: int) -> tuple[str, str]:
    """Wait until both panes have given their ``turn``-th answer (1-based) and the stream has
    ended (the input box is enabled again); return the two answers."""
    page.wait_for_function(
        """n => {
            const box = document.querySelector('#dim3-box textarea');
            const done = ['#dim3-original', '#dim3-merged'].every(pane => {
                const bots = document.querySelectorAll(pane + " [data-testid='bot']");
                const last = bots[bots.length - 1];
                return bots.length >= n && last.innerText.trim() !== '' && last.innerText.trim() !== '…';
            });
            return done && box && !box.disabled;
        }""",
        arg=turn,
    )
    return tuple(
        page.locator(f"{pane} [data-testid='bot']").last.inner_text().strip()
        for pane in ("#dim3-original", "#dim3-merged")
    )


def screenshot(page, name: str) -> None:
    """A small PNG of the page (downscaled, palette) in assets/screenshots/."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    raw = SHOTS / f"{name}.raw.png"
    page.screenshot(path=str(raw), full_page=True)
    with Image.open(raw) as img:
        img = img.convert("RGB")
        img.thumbnail((960, 1400))
        img.quantize(colors=128).save(SHOTS / f"{name}.png", optimize=True)
    raw.unlink()


def test_merge_the_offline_trio_and_chat_side_by_side(server, browser):
    url, _ = server
    page = open_app(browser, url)
    assert page.input_value("#dim3-ref-multimodal textarea").endswith(
        os.path.join("demo", "multimodal")
    )

    status = merge(page)
    assert "Merged" in status, status
    assert "tensors" in page.input_value("#dim3-log textarea")
    assert "Merged:" in page.input_value("#dim3-plan textarea")
    screenshot(page, "merge")

    ask(page, "What colour is the shape?", IMAGE)
    original, merged = answers(page, 1)
    assert original and merged and original != "…" and merged != "…"
    assert "No merged model" not in merged
    user = page.locator("#dim3-original [data-testid='user']")
    assert user.last.inner_text().strip() == "What colour is the shape?"
    assert page.locator("#dim3-merged img").count() >= 1  # the picture is in the conversation

    # Right-to-left: an Arabic question is laid out right to left.
    ask(page, "ما لون الشكل؟")
    answers(page, 2)
    para = page.locator("#dim3-original [data-testid='user'] p").last
    assert para.evaluate("p => getComputedStyle(p).unicodeBidi") == "plaintext"
    box = para.bounding_box()
    bubble = page.locator("#dim3-original [data-testid='user']").last.bounding_box()
    assert box["x"] + box["width"] > bubble["x"] + bubble["width"] - 30  # hugs the right edge
    screenshot(page, "chat")

    page.click("#dim3-tab-evaluate-button")
    slider = page.locator("#dim3-eval-n input[type=number]")
    slider.fill("8")
    slider.press("Enter")
    page.click("#dim3-evaluate")
    page.locator("#dim3-eval-status").filter(has_text="✅").or_(
        page.locator("#dim3-eval-status").filter(has_text="❌")
    ).wait_for()
    screenshot(page, "evaluate")

    page.click("#dim3-tab-analysis-button")
    page.click("#dim3-diagnose")
    page.locator("#dim3-analysis-status").filter(has_text="tensors").wait_for()
    screenshot(page, "analysis")
    page.close()


def test_bad_inputs_show_messages_and_the_server_keeps_serving(
    server, browser, tmp_path_factory, tiny_llava_trio
):
    url, _ = server
    pickles = tmp_path_factory.mktemp("pickle_only")
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"not really a pickle")
    page = open_app(browser, url)

    def plan_message(**refs: str) -> str:
        for role, ref in refs.items():
            page.fill(f"#dim3-ref-{role} textarea", ref)
        status = "#dim3-merge-status .prose"
        before = page.inner_text(status)
        page.click("#dim3-check")
        page.wait_for_function(
            "([sel, old]) => { const t = document.querySelector(sel).innerText;"
            " return t !== old && t.trim() !== ''; }",
            arg=[status, before],
        )
        return page.inner_text(status)

    assert "outside the allowed folders" in plan_message(multimodal="/etc")
    assert "offline" in plan_message(multimodal="nobody-here/no-such-vlm-dim3")
    assert "pickle" in plan_message(multimodal=str(pickles))
    assert "cannot be merged" in plan_message(multimodal=str(tiny_llava_trio.multimodal))

    fake = tmp_path_factory.mktemp("upload") / "holiday.png"
    fake.write_text("this is text, not a picture")
    ask(page, "What is this?", fake)
    page.get_by_text("is not a readable image").wait_for()

    ask(page, "", IMAGE)
    page.get_by_text("Type a question to go with your picture").wait_for()

    # Still serving: the default trio checks out.
    page.reload()
    page.wait_for_selector("#dim3-check")
    page.click("#dim3-check")
    page.locator("#dim3-merge-status").filter(has_text="fit together").wait_for()
    page.close()


def test_two_chats_while_a_third_browser_merges(server, browser):
    url, _ = server
    pages = [open_app(browser, url) for _ in range(3)]
    merge(pages[2])  # a merged model exists, then: two chats and a new merge at once
    pages[2].click("#dim3-merge")
    for page, text in zip(
        pages[:2], ("What colour is the shape?", "Welche Farbe hat die Form?"), strict=True
    ):
        ask(page, text, IMAGE)
    for page in pages[:2]:
        assert all(answers(page, 1))
    status = pages[2].locator("#dim3-merge-status")
    status.filter(has_text="Merged").wait_for()
    for page in pages:
        page.close()
