"""The Evaluate tab's Sweep view: a grid of one method's options, English against the others.

Layout and wiring only. "Run sweep" takes the three checkpoints (and device) of the Merge tab's
form, a method and a grid typed here (one ``option=v1,v2,...`` per line) and a probe, and runs
``dim3.sweep.iter_sweep``: the original VLM, the method's default, every grid point and,
if ticked, the other methods at their defaults, each merged in memory and scored on both halves
of the probe. The table and the Pareto plot (English accuracy against the mean of the other
languages, on the tuning half) grow as points finish. The setting chosen on the tuning half (and
any other) can be sent to the Merge tab's form. Errors are shown as messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from dim3 import estimate as est
from dim3 import sweep as sw
from dim3.demo import demo_probe_path, load_probe
from dim3.demo.probe import ProbeItem
from dim3.methods import METHODS
from dim3.ui import jobs
from dim3.ui.common import AppContext, gpu
from dim3.ui.fisher import FISHER, data_free, job_fisher_status
from dim3.ui.merge import HEAVY, MergeTab
from dim3.ui.progress import err
from dim3.ui.reveal import reveal_after, reveal_now

INTRO = (
    "### Sweep\n"
    "Score a grid of one method's options per language, to see how they trade English against "
    "the other languages. The probe is split once (by picture, seed 0) into a **tuning** half, "
    "on which the best setting is chosen, and a **reporting** half, on which it is reported. "
    "Uses the checkpoints of the **Merge** tab; one VLM is loaded and merged in place per point."
)
EXAMPLE_GRIDS = {
    "dim3": "above_average_ratio=0.5,1,2\ncalibration=0.5,1",
    "task_arithmetic": "scaling=0.25,0.5,0.75,1",
    "linear": "multilingual_weight=0.5,1,2",
    "ties": "density=0.2,0.5,0.8",
    "dare_task_arithmetic": "drop_rate=0.1,0.5,0.9",
    "dare_ties": "drop_rate=0.1,0.5,0.9",
    "breadcrumbs": "density=0.5,0.7,0.9",
    "fisher": "multimodal_weight=0.5,1,2",
}
EMPTY = (
    "*Press **Run sweep** to score each setting; a table grows as they finish and a plot of "
    "English against the other languages follows. The time it will take is said first.*"
)
DEFAULT_PER_LANGUAGE = 16  # the defaults score 4 models x 128 questions: about a minute on 2 CPUs
COLUMNS = ["model", "options", "tune en", "tune others", "tune rule", "report en", "report others"]


@dataclass
class SweepView:
    """The sweep view's components."""

    method: gr.Dropdown
    grid: gr.Textbox
    probe: gr.Textbox
    per_language: gr.Slider
    select: gr.Dropdown
    references: gr.Checkbox
    run: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    point: gr.Dropdown
    send: gr.Button
    points: gr.State
    results: gr.Column  # the plot and the table, shown while a sweep runs and after it
    empty: gr.Markdown  # what will appear, until the first sweep


