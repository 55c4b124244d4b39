"""The app in a real browser: `python app.py` on a free port, driven by headless Chromium.

Merges the built-in offline trio, asks an image question and sees both panes answer; bad inputs
show their messages and the server keeps serving; two chats and a merge run at once. Saves a
small screenshot of each tab into a temporary folder, or into ``$DIM3_SCREENSHOTS`` when that is set
(never into the repository: the README's screenshots are taken by an explicit command).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path

import pytest

from tests.app_server import ROOT, running_app

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("DIM3_CHROMIUM", "/usr/bin/chromium")
IMAGE = ROOT / "assets" / "examples" / "red_circle.png"
TIMEOUT = 90_000  # ms, for a merge or a reply on a busy 2-core machine

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (set DIM3_CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(app_server):
    """The app as users start it, offline, with a scratch folder inside the allowed roots."""
    return app_server


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


@cache
def shots_dir() -> Path:
    """``$DIM3_SCREENSHOTS`` if set, else a temporary folder removed when the tests end."""
    if os.environ.get("DIM3_SCREENSHOTS"):
        return Path(os.environ["DIM3_SCREENSHOTS"])
    folder = tempfile.mkdtemp(prefix="dim3-screenshots-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


def screenshot(page, name: str) -> Path:
    """A small PNG of the page (downscaled, palette) in :func:`shots_dir`; returns its path."""
    from PIL import Image

    shots = shots_dir()
    shots.mkdir(parents=True, exist_ok=True)
    raw = shots / f"{name}.raw.png"
    page.screenshot(path=str(raw), full_page=True)
    with Image.open(raw) as img:
        img = img.convert("RGB")
        img.thumbnail((960, 1400))
        img.quantize(colors=128).save(shots / f"{name}.png", optimize=True)
    raw.unlink()
    return shots / f"{name}.png"


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
    page.click("#dim3-box .delete-button")
    page.press("#dim3-box textarea", "Enter")
    page.get_by_text("Type a question first").wait_for()

    # Still serving: the default trio checks out.
    page.reload()
    page.wait_for_selector("#dim3-check")
    page.click("#dim3-check")
    page.locator("#dim3-merge-status").filter(has_text="fit together").wait_for()
    page.close()


def pane_texts(page) -> str:
    return page.locator("#dim3-original").inner_text() + page.locator("#dim3-merged").inner_text()


def test_two_chats_while_a_third_browser_merges_fails_and_merges_again(server, browser):
    url, _ = server
    pages = [open_app(browser, url) for _ in range(3)]
    assert "Merged" in merge(pages[2])  # a merged model is served
    questions = ("What colour is the shape?", "Welche Farbe hat die Form?")
    for page, text in zip(pages[:2], questions, strict=True):
        ask(page, text, IMAGE)
    for page in pages[:2]:
        assert all(answers(page, 1))

    # A failing merge (base /etc) while both chat: their merged model stays.
    pages[2].fill("#dim3-ref-base textarea", "/etc")
    pages[2].click("#dim3-merge")
    for page, text in zip(pages[:2], questions, strict=True):
        ask(page, text)
    pages[2].locator("#dim3-merge-status").filter(has_text="❌").wait_for()
    assert "outside the allowed folders" in pages[2].inner_text("#dim3-merge-status")
    for page in pages[:2]:
        _, merged = answers(page, 2)
        assert "No merged model" not in merged and "merged at" in merged

    # A merge that succeeds: the others are told before their next answer.
    pages[2].reload()
    pages[2].wait_for_selector("#dim3-merge")
    assert "Merged" in merge(pages[2])
    for page, text in zip(pages[:2], questions, strict=True):
        ask(page, text)
    for page in pages[:2]:
        answers(page, 3)
        right = page.locator("#dim3-merged").inner_text()
        assert right.count("The merged model is now dim3 merge of ./assets/demo/multimodal") == 1
        assert "No merged model" not in right
    for page in pages:
        page.close()


PANES = """() => {
  const box = document.querySelector('#dim3-box textarea');
  const n = s => document.querySelectorAll(s).length;
  const text = ['#dim3-original', '#dim3-merged'].map(p => document.querySelector(p).innerText);
  return {users: n("#dim3-original [data-testid='user']") + n("#dim3-merged [data-testid='user']"),
          bots: n("#dim3-original [data-testid='bot']") + n("#dim3-merged [data-testid='bot']"),
          disabled: !box || box.disabled, text: text.join(' | ')};
}"""


def test_a_conversation_whose_picture_the_server_removed_says_so(server, browser, tmp_path):
    """The server removes uploads after a while (``dim3.ui.uploads``): the next question of a
    conversation whose picture is gone is taken back with a message saying so, not answered
    about nothing; Clear and the picture again, and it is answered."""
    import uuid
    from urllib.parse import unquote

    from PIL import Image

    url, _ = server
    picture = tmp_path / "blue_note.png"  # its own bytes: no other test's upload shares its path
    Image.new("RGB", (40, 40), tuple(uuid.uuid4().bytes[:3])).save(picture)
    page = open_app(browser, url)
    ask(page, "What colour is this?", picture)
    assert all(answers(page, 1))
    src = page.locator("#dim3-original img[src*='blue_note']").first.get_attribute("src")
    stored = Path(unquote(src.split("file=", 1)[1]))
    assert stored.is_file() and stored != picture
    stored.unlink()  # as the server's expiry or its room for uploads would
    asked = page.locator("#dim3-original [data-testid='user']").count()

    ask(page, "And its shape?")
    page.get_by_text("no longer on the server").wait_for()
    page.wait_for_function("() => !document.querySelector('#dim3-box textarea').disabled")
    assert "And its shape?" not in pane_texts(page)  # taken back, not answered
    assert page.locator("#dim3-original [data-testid='user']").count() <= asked
    assert page.locator("#dim3-original [data-testid='bot']").count() == 1
    assert page.locator("#dim3-original img[src*='blue_note']").count() == 0  # no broken picture
    page.click("#dim3-clear")
    ask(page, "And its shape?", picture)
    assert all(answers(page, 1))
    page.close()


def test_clear_during_an_answer_is_final(server, browser):
    """Clear at 0-200 ms after Enter, on a fresh page each time (the first question of a
    session is where the race was): the conversation never comes back, the box is never left
    disabled, no partial answer stays; and a question asked right after Clear is answered."""
    url, _ = server
    trials, bad = 21, []
    for i in range(trials):
        delay = 200 * i // (trials - 1)
        page = open_app(browser, url)
        page.click("#dim3-tab-chat-button")
        page.fill("#dim3-box textarea", "What colour is the shape?")
        page.press("#dim3-box textarea", "Enter")
        page.wait_for_timeout(delay)
        page.click("#dim3-clear")
        states = []
        for _ in range(10):  # 2.5 s: longer than a stopped answer takes to end
            page.wait_for_timeout(250)
            states.append(page.evaluate(PANES))
        last = states[-1]
        if last["users"] or last["bots"] or last["disabled"] or "…" in last["text"]:
            seen = [(s["users"], s["bots"], s["disabled"]) for s in states]  # every 250 ms
            bad.append((delay, seen, last))
        if i % 10 == 0:  # Clear leaves a working chat: the next question is answered
            page.wait_for_function("() => !document.querySelector('#dim3-box textarea').disabled")
            ask(page, "Welche Farbe hat die Form?")
            assert all(answers(page, 1))
            assert page.locator("#dim3-original [data-testid='user']").count() == 1
        page.close()
    assert not bad, bad
    page = open_app(browser, url)
    page.click("#dim3-tab-chat-button")
    page.click("#dim3-regen")
    page.get_by_text("Nothing to regenerate yet").wait_for()
    page.close()


# Two actions in one task of the page, as a busy page takes a visitor's quick Enter and click:
# Gradio's own handlers run after a tick, each in its turn.
TOGETHER = """([first, clear]) => {
  const enter = () => document.querySelector('#dim3-box textarea').dispatchEvent(
    new KeyboardEvent('keypress', {key: 'Enter', bubbles: true, cancelable: true}));
  const click = () => document.querySelector(clear).click();
  if (first === 'enter') { enter(); click(); } else { click(); enter(); }
}"""


ANSWERED = """([question, turns]) => {
  const box = document.querySelector('#dim3-box textarea');
  return box && !box.disabled && ['#dim3-original', '#dim3-merged'].every(pane => {
    const users = document.querySelectorAll(pane + " [data-testid='user']");
    const bots = document.querySelectorAll(pane + " [data-testid='bot']");
    if (users.length === 0) return turns === null;
    const last = bots[bots.length - 1];
    return (turns === null || users.length === turns) && bots.length === users.length
      && users[users.length - 1].innerText.includes(question)
      && !['', '…'].includes(last.innerText.trim());
  });
}"""


def answered(page, question: str, turns: int | None) -> str:
    """Wait until both panes hold ``turns`` questions, the last ``question``, each answered,
    and the box is enabled (``turns`` None: that, in any number, or both panes empty); return
    the panes' text. AssertionError, with what the panes hold, if they never do."""
    try:
        page.wait_for_function(ANSWERED, arg=[question, turns])
    except playwright.TimeoutError:
        raise AssertionError(f"not answered: {page.evaluate(PANES)}") from None
    return pane_texts(page)


