"""The Chat tab: the original and the DiM3-merged VLM answer the same question side by side.

Layout and wiring only. The conversation lives in ``gr.State`` as plain message lists (one per
pane, ``[{"role": "user" | "assistant", "content": str}]``; an answer also records ``by``, the
model that gave it, and a ``notice`` entry marks a message from the app that the models never
see) plus the path of the conversation's image and the version of the merged model this session
last saw. Both replies stream at once through ``dim3.chat.stream_reply`` and ``interleave``.

What the session sees of the shared models: each answer uses one consistent pair
(``ModelManager.served``); when another visitor's merge has replaced the merged model since the
last answer, a notice says so before the next one. Stop ends the session's generation after the
current token; Clear does too and is final (nothing the stopped stream produced is shown or kept);
a closed tab stops it through ``unload``. ``/chat`` is the one-call API: a message, an optional
image and generation settings in, both answers out.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from dim3.chat import (
    MAX_MESSAGE_CHARS,
    ChatError,
    GenerationParams,
    Reply,
    interleave,
    load_image,
    stream_reply,
)
from dim3.examples import examples_for, load_examples
from dim3.examples import label as example_label
from dim3.models import Served
from dim3.ui.common import AppContext, error_html, error_text, gpu, md_escape
from dim3.ui.draw import DrawControls, draw_controls, gold_line, wire_draw

NO_MERGE = "No merged model yet: run a merge in the **Merge** tab, then ask again."
STOPPED = " ⏹ (stopped)"
EMPTY = "(no answer: the model produced only blank tokens)"
MIN_UPDATE = 0.05  # seconds between streamed screen updates
PRIVATE = {"api_visibility": "private"}
PICTURE_GONE = (
    "this conversation's picture is no longer on the server (it removes uploads after a while, "
    "sooner when it is short of room); press Clear and attach the picture again"
)
# The order of a question and a Clear is the order of the visitor's actions, not of Gradio's
# events: Gradio reads an event's inputs after a tick, which in its async mode waits for a timer
# or an animation frame, and the box submits only after one; so on a busy page, Enter and then
# Clear could send the question with the Clear's count, and it was answered after the Clear.
# The page counts Clear clicks as they happen and notes the count when a question is asked
# (Enter in the box, its send button, Regenerate); the question's event sends that count.
# ``counted``, the Clear events' own count, covers a Clear the click listener did not see.
PAGE_JS = f"""() => {{
  const cap = () => document.querySelectorAll('#dim3-box textarea').forEach(
    t => t.setAttribute('maxlength', '{MAX_MESSAGE_CHARS}'));
  cap();
  new MutationObserver(cap).observe(document.body, {{childList: true, subtree: true}});
  const order = window.dim3Order = {{clicks: 0, counted: 0, asked: null}};
  const now = () => Math.max(order.clicks, order.counted);
  const on = (e, selector) => e.target instanceof Element && e.target.closest(selector);
  document.addEventListener('click', e => {{
    if (on(e, '#dim3-clear, .dim3-pane .top-panel button')) order.clicks += 1;
    else if (on(e, '#dim3-regen, #dim3-box [data-testid="submit-button"]')) order.asked = now();
  }}, true);
  document.addEventListener('keypress', e => {{
    if (e.key === 'Enter' && on(e, '#dim3-box')) order.asked = now();
  }}, true);
}}"""
# A Clear event's count (its place among the page's Clears), kept in the browser.
COUNT_JS = """(n) => {
  const count = (Number(n) || 0) + 1, order = window.dim3Order;
  if (order) order.counted = Math.max(order.counted, count);
  return count;
}"""
# A question's event: the Clear count noted when it was asked (its last input), once.
ASKED_JS = """(...inputs) => {
  const order = window.dim3Order;
  if (order && order.asked !== null) {
    inputs[inputs.length - 1] = order.asked;
    order.asked = null;
  }
  return inputs;
}"""


@dataclass
class ChatTab:
    """The Chat tab's components."""

    status: gr.Markdown
    left: gr.Chatbot
    right: gr.Chatbot
    box: gr.MultimodalTextbox
    left_msgs: gr.State
    right_msgs: gr.State
    image: gr.State
    seen: gr.State  # the merged model's version this session last answered with
    clears: gr.Number  # hidden, in the browser: how many times this page pressed Clear
    turn: gr.Textbox  # hidden, in the browser: the id of the question its stream answers
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    draw: DrawControls | None = None  # "Draw a question" (dim3/ui/draw.py)

    def settings(self) -> list[gr.Slider]:
        return [self.max_new_tokens, self.temperature, self.top_p]


