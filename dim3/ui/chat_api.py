"""``/chat``: the Chat tab's one-call API.

A message, an optional picture and generation settings in; both answers (original, merged) and
the merged model that answered (its recipe label, version and time, so that a client sees when
another visitor's merge replaced it) out, streamed with ``client.submit`` and final with
``client.predict``. It uses the same served pair, input limits and stop flags as the browser's
chat, and takes the generation settings' defaults from the tab's sliders. Bad input is raised as
``gr.Error`` with the message (the client gets an ``AppError``), before any forward pass; a
picture's size is read from its header before anything decodes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from dim3.chat import MAX_MESSAGE_CHARS, ChatError, GenerationParams, interleave, load_image
from dim3.models import Served
from dim3.ui.chat import NO_MERGE, ChatTab, final_text, pane_chunks, start_replies
from dim3.ui.common import AppContext, error_text, gpu
from dim3.ui.validate import header_checked


def chat_api(ctx: AppContext, tab: ChatTab) -> None:
    """``/chat``: one question (and an optional picture) to both models, both answers back."""
    with gr.Group(visible=False):
        message = gr.Textbox(label="message", max_length=MAX_MESSAGE_CHARS)
        image = header_checked(gr.Image(label="image", type="filepath", image_mode=None))
        answers = (
            gr.Textbox(label="original answer"),
            gr.Textbox(label="merged answer"),
            gr.Textbox(label="merged model"),
        )
        trigger = gr.Button("chat")
    trigger.click(
        _api_chat(ctx),
        inputs_kwargs={
            "message": message,
            "image": image,
            "max_new_tokens": tab.max_new_tokens,
            "temperature": tab.temperature,
            "top_p": tab.top_p,
        },
        outputs=list(answers),
        api_name="chat",
        concurrency_limit=4,
        concurrency_id="dim3-chat",
    )


def _api_chat(ctx: AppContext):
    @gpu(duration=120)
    def chat(
        message: str,
        image: str | None = None,
        max_new_tokens: float = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        request: gr.Request = None,  # type: ignore[assignment]
    ) -> Iterator[tuple[str, str, str]]:
        """Ask both models one question (with an optional picture); streams (original answer,
        merged answer, which merged model answered)."""
        try:
            text = (message or "").strip()
            if not text:
                raise ChatError("the message is empty: ask a question")
            params = GenerationParams(int(max_new_tokens), float(temperature), float(top_p))
            picture = load_image(image) if image else None
            ctx.manager.ensure_original()
            served = ctx.manager.served()
            turn = [{"role": "user", "content": text}]
            session = request.session_hash if request else "api"
            flag = ctx.stop_flags.start(session)
            replies = start_replies(served, (turn, turn), picture, params, flag)
        except Exception as exc:  # noqa: BLE001 - the API's answer is the message
            raise gr.Error(error_text(exc, ctx.allowed_roots), print_exception=False) from None
        model = answered_by(served)
        panes = (
            pane_chunks(replies[0], "No original VLM is loaded."),
            pane_chunks(replies[1], NO_MERGE),
        )
        texts: tuple[str, str] = ("", "")
        try:
            for texts in interleave(*panes):
                yield (*texts, model)
        finally:
            for p in panes:
                p.close()
            ctx.stop_flags.finish(session, flag)  # an API call's session is its own: no record kept
            ctx.stop_flags.forget_idle(session)
        yield (final_text(texts[0]), final_text(texts[1]), model)

    return chat


def answered_by(served: Served) -> str:
    """The merged model of ``served`` in words: recipe label, version (counts swaps), time."""
    if served.merged is None or served.info is None:
        return "no merged model yet"
    info = served.info
    return f"{served.merged.label} · version {info.version} · merged at {info.when()}"