@pytest.mark.parametrize(
    "clear,first",
    [
        ("#dim3-clear", "enter"),
        ("#dim3-clear", "clear"),
        ("#dim3-merged .top-panel button", "enter"),
        ("#dim3-merged .top-panel button", "clear"),
    ],
)
def test_a_question_and_a_clear_at_once_keep_the_visitors_order(server, browser, clear, first):
    """Enter then Clear (the button, or a pane's own) in the same moment: the question is
    cleared, not answered; Clear then Enter: it is answered, in a fresh conversation. The
    page's Clear count and the server's agree afterwards: the next question is answered.
    (Gradio reads a question's inputs after a tick, by which time the Clear had counted
    itself: the question went out as asked after it, and was answered. And the Clear's
    update of the session's states, sent first, could be stored after the question's: its
    answer found no question and left the panes empty, in loaded runs by hand.)"""
    url, _ = server
    page = open_app(browser, url)
    ask(page, "What colour is the shape?")
    assert all(answers(page, 1))  # a pane shows its own Clear once it has a conversation
    page.fill("#dim3-box textarea", "Welche Form hat es?")
    page.evaluate(TOGETHER, [first, clear])
    if first == "clear":
        texts = answered(page, "Welche Form hat es?", 1)
        assert "What colour is the shape?" not in texts
    else:  # settled: cleared, or (wrongly) the question answered
        answered(page, "Welche Form hat es?", None)
        state = page.evaluate(PANES)
        assert (state["users"], state["bots"], state["disabled"]) == (0, 0, False), state
    ask(page, "Und die Farbe?")
    texts = answered(page, "Und die Farbe?", 2 if first == "clear" else 1)
    assert "What colour is the shape?" not in texts
    assert ("Welche Form hat es?" in texts) == (first == "clear"), (first, texts)
    page.close()


