"""The Analysis tab's representation view: the paper's Figures 3–9 for the models in memory.

Layout and wiring only. "Compute representations" runs a parallel set (the demo's pictures or
descriptions, the bundled everyday sentences, or a JSONL file under the allowed folders) through
the original VLM and, when the Merge tab has made one, the merged VLM held by the model manager
(nothing is loaded or merged here; the original is loaded if no model is in memory yet), and
shows per layer the silhouette by language, by content and the retrieval accuracy
(``dim3.represent``). A slider picks the layer of the 2-D map (PCA, or t-SNE). Errors are shown
as messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from dim3 import represent as rp
from dim3.models import MERGED, ORIGINAL
from dim3.ui import jobs
from dim3.ui.common import AppContext, gpu
from dim3.ui.merge import HEAVY
from dim3.ui.progress import err
from dim3.ui.reveal import reveal_after

MAX_ITEMS = 1_000  # a parallel set's items in the app (the built-in sentences: 288)
MAPS = "dim3-map"  # map redraws, one at a time on the server: a t-SNE takes both cores

INTRO = (
    "### Representations\n"
    "How each model's hidden states of the same content in several languages relate, layer by "
    "layer (the paper's Figures 3–9): averaged over the tokens of each item's text (the question, "
    "for a picture). **Silhouette by language** is high when languages sit apart (cross-lingual "
    "alignment lowers it); **by content**, high when the same meaning sits together; "
    "**retrieval** is how often an item's nearest neighbour in another language is its "
    "translation. Uses the original and merged VLMs in memory: merge in the **Merge** tab first."
)
EMPTY = (
    "*Press **Compute representations** to draw the three scores per layer for each model and a "
    "2-D map of one layer (colour = language, marker = content), with a slider for the layer.*"
)
PROBES = [
    ("Demo: pictures + colour question (8 languages)", "demo"),
    ("Demo: scene descriptions, text only (8 languages)", "demo-text"),
    ("Everyday sentences (12 languages)", "sentences"),
    ("A JSONL file (below)", "file"),
]


@dataclass
class RepresentView:
    """The representation view's components."""

    probe: gr.Dropdown
    path: gr.Textbox
    map_method: gr.Radio
    compute: gr.Button
    status: gr.Markdown
    empty: gr.Markdown
    curves: gr.Plot
    layer: gr.Slider
    map: gr.Plot
    state: gr.State
    results: gr.Column  # curves, layer slider and map, shown by the first run


def _layout() -> RepresentView:
    gr.Markdown(INTRO)
    with gr.Row():
        probe = gr.Dropdown(
            [(label, key) for label, key in PROBES],
            value="demo",
            label="Parallel set",
            scale=2,
            min_width=260,
            elem_id="dim3-rep-probe",
        )
        path = gr.Textbox(
            "",  # a default for API callers: the built-in set
            label="JSONL file (id, language, text, image)",
            placeholder="/path/to/parallel.jsonl",
            scale=2,
            min_width=260,
            elem_id="dim3-rep-file",
        )
        map_method = gr.Radio(
            [("PCA (fast)", "pca"), ("t-SNE", "tsne")],
            value="pca",
            label="Map",
            scale=1,
            elem_id="dim3-rep-map-method",
        )
    compute = gr.Button("Compute representations", variant="primary", elem_id="dim3-represent")
    status = gr.Markdown("", elem_id="dim3-rep-status")
    empty = gr.Markdown(EMPTY, elem_id="dim3-rep-empty")
    with gr.Column(visible=False, elem_id="dim3-rep-results") as results:
        curves = gr.Plot(show_label=False, elem_id="dim3-rep-curves", elem_classes="dim3-figure")
        layer = gr.Slider(0, 1, value=0, step=1, label="Layer of the map", elem_id="dim3-rep-layer")
        map_plot = gr.Plot(show_label=False, elem_id="dim3-rep-map", elem_classes="dim3-figure")
    return RepresentView(
        probe,
        path,
        map_method,
        compute,
        status,
        empty,
        curves,
        layer,
        map_plot,
        gr.State(None),
        results,
    )


