"""The Gradio app: Merge, Chat, Evaluate and Analysis tabs over one shared model manager.

``build_app()`` lays out the Blocks; ``launch_options()`` holds what ``Blocks.launch`` needs
(theme, CSS, the chat box's length cap, upload limit). This package is the only part of dim3 that
imports Gradio. What one visitor may change for the others (the loaded models) is decided by the
``ModelManager`` in ``AppContext`` (open mode: swap only a complete merge and tell the other chats;
showcase, ``$DIM3_SHOWCASE``: nobody), never by a handler.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import gradio as gr

from dim3.ui.analysis import build_analysis_tab
from dim3.ui.chat import PAGE_JS, build_chat_tab, refresh_status, stop_session
from dim3.ui.chat_api import chat_api
from dim3.ui.common import CSS, MAX_UPLOAD, AppContext
from dim3.ui.evaluate import build_evaluate_tab
from dim3.ui.merge import build_merge_tab
from dim3.ui.uploads import (
    RequestGuard,
    StreamRefusals,
    UploadRoom,
    delete_cache,
    max_request,
)
from dim3.ui.validate import StudioBlocks
from dim3.ui.visitors import (
    FairQueue,
    SessionShare,
    max_queue,
    max_sessions,
    proxy_hops,
    visitor_sessions,
)

TITLE = "DiM3 Studio"
INTRO = (
    "# DiM3 Studio\n"
    "Give a vision-language model the languages of a multilingual fine-tune of its base LLM, "
    "without training ([DiM3, arXiv 2605.12960](https://arxiv.org/abs/2605.12960)). "
    "**Merge** three checkpoints, then **Chat** with the original and the merged VLM side by side."
)


SHOWCASE_NOTE = (
    "\n\n*A showcase: the models here were fixed by this Space's owner; every visitor chats "
    "with the same merge.*"
)


def build_app(ctx: AppContext | None = None) -> gr.Blocks:
    """The whole app (not launched). ``ctx`` defaults to one built from the environment."""
    ctx = ctx or AppContext.from_env()
    with StudioBlocks(  # typed inputs (see validate); uploads expire (see uploads)
        title=TITLE, analytics_enabled=False, delete_cache=delete_cache()
    ) as app:
        gr.Markdown(INTRO + (SHOWCASE_NOTE if ctx.is_showcase else ""))
        with gr.Tabs():
            with gr.Tab("Merge", id="merge", elem_id="dim3-tab-merge"):
                merge = build_merge_tab(ctx)
            with gr.Tab("Chat", id="chat", elem_id="dim3-tab-chat") as chat_tab:
                chat = build_chat_tab(ctx)
                chat_api(ctx, chat)
            with gr.Tab("Evaluate", id="evaluate", elem_id="dim3-tab-evaluate"):
                build_evaluate_tab(ctx, merge)
            with gr.Tab("Analysis", id="analysis", elem_id="dim3-tab-analysis"):
                build_analysis_tab(ctx, merge)
        chat_tab.select(
            refresh_status(ctx, chat),
            outputs=[chat.status],
            queue=False,
            api_visibility="private",
        )
        app.unload(stop_session(ctx))
    app.queue(
        default_concurrency_limit=int(os.environ.get("DIM3_CONCURRENCY", "4")),
        max_size=max_queue(),  # all visitors' waiting events (see visitors)
    )
    # one visitor's events waiting or running, and sessions kept (see visitors)
    app.dim3_sessions = SessionShare(visitor_sessions(), proxy_hops(), ctx.stop_flags.forget_idle)
    FairQueue.install(app, app.dim3_sessions)
    return app


def configure_logging() -> None:
    """dim3's own messages (showcase start-up, refused requests) at INFO on stderr; no tokens,
    no user text."""
    logger = logging.getLogger("dim3")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def launch_options() -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``: look, request and upload limits (a file's size,
    the room all uploads share, a request's body: ``dim3.ui.uploads``), no telemetry pages."""
    from starlette.middleware import Middleware

    room = UploadRoom.from_env()
    StreamRefusals.install()  # a refused queue stream: one line, not a traceback
    return {
        "app_kwargs": {"middleware": [Middleware(RequestGuard, room=room, max_body=max_request())]},
        "theme": gr.themes.Soft(primary_hue="indigo"),
        "css": CSS,
        "js": PAGE_JS,
        "max_file_size": MAX_UPLOAD,
        "state_session_capacity": max_sessions() or 10_000,  # Gradio's own default
        "show_error": False,
    }