def test_an_over_long_message_is_capped_in_the_browser_and_refused_by_the_server(server, browser):
    url, _ = server
    page = open_app(browser, url)
    page.click("#dim3-tab-chat-button")
    box = page.locator("#dim3-box textarea")
    assert box.get_attribute("maxlength") == "4000"
    box.fill("x" * 5000)
    assert len(box.input_value()) == 4000

    # A client that ignores maxlength still hits the server's check.
    page.evaluate("document.querySelector('#dim3-box textarea').removeAttribute('maxlength')")
    page.wait_for_timeout(100)
    box.evaluate("t => { t.removeAttribute('maxlength'); }")
    page.evaluate(
        "() => { const t = document.querySelector('#dim3-box textarea');"
        " const set = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;"
        " t.removeAttribute('maxlength'); set.call(t, 'y'.repeat(5000));"
        " t.dispatchEvent(new Event('input', {bubbles: true})); }"
    )
    box.press("Enter")
    page.get_by_text("the limit is 4,000").wait_for()

    # Under the character cap but longer than the demo model's 160-token context: refused
    # before any forward pass, and the question is taken back.
    ask(page, "rot blau grün " * 150)
    page.get_by_text("reads at most 160").first.wait_for()
    page.wait_for_function("() => !document.querySelector('#dim3-box textarea').disabled")
    assert page.locator("#dim3-original [data-testid='user']").count() == 0
    page.close()


def test_a_picture_the_server_has_no_room_for_is_refused_with_the_reason(browser, tmp_path):
    """Uploads share a bounded room on the server's disk (``$DIM3_UPLOAD_CACHE``,
    ``dim3.ui.uploads``): one that does not fit is refused before it is written, and the
    visitor reads why, not a broken attachment."""
    cache = tmp_path / "gradio-cache"
    env = {"GRADIO_TEMP_DIR": str(cache), "DIM3_UPLOAD_CACHE": "1kB"}
    with running_app(tmp_path, [ROOT / "assets"], **env) as url:
        page = open_app(browser, url)
        page.click("#dim3-tab-chat-button")
        before = sorted(p for p in cache.rglob("*") if p.is_file())  # the demo's examples
        page.set_input_files("#dim3-box input[type=file]", str(IMAGE))
        page.get_by_text("as many uploads as it can keep (1 kB)").wait_for()
        assert page.locator("#dim3-box .thumbnail-item").count() == 0
        assert sorted(p for p in cache.rglob("*") if p.is_file()) == before  # nothing written
        page.close()


