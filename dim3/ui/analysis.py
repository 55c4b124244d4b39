"""The Analysis tab: the residual geometry of the three checkpoints chosen in the Merge tab.

Layout and wiring only. "Compute" turns the Merge tab's form into a recipe, streams
``dim3.diagnostics.diagnose`` over the checkpoints (one tensor trio at a time, with a progress
bar) and shows each metric as a line plot over layers, one line per module type, beside a
per-module table and the full per-tensor CSV to download. DiM3's weights use the Merge tab's DiM3
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

INTRO = (
    "How the two updates relate, per layer and module (the paper's Figure 1): their size "
    "relative to the base, how far each turns the base's columns, whether they point the same "
    "way, and what weight DiM3 gives each. Uses the three checkpoints of the **Merge** tab; reads "
    "them one tensor at a time, like the merge."
)
PLOTTED = tuple(dg.METRICS)  # one plot per metric
SUMMARY_COLUMNS = ("module", "group", "tensors", *dg.METRICS)


@dataclass
class AnalysisTab:
    """The Analysis tab's components."""

    compute: gr.Button
    status: gr.Markdown
    plots: dict[str, gr.LinePlot]
    table: gr.Dataframe
    download: gr.File


def plot_frame(rows: list[dg.DiagnosticRow], metric: str) -> pd.DataFrame:
    """One metric's plot data: columns layer, module, value (layered tensors, no NaN)."""
    data = [d for d in dg.long_table(rows, [metric]) if not math.isnan(d["value"])]
    frame = pd.DataFrame(data, columns=["layer", "module", "metric", "value"])
    return frame.drop(columns="metric")


def summary_frame(rows: list[dg.DiagnosticRow]) -> pd.DataFrame:
    """The per-module table, 4 significant digits, NaN shown as empty."""
    records = dg.summarize(rows)
    for r in records:
        for k, v in r.items():
            if isinstance(v, float):
                r[k] = None if math.isnan(v) else float(f"{v:.4g}")
    return pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))


def _layout() -> AnalysisTab:
    gr.Markdown(INTRO)
    with gr.Row():
        compute = gr.Button("Compute diagnostics", variant="primary", elem_id="dim3-diagnose")
    status = gr.Markdown("", elem_id="dim3-analysis-status")
    plots: dict[str, gr.LinePlot] = {}
    for i in range(0, len(PLOTTED), 2):
        with gr.Row(equal_height=True):
            for metric in PLOTTED[i : i + 2]:
                plots[metric] = gr.LinePlot(
                    x="layer",
                    y="value",
                    color="module",
                    title=dg.METRICS[metric],
                    x_title="layer",
                    y_title=metric,
                    color_title="module",
                    height=260,
                    elem_id=f"dim3-plot-{metric}",
                )
    table = gr.Dataframe(
        headers=list(SUMMARY_COLUMNS),
        label="Per module type (mean over layers)",
        interactive=False,
        elem_id="dim3-analysis-table",
    )
    download = gr.File(label="Per-tensor diagnostics (CSV)", elem_id="dim3-analysis-csv")
    return AnalysisTab(compute, status, plots, table, download)


def build_analysis_tab(ctx: AppContext, merge: MergeTab) -> AnalysisTab:
    """Lay out the Analysis tab inside the current Blocks; it reads ``merge``'s form."""
    tab = _layout()
    tab.compute.click(
        _compute(ctx, merge, tab),
        inputs_kwargs=merge.form.kwargs(),
        outputs=[tab.status, tab.table, tab.download, *tab.plots.values()],
        api_name="diagnose",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
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
        out: dict[Any, Any] = {
            tab.status: status,
            tab.table: summary_frame(rows),
            tab.download: str(csv_path),
        }
        return out | {plot: plot_frame(rows, m) for m, plot in tab.plots.items()}

    return diagnose