def points_frame(points: list[sw.SweepPoint], rule: str) -> pd.DataFrame:
    """One row per scored model, accuracies rounded to 3 places."""
    rows = []
    for p in points:
        grid_options = "" if p.kind in ("original", "reference") else _options_text(p.options)
        rows.append(
            [
                p.label,
                grid_options,
                round(p.tuning.get(sw.ENGLISH, float("nan")), 3),
                round(p.tuning["others"], 3),
                round(sw.objective(p, rule), 3),
                round(p.report.get(sw.ENGLISH, float("nan")), 3),
                round(p.report["others"], 3),
            ]
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _layout() -> SweepView:
    gr.Markdown(INTRO)
    with gr.Row():
        method = gr.Dropdown(
            sorted(METHODS),
            value="ties",
            label="Method to sweep",
            scale=1,
            min_width=200,
            elem_id="dim3-sweep-method",
        )
        grid = gr.Textbox(
            EXAMPLE_GRIDS["ties"],
            lines=3,
            label="Grid: one option=v1,v2,... per line",
            scale=2,
            min_width=260,
            elem_id="dim3-sweep-grid",
        )
        with gr.Column(scale=1, min_width=260):
            per_language = gr.Slider(
                0,
                480,
                value=DEFAULT_PER_LANGUAGE,
                step=8,
                label="Questions per language (0 = all)",
                elem_id="dim3-sweep-n",
            )
            select = gr.Dropdown(
                [
                    ("mean over languages", "mean"),
                    ("mean over non-English", "others"),
                    ("all questions pooled", "overall"),
                ],
                value="mean",
                label="Choose by (tuning half)",
                elem_id="dim3-sweep-select",
            )
    with gr.Row():
        probe = gr.Textbox(
            "",  # a default for API callers: the built-in set
            label="Probe file (JSONL); empty = built-in demo probe",
            placeholder="/path/to/probe.jsonl",
            scale=3,
            min_width=300,
            elem_id="dim3-sweep-probe",
        )
        references = gr.Checkbox(
            value=False,
            label=f"Also score the {len(METHODS) - 1} other methods at their defaults (slow)",
            scale=1,
            min_width=260,
            elem_id="dim3-sweep-refs",
        )
    run = gr.Button("Run sweep", variant="primary", elem_id="dim3-sweep")
    status = gr.Markdown("", elem_id="dim3-sweep-status")
    empty = gr.Markdown(EMPTY, elem_id="dim3-sweep-empty")
    with gr.Column(visible=False, elem_id="dim3-sweep-results") as results:
        plot = gr.Plot(show_label=False, elem_id="dim3-sweep-plot", elem_classes="dim3-figure")
        table = gr.Dataframe(
            headers=COLUMNS,
            label="Per setting (accuracy)",
            interactive=False,
            wrap=True,
            elem_id="dim3-sweep-table",
        )
    with gr.Row():
        point = gr.Dropdown([], label="Setting", scale=3, elem_id="dim3-sweep-point")
        send = gr.Button("Use in the Merge tab", scale=1, elem_id="dim3-sweep-send")
    return SweepView(
        method,
        grid,
        probe,
        per_language,
        select,
        references,
        run,
        status,
        plot,
        table,
        point,
        send,
        gr.State([]),
        results,
        empty,
    )


def build_sweep_view(ctx: AppContext, merge: MergeTab) -> SweepView:
    """Lay out the sweep view inside the current Blocks; it reads and can fill ``merge``'s form."""
    view = _layout()
    view.method.change(
        lambda m: EXAMPLE_GRIDS.get(m, ""),
        inputs=view.method,
        outputs=view.grid,
        api_visibility="private",
    )
    reveal_now(view.run.click, view.results, view.empty)  # the table grows as points finish
    event = view.run.click(
        sweep_handler(ctx, merge, view),
        inputs_kwargs=merge.form.kwargs() | sweep_kwargs(view),
        outputs=[view.status, view.plot, view.table, view.point, view.points],
        api_name="sweep",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
    reveal_after(event, view.status, view.results, view.empty)
    form = merge.form
    view.send.click(
        send_handler(merge, view),
        inputs=[view.point, view.points],
        outputs=[form.method, *form.options.values(), view.status],
        api_visibility="private",
    )
    return view


def sweep_kwargs(view: SweepView) -> dict[str, gr.components.Component]:
    """The sweep's own API parameters (beside the Merge form's checkpoints)."""
    return {
        "sweep_method": view.method,
        "grid": view.grid,
        "probe": view.probe,
        "per_language": view.per_language,
        "select": view.select,
        "references": view.references,
    }


def probe_items(ctx: AppContext, path: str) -> list[ProbeItem]:
    """The demo probe (empty ``path``) or a JSONL file that must lie under the allowed folders."""
    if not path.strip():
        return load_probe(demo_probe_path())
    return load_probe(path.strip(), allowed_roots=ctx.allowed_roots)


def sweep_handler(ctx: AppContext, merge: MergeTab, view: SweepView) -> Callable:
    @gpu(duration=600)
    def handler(progress=gr.Progress(), **named: Any) -> Iterator[dict[Any, Any]]:  # noqa: B008
        own = sweep_kwargs(view)
        values = {own[k] if k in own else k: v for k, v in named.items()}
        try:
            method = values[view.method]
            fixed = merge.form.fixed is not None
            recipe = merge.form.recipe(data_free(values, fixed))
            folders = dict(recipe.fisher)
            estimate = method == FISHER and not folders
            recipe = dataclasses.replace(
                recipe, method="linear" if estimate else method, options={}
            )
            items = sw.first_per_language(
                probe_items(ctx, values[view.probe] or ""), int(values[view.per_language])
            )
            refs = (
                tuple(m for m in METHODS if m != method and not METHODS[m].extra_inputs)
                if values[view.references]
                else ()
            )
            grid = sw.parse_grid(
                [ln for ln in (values[view.grid] or "").splitlines() if ln.strip()]
            )
            if not estimate:
                spec = sw.SweepSpec(
                    recipe, grid, tuple(items), references=refs, select=values[view.select]
                )
            points_ = sw.grid_points(method, grid) if estimate else spec.points
            budget = jobs.budget("sweep")
            merges = [(method, p) for p in points_] + [(m, {}) for m in (method, *refs)]
            jobs.refuse_estimate(budget, recipe, merges, ctx.allowed_roots)
            # the trio's downloads, sized together, before a Fisher or the VLM is loaded
            yield from jobs.fetch_status(ctx, recipe, progress, view.status, budget)
            if estimate:  # the Fishers first, with the Merge tab's Fisher inputs
                weight = max(float(p.get("base_weight", 0.0)) for p in [{}, *points_])
                weight = max(weight, float(METHODS[FISHER].options().base_weight))
                folders = yield from job_fisher_status(
                    ctx, recipe, values, budget, view.status, base_weight=weight
                )
                recipe = dataclasses.replace(recipe, method=method, fisher=folders)
                spec = sw.SweepSpec(
                    recipe, grid, tuple(items), references=refs, select=values[view.select]
                )
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            yield {view.status: err(ctx, exc)}
            return
        points: list[sw.SweepPoint] = []
        total = spec.total()
        vlm, n = f"{recipe.multimodal.ref}@{recipe.device}", len(spec.items)
        merges = [*spec.references, *[method] * (1 + len(spec.points))]
        plan = est.plan_text(est.BOOK, vlm, n, merges)
        yield {view.status: f"⏳ Loading the VLM. {plan}"}
        try:
            for point in sw.iter_sweep(
                spec, allowed_roots=ctx.allowed_roots, costs=_recorder(vlm, n)
            ):
                budget.check(len(points) / total)  # scored so far: the next would run past it
                points.append(point)
                left = est.remaining_text(
                    est.BOOK, vlm, n, merges[len(points) - 1 :], total - len(points)
                )
                progress((len(points), total), desc=f"scored {point.label}", unit="models")
                yield {
                    view.status: f"⏳ {len(points)}/{total}: {point.label}"
                    + (f" ({left})" if left else ""),
                    view.table: points_frame(points, spec.select),
                }
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            yield {view.status: err(ctx, exc)}
            return
        chosen = sw.select(points, spec.select)
        tune, report = sw.split_units(spec.items, spec.split_seed)
        settings = [p for p in points if p.kind in ("default", "grid", "reference")]
        yield {
            view.status: (
                f"✅ {total} models, {len(tune)} tuning and {len(report)} reporting questions. "
                f"Chosen on the tuning half: **{chosen.label}**; on the reporting half it scores "
                f"{sw.objective(chosen, spec.select, 'report'):.3f} ({spec.select}), English "
                f"{chosen.report.get(sw.ENGLISH, float('nan')):.3f}, others "
                f"{chosen.report['others']:.3f}."
            ),
            view.table: points_frame(points, spec.select),
            view.plot: sw.pareto_figure(points, chosen=chosen.label),
            view.point: gr.Dropdown(choices=[p.label for p in settings], value=chosen.label),
            view.points: [dataclasses.asdict(p) for p in settings],
        }

    return handler


def _recorder(vlm: str, questions: int) -> Callable[[str, float, float], None]:
    """Book each scored point's measured cost (for the next estimates)."""

    def record(method: str, merge_seconds: float, answer_seconds: float) -> None:
        est.BOOK.record_answers(vlm, questions, answer_seconds)
        if method:
            est.BOOK.record_merge(vlm, method, merge_seconds)

    return record


def send_handler(merge: MergeTab, view: SweepView) -> Callable:
    form = merge.form

    def send(label: str, points: list[dict]) -> dict[Any, Any]:
        match = next((p for p in points or [] if p["label"] == label), None)
        if match is None:
            return {view.status: "❌ Run a sweep and pick one of its settings first."}
        method = match["method"]
        out: dict[Any, Any] = {form.method: method}
        for (m, name), widget in form.options.items():
            if m == method and name in match["options"]:
                out[widget] = match["options"][name]
        return out | {
            view.status: f"✅ The Merge tab is set to {label}. Press Merge there to build it."
        }

    return send
