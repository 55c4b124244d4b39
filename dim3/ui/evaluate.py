"""The Evaluate tab: scores of the original VLM and of merges, per language, on a question source.

Layout and wiring only. "Evaluate" takes the three checkpoints (and the selected method's
options) from the Merge tab's form, the methods ticked here and a question source: the built-in
demo probe or a JSONL probe file under the allowed folders, or a multilingual benchmark
(``dim3.benchmarks``: xGQA, MaXM, MaRVL, M3Exam; its Hub dataset or a local folder under the
allowed folders) with the languages and the per-language sample size picked here. It calls
``dim3.evaluate.evaluate_merges`` on a worker thread and shows, while it runs, one progress bar per
model and (after the original's first batch) the time the run will take (questions x models x
measured seconds per question); then a per-language table, a grouped bar chart and the
predictions as a downloadable JSON file. Errors are shown as messages.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from dim3.benchmarks import BENCHMARKS, PROBE, get_benchmark
from dim3.benchmarks.sources import load_items
from dim3.evaluate import (
    ORIGINAL,
    EvalSpec,
    evaluate_merges,
    results_record,
    steady_seconds,
    write_json,
)
from dim3.limits import JobBudget
from dim3.methods import METHODS, get_method
from dim3.ui import jobs
from dim3.ui.common import AppContext, check_text, clock, error_text, gpu, md_escape
from dim3.ui.fisher import FISHER, data_free, job_fisher_status
from dim3.ui.merge import HEAVY, MergeTab
from dim3.ui.reveal import reveal_after
from dim3.ui.sweep import build_sweep_view

INTRO = (
    "How often each model answers right, per language. The original VLM and the VLM merged by "
    "each ticked method use the three checkpoints of the **Merge** tab (the selected method with "
    "its options there; **fisher** first estimates its Fishers with the Fisher data, N and "
    "labels set there, or reuses them). **Source**: the built-in probe (it fits the built-in demo trio: "
    "pictures of coloured shapes, asked about in eight languages; exact match in the question's "
    "language) or one of the paper's multilingual benchmarks, asked with the reference prompt "
    "and scored with the reference metric on a seeded sample per language."
)
DEFAULT_METHODS = ("dim3", "task_arithmetic")
SOURCES = [("Probe (demo or JSONL file)", PROBE.name)] + [
    (f"{b.title} ({b.dataset})", b.name) for b in BENCHMARKS.values()
]
DEMO_LANGUAGES = ("en", "de", "es", "ru", "zh", "ar", "hi", "sw")
BAR = 20  # characters of a text progress bar
EMPTY = (
    "*Press **Evaluate** to see a table and a bar chart of each model's score per language, "
    "and the predictions to download.*"
)


@dataclass
class EvaluateTab:
    """The Evaluate tab's components."""

    methods: gr.CheckboxGroup
    source: gr.Dropdown
    languages: gr.Dropdown
    probe: gr.Textbox
    per_language: gr.Slider
    run: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    chart: gr.Plot
    download: gr.File
    empty: gr.Markdown  # what will appear, until the first run
    results: gr.Column  # the table, the chart and the file, shown by the first successful run