def build_represent_view(ctx: AppContext) -> RepresentView:
    """Lay out the representation view inside the current Blocks and wire its events."""
    view = _layout()
    event = view.compute.click(
        compute_handler(ctx, view),
        inputs=[view.probe, view.path, view.map_method],
        outputs=[
            view.status,
            view.state,
            view.curves,
            view.layer,
            view.map,
        ],
        api_name="represent",
        concurrency_limit=1,
        concurrency_id=HEAVY,
    )
    reveal_after(event, view.status, view.results, view.empty)
    for trigger in (view.layer.release, view.map_method.change):
        trigger(
            map_handler(ctx, view),
            inputs=[view.state, view.layer, view.map_method],
            outputs=[view.map, view.status],
            api_visibility="private",
            show_progress="minimal",
            concurrency_limit=1,
            concurrency_id=MAPS,
        )
    return view


def load_items(ctx: AppContext, probe: str, path: str) -> list[rp.ParallelItem]:
    """A built-in parallel set, or a JSONL file that must lie under the allowed folders, of at
    most :data:`MAX_ITEMS` items."""
    if probe != "file":
        return rp.parallel_items(probe)
    if not (path or "").strip():
        raise ValueError("choose a built-in parallel set or give the path of a JSONL file")
    items = rp.parallel_items(path.strip(), allowed_roots=ctx.allowed_roots)
    if len(items) > MAX_ITEMS:
        raise ValueError(
            f"the parallel set has {len(items):,} items; the app takes at most {MAX_ITEMS:,} "
            "(its retrieval compares every pair of items and its maps place each one: "
            "24,000 items ran 4.5 minutes): take a sample, or run `python -m dim3 represent` "
            "on your own machine"
        )
    return items


def _loaded(ctx: AppContext) -> dict[str, tuple[Any, Any]]:
    original = ctx.manager.ensure_original()
    merged = ctx.manager.get(MERGED)
    models = {}
    if original is not None:
        models[ORIGINAL] = (original.model, original.processor)
    if merged is not None:
        models[MERGED] = (merged.model, merged.processor)
    if not models:
        raise ValueError("no VLM is loaded: merge one in the Merge tab first")
    return models


def compute_handler(ctx: AppContext, view: RepresentView) -> Callable:
    @gpu(duration=300)
    def represent(probe: str, probe_file: str, map_method: str, progress=gr.Progress()):  # noqa: B008
        """Per-layer silhouette and retrieval of the loaded original and merged VLMs."""

        budget = jobs.budget("representation analysis")

        def report(name: str, done: int, total: int) -> None:
            budget.check(done / max(1, total))  # per model: the first model's share projects
            progress((done, total), desc=f"{name}: {done}/{total} items", unit="items")

        try:
            items = load_items(ctx, probe, probe_file)
            models = _loaded(ctx)
            rep = rp.represent_models(models, items, probe=probe, progress=report)
            layer = len(rep.layers) // 2
            figure = rp.map_figure(rep, layer, map_method)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {view.status: err(ctx, exc)}
        languages = len({it.language for it in items})
        note = "" if MERGED in models else " No merged model yet: merge in the Merge tab."
        status = (
            f"✅ {len(items)} items ({languages} languages) through {', '.join(models)}, "
            f"{len(rep.layers)} layers (0 = embeddings); retrieval chance "
            f"{rep.to_json()['retrieval_chance']:.2f}.{note}"
        )
        out: dict[Any, Any] = {
            view.status: status,
            view.state: rep,
            view.curves: rp.curves_figure(rep),
            view.layer: gr.Slider(0, len(rep.layers) - 1, value=layer, step=1),
            view.map: figure,
        }
        return out

    return represent


def map_handler(ctx: AppContext, view: RepresentView) -> Callable:
    def redraw(rep: rp.Representations | None, layer: float, map_method: str) -> dict[Any, Any]:
        if rep is None:
            return {view.status: "Compute the representations first."}
        try:
            return {view.map: rp.map_figure(rep, int(layer), map_method)}
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            return {view.status: err(ctx, exc)}

    return redraw
