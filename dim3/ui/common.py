"""Shared UI bits: the app context, error messages in plain words, ZeroGPU, progress text, CSS.

This module knows Gradio and how dim3's exceptions read to a user. It holds no layout; the tabs
(``dim3.ui.merge``, ``dim3.ui.chat``) do.
"""

from __future__ import annotations

import html
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dim3.chat import ChatError
from dim3.checkpoints import CheckpointError, allowed_roots_from_env
from dim3.models import MergeInfo, ModelManager, ModelMemoryError, ShowcaseError
from dim3.paths import redact_paths
from dim3.plan import PlanError
from dim3.presets import DEMO_KEY, get_preset
from dim3.ui.saves import SaveOwners
from dim3.writer import remove_stale_in_folder

log = logging.getLogger("dim3.ui")
F = TypeVar("F", bound=Callable[..., Any])

MAX_UPLOAD = os.environ.get("DIM3_MAX_UPLOAD", "10mb")  # per file, enforced by Gradio
ENV_OUTPUT = "DIM3_OUTPUT_DIR"
ENV_SHOWCASE = "DIM3_SHOWCASE"
MAX_ERROR_CHARS = 600  # longer messages are cut (they may echo user input)
MAX_REF_CHARS = 300  # a Hub id, revision or folder path typed into the form


def gpu(duration: int = 120) -> Callable[[F], F]:
    """``spaces.GPU(duration=...)`` on Hugging Face ZeroGPU; a no-op when ``spaces`` is absent."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def output_root_from_env() -> Path:
    """Where "Save to folder" writes: ``$DIM3_OUTPUT_DIR`` or ``./outputs``."""
    return Path(os.environ.get(ENV_OUTPUT, "outputs")).expanduser().resolve()


class Generation(threading.Event):
    """A session's running generation: set it to stop after the current token. ``cleared``
    turns true once Clear (or a closed tab) ended the conversation it answers: from then on
    nothing it produced may be shown or stored."""

    def __init__(self, flags: StopFlags, session: str, epoch: int) -> None:
        super().__init__()
        self._flags, self._session, self.epoch = flags, session, epoch

    @property
    def cleared(self) -> bool:
        return self._flags.epoch(self._session) > self.epoch


class StopFlags:
    """Per browser session: the running generation's stop flag (for Stop), a count of Clears
    (the *epoch*: the browser counts its Clears and sends the count with each question and each
    Clear), so that a question asked before a Clear is never answered after it, however the
    Clear and the answer's events interleave; and the conversation as last stored, which an
    event that lost the race to a Clear shows again rather than its own."""

    def __init__(self) -> None:
        self._flags: dict[str, Generation] = {}
        self._epochs: dict[str, int] = {}
        self._latest: dict[str, tuple[Any, int]] = {}  # conversation, its question's epoch
        self._lock = threading.Lock()

    def clear(self, session: str, count: int, cleared: Any = None) -> bool:
        """The browser's ``count``-th Clear (each Clear counts one, also should the browser's
        count arrive late): its conversation ends (``cleared`` is what is stored now),
        questions asked before it are not answered, the running one stops. False, and the
        stored conversation kept, when a question asked after this Clear (its count at least
        ``count``) began it: the two reached the server in the other order."""
        with self._lock:
            self._epochs[session] = max(self._epochs.get(session, 0) + 1, count)
            stored = self._latest.get(session)
            kept = count > 0 and stored is not None and stored[1] >= count
            if not kept:
                self._latest[session] = (cleared, -1)
            flag = self._flags.get(session)
        if flag is not None and flag.cleared:  # not a generation for a question after it
            flag.set()
        return not kept

    def remember(self, session: str, conversation: Any, epoch: int) -> bool:
        """Store the conversation a handler made for the session (see :meth:`latest`) from a
        question asked after ``epoch`` Clears; False, and nothing stored, when a Clear came
        since. One step under the lock: a Clear that lands between a handler's check and its
        store would otherwise have the cleared conversation stored again over its own."""
        with self._lock:
            if self._epochs.get(session, 0) > epoch:
                return False
            self._latest[session] = (conversation, epoch)
            return True

    def latest(self, session: str) -> Any:
        """The conversation last stored for the session (None if none)."""
        with self._lock:
            stored = self._latest.get(session)
        return None if stored is None else stored[0]

    def epoch(self, session: str) -> int:
        """How many times the session was cleared; a question records it when it is asked."""
        with self._lock:
            return self._epochs.get(session, 0)

    def start(self, session: str, epoch: int | None = None) -> Generation:
        """A fresh flag for the session's new generation, answering a question asked in
        ``epoch`` (default: now); already set if the session was cleared since."""
        with self._lock:
            now = self._epochs.get(session, 0)
            flag = self._flags[session] = Generation(self, session, now if epoch is None else epoch)
        if flag.cleared:
            flag.set()
        return flag

    def stop(self, session: str, *, clear: bool = False) -> bool:
        """Set the session's flag (with ``clear``, also end its conversation); False when idle."""
        with self._lock:
            if clear:
                self._epochs[session] = self._epochs.get(session, 0) + 1
            flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def forget(self, session: str) -> None:
        """A closed session: stop its generation and drop its records."""
        self.stop(session, clear=True)
        with self._lock:
            self._epochs.pop(session, None)
            self._latest.pop(session, None)

    def forget_idle(self, session: str) -> None:
        """Drop the session's records unless a generation of it is running (an API call's
        session, or one Gradio no longer keeps: its records would otherwise stay for good)."""
        with self._lock:
            if session not in self._flags:
                self._epochs.pop(session, None)
                self._latest.pop(session, None)

    def sessions(self) -> int:
        """How many sessions have records here."""
        with self._lock:
            return len(self._flags.keys() | self._epochs.keys() | self._latest.keys())

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