def test_a_visitor_past_their_share_of_the_queue_reads_why(browser, tmp_path):
    """One visitor may hold ``$DIM3_MAX_QUEUED`` events waiting or running
    (``dim3.ui.visitors``): past it, the browser's request is refused and the page says why and
    what to do. The visitor's share is filled by an API call from the same address, held
    running by a hook in the server (as in ``test_app_queue``)."""
    import httpx

    from tests.test_app_queue import ask as api_ask
    from tests.test_app_queue import held_app

    hold = tmp_path / "hold"
    with held_app(tmp_path, hold, DIM3_MAX_QUEUED="1") as url:
        page = open_app(browser, url)
        assert api_ask(url, None).status_code == 200  # this address's one event, held
        page.click("#dim3-merge")
        page.get_by_text("You already have 1 request waiting or running").wait_for()
        page.get_by_text("wait for one to finish, then try again").wait_for()
        page.wait_for_timeout(500)  # the toast fades in
        screenshot(page, "queue-share")
        hold.unlink()
        assert httpx.get(url, timeout=30).status_code == 200  # the server serves on
        page.close()


def test_showcase_mode_in_a_browser(browser, tmp_path):
    from dim3.presets import get_preset
    from dim3.recipe import Recipe, Source

    demo = get_preset("demo")
    recipe = Recipe(
        Source(demo.base),
        Source(demo.multilingual),
        Source(demo.multimodal),
        method="task_arithmetic",
        device="cpu",
    )
    path = tmp_path / "showcase.json"
    path.write_text(recipe_json(recipe))
    with running_app(tmp_path, [ROOT / "assets", tmp_path], DIM3_SHOWCASE=str(path)) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        page.get_by_text("This Space is a showcase").wait_for()
        assert page.locator("#dim3-merge").count() == 0 and page.locator("#dim3-check").count() == 0
        assert '"task_arithmetic"' in page.locator("#dim3-showcase-recipe").inner_text()
        # the card renders after the page (its code block is highlighted): wait for its title
        page.locator("#dim3-showcase-card").get_by_text("Merged VLM (task_arithmetic)").wait_for()
        card = page.locator("#dim3-showcase-card").inner_text()
        assert re.search(r"Tensors: [1-9]\d* merged, [1-9]\d* copied", card), card
        assert str(ROOT) not in page.locator("body").inner_text()
        screenshot(page, "showcase")
        ask(page, "Welche Farbe hat die Form?", IMAGE)
        _, merged = answers(page, 1)
        assert "task_arithmetic merge of ./assets/demo/multimodal" in merged
        page.close()

        # Through the API too: no merge, save or push endpoints; chat answers with the showcase.
        from gradio_client import Client

        client = Client(url, verbose=False)
        info = client.view_api(return_format="dict", print_info=False)
        public = {"/chat", "/evaluate", "/diagnose", "/represent", "/sweep"}  # no merge/save/push
        assert set(info["named_endpoints"]) == public
        original, merged, model = client.predict("Welche Farbe?", api_name="/chat")
        assert model.startswith("task_arithmetic merge of")
        assert original.strip() and merged.strip() and "No merged model" not in merged
    assert "showcase: serving task_arithmetic merge of" in (tmp_path / "app.log").read_text()


def recipe_json(recipe) -> str:
    import json

    return json.dumps(recipe.to_dict())


def test_multilingual_rows_can_be_added_and_removed(server, browser):
    page = open_app(browser, server[0])
    page.click("#dim3-tab-merge-button")
    assert not page.locator("#dim3-ref-multilingual_2").is_visible()
    page.click("#dim3-add-expert")
    page.fill("#dim3-ref-multilingual_2 textarea", "./assets/demo/experts/zh+ar+hi+sw")
    plan = page.locator("#dim3-plan textarea")
    page.click("#dim3-check")
    page.wait_for_function(
        "() => document.querySelector('#dim3-plan textarea').value.includes('Multilingual models: 2')"
    )
    page.click("#dim3-remove-expert")
    page.locator("#dim3-ref-multilingual_2").wait_for(state="hidden")
    page.click("#dim3-check")
    page.wait_for_function(
        "() => { const v = document.querySelector('#dim3-plan textarea').value;"
        " return v.includes('Merged:') && !v.includes('Multilingual models'); }"
    )
    assert "Multilingual models" not in plan.input_value()
    page.close()
