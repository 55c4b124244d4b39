"""The Evaluate tab: probe-set accuracy of the original VLM and of merges, per language.

Layout and wiring only. "Evaluate" takes the three checkpoints (and the selected method's
options) from the Merge tab's form, the methods ticked here and a probe set (the built-in demo
probe, or a JSONL file under the allowed folders), and calls ``dim3.evaluate.evaluate_merges``:
the original VLM, then the VLM merged in memory by each method, each answering every question.
It shows a per-language table and a grouped bar chart. Errors are shown as messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from dim3 import estimate as est
from dim3.checkpoints import check_under_roots
from dim3.demo import demo_probe_path, load_probe
from dim3.demo.probe import ProbeItem
from dim3.evaluate import ORIGINAL, EvalSpec, evaluate_merges
from dim3.methods import METHODS
from dim3.sweep import first_per_language
from dim3.ui.common import AppContext, check_text, error_text, gpu, md_escape
from dim3.ui.merge import HEAVY, MergeTab
from dim3.ui.reveal import reveal_after
from dim3.ui.sweep import build_sweep_view

INTRO = (
    "How often each model answers a probe question with the right word **in the question's "
    "language** (exact match). The original VLM and the VLM merged by each ticked method use the "
    "three checkpoints of the **Merge** tab (the selected method with its options there). The "
    "built-in probe fits the built-in demo trio: pictures of coloured shapes, asked about in "
    "eight languages."
)
EMPTY = "*Press **Evaluate** to see a table and a bar chart of each model's accuracy per language.*"
DEFAULT_METHODS = ("dim3", "task_arithmetic")


@dataclass
class EvaluateTab:
    """The Evaluate tab's components."""

    methods: gr.CheckboxGroup
    probe: gr.Textbox
    per_language: gr.Slider
    run: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    chart: gr.Plot
    empty: gr.Markdown  # what will appear, until the first run
    results: gr.Column  # the table and the chart, shown by the first run


def results_frame(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows = models, columns = model + languages + overall; accuracies rounded to 3 places."""
    rows = [
        {"model": name, **{k: round(v, 3) for k, v in accs.items()}}
        for name, accs in results.items()
    ]
    return pd.DataFrame(rows)


def chart_figure(results: dict[str, dict[str, float]]):
    """A grouped bar chart: one group per language (and overall), one bar per model in its
    colour (``dim3.plots.accuracy_figure``)."""
    from dim3 import plots

    return plots.accuracy_figure(results)


def _timed_progress(progress: Any, vlm: str, questions: int, methods: tuple[str, ...]) -> Callable:
    """evaluate_merges' progress callback: the bar, with the time left from measured costs
    (the first model's answers measure the cost per answer; each later interval, a merge)."""
    marks: list[float] = []

    def report(name: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if marks:
            took = now - marks[-1]
            if done == 1:
                est.BOOK.record_answers(vlm, questions, took)
            else:
                answers = (est.BOOK.per_answer(vlm) or 0.0) * questions
                est.BOOK.record_merge(vlm, methods[done - 2], max(took - answers, 1e-3))
        marks.append(now)
        left = est.remaining_text(
            est.BOOK, vlm, questions, methods[max(done - 1, 0) :], total - done
        )
        if done == 0:
            whole = est.BOOK.estimate(vlm, questions, methods)
            left = f"about {est.clock(whole)} in all" if whole is not None else ""
        desc = f"evaluating {name}" if name else "done"
        progress((done, total), desc=f"{desc} ({left})" if left and name else desc, unit="models")

    return report


def probe_items(ctx: AppContext, path: str) -> list[ProbeItem]:
    """The demo probe (empty ``path``) or a JSONL file that must lie under the allowed folders."""
    if not path.strip():
        return load_probe(demo_probe_path())
    return load_probe(check_under_roots(Path(path.strip()), ctx.allowed_roots))


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
            label="Questions per language (0 = all)",
            scale=1,
            elem_id="dim3-eval-n",
        )
    probe = gr.Textbox(
        label="Probe file (JSONL: image, question, answer, language); empty = built-in demo probe",
        placeholder="./my-probe/probe.jsonl",
        max_length=300,
        elem_id="dim3-eval-probe",
    )
    run = gr.Button("Evaluate", variant="primary", elem_id="dim3-evaluate")
    status = gr.Markdown("", elem_id="dim3-eval-status")
    empty = gr.Markdown(EMPTY, elem_id="dim3-eval-empty")
    with gr.Column(visible=False, elem_id="dim3-eval-results") as results:
        table = gr.Dataframe(
            label="Accuracy per language", interactive=False, wrap=True, elem_id="dim3-eval-table"
        )
        chart = gr.Plot(show_label=False, elem_id="dim3-eval-chart", elem_classes="dim3-figure")
    return EvaluateTab(methods, probe, per_lang, run, status, table, chart, empty, results)


def build_evaluate_tab(ctx: AppContext, merge: MergeTab) -> EvaluateTab:
    """Lay out the Evaluate tab inside the current Blocks; it reads ``merge``'s form."""
    tab = _layout()
    event = tab.run.click(
        evaluate_handler(ctx, merge, tab),
        inputs_kwargs=merge.form.kwargs()
        | {"methods": tab.methods, "probe": tab.probe, "questions_per_language": tab.per_language},
        outputs=[tab.status, tab.table, tab.chart],
        api_name="evaluate",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
    reveal_after(event, tab.status, tab.results, tab.empty)
    build_sweep_view(ctx, merge)  # the Sweep view (dim3/ui/sweep.py)
    return tab


def evaluate_handler(ctx: AppContext, merge: MergeTab, tab: EvaluateTab) -> Callable:
    """The "Evaluate" click handler: form values -> status, table and chart updates."""

    @gpu(duration=600)
    def evaluate(progress=gr.Progress(), **values: Any) -> dict[Any, Any]:  # noqa: B008
        """Probe-set accuracy per language of the original VLM and of each ticked merge."""

        try:
            recipe = merge.form.recipe(values)
            methods = tuple(values["methods"] or ())
            probe = check_text(values["probe"], "probe file path")
            items = first_per_language(
                probe_items(ctx, probe), int(values["questions_per_language"])
            )
            report = _timed_progress(progress, f"{recipe.multimodal.ref}@cpu", len(items), methods)
            options = {recipe.method: recipe.options} if recipe.method in methods else {}
            spec = EvalSpec(
                recipe.base,
                recipe.multilingual,
                recipe.multimodal,
                items=tuple(items),
                methods=methods,
                options=options,
            )
            results = evaluate_merges(spec, report, allowed_roots=ctx.allowed_roots)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {tab.status: f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"}
        best = max(
            (m for m in results if m != ORIGINAL), key=lambda m: results[m]["overall"], default=None
        )
        status = f"✅ {len(items)} questions, {len(results)} models, exact match in the question's language."
        if best:
            status += f" Best merge overall: **{best}** ({results[best]['overall']:.3f})."
        return {
            tab.status: status,
            tab.table: results_frame(results),
            tab.chart: chart_figure(results),
        }

    return evaluate