def check_settings() -> None:
    """Read the server's limits once at start-up, so that a mistyped one stops the server with
    its message (naming the variable) instead of failing every visitor's job, and log how the
    Hub cache is kept (:func:`dim3.hubcache.policy`)."""
    from dim3 import hubcache
    from dim3.checkpoints import download_limit
    from dim3.fisher import fishers_limit
    from dim3.limits import budget_from_env, saved_limit
    from dim3.sizes import human_size
    from dim3.ui.uploads import UploadRoom, max_request, upload_ttl
    from dim3.ui.visitors import max_queue, max_queued, max_sessions, proxy_hops, visitor_sessions

    try:
        budget_from_env()
        saved_limit()
        download_limit(server=True)
        upload_ttl()
        UploadRoom.from_env()
        max_request()
        fishers_limit()
        max_queued(), max_queue(), proxy_hops(), max_sessions(), visitor_sessions()
        bounds = hubcache.policy()
    except ValueError as exc:
        raise SystemExit(f"DiM3 Studio cannot start: {exc}") from None
    if bounds is None:
        log.info(
            "Hub cache: nothing is deleted from it ($%s unset or 0)", hubcache.ENV_MAX_HUB_CACHE
        )
    elif bounds.limit is None:
        log.info("Hub cache: the least recently used make room when its disk is short (a Space)")
    else:
        log.info(
            "Hub cache: kept within %s ($%s); the least recently used make room",
            human_size(bounds.limit),
            hubcache.ENV_MAX_HUB_CACHE,
        )


@dataclass
class AppContext:
    """What every handler of one server shares: models, folders, the default trio.

    ``showcase`` is set when the owner fixed the models (``$DIM3_SHOWCASE``): the Merge tab is
    then read-only and the manager refuses every change.
    """

    manager: ModelManager
    allowed_roots: Sequence[Path]
    output_root: Path
    default_preset: str = DEMO_KEY
    stop_flags: StopFlags = field(default_factory=StopFlags)
    showcase: MergeInfo | None = None
    showcase_card: str = ""
    saves: SaveOwners = field(default_factory=SaveOwners)  # which session saved which folder

    @classmethod
    def from_env(cls) -> AppContext:
        """Allowed roots from ``$DIM3_ALLOWED_ROOTS``, outputs from ``$DIM3_OUTPUT_DIR``, the
        demo trio's VLM as the original model until a merge chooses another; with
        ``$DIM3_SHOWCASE`` (a recipe file or a saved merged folder) the showcase is merged or
        loaded here, before the server starts."""
        roots = allowed_roots_from_env()
        output = output_root_from_env()
        check_settings()
        stale = remove_stale_in_folder(output, at_startup=True)  # ours only, by exact name
        if stale:
            log.info("removed %d stale temporary folder(s) from the output folder", len(stale))
        default_vlm = get_preset(DEMO_KEY).multimodal
        manager = ModelManager(allowed_roots=[*roots, output], default_vlm=default_vlm)
        ctx = cls(manager=manager, allowed_roots=[*roots, output], output_root=output)
        source = os.environ.get(ENV_SHOWCASE, "").strip()
        if source:
            ctx.start_showcase(source)
        return ctx

    @property
    def is_showcase(self) -> bool:
        return self.showcase is not None

    def start_showcase(self, source: str) -> None:
        """Merge or load the owner's showcase and freeze the models (logs what it serves)."""
        from dim3.recipe import model_card

        log.info("showcase: preparing %s", source)
        info = self.manager.start_showcase(source)
        card = Path(source).expanduser() / "README.md"
        if card.is_file():
            self.showcase_card = card.read_text(encoding="utf-8")
        else:
            summary = info.summary or {"merged": 0, "copied": 0, "padded": 0}
            self.showcase_card = model_card(info.recipe, summary, {})
        self.showcase = info
        log.info("showcase: serving %s", info.label)

    def public(self, text: str) -> str:
        """``text`` without absolute server paths (see ``dim3.paths.redact_paths``)."""
        return redact_paths(text, self.allowed_roots)


