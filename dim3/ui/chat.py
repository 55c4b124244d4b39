"""The Chat tab: the original and the DiM3-merged VLM answer the same question side by side.

Layout and wiring only. The conversation lives in ``gr.State`` as plain message lists (one per
pane, ``[{"role": "user" | "assistant", "content": str}]``) plus the path of the conversation's
image; both replies stream at once through ``dim3.chat.stream_reply`` and ``interleave``. Stop
sets the session's stop flag, which the generation threads read after every token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from dim3.chat import GenerationParams, interleave, load_image, stream_reply
from dim3.examples import load_examples
from dim3.models import MERGED, ORIGINAL, LoadedVLM
from dim3.ui.common import AppContext, error_html, error_text, gpu

NO_MERGE = "No merged model yet: run a merge in the **Merge** tab, then ask again."
STOPPED = " ⏹ (stopped)"
EMPTY = "(no answer: the model produced only blank tokens)"
MIN_UPDATE = 0.05  # seconds between streamed screen updates


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
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider


def display(messages: list[dict], image: str | None) -> list[dict]:
    """A pane's plain messages -> Chatbot messages; the image is shown before the first question."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if i == 0 and image:
            out.append({"role": "user", "content": {"path": image}})
        out.append({"role": m["role"], "content": m["content"] or "…"})
    return out


def status_text(ctx: AppContext) -> str:
    s = ctx.manager.status()
    return f"**Original:** {s['original']} · **Merged:** {s[MERGED]}"


def _layout(ctx: AppContext) -> tuple[ChatTab, dict[str, gr.Button]]:
    status = gr.Markdown(status_text(ctx), elem_classes="dim3-status", elem_id="dim3-chat-status")
    with gr.Row(equal_height=True):
        left = gr.Chatbot(
            label="Original VLM",
            height=420,
            elem_id="dim3-original",
            elem_classes="dim3-pane",
            buttons=["copy"],
        )
        right = gr.Chatbot(
            label="DiM3-merged",
            height=420,
            elem_id="dim3-merged",
            elem_classes="dim3-pane",
            buttons=["copy"],
        )
    box = gr.MultimodalTextbox(
        placeholder="Ask about a picture, in any language. Attach an image with the clip.",
        file_types=["image"],
        file_count="single",
        sources=["upload"],
        show_label=False,
        elem_id="dim3-box",
        elem_classes="dim3-bidi",
    )
    with gr.Row():
        stop = gr.Button("⏹ Stop", elem_id="dim3-stop", variant="stop")
        regen = gr.Button("🔄 Regenerate", elem_id="dim3-regen")
        clear = gr.Button("🗑 Clear", elem_id="dim3-clear")
    with gr.Accordion("Generation settings", open=False):
        fields = GenerationParams.__dataclass_fields__
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
            for name, f in fields.items()
        ]
    examples = load_examples()
    if examples:
        gr.Examples(
            [[{"text": e.text, "files": [str(path)]}] for e, path in examples],
            inputs=[box],
            example_labels=[f"{e.language_name} · {e.text}" for e, _ in examples],
            label=f"Examples in {len({e.language for e, _ in examples})} languages",
            examples_per_page=len(examples),
            elem_id="dim3-examples",
        )
    tab = ChatTab(status, left, right, box, gr.State([]), gr.State([]), gr.State(None), *sliders)
    return tab, {"stop": stop, "regen": regen, "clear": clear}


def build_chat_tab(ctx: AppContext) -> ChatTab:
    """Lay out the Chat tab inside the current Blocks and wire its events."""
    tab, buttons = _layout(ctx)
    shown = [tab.left, tab.right, tab.left_msgs, tab.right_msgs, tab.image, tab.box]
    stream_inputs = {
        tab.left_msgs,
        tab.right_msgs,
        tab.image,
        tab.max_new_tokens,
        tab.temperature,
        tab.top_p,
    }
    stream = _stream(ctx, tab)
    streaming = {"concurrency_limit": 4, "concurrency_id": "dim3-chat"}
    tab.box.submit(
        _add_turn(tab), inputs={tab.box, tab.left_msgs, tab.right_msgs, tab.image}, outputs=shown
    ).success(stream, inputs=stream_inputs, outputs=[*shown, tab.status], **streaming)
    buttons["regen"].click(
        _regenerate(tab), inputs={tab.left_msgs, tab.right_msgs, tab.image}, outputs=shown
    ).success(stream, inputs=stream_inputs, outputs=[*shown, tab.status], **streaming)
    buttons["stop"].click(_stop(ctx), queue=False)
    for event in (buttons["clear"].click, tab.left.clear, tab.right.clear):
        event(_clear(ctx, tab), outputs=shown, queue=False)
    return tab


def refresh_status(ctx: AppContext, tab: ChatTab):
    """A handler that re-reads which models are loaded (for the tab's select event)."""
    return lambda: {tab.status: status_text(ctx)}


def _locked(tab: ChatTab) -> dict:
    return {tab.box: gr.MultimodalTextbox(value=None, interactive=False)}


