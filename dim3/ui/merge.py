"""The Merge tab: pick the checkpoints, a method and its options, check the plan, merge.

Layout and wiring only (the form is ``dim3.ui.form``, saving and pushing ``dim3.ui.share``,
progress ``dim3.ui.progress``). Handlers turn the form into a ``dim3.engine.Recipe`` and call the engine
(``plan``, ``merge_to_folder``) or the model manager (in-memory merge for the Chat tab, under
the manager's sharing policy); every exception is shown as a message, never raised into
Gradio's error page. Heavy events (merge, save, push) share one queue slot, so one runs at a
time per server and others wait in line, seeing their queue position.

Every public event has an API name and named parameters that default to the form's values
(``/plan``, ``/merge``, ``/save``, ``/push``); the form's own helpers are private. In a
showcase (``$DIM3_SHOWCASE``) the tab is read-only: it shows the recipe and its model card, and
has no merge, save or push.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from dim3 import engine
from dim3.presets import presets
from dim3.recipe import ROLES
from dim3.ui import jobs
from dim3.ui.common import AppContext, gpu, md_escape
from dim3.ui.fisher import data_free, with_fishers
from dim3.ui.form import MergeForm, MergeTab, build_form
from dim3.ui.progress import LOG_LINES, drive, err, ok, plain
from dim3.ui.reveal import succeeded
from dim3.ui.share import REPO_ID_CHARS, push_handler, save_handler

HEAVY = "dim3-heavy"  # the heavy jobs (merge, save, evaluate, sweep, analysis): one at a time
# Pushes, one at a time, in a queue of their own: an upload takes as long as the visitor's link
# to the Hub allows (their own token; no job budget can stop it halfway), and would hold the
# heavy slot, every other visitor's merge, for as long.
PUSH = "dim3-push"
PRIVATE = {"api_visibility": "private"}  # UI-only events: not part of the API


INTRO = (
    "Merge a **base** LLM, a **multilingual** fine-tune of it and a **VLM** built on the same "
    "base. The vision encoder and projector are copied; every language-model tensor becomes "
    "`base + w_mm·Δmm + w_ml·Δml`, with DiM3 choosing the weights per column from how much "
    "each update changed its magnitude and direction. One merge runs at a time on this "
    "server; others wait in line and see their place in the queue. The merged model is shared "
    "by everyone using this server: it is replaced only when a merge completes, and every open "
    "chat is told."
)
SHOWCASE_INTRO = (
    "**This Space is a showcase.** Its owner fixed the merge below; it was made when the "
    "server started and cannot be changed from here. Chat with it, evaluate it or analyse it "
    "in the other tabs. To merge your own, duplicate the Space or run `python app.py`."
)


def _layout(ctx: AppContext) -> tuple[MergeTab, dict[str, gr.Button]]:
    if ctx.showcase:
        return _showcase_layout(ctx), {}
    gr.Markdown(INTRO)
    form, note = build_form(ctx)
    with gr.Row():
        check = gr.Button("Check plan", variant="secondary", elem_id="dim3-check")
        merge = gr.Button("Merge", variant="primary", elem_id="dim3-merge")
    status = gr.Markdown("", elem_id="dim3-merge-status")
    weights = gr.Plot(
        visible=False, show_label=False, elem_id="dim3-merge-heatmap", elem_classes="dim3-figure"
    )
    plan_box, log_box = _plan_and_log()
    with gr.Accordion("Save to a folder and share on the Hub", open=False):
        with gr.Row():
            folder = gr.Textbox(
                label="Folder name (inside the server's output folder)",
                placeholder="my-dim3-merge",
                max_length=100,
                scale=3,
            )
            overwrite = gr.Checkbox(label="Overwrite", value=False, scale=1)
            save = gr.Button("Save to folder", scale=1)
        with gr.Row():
            repo = gr.Textbox(
                label="Hub repository",
                placeholder="your-name/dim3-merge",
                max_length=REPO_ID_CHARS,
                scale=2,
            )
            token = gr.Textbox(
                label="Hub token (write access; never stored or logged)",
                type="password",
                max_length=200,
                scale=2,
            )
            private = gr.Checkbox(label="Private", value=True, scale=1)
            push = gr.Button("Push to Hub", scale=1)
    saved = gr.State(None)  # str path of the last folder saved in this session
    tab = MergeTab(
        form, note, plan_box, log_box, status, folder, overwrite, repo, token, private, saved
    )
    tab.weights = weights
    return tab, {"check": check, "merge": merge, "save": save, "push": push}


def _plan_and_log(visible: bool = True) -> tuple[gr.Textbox, gr.Textbox]:
    with gr.Row(visible=visible):
        plan_box = gr.Textbox(
            label="Plan",
            lines=8,
            max_lines=16,
            interactive=False,
            min_width=320,  # stacked on a phone
            elem_id="dim3-plan",
        )
        log_box = gr.Textbox(
            label="Log",
            min_width=320,
            lines=8,
            max_lines=16,
            interactive=False,
            autoscroll=True,
            elem_id="dim3-log",
        )
    return plan_box, log_box


def _showcase_layout(ctx: AppContext) -> MergeTab:
    """Read-only: what is served, the recipe (JSON) and its model card, and the form greyed out
    (the Evaluate and Analysis tabs read their checkpoints from it)."""
    info = ctx.showcase
    assert info is not None
    gr.Markdown(SHOWCASE_INTRO, elem_id="dim3-showcase")
    status = gr.Markdown(
        f"Serving **{md_escape(info.label)}**, merged at {info.when()}.",
        elem_id="dim3-merge-status",
    )
    with gr.Row():
        gr.Code(
            ctx.public(json.dumps(info.recipe.to_dict(), indent=2, ensure_ascii=False)),
            language="json",
            label="Recipe (dim3_recipe.json)",
            interactive=False,
            elem_id="dim3-showcase-recipe",
        )
        with gr.Column():
            gr.Markdown(
                ctx.public(_without_front_matter(ctx.showcase_card)),
                elem_id="dim3-showcase-card",
                sanitize_html=True,
            )
    with gr.Accordion("The recipe as a form (read-only)", open=False):
        form, note = build_form(ctx)
    plan_box, log_box = _plan_and_log(visible=False)
    return MergeTab(form, note, plan_box, log_box, status)


def _without_front_matter(card: str) -> str:
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4 :].lstrip()
    return card


def build_merge_tab(ctx: AppContext) -> MergeTab:
    """Lay out the Merge tab inside the current Blocks and wire its events."""
    tab, buttons = _layout(ctx)
    form = tab.form
    form.preset.change(
        _on_preset(ctx, tab),
        inputs=form.preset,
        outputs=[
            *form.refs.values(),
            *form.revisions.values(),
            *form.extra_rows,
            form.experts_shown,
            tab.note,
        ],
        **PRIVATE,
    )
    form.method.change(
        _on_method(form), inputs=form.method, outputs=list(form.option_groups.values()), **PRIVATE
    )
    if not buttons:  # showcase: nothing to check, merge, save or push
        return tab
    buttons["check"].click(
        _check_plan(ctx, tab),
        inputs_kwargs=form.kwargs(),
        outputs=[tab.plan_box, tab.status],
        api_name="plan",
    )
    heavy = {"concurrency_limit": 1, "concurrency_id": HEAVY}
    buttons["merge"].click(
        _merge(ctx, tab),
        inputs_kwargs=form.kwargs(),
        outputs=[tab.plan_box, tab.log_box, tab.status],
        api_name="merge",
        **heavy,
    ).then(  # the heat map reads the trio again: in the heavy queue slot
        _weights(ctx), inputs=[tab.status], outputs=[tab.weights], **heavy, **PRIVATE
    )
    buttons["save"].click(
        save_handler(ctx, tab),
        inputs_kwargs=form.kwargs() | {"folder": tab.folder, "overwrite": tab.overwrite},
        outputs=[tab.log_box, tab.status, tab.saved],
        api_name="save",
        **heavy,
    )
    buttons["push"].click(
        push_handler(ctx, tab),
        inputs_kwargs={
            "repo_id": tab.repo,
            "token": tab.token,
            "private": tab.private,
            "saved": tab.saved,
        },
        outputs=[tab.status],
        api_name="push",
        concurrency_limit=1,
        concurrency_id=PUSH,
    )
    return tab


def _on_preset(ctx: AppContext, tab: MergeTab) -> Callable:
    def handler(key: str) -> dict:
        p = presets()[key]
        out: dict = {box: "" for box in [*tab.form.refs.values(), *tab.form.revisions.values()]}
        out |= {tab.form.refs[r]: ctx.manager.display_ref(getattr(p, r)) for r in ROLES}
        out |= {row: gr.Row(visible=False) for row in tab.form.extra_rows}
        out[tab.form.experts_shown] = 0
        return out | {tab.note: p.note}

    return handler


def _on_method(form: MergeForm) -> Callable:
    def handler(name: str) -> dict:
        return {g: gr.Group(visible=m == name) for m, g in form.option_groups.items()}

    return handler


def _check_plan(ctx: AppContext, tab: MergeTab) -> Callable:
    def plan(**values: Any) -> dict:
        """Check that the three checkpoints can be merged; returns the plan and a status line."""
        try:
            recipe = tab.form.recipe(
                data_free(values, tab.form.fixed is not None, tab.form)
            )  # the plan is the method's
            plan = engine.plan(recipe, allowed_roots=ctx.allowed_roots)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {tab.plan_box: ctx.public(plain(ctx, exc)), tab.status: err(ctx, exc)}
        s = plan.summary()
        return {
            tab.plan_box: ctx.public(plan.describe(recipe.dtype)),
            tab.status: ok(
                f"The three fit together: {s['merged']} tensors will be merged, "
                f"{s['copied']} copied. Press Merge."
            ),
        }

    return plan


def _merge(ctx: AppContext, tab: MergeTab) -> Callable:
    @gpu(duration=300)
    def merge(progress=gr.Progress(), **values: Any) -> Iterator[dict]:  # noqa: B008
        """Merge in memory and serve the result to every chat (when complete); streams the log."""
        log: list[str] = []
        out: dict = {}
        try:
            budget = jobs.budget("merge")
            recipe = tab.form.recipe(data_free(values, tab.form.fixed is not None, tab.form))
            # the trio's downloads first, sized together (a fisher merge's Fishers read them)
            yield from jobs.fetch(ctx, recipe, progress, log, tab.log_box, budget)
            recipe = yield from with_fishers(ctx, tab, recipe, values, budget, log)
            jobs.refuse_estimate(
                budget, recipe, [(recipe.method, recipe.options)], ctx.allowed_roots
            )
            shown = ctx.manager.display_ref(recipe.multimodal.ref)
            log.append(f"Recipe: {recipe.method} on {shown}; loading a staging copy of the VLM…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Loading the VLM and merging…"}
            yield from drive(
                lambda cb: ctx.manager.merge(recipe, progress=cb),
                progress,
                log,
                tab.log_box,
                out,
                budget,
            )
            merged, result = out["result"]
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            log.append(plain(ctx, exc))
            log.append("The models being served have not changed.")
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: err(ctx, exc)}
            return
        s = result.plan.summary()
        log.append(
            f"Done in {result.seconds:.1f} s; merged model on {merged.placement.describe()}."
        )
        log.append(ctx.manager.memory_note())
        yield {
            tab.plan_box: ctx.public(result.plan.describe(recipe.dtype)),
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.status: ok(
                f"Merged {s['merged']} tensors and copied {s['copied']} in "
                f"{result.seconds:.1f} s. Open the **Chat** tab to compare; every open chat "
                "now answers with this merge."
            ),
        }

    return merge


HEATMAP_BYTES = 2 * 10**9  # above this the heat map (a second read of the trio) is left to Analysis


def _weights(ctx: AppContext) -> Callable:
    computed: dict[int, list] = {}  # the served merge's version -> its rows (the latest only)
    lock = threading.Lock()

    def weights(status: str) -> Any:
        """After a merge: the heat map of the served merge's DiM3 weights per layer and module
        (hidden after a failed merge, another method's merge, or a trio above 2 GB, whose second
        read the Analysis tab offers). Computed once per served merge: the status comes from
        the page, so a caller could ask again and again, and each would read the trio anew."""
        served = ctx.manager.served()
        info = served.info
        if not succeeded(status) or info is None or info.recipe.method != "dim3":
            return gr.Plot(visible=False)
        size = (info.summary or {}).get("bytes") or (
            served.merged.placement.needed if served.merged else 0
        )
        if size > HEATMAP_BYTES:
            return gr.Plot(visible=False)
        from dim3 import diagnostics as dg

        with lock:
            rows = computed.get(served.version)
            if rows is None:
                try:
                    rows = dg.diagnose(info.recipe, allowed_roots=ctx.allowed_roots)
                except Exception:  # noqa: BLE001 - a picture is not worth failing a finished merge
                    rows = []
                computed.clear()
                computed[served.version] = rows
        return gr.Plot(dg.heatmap(rows), visible=True) if rows else gr.Plot(visible=False)

    return weights
