"""The Fisher step of a merge in the app: estimate each model's Fisher, with its time, then merge.

``estimate_step`` runs :func:`dim3.fisher.fishers_for` on a thread and yields log text while it
runs (per model: the measured seconds of its first example and the time that N examples will
take, then its progress), and finally ``("done", {role: folder})``. The job has downloaded its
Hub checkpoints before (``dim3.ui.jobs.fetch``: all of them, sized together, one job at a time),
so each Fisher is estimated from the cache. ``job_fishers`` wraps it for a
job with a time budget, checked at every example with the share done over all roles' N. Layout-free: the Merge tab's handler calls it before the merge when the
method is ``fisher``, the Evaluate tab and its Sweep view before their first merge when ``fisher``
is ticked or swept; all read the estimation inputs (data, N, labels) of the Merge tab's form and
share the Fishers kept under the output folder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any

from dim3.limits import JobBudget
from dim3.methods import get_method
from dim3.recipe import Recipe
from dim3.ui.common import AppContext, clock, md_escape
from dim3.ui.progress import LOG_LINES, Aborted

FISHER = "fisher"


def data_free(values: dict[str, Any], fixed: bool = False, form: Any = None) -> dict[str, Any]:
    """A fisher merge's form values as a data-free one (linear), for what does not need its
    Fishers yet: the plan, and the checked sources whose Fishers are estimated first. With the
    ``form`` (its :class:`dim3.ui.form.MethodForm`), the fisher method's own options are checked
    first (``ValueError``): a floor out of range is refused before the Fishers are estimated,
    not after."""
    if not fixed and values.get("method") == FISHER:
        if form is not None:
            get_method(FISHER).make_options(form.options_for(values, FISHER))
        return values | {"method": "linear"}
    return values


def job_fishers(
    ctx: AppContext,
    recipe: Recipe,
    values: dict[str, Any],
    budget: JobBudget,
    *,
    base_weight: float | None = None,
    log: list[str] | None = None,
) -> Iterator[str | dict[str, str]]:
    """The Fishers a fisher merge of ``recipe``'s checkpoints needs, estimated (or reused) with the
    form's Fisher inputs in ``values``: yields the log so far (text) while it runs, then the
    folders by role (a dict). The estimation counts against ``budget``. ``base_weight``: the
    fisher method's base weight when it is not the form's (a base weight above 0 needs the
    base's Fisher too). ``log``: the job's log, which the estimation's lines join."""
    if base_weight is not None:
        values = values | {"fisher_base_weight": base_weight}
    log = [] if log is None else log
    for item in estimate_step(ctx, recipe, values, log, budget):
        budget.check()
        yield item[1] if isinstance(item, tuple) else item


def with_fishers(
    ctx: AppContext,
    tab: Any,
    recipe: Recipe,
    values: dict[str, Any],
    budget: JobBudget,
    log: list[str],
) -> Generator[dict[Any, str], None, Recipe]:
    """The Merge tab's job recipe (``recipe``: the form's, made data-free by :func:`data_free`)
    with its Fishers: for a ``fisher`` merge they are estimated (or reused) first, the job's
    ``log`` shown in ``tab.log_box``; any other recipe as it is
    (``recipe = yield from with_fishers(...)``, in Merge and Save to folder)."""
    if recipe.method == values.get("method", recipe.method):
        return recipe
    folders: dict[str, str] = {}
    for item in job_fishers(ctx, recipe, values, budget, log=log):
        if isinstance(item, dict):
            folders = item
        else:
            yield {tab.log_box: item, tab.status: "⏳ Estimating the Fishers…"}
    return tab.form.recipe(values, fisher=folders)


def job_fisher_status(
    ctx: AppContext,
    recipe: Recipe,
    values: dict[str, Any],
    budget: JobBudget,
    status: Any,
    *,
    base_weight: float | None = None,
) -> Generator[dict[Any, str], None, dict[str, str]]:
    """:func:`job_fishers` for a tab's job: yields updates of the ``status`` component (the log's
    last line) while the Fishers are estimated, and returns their folders by role
    (``folders = yield from job_fisher_status(...)``)."""
    folders: dict[str, str] = {}
    for item in job_fishers(ctx, recipe, values, budget, base_weight=base_weight):
        if isinstance(item, dict):
            folders = item
        else:
            last = ctx.public(item.splitlines()[-1])
            yield {status: f"⏳ Estimating the Fishers… {md_escape(last)}"}
    return folders


def estimate_step(
    ctx: AppContext,
    recipe: Recipe,
    values: dict[str, Any],
    log: list[str],
    budget: JobBudget | None = None,
) -> Iterator[str | tuple[str, dict[str, str]]]:
    """Estimate (or reuse) the Fishers that merging ``recipe``'s models needs, from the form's
    Fisher inputs (``values``: fisher_data, fisher_n, fisher_labels, fisher_base_weight).
    ``budget`` is checked at every example, from the estimation's thread, with the share done
    over all the roles' examples: past it the estimation stops there (its finished Fishers
    deleted by :func:`dim3.fisher.fishers_for`) and its :class:`BudgetExceeded` is raised.
    The caller downloaded ``recipe``'s Hub checkpoints first (``dim3.ui.jobs.fetch``): a model
    each estimation sized and fetched alone could pass the server's download limit or its disk
    together with the others."""
    from dim3.fisher import fishers_for

    data = str(values.get("fisher_data") or "demo").strip()
    n, labels = int(values.get("fisher_n") or 32), str(values.get("fisher_labels") or "given")
    events: queue.Queue[tuple[str, int, int, float]] = queue.Queue()
    stop, outcome = threading.Event(), {}
    base = float(values.get("fisher_base_weight") or 0) > 0
    roles = [r for r in recipe.sources() if r != "base" or base]
    done_by_role: dict[str, tuple[int, float]] = {}

    def progress(role: str, done: int, total: int, seconds: float) -> None:
        if stop.is_set():
            raise Aborted("the merge was cancelled")
        events.put((role, done, total, seconds))
        if budget is not None:  # projected over every role's N examples, from their seconds
            done_by_role[role] = (done, seconds)
            share = sum(d for d, _ in done_by_role.values()) / (len(roles) * total)
            budget.check(share, sum(s for _, s in done_by_role.values()))

    def target() -> None:
        try:
            outcome["result"] = fishers_for(
                recipe.sources(),
                ctx.output_root,
                base=base,
                device=recipe.device,
                data=data,
                n=n,
                labels=labels,
                allowed_roots=ctx.allowed_roots,
                progress=progress,
            )
        except BaseException as exc:  # noqa: BLE001 - shown by the caller
            outcome["error"] = exc

    log.append(f"Fisher: {n} examples of {data} per model ({labels} labels), then the merge.")
    thread = threading.Thread(target=target, name="dim3-fisher", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not events.empty():
            try:
                role, done, total, seconds = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if done == 1 and total > 1:
                each = seconds
                log.append(
                    f"Fisher of {role}: first example {each:.1f} s → about "
                    f"{clock(each * (total - 1))} for the other {total - 1}"
                )
            elif done == total:
                log.append(f"Fisher of {role}: {total} examples done ({clock(seconds)})")
            else:
                continue
            yield "\n".join(log[-LOG_LINES:])
        thread.join()
    finally:
        stop.set()
    if "error" in outcome:
        raise outcome["error"]
    yield ("done", outcome["result"])