def _add_turn(tab: ChatTab):
    def handler(values: dict) -> dict:
        box = values[tab.box] or {}
        text = (box.get("text") or "").strip()
        files = box.get("files") or []
        left, right, image = (
            list(values[tab.left_msgs]),
            list(values[tab.right_msgs]),
            values[tab.image],
        )
        if not text:
            gr.Warning(
                "Type a question to go with your picture: the models need text to "
                "answer (an image alone is not a prompt).",
                title="No question",
            )
            return {tab.box: gr.skip()}  # nothing changes; the stream sees no new question
        if files:
            try:
                load_image(files[0])  # checks it really is a readable, not oversized, image
            except ValueError as exc:
                gr.Warning(error_html(exc), title="Not an image")
                return {tab.box: gr.skip()}
            if left:
                gr.Info("A new picture starts a new conversation.")
            left, right, image = [], [], str(files[0])
        turn = {"role": "user", "content": text}
        left, right = [*left, turn], [*right, turn]
        return {
            tab.left: display(left, image),
            tab.right: display(right, image),
            tab.left_msgs: left,
            tab.right_msgs: right,
            tab.image: image,
        } | _locked(tab)

    return handler


def _regenerate(tab: ChatTab):
    def handler(values: dict) -> dict:
        left, right, image = values[tab.left_msgs], values[tab.right_msgs], values[tab.image]
        left, right = _drop_reply(left), _drop_reply(right)
        if not left:
            gr.Warning("Nothing to regenerate yet: ask a question first.", title="No question")
            return {tab.box: gr.skip()}
        return {
            tab.left: display(left, image),
            tab.right: display(right, image),
            tab.left_msgs: left,
            tab.right_msgs: right,
            tab.image: image,
        } | _locked(tab)

    return handler


def _drop_reply(messages: list[dict]) -> list[dict]:
    """The conversation without its last assistant turn (so the last user turn is answered anew)."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def _stop(ctx: AppContext):
    def handler(request: gr.Request) -> None:
        ctx.stop_flags.stop(request.session_hash)

    return handler


def _clear(ctx: AppContext, tab: ChatTab):
    def handler(request: gr.Request) -> dict:
        ctx.stop_flags.stop(request.session_hash)
        return {
            tab.left: [],
            tab.right: [],
            tab.left_msgs: [],
            tab.right_msgs: [],
            tab.image: None,
            tab.box: gr.MultimodalTextbox(value=None, interactive=True),
        }

    return handler


def _pane(
    model: LoadedVLM | None,
    messages: list[dict],
    image,
    params: GenerationParams,
    stop,
    missing: str,
) -> Iterator[str]:
    """One pane's reply as text chunks; problems become a visible message, never an exception."""
    if model is None:
        yield missing
        return
    try:
        reply = stream_reply(model.model, model.processor, messages, image, params, stop)
    except Exception as exc:  # noqa: BLE001 - shown in the pane
        yield f"⚠️ {error_text(exc)}"
        return
    try:
        yield from reply
        if reply.stopped:
            yield STOPPED
    except Exception as exc:  # noqa: BLE001 - shown in the pane
        yield f"\n⚠️ {error_text(exc)}"
    finally:
        reply.close()


def _stream(ctx: AppContext, tab: ChatTab):
    @gpu(duration=120)
    def handler(values: dict, request: gr.Request) -> Iterator[dict]:
        left, right, image_path = values[tab.left_msgs], values[tab.right_msgs], values[tab.image]
        done = {tab.box: gr.MultimodalTextbox(interactive=True)}
        if not left or left[-1]["role"] != "user":  # the question was refused: nothing to answer
            yield done
            return
        try:
            params = GenerationParams(
                int(values[tab.max_new_tokens]),
                float(values[tab.temperature]),
                float(values[tab.top_p]),
            )
            image = load_image(image_path) if image_path else None
            if ctx.manager.get(ORIGINAL) is None:
                yield {tab.status: "⏳ Loading the original VLM (first question only)…"}
            original, merged = ctx.manager.ensure_original(), ctx.manager.get(MERGED)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: the answer is the message
            problem = f"⚠️ {error_text(exc)}"
            yield done | _finish(tab, left, right, (problem, problem), image_path, ctx)
            return
        flag = ctx.stop_flags.start(request.session_hash)
        panes = (
            _pane(original, left, image, params, flag, "No original VLM is loaded."),
            _pane(merged, right, image, params, flag, NO_MERGE),
        )
        texts, last = ("", ""), 0.0
        try:
            for texts in interleave(*panes):
                if time.monotonic() - last >= MIN_UPDATE:
                    last = time.monotonic()
                    yield _show(tab, left, right, texts, image_path)
        finally:
            for p in panes:
                p.close()
            ctx.stop_flags.finish(request.session_hash, flag)
        yield done | _finish(tab, left, right, texts, image_path, ctx)

    return handler


def _finish(
    tab: ChatTab,
    left: list[dict],
    right: list[dict],
    texts: tuple[str, str],
    image: str | None,
    ctx: AppContext,
) -> dict:
    """The final update: both replies stored in the conversation and shown."""
    left = [*left, {"role": "assistant", "content": _final(texts[0])}]
    right = [*right, {"role": "assistant", "content": _final(texts[1])}]
    return {
        tab.left: display(left, image),
        tab.right: display(right, image),
        tab.left_msgs: left,
        tab.right_msgs: right,
        tab.status: status_text(ctx),
    }


def _final(text: str) -> str:
    return text if text.strip() else EMPTY


def _show(
    tab: ChatTab,
    left: list[dict],
    right: list[dict],
    texts: tuple[str, str],
    image: str | Path | None,
) -> dict:
    return {
        tab.left: display([*left, {"role": "assistant", "content": texts[0]}], image),
        tab.right: display([*right, {"role": "assistant", "content": texts[1]}], image),
    }
