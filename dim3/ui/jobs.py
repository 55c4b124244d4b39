"""What a heavy job of the app may cost and leave behind: its time budget and its temporary files.

- :func:`budget` is the time one heavy job (merge, save, evaluate, sweep, diagnose, represent)
  may take on this server (``$DIM3_JOB_BUDGET``, see ``dim3.limits``); :func:`refuse_estimate`
  refuses, before any weight is read, a job whose iterative merges (WUDI, OptMerge) are
  measured to take longer. The handlers call ``budget.check`` from their progress callbacks.
- :func:`fetch` downloads a job's Hub checkpoints before anything else, its bytes in the log (or
  the status line: :func:`fetch_status`; the bar only: :func:`fetch_progress`) and under the
  job's budget (a download that alone would pass it is stopped).
- :func:`job_folder` makes a temporary folder that belongs to the running job, and
  :func:`cleans_up` turns a handler into one that removes those folders once Gradio has taken
  its outputs (a file shown for download is copied into Gradio's cache first), or when the
  visitor leaves.

No layout here; the tabs call these from their handlers.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from dim3.limits import JobBudget, budget_from_env, estimate_merges_seconds

_FOLDERS: ContextVar[list[Path] | None] = ContextVar("dim3_job_folders", default=None)
HINTS = {
    "merge": "choose fewer iterations or a faster method",
    "save": "choose fewer iterations or a faster method",
    "evaluation": "tick fewer methods, ask fewer questions per language or use fewer iterations",
    "sweep": "use a smaller grid, fewer questions per language or no reference methods",
    "diagnosis": "use smaller checkpoints",
    "representation analysis": "use a smaller parallel set",
}


def budget(what: str) -> JobBudget:
    """The time budget of one job, started now."""
    return JobBudget(budget_from_env(), what, HINTS.get(what, ""))


def merged_shapes(recipe: Any, allowed_roots: Any) -> list[tuple[int, ...]]:
    """The shapes the rule sees for every merged tensor of ``recipe`` (from the headers)."""
    from dim3 import engine

    plan = engine.plan(recipe, allowed_roots=allowed_roots)
    return [
        tuple(reversed(e.shape)) if e.transpose else tuple(e.shape)
        for e in plan.entries
        if e.action == "merge"
    ]


def refuse_estimate(
    job: JobBudget,
    recipe: Any,
    merges: Iterable[tuple[str, dict[str, Any]]],
    allowed_roots: Any,
) -> None:
    """Raise ``BudgetExceeded`` before the job starts if its merges (method, options) on
    ``recipe``'s checkpoints are measured to take longer than ``job`` allows."""
    from dim3.methods import get_method
    from dim3.models import resolve_device

    merges = list(merges)
    iterative = [
        (m, o)
        for m, o in merges
        if any(f == "iterations" for f in get_method(m).options.__dataclass_fields__)
    ]
    if job.seconds is None or not iterative:
        return
    shapes = merged_shapes(recipe, allowed_roots)
    n_tuned = 1 + len(recipe.multilingual)
    device = resolve_device(recipe.device)
    total, note = estimate_merges_seconds(iterative, shapes, n_tuned, device)
    job.refuse_estimate(job.elapsed + total, note)


def fetch(
    ctx: Any, recipe: Any, progress: Any, log: list[str], log_box: Any, budget: JobBudget
) -> Iterator[dict]:
    """Download ``recipe``'s Hub checkpoints not yet cached (``dim3.engine.fetch_inputs``:
    sized together first, one job at a time), yielding ``log_box`` updates with the bytes done;
    the progress bar shows them too. ``budget`` stops the downloads once they alone would pass
    it, and so does a visitor who leaves. Yields nothing where all are local or cached."""
    from dim3.ui.progress import drive

    yield from drive(_fetch_work(ctx, recipe), progress, log, log_box, {}, budget)


def fetch_progress(ctx: Any, recipe: Any, progress: Any, budget: JobBudget) -> None:
    """:func:`fetch` for a handler that returns once (Analysis): returns when the downloads are
    done, the bar having followed their bytes (from this thread: Gradio's bar does not hear the
    download's threads)."""
    from dim3.ui.progress import run_with_progress

    for _ in run_with_progress(_fetch_work(ctx, recipe), progress, [], budget):
        pass


def _fetch_work(ctx: Any, recipe: Any) -> Callable[[Callable], int]:
    from dim3 import engine

    def work(callback: Callable) -> int:
        return engine.fetch_inputs(recipe, allowed_roots=ctx.allowed_roots, progress=callback)

    return work


def fetch_status(
    ctx: Any, recipe: Any, progress: Any, status: Any, budget: JobBudget
) -> Iterator[dict]:
    """:func:`fetch` for a tab with a status line and no log (Evaluate, Sweep): yields
    ``status`` updates with the download's last line."""
    from dim3.ui.common import md_escape

    for update in fetch(ctx, recipe, progress, [], status, budget):
        line = str(update[status]).splitlines()[-1]
        yield {status: f"⏳ {md_escape(line)}"}


def job_folder(prefix: str) -> Path:
    """A new temporary folder ``<tmp>/<prefix>XXXX`` removed when the current job ends (inside
    a :func:`cleans_up` handler; elsewhere the caller removes it)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    owned = _FOLDERS.get()
    if owned is not None:
        owned.append(folder)
    return folder


def cleans_up(fn: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
    """``fn`` as a one-step generator handler that removes the :func:`job_folder` folders it
    made once Gradio resumes it after taking its result (or closes it: the visitor left)."""

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Iterator[Any]:
        folders: list[Path] = []
        token = _FOLDERS.set(folders)
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            _remove(folders)
            raise
        finally:
            _FOLDERS.reset(token)
        try:
            yield result
        finally:
            _remove(folders)

    return handler


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