def display(messages: list[dict], image: str | None) -> list[dict]:
    """A pane's plain messages -> Chatbot messages; the image is shown before the first question.

    A user's text is shown literally (escaped), an answer as Markdown (``answer_markdown``: its
    formatting, but no image, link or HTML) with a small caption naming the model that gave it;
    app notices in italics. A picture the server no longer holds is left out."""
    out: list[dict] = []
    image = image if image and Path(image).is_file() else None
    for i, m in enumerate(messages):
        if i == 0 and image:
            out.append({"role": "user", "content": {"path": image}})
        if m.get("notice"):
            out.append({"role": "assistant", "content": f"ℹ️ *{md_escape(m['content'], None)}*"})
        elif m["role"] == "user":
            out.append({"role": "user", "content": md_escape(m["content"], None)})
        else:
            text = answer_markdown(m["content"]) or "…"
            if m.get("by"):
                text += f"\n\n<sub>— {md_escape(m['by'])}</sub>"
            out.append({"role": "assistant", "content": text})
    return out


# A model's answer is shown to every visitor (the served models are shared), and a visitor's own
# checkpoint can make it say anything: see ``answer_markdown``.
_FENCE = re.compile(r"^([ \t]*(?:(?:[-*+]|\d{1,9}[.)])[ \t]+)?)(`{3,}|~{3,})(.*)$")
_LANGUAGE = re.compile(r"[\w+#.-]{1,40}")
# what links, images, references, autolinks, HTML, quotes and code spans are made of, as named
# references (a bare URL that ends in one leaves it out, as GFM does, so the URL stays whole)
_PROSE = {
    **{"\\": "&bsol;", "`": "&grave;", "[": "&lsqb;", "]": "&rsqb;"},
    **{"<": "&lt;", ">": "&gt;", "&": "&amp;"},
}
_PROSE_CHARS = re.compile("[" + re.escape("".join(_PROSE)) + "]")
_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~]")  # every ASCII punctuation character
_TICKS = re.compile(r"`+")
_INDENTED = re.compile(r" {4}| {0,3}\t")  # how a line of an indented code block starts
_LIST_ITEM = re.compile(r" {0,3}(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_PARAGRAPHS = re.compile(r"(\n[ \t]*\n)")


def answer_markdown(text: str) -> str:
    """A model's answer as Markdown that renders its formatting but cannot fetch or link.

    In prose, the characters that links, images, references, autolinks, HTML, quotes and code
    spans are made of (``\\ ` [ ] < >``, and ``&``) become character references (``&lsqb;``):
    they show as written, and no parser builds anything from them (references, unlike
    backslashes, also hold inside a bare URL that Gradio links, whose text is the URL itself).
    Bold, italics, headings, lists and tables stay. A code span becomes ``<code>`` with all its
    punctuation as references, so nothing in it is Markdown whatever a parser makes of its line.
    A fenced block becomes a fence at the left margin after a blank line (no list, quote or HTML
    block of the prose can hold it), longer than any run of backticks inside and always closed,
    also mid-stream, so its content stays code; so does an indented code block (one that no open
    list could hold). ``mermaid`` is dropped from its language: Gradio draws such a block as a
    diagram, which may hold links and images.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks, prose, i, listed = [], [], 0, False  # listed: a list is open in what is written
    while i < len(lines):
        line, after_blank = lines[i], not prose or not prose[-1].strip()
        fence = _FENCE.match(line)
        if fence and not (fence[2][0] == "`" and "`" in fence[3]):  # no backtick in its info
            if fence[1].strip():  # a list item that opens with a fence: the item, then the fence
                prose.append(fence[1].rstrip())
            i, code = _fenced(lines, i + 1, fence[1], fence[2], fence[3])
        elif line.strip() and _INDENTED.match(line) and after_blank and not listed:
            i, code = _indented(lines, i)  # fenced too, so that its content stays verbatim
        else:
            if _LIST_ITEM.match(line):
                listed = True
            elif line.strip() and not _INDENTED.match(line) and after_blank:
                listed = False
            prose.append(line)
            i += 1
            continue
        blocks += [_prose("\n".join(prose).strip("\n")), code]
        prose, listed = [], False  # a fence at the margin ends any list
    blocks.append(_prose("\n".join(prose).strip("\n")))
    return "\n\n".join(b for b in blocks if b)  # a blank line before and after each fence


def _fenced(lines: list[str], i: int, indent: str, fence: str, info: str) -> tuple[int, str]:
    """The fenced block opened before ``lines[i]``: (the line after it, the block re-fenced)."""
    closing = re.compile(rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*")
    strip = re.compile(rf"[ \t]{{0,{len(indent)}}}")
    body = []
    while i < len(lines) and not closing.fullmatch(lines[i]):
        body.append(strip.sub("", lines[i], count=1))
        i += 1
    words = info.split()
    language = words[0] if words and _LANGUAGE.fullmatch(words[0]) else ""
    return i + 1, _code_block(body, "" if language.lower() == "mermaid" else language)


def _indented(lines: list[str], i: int) -> tuple[int, str]:
    """The indented code block from ``lines[i]``: (the line after it, the block fenced)."""
    end = i
    while end < len(lines) and (_INDENTED.match(lines[end]) or not lines[end].strip()):
        end += 1
    while not lines[end - 1].strip():  # blank lines after it are not its own
        end -= 1
    return end, _code_block([_INDENTED.sub("", line, count=1) for line in lines[i:end]], "")


def _code_block(body: list[str], language: str) -> str:
    """``body`` fenced anew: longer than any run of backticks inside it, and closed."""
    code = "".join(f"{line}\n" for line in body)
    ticks = "`" * max(3, 1 + max((len(t) for t in _TICKS.findall(code)), default=0))
    return f"{ticks}{language}\n{code}{ticks}"


def _prose(text: str) -> str:
    """Prose with its code spans as ``<code>``, the rest escaped; a span ends in its paragraph."""
    return "".join(
        part if _PARAGRAPHS.fullmatch(part) else _spans(part) for part in _PARAGRAPHS.split(text)
    )


def _spans(text: str) -> str:
    """CommonMark's code spans: a run of n backticks up to the next run of exactly n."""
    runs = list(_TICKS.finditer(text))
    after: dict[int, int] = {}  # run index -> the next run of the same length
    following: dict[int, int] = {}
    for k in range(len(runs) - 1, -1, -1):
        n = len(runs[k][0])
        if n in following:
            after[k] = following[n]
        following[n] = k
    out, start, k = [], 0, 0
    while k < len(runs):
        if k not in after:  # no closing run: literal backticks, prose
            k += 1
            continue
        close = after[k]
        out += [_escape_prose(text[start : runs[k].start()])]
        out += [_code_span(text[runs[k].end() : runs[close].start()])]
        start, k = runs[close].end(), close + 1
    return "".join([*out, _escape_prose(text[start:])])


def _code_span(code: str) -> str:
    code = code.replace("\n", " ")
    if code[:1] == code[-1:] == " " and code.strip():  # CommonMark drops one space each side
        code = code[1:-1]
    return "<code>" + _PUNCTUATION.sub(lambda c: f"&#{ord(c[0])};", code) + "</code>"


def _escape_prose(text: str) -> str:
    return _PROSE_CHARS.sub(lambda c: _PROSE[c[0]], text)


def for_model(messages: list[dict]) -> list[dict]:
    """The turns a model reads: app notices left out, only role and content kept."""
    return [{"role": m["role"], "content": m["content"]} for m in messages if not m.get("notice")]


def status_text(ctx: AppContext) -> str:
    s = ctx.manager.status()
    served = ctx.manager.served()
    when = f", merged at {served.info.when()}" if served.info else ""
    return f"**Original:** {md_escape(s['original'])} · **Merged:** {md_escape(s['merged'])}{when}"


def _layout(ctx: AppContext) -> tuple[ChatTab, dict[str, gr.Button]]:
    status = gr.Markdown(status_text(ctx), elem_classes="dim3-status", elem_id="dim3-chat-status")
    with gr.Row(equal_height=True):
        left, right = (
            gr.Chatbot(
                label=label,
                height=420,
                elem_id=elem,
                elem_classes="dim3-pane",
                buttons=["copy"],
                # No LaTeX: Gradio cuts $$…$$ out of a message before it parses the Markdown,
                # across a fence's opening or closing line, which let an answer's code out.
                latex_delimiters=[],
            )
            for label, elem in (("Original VLM", "dim3-original"), ("Merged", "dim3-merged"))
        )
    gold = gold_line()  # a drawn question's gold answer, under the pair
    box = gr.MultimodalTextbox(
        placeholder=(
            f"Ask about a picture, in any language (up to {MAX_MESSAGE_CHARS:,} characters). "
            "Attach an image with the clip."
        ),
        file_types=["image"],
        file_count="single",
        sources=["upload"],
        show_label=False,
        elem_id="dim3-box",
        elem_classes="dim3-bidi",
    )
    with gr.Row(elem_id="dim3-chat-actions"):  # one row at any width: see CSS
        stop = gr.Button("⏹ Stop", elem_id="dim3-stop", variant="stop")
        regen = gr.Button("🔄 Regenerate", elem_id="dim3-regen")
        clear = gr.Button("🗑 Clear", elem_id="dim3-clear")
    with gr.Accordion("Generation settings", open=False):
        sliders = [
            gr.Slider(
                f.metadata["min"],
                f.metadata["max"],
                value=f.default,
                step=1 if name == "max_new_tokens" else 0.05,
                label=name.replace("_", " "),
                elem_id=f"dim3-{name.replace('_', '-')}",
                info=f.metadata["help"],
            )
            for name, f in GenerationParams.__dataclass_fields__.items()
        ]
    draw = draw_controls(gold)
    _examples(box, ctx.showcase.recipe.multimodal.ref if ctx.showcase else ctx.manager.default_vlm)
    states = gr.State([]), gr.State([]), gr.State(None), gr.State(None)
    # Browser-side values: read when an event is triggered, not when the server runs it.
    # (visible="hidden": in the page but not shown; a visible=False one is not in the page, and
    # events would read its first value, not its current one)
    clears = gr.Number(0, precision=0, visible="hidden", elem_id="dim3-clears")
    turn = gr.Textbox("", visible="hidden", elem_id="dim3-turn")
    tab = ChatTab(status, left, right, box, *states, clears, turn, *sliders, draw=draw)
    return tab, {"stop": stop, "regen": regen, "clear": clear}


def _examples(box: gr.MultimodalTextbox, vlm: str | None) -> None:
    """Example chips that fit the VLM served at start (its declared languages; all otherwise),
    each with its picture; right-to-left text isolated (``dim3.examples.label``)."""
    examples = examples_for(vlm)
    if examples:
        every = len({e.language for e, _ in load_examples()})
        languages = len({e.language for e, _ in examples})
        which = "" if languages == every else " (the ones this VLM was taught)"
        gr.Examples(
            [[{"text": e.text, "files": [str(path)]}] for e, path in examples],
            inputs=[box],
            example_labels=[example_label(e) for e, _ in examples],
            label=f"Examples in {languages} languages{which}",
            examples_per_page=len(examples),
            elem_id="dim3-examples",
            api_visibility="private",
        )


def build_chat_tab(ctx: AppContext) -> ChatTab:
    """Lay out the Chat tab inside the current Blocks and wire its events (its one-call API,
    ``/chat``, is wired beside it by ``dim3.ui.chat_api``)."""
    tab, buttons = _layout(ctx)
    shown = [tab.left, tab.right, tab.left_msgs, tab.right_msgs, tab.image, tab.box]
    turn_out = [*shown, tab.turn]
    stream_in = [
        *(tab.left_msgs, tab.right_msgs, tab.image, tab.seen, tab.turn, tab.clears),
        *tab.settings(),
    ]
    stream_out = [*shown, tab.status, tab.seen]
    stream = _stream(ctx, tab)
    # "multiple": a question asked after Clear starts even while the stopped answer's event
    # is still winding down (with "once", the browser would drop it and leave the box locked).
    turns = {"trigger_mode": "multiple", **PRIVATE}
    streaming = {"concurrency_limit": 4, "concurrency_id": "dim3-chat", **turns}
    asked = tab.box.submit(
        _add_turn(ctx, tab),
        inputs=[tab.box, tab.left_msgs, tab.right_msgs, tab.image, tab.clears],
        outputs=turn_out,
        js=ASKED_JS,
        **turns,
    ).success(stream, inputs=stream_in, outputs=stream_out, **streaming)
    again = (
        buttons["regen"]
        .click(
            _regenerate(ctx, tab),
            inputs=[tab.left_msgs, tab.right_msgs, tab.image, tab.clears],
            outputs=turn_out,
            js=ASKED_JS,
            **turns,
        )
        .success(stream, inputs=stream_in, outputs=stream_out, **streaming)
    )
    buttons["stop"].click(_stop(ctx), queue=False, **PRIVATE)
    # Clear counts itself in the browser at once, then ends the conversation on the server in
    # the session's queue (ordered with its questions' events). Nothing is cancelled: a stream
    # that learns of the Clear stops itself and shows the conversation as the Clear left it.
    # Every click is one Clear ("multiple"): the page's click count must match its events'.
    for event in (buttons["clear"].click, tab.left.clear, tab.right.clear):
        event(
            None, inputs=[tab.clears], outputs=[tab.clears], js=COUNT_JS, queue=False, **turns
        ).then(_clear(ctx, tab), inputs=[tab.clears], outputs=shown, **turns)
    if tab.draw:
        wire_draw(ctx, tab, tab.draw, answered=[asked, again])
    return tab


def refresh_status(ctx: AppContext, tab: ChatTab):
    """A handler that re-reads which models are loaded (for the tab's select event)."""
    return lambda: {tab.status: status_text(ctx)}


def stop_session(ctx: AppContext):
    """A handler for ``Blocks.unload``: a closed or reloaded tab ends its generation."""

    def handler(request: gr.Request) -> None:
        ctx.stop_flags.forget(request.session_hash)

    return handler


def _locked(tab: ChatTab) -> dict:
    return {tab.box: gr.MultimodalTextbox(value=None, interactive=False)}


def _add_turn(ctx: AppContext, tab: ChatTab):
    def handler(
        box: dict | None,
        left: list,
        right: list,
        image: str | None,
        clears: float | None,
        request: gr.Request,
    ) -> dict:
        epoch = _before_clear(ctx, clears, request)
        if epoch is None:  # asked before a Clear: not asked; its stream has nothing to answer
            return {tab.turn: ""}
        box = box or {}
        text = (box.get("text") or "").strip()
        files = box.get("files") or []
        left, right = list(left), list(right)
        if not text:
            message = (
                "Type a question to go with your picture: the models need text to answer "
                "(an image alone is not a prompt)."
                if files
                else "Type a question first."
            )
            gr.Warning(message, title="No question")
            return {tab.box: gr.skip()}  # nothing changes; the stream sees no new question
        if len(text) > MAX_MESSAGE_CHARS:
            gr.Warning(
                f"Your message is {len(text):,} characters long; the limit is "
                f"{MAX_MESSAGE_CHARS:,}. Shorten it and send it again.",
                title="Message too long",
            )
            return {tab.box: gr.skip()}
        if files:
            try:
                load_image(files[0])  # checks it really is a readable, not oversized, image
            except ValueError as exc:
                gr.Warning(error_html(exc), title="Not a usable image")
                return {tab.box: gr.skip()}
            if left:
                gr.Info("A new picture starts a new conversation.")
            left, right, image = [], [], str(files[0])
        if _alive(left, epoch) is not left:  # a conversation a Clear ended: start afresh
            left, right, image = [], [], None
        turn = {"role": "user", "content": text, "epoch": epoch, "turn": uuid.uuid4().hex}
        left, right = [*left, turn], [*right, turn]
        if not ctx.stop_flags.remember(request.session_hash, (left, right, image), epoch):
            return _again(tab, ctx.stop_flags.latest(request.session_hash)) | {tab.turn: ""}
        return _shown(tab, left, right, image) | _locked(tab) | {tab.turn: turn["turn"]}

    return handler


def _shown(tab: ChatTab, left: list[dict], right: list[dict], image: str | None) -> dict:
    return {
        tab.left: display(left, image),
        tab.right: display(right, image),
        tab.left_msgs: left,
        tab.right_msgs: right,
        tab.image: image,
    }


def _regenerate(ctx: AppContext, tab: ChatTab):
    def handler(
        left: list, right: list, image: str | None, clears: float | None, request: gr.Request
    ) -> dict:
        epoch = _before_clear(ctx, clears, request)
        if epoch is None:
            return {tab.turn: ""}
        left, right = _drop_reply(_alive(left, epoch)), _drop_reply(_alive(right, epoch))
        if not left:
            gr.Warning("Nothing to regenerate yet: ask a question first.", title="No question")
            return {tab.box: gr.skip()}
        turn = uuid.uuid4().hex
        left = [*left[:-1], left[-1] | {"turn": turn}]
        right = [*right[:-1], right[-1] | {"turn": turn}]
        if not ctx.stop_flags.remember(request.session_hash, (left, right, image), epoch):
            return _again(tab, ctx.stop_flags.latest(request.session_hash)) | {tab.turn: ""}
        return _shown(tab, left, right, image) | _locked(tab) | {tab.turn: turn}

    return handler


def _before_clear(ctx: AppContext, clears: float | None, request: gr.Request) -> int | None:
    """The page's Clear count when it asked, or None when it asked before a Clear that the
    server has already seen: then nothing is asked."""
    epoch = int(clears or 0)
    return None if epoch < ctx.stop_flags.epoch(request.session_hash) else epoch


def _question(messages: list[dict], turn: str | None) -> dict | None:
    """The last message when it is the question whose id is ``turn``; else None."""
    last = messages[-1] if messages else None
    if turn and last is not None and last["role"] == "user" and last.get("turn") == turn:
        return last
    return None


def _alive(messages: list[dict], epoch: int) -> list[dict]:
    """``messages`` unless a Clear (the ``epoch``-th) ended them: then none."""
    asked = next((m["epoch"] for m in messages if "epoch" in m), None)
    return [] if asked is not None and asked < epoch else messages


def _again(tab: ChatTab, stored: tuple | None) -> dict:
    """What an event that has nothing of its own to show leaves on screen: the conversation
    as stored, the box unlocked unless a question in it is waiting for its answer."""
    left, right, image = stored or ([], [], None)
    out = _shown(tab, left, right, image)
    if not left or left[-1]["role"] != "user":
        out[tab.box] = gr.MultimodalTextbox(interactive=True)
    return out


def _drop_reply(messages: list[dict]) -> list[dict]:
    """The conversation without its last answers (so the last user turn is answered anew)."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def _stop(ctx: AppContext):
    def handler(request: gr.Request) -> None:
        ctx.stop_flags.stop(request.session_hash)

    return handler


def _clear(ctx: AppContext, tab: ChatTab):
    def handler(clears: float | None, request: gr.Request) -> dict:
        session = request.session_hash
        if not ctx.stop_flags.clear(session, int(clears or 0), ([], [], None)):
            # a question asked after this Clear got to the server first: its conversation stays
            return _again(tab, ctx.stop_flags.latest(session))
        return _shown(tab, [], [], None) | {
            tab.box: gr.MultimodalTextbox(value=None, interactive=True)
        }

    return handler


def pane_chunks(reply: Reply | None, missing: str) -> Iterator[str]:
    """One pane's reply as text chunks; problems become a visible message, never an exception."""
    if reply is None:
        yield missing
        return
    try:
        yield from reply
        if reply.stopped:
            yield STOPPED
    except Exception as exc:  # noqa: BLE001 - shown in the pane
        yield f"\n⚠️ {error_text(exc)}"
    finally:
        reply.close()


def start_replies(
    served: Served, panes: tuple[list, list], image, params: GenerationParams, flag
) -> tuple[Reply | None, Reply | None]:
    """Start both replies; a refused input (too long for a model, ...) raises ``ChatError``
    before either model runs a forward pass."""
    started: list[Reply] = []
    try:
        for model, messages in zip((served.original, served.merged), panes, strict=True):
            if model is None:
                started.append(None)  # type: ignore[arg-type]
                continue
            started.append(
                stream_reply(model.model, model.processor, for_model(messages), image, params, flag)
            )
    except Exception:
        for r in started:
            if r is not None:
                r.close()
        raise
    return started[0], started[1]


def _notice(served: Served, seen: int | None) -> dict | None:
    """The app's note to this session when the merged model changed since its last answer."""
    if seen is None or served.info is None or served.version == seen:
        return None
    text = f"The merged model is now {served.info.label}, merged at {served.info.when()}."
    return {"role": "assistant", "content": text, "notice": True}


def _with_notice(messages: list[dict], note: dict | None) -> list[dict]:
    """``note`` placed before the last question."""
    if note is None:
        return messages
    return [*messages[:-1], note, messages[-1]]


def _stream(ctx: AppContext, tab: ChatTab):
    """The answer's handler: :func:`_answer`'s updates, then one that changes nothing.

    Gradio ends a stream with a closing message that carries the last update's values again,
    and sends it after whatever ran meanwhile: a Clear shown between the answer's last update
    and that message would be overwritten by the answer. So the last update leaves the page as
    it is."""
    answer = _answer(ctx, tab)

    @gpu(duration=120)
    @functools.wraps(answer)  # Gradio reads the answer's parameters (inputs, gr.Request)
    def handler(*args: Any, **kwargs: Any) -> Iterator[dict]:
        yield from answer(*args, **kwargs)
        yield {tab.status: gr.skip()}

    return handler


def _answer(ctx: AppContext, tab: ChatTab):
    def handler(
        left: list,
        right: list,
        image_path: str | None,
        seen: int | None,
        turn: str | None,
        clears: float | None,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        request: gr.Request,
    ) -> Iterator[dict]:
        done = {tab.box: gr.MultimodalTextbox(interactive=True)}
        session = request.session_hash
        question = _question(left, turn)
        stored = ctx.stop_flags.latest(session) if question is None else None
        if stored is not None and _question(stored[0], turn) is not None:
            # The page's states lost the question: a Clear's update, sent before the question
            # was added, was stored after it (two events' outputs, on two workers). The
            # question as the server stored it is the one asked.
            left, right, image_path = stored
            question = left[-1]
        if question is None:
            # Refused, cleared, or another question's: nothing of its own to answer. What the
            # page sent may predate a Clear whose answer is still on its way: not shown again.
            alive = _alive(left, int(clears or 0))
            image_path = image_path if alive is left else None
            yield _again(tab, (alive, _alive(right, int(clears or 0)), image_path))
            return
        flag = ctx.stop_flags.start(session, int(question.get("epoch", 0)))
        if flag.cleared:  # Clear came after the question: it is not answered
            ctx.stop_flags.finish(session, flag)
            yield _again(tab, ctx.stop_flags.latest(session))
            return
        try:
            params = GenerationParams(int(max_new_tokens), float(temperature), float(top_p))
            if image_path and not Path(image_path).is_file():
                raise ChatError(PICTURE_GONE)
            image = load_image(image_path) if image_path else None
            if ctx.manager.get("original") is None:
                yield {tab.status: "⏳ Loading the original VLM (first question only)…"}
            ctx.manager.ensure_original()
            served = ctx.manager.served()
            note = _notice(served, seen)
            left, right = _with_notice(left, note), _with_notice(right, note)
            replies = start_replies(served, (left, right), image, params, flag)
        except ChatError as exc:  # refused before any forward pass: the question is taken back
            ctx.stop_flags.finish(session, flag)
            taken_back = (left[:-1], right[:-1], image_path)
            if not ctx.stop_flags.remember(session, taken_back, flag.epoch):
                yield _again(tab, ctx.stop_flags.latest(session))  # cleared meanwhile
                return
            gr.Warning(error_html(exc, ctx.allowed_roots), title="Cannot answer this")
            yield done | _shown(tab, left[:-1], right[:-1], image_path)
            return
        except Exception as exc:  # noqa: BLE001 - the UI boundary: the answer is the message
            ctx.stop_flags.finish(session, flag)
            problem = f"⚠️ {error_text(exc, ctx.allowed_roots)}"
            out = done | _finish(ctx, tab, (left, right), (problem, problem), image_path, None)
            yield _kept(ctx, tab, session, flag, out, image_path)
            return
        yield from _run(ctx, tab, session, flag, served, (left, right), replies, image_path, done)
        if flag.cleared:  # a Clear that came while the last update was on its way: it wins
            yield _again(tab, ctx.stop_flags.latest(session))

    return handler


def _run(ctx, tab, session, flag, served, convs, replies, image_path, done) -> Iterator[dict]:
    """Stream both replies into the panes; once Clear has stopped them, the conversation as the
    Clear (or a later question) left it, shown again over any partial answer that got out."""
    panes = (
        pane_chunks(replies[0], "No original VLM is loaded."),
        pane_chunks(replies[1], NO_MERGE),
    )
    texts, last = ("", ""), 0.0
    try:
        for texts in interleave(*panes):
            if flag.cleared:
                return
            if time.monotonic() - last >= MIN_UPDATE:
                last = time.monotonic()
                yield _partial(tab, convs, texts, image_path)
    finally:
        for p in panes:
            p.close()
        ctx.stop_flags.finish(session, flag)
    if flag.cleared:
        yield _again(tab, ctx.stop_flags.latest(session))
        return
    out = done | _finish(ctx, tab, convs, texts, image_path, served)
    yield _kept(ctx, tab, session, flag, out, image_path)


def _kept(ctx, tab, session, flag, out: dict, image_path: str | None) -> dict:
    """``out`` once its conversation is stored for the session; the stored one when a Clear
    came first (the check and the store are one step: see ``StopFlags.remember``)."""
    stored = (out[tab.left_msgs], out[tab.right_msgs], image_path)
    if ctx.stop_flags.remember(session, stored, flag.epoch):
        return out
    return _again(tab, ctx.stop_flags.latest(session))


def _by(served: Served | None) -> tuple[str | None, str | None]:
    if served is None:
        return None, None
    left = served.original.label if served.original else None
    right = None
    if served.merged and served.info:
        right = f"{served.merged.label}, merged at {served.info.when()}"
    return left, right


def _finish(
    ctx: AppContext,
    tab: ChatTab,
    convs: tuple[list[dict], list[dict]],
    texts: tuple[str, str],
    image: str | None,
    served: Served | None,
) -> dict:
    """The final update: both replies stored in the conversation (with who gave them) and shown."""
    by = _by(served)
    left, right = (
        [*conv, {"role": "assistant", "content": final_text(text), "by": who}]
        for conv, text, who in zip(convs, texts, by, strict=True)
    )
    out = _shown(tab, left, right, image) | {tab.status: status_text(ctx)}
    return out | {tab.seen: served.version} if served else out


def final_text(text: str) -> str:
    return text if text.strip() else EMPTY


def _partial(
    tab: ChatTab,
    convs: tuple[list[dict], list[dict]],
    texts: tuple[str, str],
    image: str | Path | None,
) -> dict:
    return {
        tab.left: display([*convs[0], {"role": "assistant", "content": texts[0]}], image),
        tab.right: display([*convs[1], {"role": "assistant", "content": texts[1]}], image),
    }
