"""Long-running work in the app (merge, save): live progress, log lines and status messages.

``run_with_progress`` runs the engine on a thread and turns its per-tensor callbacks into
``gr.Progress`` updates and log lines; if the browser goes away the generator is closed and the
next callback aborts the work. ``ok`` and ``err`` are the status lines the tabs show.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from dim3.engine import Progress
from dim3.limits import JobBudget
from dim3.ui.common import AppContext, clock, error_text, md_escape, size

LOG_LINES = 14


class Aborted(Exception):
    """Raised from the progress callback when the browser went away; the engine stops cleanly."""


def progress_line(p: Progress) -> str:
    if p.phase == "download":
        return (
            f"downloading {p.key} from the Hub · {size(p.bytes_done)} of {size(p.bytes_total)}"
            f" · ETA {clock(p.eta)}"
        )
    line = (
        f"{p.done}/{p.total} tensors · {size(p.bytes_done)} of {size(p.bytes_total)} · "
        f"ETA {clock(p.eta)}"
    )
    if p.steps:  # a slow rule (WUDI, TSV, Iso-CTS, OptMerge) inside one tensor
        name = ".".join(p.key.split(".")[-2:-1]) or p.key
        line += f" · {name}: step {p.step}/{p.steps}"
    return line


def progress_fraction(p: Progress) -> float:
    """The merge's share done, counting a slow rule's inner steps within its tensor; while
    the job downloads, the downloads' share (so a time budget projects the download alone)."""
    if p.phase == "download":
        return min(1.0, p.bytes_done / max(1, p.bytes_total))
    inner = p.step / p.steps if p.steps else 0.0
    return min(1.0, (p.done + inner) / max(1, p.total))


def run_with_progress(
    work: Callable[[Callable[[Progress], None]], Any],
    progress: gr.Progress,
    log: list[str],
    budget: JobBudget | None = None,
) -> Iterator[str | tuple[str, Any]]:
    """Run ``work(callback)`` on a thread; yield the log text while it runs, then ("done", result).

    The engine's callback (per tensor, and per inner step of a slow rule) feeds ``gr.Progress``
    (bar, tensors done, steps, ETA); if the browser goes away the generator is closed and the
    next callback aborts the merge, within a step of WUDI's optimisation. So does ``budget``
    (``dim3.limits.JobBudget``) once the time it allows is spent or projected to be.
    """
    events: queue.Queue[Progress] = queue.Queue()
    aborted = threading.Event()
    outcome: dict[str, Any] = {}

    def callback(p: Progress) -> None:
        if aborted.is_set():
            raise Aborted("the merge was cancelled")
        if budget is not None:
            budget.check(progress_fraction(p), p.elapsed)
        events.put(p)

    def target() -> None:
        try:
            outcome["result"] = work(callback)
        except BaseException as exc:  # noqa: BLE001 - shown to the user by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="dim3-merge", daemon=True)
    thread.start()
    last, shown = None, 0.0
    try:
        while thread.is_alive() or not events.empty():
            try:
                last = events.get(timeout=0.2)
                while not events.empty():  # a fast rule's steps come faster than a browser needs
                    last = events.get_nowait()
            except queue.Empty:
                continue
            progress(progress_fraction(last), desc=progress_line(last), unit="tensors")
            time.sleep(0.05)  # at most ~20 updates a second go to the browser
            merging = last.phase == "merge"
            if time.monotonic() - shown > 1.0 or (merging and last.done == last.total):
                shown = time.monotonic()
                log.append(
                    f"{progress_line(last)} · {last.key}" if merging else progress_line(last)
                )
                yield "\n".join(log[-LOG_LINES:])
        thread.join()
    finally:
        aborted.set()
    if "error" in outcome:
        raise outcome["error"]
    yield ("done", outcome.get("result"))


def drive(
    work: Callable,
    progress: gr.Progress,
    log: list[str],
    log_box: Any,
    out: dict,
    budget: JobBudget | None = None,
) -> Iterator[dict]:
    """Run ``work`` with live progress, yielding ``log_box`` updates; its result lands in ``out``."""
    for item in run_with_progress(work, progress, log, budget):
        if isinstance(item, tuple):
            out["result"] = item[1]
        else:
            yield {log_box: item}


def ok(text: str) -> str:
    return f"✅ {text}"


def err(ctx: AppContext, exc: BaseException) -> str:
    """An error for a Markdown status line: no server paths, escaped, cut to length."""
    return f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"


def plain(ctx: AppContext, exc: BaseException) -> str:
    """An error for a plain text box (the log): no server paths, cut to length."""
    return f"❌ {error_text(exc, ctx.allowed_roots)}"