KNOWN_ERRORS = (
    CheckpointError,
    PlanError,
    ModelMemoryError,
    ChatError,
    ShowcaseError,
    ValueError,
)


def error_text(exc: BaseException, roots: Sequence[str | Path] = ()) -> str:
    """A one-paragraph message for the user: the problem and how to fix it (plain text), with
    server paths shortened (see ``dim3.paths.redact_paths``) and cut to a readable length."""
    text = redact_paths(_error_text(exc), roots)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, PlanError):
        return f"These checkpoints cannot be merged: {exc}"
    if isinstance(exc, KNOWN_ERRORS):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "The server ran out of memory; pick a smaller preset or unload a model."
    if isinstance(exc, OSError):
        return f"A file could not be read or written: {exc}"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "The GPU ran out of memory; choose a smaller preset, float16, or fewer new tokens."
    log.exception("unexpected error", exc_info=exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}. The server is still running."


def error_html(exc: BaseException, roots: Sequence[str | Path] = ()) -> str:
    """``error_text`` escaped for Gradio's HTML toasts."""
    return html.escape(error_text(exc, roots))


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:])")


def md_escape(text: str, limit: int | None = 300) -> str:
    """Plain ``text`` (user input, or a message that may echo it) made safe to show in a
    Markdown component: cut to ``limit`` characters, HTML escaped, Markdown punctuation
    backslash-escaped (so no link, image or emphasis comes out of it)."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return _MARKDOWN.sub(r"\\\1", html.escape(text, quote=False))


def check_text(value: str | None, label: str, limit: int = MAX_REF_CHARS) -> str:
    """A typed field, stripped; a clear ``ValueError`` for one that is too long or holds
    control characters (a NUL byte would otherwise surface as "embedded null byte")."""
    text = (value or "").strip()
    if len(text) > limit:
        raise ValueError(
            f"the {label} is {len(text):,} characters long; at most {limit} are allowed"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"the {label} contains a control character; type it again")
    return text


def clock(seconds: float | None) -> str:
    """Seconds as ``m:ss`` (``h:mm:ss`` past an hour); ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def size(n: int) -> str:
    """Bytes in a readable unit."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# Right-to-left text (Arabic, Hebrew, ...) is laid out by the browser per paragraph:
# `unicode-bidi: plaintext` takes each paragraph's direction from its first strong character and
# `text-align: start` then aligns it to that side, so mixed-language chats read correctly.
CSS = """
.dim3-pane .message-content, .dim3-pane .message-content p, .dim3-bidi textarea,
.dim3-examples button, .dim3-examples td {
    unicode-bidi: plaintext;
    text-align: start;
}
.dim3-pane img { max-height: 180px; width: auto; object-fit: contain; }
.dim3-status { font-size: 0.9em; opacity: 0.85; }
.dim3-error { color: var(--error-text-color, #b91c1c); }
footer { display: none !important; }
/* the chat's three buttons share one row at any width and with any font: each takes its
   label's width and, where the row is too narrow, shrinks and cuts its label with an ellipsis
   (a wrapped row, or a label on two lines, is what a phone showed with fallback fonts) */
#dim3-chat-actions { flex-wrap: nowrap !important; }
#dim3-chat-actions > button {
    flex: 1 1 auto !important; min-width: 0 !important;
    white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
}
/* phones: the four tabs fit in one row instead of hiding two behind a "more" menu */
@media (max-width: 520px) {
    .tab-container button { padding-left: 8px !important; padding-right: 8px !important; }
    #dim3-chat-actions { gap: 8px !important; }
    #dim3-chat-actions > button { padding-left: 6px !important; padding-right: 6px !important; }
    /* figures keep a legible size and scroll sideways inside their box, not the page */
    .dim3-figure [data-testid="matplotlib"] { display: block; overflow-x: auto; }
    .dim3-figure [data-testid="matplotlib"] img { min-width: 640px; max-width: none; }
}
"""
