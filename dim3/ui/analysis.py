"""The Analysis tab: the residual geometry of the three checkpoints chosen in the Merge tab.

Layout and wiring only. "Compute" turns the Merge tab's form into a recipe, streams
``dim3.diagnostics.diagnose`` over the checkpoints (one tensor trio at a time, with a progress
bar) and shows DiM3's weights as a heat map (layer x module, Δmm beside Δml) and the other metrics
as line plots over layers (``dim3.plots``, the figures the CLI writes), with a per-module table
and the full per-tensor CSV to download. Before the first run a line says what will appear. DiM3's weights use the Merge tab's DiM3
options (defaults when another method is selected there). Errors are shown as messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from dim3 import diagnostics as dg
from dim3.engine import Progress
from dim3.ui import jobs
from dim3.ui.common import AppContext, error_text, gpu, md_escape
from dim3.ui.merge import HEAVY, MergeTab
from dim3.ui.represent import build_represent_view
from dim3.ui.reveal import reveal_after

INTRO = (
    "How the two updates relate, per layer and module (the paper's Figure 1): their size "
    "relative to the base, how far each turns the base's columns, whether they point the same "
    "way, and what weight DiM3 gives each. Uses the three checkpoints of the **Merge** tab; reads "
    "them one tensor at a time, like the merge."
)
EMPTY = (
    "*Press **Compute diagnostics** to draw a heat map of DiM3's weights per layer and module, "
    "the size and turn of each update per layer, a table per module type and a CSV of every "
    "tensor (a few seconds on the demo trio).*"
)
# figures shown below the heat map (the heat map already shows DiM3's mean weights)
SHOWN_FIGURES = tuple(name for name in dg.FIGURES if name != "dim3_weights")
SUMMARY_COLUMNS = ("module", "group", "tensors", *dg.METRICS)
# the table's headers in words (short, so that they wrap between words)
HEADERS = {
    "mm_norm": "Δmm size",
    "ml_norm": "Δml size",
    "mm_reorientation": "Δmm turn",
    "ml_reorientation": "Δml turn",
    "cross_alignment": "cos(Δml, Δmm)",
    "dim3_mm_weight": "DiM3 weight of Δmm",
    "dim3_ml_weight": "DiM3 weight of Δml",
    "dim3_mm_calibrated_magnitude": "Δmm calibrated (magnitude)",
    "dim3_ml_calibrated_magnitude": "Δml calibrated (magnitude)",
    "dim3_mm_calibrated_direction": "Δmm calibrated (direction)",
    "dim3_ml_calibrated_direction": "Δml calibrated (direction)",
}


@dataclass
class AnalysisTab:
    """The Analysis tab's components."""

    compute: gr.Button
    status: gr.Markdown
    empty: gr.Markdown
    heatmap: gr.Plot
    plots: dict[str, gr.Plot]
    table: gr.Dataframe
    download: gr.File
    results: gr.Column  # everything above the CSV, shown by the first run


def figures(rows: list[dg.DiagnosticRow]) -> dict[str, Any]:
    """The heat map and each shown figure (the first multilingual update's when several)."""
    first = [r for r in rows if r.update == rows[0].update]
    out = {"heatmap": dg.heatmap(rows)}
    for name in SHOWN_FIGURES:
        title, metrics = dg.FIGURES[name]
        out[name] = dg.figure(first, metrics, title)
    return out


def summary_frame(rows: list[dg.DiagnosticRow]) -> pd.DataFrame:
    """The per-module table, 4 significant digits, NaN shown as empty."""
    records = dg.summarize(rows)
    for r in records:
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = None if math.isnan(v) else float(f"{v:.4g}")
    frame = pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))
    return frame.rename(columns=HEADERS)


def _layout() -> AnalysisTab:
    gr.Markdown(INTRO)
    with gr.Row():
        compute = gr.Button("Compute diagnostics", variant="primary", elem_id="dim3-diagnose")
    status = gr.Markdown("", elem_id="dim3-analysis-status")
    empty = gr.Markdown(EMPTY, elem_id="dim3-analysis-empty")
    with gr.Column(visible=False, elem_id="dim3-analysis-results") as results:
        heatmap = gr.Plot(
            show_label=False, elem_id="dim3-analysis-heatmap", elem_classes="dim3-figure"
        )
        plots = {
            name: gr.Plot(show_label=False, elem_id=f"dim3-plot-{name}", elem_classes="dim3-figure")
            for name in SHOWN_FIGURES
        }
        table = gr.Dataframe(
            headers=[HEADERS.get(c, c) for c in SUMMARY_COLUMNS],
            label="Per module type (mean over layers; every figure per tensor in the CSV)",
            interactive=False,
            wrap=True,
            elem_id="dim3-analysis-table",
        )
        download = gr.File(label="Per-tensor diagnostics (CSV)", elem_id="dim3-analysis-csv")
    return AnalysisTab(compute, status, empty, heatmap, plots, table, download, results)


def build_analysis_tab(ctx: AppContext, merge: MergeTab) -> AnalysisTab:
    """Lay out the Analysis tab inside the current Blocks; it reads ``merge``'s form."""
    tab = _layout()
    event = tab.compute.click(
        _compute(ctx, merge, tab),
        inputs_kwargs=merge.form.kwargs(),
        outputs=[
            tab.status,
            tab.heatmap,
            tab.table,
            tab.download,
            *tab.plots.values(),
        ],
        api_name="diagnose",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
    reveal_after(event, tab.status, tab.results, tab.empty)
    build_represent_view(ctx)  # the representation view (dim3/ui/represent.py)
    return tab


def _write_csv(rows: list[dg.DiagnosticRow]) -> Path:
    folder = jobs.job_folder("dim3-diagnostics-")  # removed once Gradio has copied the CSV
    path = folder / dg.CSV_FILE
    path.write_text(dg.to_csv(rows), encoding="utf-8")
    return path


def _compute(ctx: AppContext, merge: MergeTab, tab: AnalysisTab) -> Callable:
    @gpu(duration=300)
    @jobs.cleans_up
    def diagnose(progress=gr.Progress(), **values: Any) -> dict[Any, Any]:  # noqa: B008
        """Per-layer residual geometry of the three checkpoints (plots, table and CSV)."""
        budget = jobs.budget("diagnosis")

        def report(p: Progress) -> None:
            budget.check(p.done / max(1, p.total), p.elapsed)
            progress((p.done, p.total), desc=f"{p.done}/{p.total} tensors", unit="tensors")

        try:
            recipe = merge.form.recipe(values)
            # the downloads' bytes on the bar; one that alone would pass the budget is stopped
            jobs.fetch_progress(ctx, recipe, progress, budget)
            rows = dg.diagnose(recipe, progress=report, allowed_roots=ctx.allowed_roots)
            if not rows:
                raise ValueError("these checkpoints have no language-model tensors to compare")
            csv_path = _write_csv(rows)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {tab.status: f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"}
        options = "its DiM3 options" if recipe.method == "dim3" else "default DiM3 options"
        layers = len({r.layer for r in rows if r.layer is not None})
        status = (
            f"✅ {len(rows)} language-model tensors over {layers} layers of "
            f"{md_escape(ctx.manager.display_ref(recipe.multimodal.ref))} "
            f"(DiM3 weights with {options})."
        )
        drawn = figures(rows)
        out: dict[Any, Any] = {
            tab.status: status,
            tab.heatmap: drawn["heatmap"],
            tab.table: summary_frame(rows),
            tab.download: str(csv_path),
        }
        return out | {plot: drawn[name] for name, plot in tab.plots.items()}

    return diagnose