def results_frame(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows = models, columns = model + languages + overall; accuracies rounded to 3 places."""
    rows = [
        {"model": name, **{k: round(v, 3) for k, v in accs.items()}}
        for name, accs in results.items()
    ]
    return pd.DataFrame(rows)


def chart_figure(results: dict[str, dict[str, float]], ylabel: str = "accuracy"):
    """A grouped bar chart: one group per language (and overall), one bar per model in its
    colour (``dim3.plots.accuracy_figure``), the metric named on the y axis."""
    from dim3 import plots

    fig = plots.accuracy_figure(results)
    fig.axes[0].set_ylabel(ylabel)
    return fig


def source_languages(source: str) -> list[str]:
    """The languages offered for a source (the demo probe's for ``probe``)."""
    return list(DEMO_LANGUAGES if source == PROBE.name else get_benchmark(source).languages)


def _layout() -> EvaluateTab:
    gr.Markdown(INTRO)
    with gr.Row():
        methods = gr.CheckboxGroup(
            sorted(METHODS),
            value=list(DEFAULT_METHODS),
            label="Merge methods",
            scale=3,
            min_width=300,  # the slider goes below it on a phone
            elem_id="dim3-eval-methods",
        )
        per_lang = gr.Slider(
            0,
            480,
            value=16,
            step=8,
            label="Questions per language (a seeded sample; 0 = all, probes only)",
            scale=1,
            elem_id="dim3-eval-n",
        )
    with gr.Row():
        source = gr.Dropdown(
            SOURCES, value=PROBE.name, label="Source", scale=1, elem_id="dim3-eval-source"
        )
        probe = gr.Textbox(
            "",  # a default for API callers: the built-in set
            label="Probe JSONL file, or the benchmark's Hub dataset id / local folder; "
            "empty = the built-in demo probe or the benchmark's Hub dataset",
            placeholder="./my-probe/probe.jsonl  ·  neulab/PangeaBench-xgqa  ·  ./data/xgqa",
            max_length=300,
            scale=2,
            elem_id="dim3-eval-probe",
        )
    languages = gr.Dropdown(  # typed values allowed: API callers name any split; checked later
        source_languages(PROBE.name),
        value=[],
        multiselect=True,
        allow_custom_value=True,
        label="Languages (none = all the source has)",
        elem_id="dim3-eval-languages",
    )
    run = gr.Button("Evaluate", variant="primary", elem_id="dim3-evaluate")
    status = gr.Markdown("", elem_id="dim3-eval-status")
    empty = gr.Markdown(EMPTY, elem_id="dim3-eval-empty")
    with gr.Column(visible=False, elem_id="dim3-eval-results") as results:
        table = gr.Dataframe(
            label="Score per language", interactive=False, wrap=True, elem_id="dim3-eval-table"
        )
        chart = gr.Plot(show_label=False, elem_id="dim3-eval-chart", elem_classes="dim3-figure")
        download = gr.File(
            label="Predictions (JSON: every question's id, gold answer and each model's answer)",
            interactive=False,
            elem_id="dim3-eval-download",
        )
    return EvaluateTab(
        methods,
        source,
        languages,
        probe,
        per_lang,
        run,
        status,
        table,
        chart,
        download,
        empty,
        results,
    )


def build_evaluate_tab(ctx: AppContext, merge: MergeTab) -> EvaluateTab:
    """Lay out the Evaluate tab inside the current Blocks; it reads ``merge``'s form."""
    tab = _layout()
    tab.source.change(
        lambda source: gr.Dropdown(choices=source_languages(source), value=[]),
        inputs=[tab.source],
        outputs=[tab.languages],
        api_visibility="private",
    )
    event = tab.run.click(
        evaluate_handler(ctx, merge, tab),
        inputs_kwargs=merge.form.kwargs()
        | {
            "methods": tab.methods,
            "source": tab.source,
            "languages": tab.languages,
            "probe": tab.probe,
            "questions_per_language": tab.per_language,
        },
        outputs=[tab.status, tab.table, tab.chart, tab.download],
        api_name="evaluate",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
    reveal_after(event, tab.status, tab.results, tab.empty)
    build_sweep_view(ctx, merge)  # the Sweep view (dim3/ui/sweep.py)
    return tab


def _spec(
    ctx: AppContext,
    merge: MergeTab,
    values: dict[str, Any],
    fisher: dict[str, str] | None = None,
    budget: JobBudget | None = None,
    items: tuple[Any, ...] | None = None,
) -> EvalSpec:
    """The run the form asks for; ``ValueError`` (shown to the user) for what cannot run.
    ``fisher``: the Fisher folders of a ticked ``fisher`` (None: leave it out, to check the rest
    before its Fishers are estimated). ``budget``: the job's, checked while the dataset is read
    (a large split takes minutes to stream past). ``items``: those an earlier call read (the
    spec made again once the Fishers are estimated), so that the dataset is read once."""
    recipe = merge.form.recipe(data_free(values, merge.form.fixed is not None, merge.form))
    methods = tuple(m for m in values["methods"] or () if m != FISHER or fisher is not None)
    source = values.get("source") or PROBE.name
    dataset = check_text(values["probe"], "probe file or dataset")
    per_language = int(values["questions_per_language"])
    if source != PROBE.name and per_language < 1:
        raise ValueError("pick a sample size per language (at least 1) for a benchmark")
    if items is None:
        items = tuple(
            load_items(
                source,
                dataset or None,
                list(values.get("languages") or ()),
                limit=per_language or None,
                allowed_roots=ctx.allowed_roots,
                check=budget.check if budget is not None else None,
            )
        )
    options = {recipe.method: recipe.options} if recipe.method in methods else {}
    if FISHER in methods and values.get("method") == FISHER and merge.form.fixed is None:
        options[FISHER] = merge.form.options_for(values, FISHER)  # the form's own fisher
    return EvalSpec(
        recipe.base,
        recipe.multilingual,
        recipe.multimodal,
        items=items,
        methods=methods,
        options=options,
        benchmark=source,
        fisher=dict(fisher or {}),
    )


def fisher_base_weight(merge: MergeTab, values: dict[str, Any]) -> float | None:
    """The base weight a ticked ``fisher`` merges with: the form's when fisher is the form's
    method (None: ``job_fishers`` reads it there), else the method's default."""
    if values.get("method") == FISHER and merge.form.fixed is None:
        return None
    return float(get_method(FISHER).options().base_weight)


SECONDS_PER_ITEM: dict[tuple[str, str], float] = {}  # (VLM, benchmark) -> measured on this server


def bar(done: int, total: int) -> str:
    """A text progress bar: ``▰▰▰▱▱▱ 50% (4/8)``."""
    filled = round(BAR * done / max(1, total))
    return (
        f"`{'▰' * filled}{'▱' * (BAR - filled)}` {100 * done / max(1, total):.0f}% ({done}/{total})"
    )


def progress_text(done: dict[str, int], total: int, estimate: str) -> str:
    """One line per model with its progress bar, then the time estimate."""
    lines = [f"⏳ **{md_escape(name)}** {bar(n, total)}  " for name, n in done.items()]
    return "\n".join(lines + ([estimate] if estimate else []))


def estimate_text(per_item: float, items: int, models: int, measured: str) -> str:
    """The time a run takes: questions x models x measured seconds per question."""
    return (
        f"⏱ About **{clock(per_item * items * models)}** for {items} questions × {models} "
        f"models at {per_item:.2f} s per question ({measured}; merges come on top)."
    )


def evaluate_handler(ctx: AppContext, merge: MergeTab, tab: EvaluateTab) -> Callable:
    """The "Evaluate" click handler: form values -> progress, then status, table, chart, file."""

    @gpu(duration=600)
    def evaluate(progress=gr.Progress(), **values: Any) -> Iterator[dict[Any, Any]]:  # noqa: B008
        """Scores per language of the original VLM and of each ticked merge on a probe set or a
        multilingual benchmark (xgqa, maxm, marvl, m3exam)."""
        budget = jobs.budget("evaluation")
        try:
            recipe = merge.form.recipe(data_free(values, merge.form.fixed is not None, merge.form))
            folders = dict(recipe.fisher)  # a fixed fisher recipe brings its own
            estimate = FISHER in (values["methods"] or ()) and not folders
            spec = _spec(ctx, merge, values, None if estimate else folders, budget)
            merges = [(m, spec.options.get(m, {})) for m in spec.methods if m != ORIGINAL]
            jobs.refuse_estimate(budget, recipe, merges, ctx.allowed_roots)
            # the trio's downloads, sized together, before a Fisher or the VLM is loaded
            yield from jobs.fetch_status(ctx, recipe, progress, tab.status, budget)
            if estimate:  # the Fishers first, with the Merge tab's Fisher inputs
                weight = fisher_base_weight(merge, values)
                folders = yield from job_fisher_status(
                    ctx, recipe, values, budget, tab.status, base_weight=weight
                )
                spec = _spec(ctx, merge, values, folders, budget, spec.items)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            yield {tab.status: f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"}
            return
        yield from _run(ctx, tab, spec, progress, budget)

    return evaluate


def _run(
    ctx: AppContext, tab: EvaluateTab, spec: EvalSpec, progress: Any, budget: JobBudget
) -> Iterator[dict]:
    names = [ORIGINAL, *spec.methods]
    total = len(spec.items)
    key = (spec.multimodal.ref, spec.benchmark)
    events: queue.Queue[tuple[str, str, int]] = queue.Queue()
    aborted = threading.Event()
    outcome: dict[str, Any] = {"answers": {}, "metrics": {}}
    progress_by_model: dict[str, int] = {}

    def put(kind: str, name: str, done: int) -> None:
        if aborted.is_set():
            raise RuntimeError("the evaluation was cancelled")
        if kind == "items":
            finished = sum(n for m, n in progress_by_model.items() if m != name) + done
            budget.check(finished / max(1, total * len(names)))
            progress_by_model[name] = done
        events.put((kind, name, done))

    def work() -> None:
        try:
            outcome["results"] = evaluate_merges(
                spec,
                lambda name, done, _: put("model", name, done),
                allowed_roots=ctx.allowed_roots,
                answers=outcome["answers"],
                metrics=outcome["metrics"],
                item_progress=lambda name, done, _: put("items", name, done),
            )
        except BaseException as exc:  # noqa: BLE001 - shown to the user below
            outcome["error"] = exc

    estimate = ""
    if key in SECONDS_PER_ITEM:
        estimate = estimate_text(SECONDS_PER_ITEM[key], total, len(names), "measured earlier")
    done = {name: 0 for name in names}
    yield {tab.status: progress_text(done, total, estimate) + "\n\nLoading the VLM…"}
    thread = threading.Thread(target=work, name="dim3-evaluate", daemon=True)
    thread.start()
    marks: dict[str, Any] = {}  # the original's start and first batch (steady_seconds)
    shown, measured = 0.0, False
    try:
        while thread.is_alive() or not events.empty():
            try:
                kind, name, n = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "model" and name == ORIGINAL:
                marks["model"] = time.perf_counter()
            elif kind == "items":
                done[name] = n
                if name == ORIGINAL and n and not measured:
                    per_item = steady_seconds(marks, time.perf_counter(), n, total)
                    if per_item is not None:
                        measured = True
                        SECONDS_PER_ITEM[key] = per_item
                        estimate = estimate_text(per_item, total, len(names), "measured now")
            fraction = sum(done.values()) / max(1, total * len(names))
            what = f"{name}: {done[name]}/{total} questions" if name else "done"
            progress(fraction, desc=what, unit="questions")
            if time.monotonic() - shown > 0.5 or not thread.is_alive():
                shown = time.monotonic()
                yield {tab.status: progress_text(done, total, estimate)}
        thread.join()
        yield {tab.status: progress_text(done, total, estimate)}  # the bars as they ended
    finally:
        aborted.set()
    if "error" in outcome:
        exc = outcome["error"]
        yield {tab.status: f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"}
        return
    folder = jobs.job_folder("dim3-eval-")
    try:
        yield _finish(ctx, tab, spec, outcome, folder)
    finally:  # Gradio has copied the predictions file once it resumes (or closes) this handler
        shutil.rmtree(folder, ignore_errors=True)


def _finish(ctx: AppContext, tab: EvaluateTab, spec: EvalSpec, outcome: dict, folder: Path) -> dict:
    results = outcome["results"]
    bench = get_benchmark(spec.benchmark)
    record = results_record(spec, results, outcome["metrics"], outcome["answers"])
    out = folder / f"dim3-eval-{bench.name}.json"
    write_json(out, record)
    best = max(
        (m for m in results if m != ORIGINAL), key=lambda m: results[m]["overall"], default=None
    )
    metric = (
        "exact match in the question's language"
        if bench is PROBE
        else f"{bench.title} {bench.primary.replace('_', ' ')} (reference metric)"
    )
    status = f"✅ {len(spec.items)} questions, {len(results)} models, {metric}."
    if best:
        status += f" Best merge overall: **{md_escape(best)}** ({results[best]['overall']:.3f})."
    return {
        tab.status: status,
        tab.table: results_frame(results),
        tab.chart: chart_figure(results, bench.primary.replace("_", " ")),
        tab.download: str(out),
    }
