"""The Merge tab: pick three checkpoints, a method and its options, check the plan, merge.

Layout and wiring only. Handlers turn the form into a ``dim3.engine.Recipe`` and call the engine
(``plan``, ``merge_to_folder``) or the model manager (in-memory merge for the Chat tab); every
exception is shown as a message, never raised into Gradio's error page. Heavy events (merge, save,
push) share one queue slot, so one runs at a time per server and others wait in line, seeing
their queue position.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from dim3 import engine
from dim3.engine import Progress, Recipe, Source
from dim3.methods import METHODS, option_fields
from dim3.presets import presets
from dim3.recipe import DEVICES, DTYPES, ROLES
from dim3.ui.common import AppContext, clock, error_text, gpu, size

HEAVY = "dim3-heavy"  # concurrency id shared by merge, save and push: one at a time per server
LOG_LINES = 14
FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROLE_LABELS = {
    "base": "Base LLM",
    "multilingual": "Multilingual LLM (fine-tuned from the base)",
    "multimodal": "Multimodal VLM (its language model fine-tuned from the base)",
}


class _Aborted(Exception):
    """Raised from the progress callback when the browser went away; the engine stops cleanly."""


@dataclasses.dataclass
class MergeForm:
    """The merge tab's input components, by role."""

    preset: gr.Dropdown
    refs: dict[str, gr.Textbox]
    revisions: dict[str, gr.Textbox]
    method: gr.Dropdown
    options: dict[tuple[str, str], gr.components.Component]  # (method, field) -> widget
    option_groups: dict[str, gr.Group]
    dtype: gr.Dropdown
    device: gr.Dropdown

    def inputs(self) -> set:
        return {
            *self.refs.values(),
            *self.revisions.values(),
            self.method,
            *self.options.values(),
            self.dtype,
            self.device,
        }

    def recipe(self, values: dict) -> Recipe:
        """The form's values -> a validated ``Recipe`` (``ValueError`` says what is wrong)."""
        method = values[self.method]
        options = {f: values[w] for (m, f), w in self.options.items() if m == method}
        sources = {}
        for role in ROLES:
            ref = (values[self.refs[role]] or "").strip()
            if not ref:
                raise ValueError(f"the {ROLE_LABELS[role]} is empty: pick a preset or enter one")
            sources[role] = Source(ref, (values[self.revisions[role]] or "").strip() or None)
        return Recipe(
            **sources,
            method=method,
            options=options,
            dtype=values[self.dtype],
            device=values[self.device],
        )


def _option_widget(field: dataclasses.Field) -> gr.components.Component:
    """A widget for one option from its metadata (help, min, max) and default's type."""
    meta, default = field.metadata, field.default
    label, info = field.name.replace("_", " "), meta.get("help")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label, info=info)
    if isinstance(default, int) and (lo is None or hi is None or hi - lo > 1000):
        return gr.Number(value=default, label=label, info=info, precision=0, minimum=lo, maximum=hi)
    fine = isinstance(default, float) and default != round(default, 2)  # e.g. a learning rate
    if isinstance(default, (int, float)) and lo is not None and hi is not None and not fine:
        step = 1 if isinstance(default, int) else 0.01
        return gr.Slider(lo, hi, value=default, step=step, label=label, info=info)
    if isinstance(default, (int, float)):
        return gr.Number(value=default, label=label, info=info, minimum=lo, maximum=hi)
    return gr.Textbox(value=str(default), label=label, info=info)


def _form(ctx: AppContext) -> tuple[MergeForm, gr.Markdown]:
    table = presets()
    first = table[ctx.default_preset]
    with gr.Row():
        preset = gr.Dropdown(
            [(p.title, k) for k, p in table.items()], value=first.key, label="Preset", scale=3
        )
        dtype = gr.Dropdown(
            list(DTYPES),
            value="auto",
            label="dtype",
            scale=1,
            info="auto: bf16 on GPU, fp32 on CPU (a saved folder keeps the VLM's dtype)",
        )
        device = gr.Dropdown(
            list(DEVICES), value="auto", label="Device", scale=1, info="auto: GPU when there is one"
        )
    note = gr.Markdown(first.note, elem_id="dim3-preset-note", elem_classes="dim3-status")
    refs, revisions = {}, {}
    with gr.Row(equal_height=True):
        for role in ROLES:
            with gr.Column(min_width=240):
                refs[role] = gr.Textbox(
                    getattr(first, role),
                    label=ROLE_LABELS[role],
                    elem_id=f"dim3-ref-{role}",
                    info="Hub id (org/name) or a local folder under the allowed roots",
                )
                revisions[role] = gr.Textbox(
                    "",
                    label="Revision (optional)",
                    placeholder="main, a tag or a commit",
                    elem_id=f"dim3-rev-{role}",
                )
    with gr.Row():
        method = gr.Dropdown(
            [(f"{m.name}: {m.summary}", m.name) for m in METHODS.values()],
            value="dim3",
            label="Method",
            scale=2,
        )
    options, groups = {}, {}
    for name in METHODS:
        with gr.Group(visible=name == "dim3") as group:
            for field in option_fields(name):
                options[(name, field.name)] = _option_widget(field)
        groups[name] = group
    return MergeForm(preset, refs, revisions, method, options, groups, dtype, device), note


def _progress_line(p: Progress) -> str:
    return (
        f"{p.done}/{p.total} tensors · {size(p.bytes_done)} of {size(p.bytes_total)} · "
        f"ETA {clock(p.eta)}"
    )


def _run_with_progress(
    work: Callable[[Callable[[Progress], None]], Any],
    progress: gr.Progress,
    log: list[str],
) -> Iterator[str | tuple[str, Any]]:
    """Run ``work(callback)`` on a thread; yield the log text while it runs, then ("done", result).

    The engine's per-tensor callback feeds ``gr.Progress`` (bar, tensors done, ETA); if the
    browser goes away the generator is closed and the next callback aborts the merge.
    """
    events: queue.Queue[Progress] = queue.Queue()
    aborted = threading.Event()
    outcome: dict[str, Any] = {}

    def callback(p: Progress) -> None:
        if aborted.is_set():
            raise _Aborted("the merge was cancelled")
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
            except queue.Empty:
                continue
            progress((last.done, last.total), desc=_progress_line(last), unit="tensors")
            if time.monotonic() - shown > 1.0 or last.done == last.total:
                shown = time.monotonic()
                log.append(f"{_progress_line(last)} · {last.key}")
                yield "\n".join(log[-LOG_LINES:])
        thread.join()
    finally:
        aborted.set()
    if "error" in outcome:
        raise outcome["error"]
    yield ("done", outcome.get("result"))


@dataclasses.dataclass
class MergeTab:
    """The Merge tab's components: the form, its outputs and the save/push controls."""

    form: MergeForm
    note: gr.Markdown
    plan_box: gr.Textbox
    log_box: gr.Textbox
    status: gr.Markdown
    folder: gr.Textbox
    overwrite: gr.Checkbox
    repo: gr.Textbox
    token: gr.Textbox
    private: gr.Checkbox
    saved: gr.State


def _layout(ctx: AppContext) -> tuple[MergeTab, dict[str, gr.Button]]:
    gr.Markdown(
        "Merge a **base** LLM, a **multilingual** fine-tune of it and a **VLM** built on the same "
        "base. The vision encoder and projector are copied; every language-model tensor becomes "
        "`base + w_mm·Δmm + w_ml·Δml`, with DiM3 choosing the weights per column from how much "
        "each update changed its magnitude and direction. One merge runs at a time on this "
        "server; others wait in line and see their place in the queue."
    )
    form, note = _form(ctx)
    with gr.Row():
        check = gr.Button("Check plan", variant="secondary", elem_id="dim3-check")
        merge = gr.Button("Merge", variant="primary", elem_id="dim3-merge")
    status = gr.Markdown("", elem_id="dim3-merge-status")
    with gr.Row():
        plan_box = gr.Textbox(
            label="Plan", lines=8, max_lines=16, interactive=False, elem_id="dim3-plan"
        )
        log_box = gr.Textbox(
            label="Log",
            lines=8,
            max_lines=16,
            interactive=False,
            autoscroll=True,
            elem_id="dim3-log",
        )
    with gr.Accordion("Save to a folder and share on the Hub", open=False):
        with gr.Row():
            folder = gr.Textbox(
                label=f"Folder name (under {ctx.output_root})", placeholder="my-dim3-merge", scale=3
            )
            overwrite = gr.Checkbox(label="Overwrite", value=False, scale=1)
            save = gr.Button("Save to folder", scale=1)
        with gr.Row():
            repo = gr.Textbox(label="Hub repository", placeholder="your-name/dim3-merge", scale=2)
            token = gr.Textbox(
                label="Hub token (write access; never stored or logged)", type="password", scale=2
            )
            private = gr.Checkbox(label="Private", value=True, scale=1)
            push = gr.Button("Push to Hub", scale=1)
    saved = gr.State(None)  # str path of the last folder saved in this session
    tab = MergeTab(
        form, note, plan_box, log_box, status, folder, overwrite, repo, token, private, saved
    )
    return tab, {"check": check, "merge": merge, "save": save, "push": push}


def build_merge_tab(ctx: AppContext) -> MergeTab:
    """Lay out the Merge tab inside the current Blocks and wire its events."""
    tab, buttons = _layout(ctx)
    form = tab.form
    form.preset.change(
        _on_preset(tab),
        inputs=form.preset,
        outputs=[*form.refs.values(), *form.revisions.values(), tab.note],
    )
    form.method.change(
        _on_method(form), inputs=form.method, outputs=list(form.option_groups.values())
    )
    buttons["check"].click(
        _check_plan(ctx, tab), inputs=form.inputs(), outputs=[tab.plan_box, tab.status]
    )
    heavy = {"concurrency_limit": 1, "concurrency_id": HEAVY}
    buttons["merge"].click(
        _merge(ctx, tab),
        inputs=form.inputs(),
        outputs=[tab.plan_box, tab.log_box, tab.status],
        **heavy,
    )
    buttons["save"].click(
        _save(ctx, tab),
        inputs=form.inputs() | {tab.folder, tab.overwrite},
        outputs=[tab.log_box, tab.status, tab.saved],
        **heavy,
    )
    buttons["push"].click(
        _push(tab),
        inputs={tab.repo, tab.token, tab.private, tab.saved},
        outputs=[tab.status],
        **heavy,
    )
    return tab


def _ok(text: str) -> str:
    return f"✅ {text}"


def _err(exc: BaseException) -> str:
    return f"❌ {error_text(exc)}"


def _on_preset(tab: MergeTab) -> Callable:
    def handler(key: str) -> dict:
        p = presets()[key]
        out: dict = {tab.form.refs[r]: getattr(p, r) for r in ROLES}
        out |= {tab.form.revisions[r]: "" for r in ROLES}
        return out | {tab.note: p.note}

    return handler


def _on_method(form: MergeForm) -> Callable:
    def handler(name: str) -> dict:
        return {g: gr.Group(visible=m == name) for m, g in form.option_groups.items()}

    return handler


def _check_plan(ctx: AppContext, tab: MergeTab) -> Callable:
    def handler(values: dict) -> dict:
        try:
            recipe = tab.form.recipe(values)
            plan = engine.plan(recipe, allowed_roots=ctx.allowed_roots)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {tab.plan_box: _err(exc), tab.status: _err(exc)}
        s = plan.summary()
        return {
            tab.plan_box: plan.describe(),
            tab.status: _ok(
                f"The three fit together: {s['merged']} tensors will be merged, "
                f"{s['copied']} copied. Press Merge."
            ),
        }

    return handler


def _drive(
    work: Callable, progress: gr.Progress, log: list[str], tab: MergeTab, out: dict
) -> Iterator[dict]:
    """Run ``work`` with live progress, yielding log updates; its result lands in ``out``."""
    for item in _run_with_progress(work, progress, log):
        if isinstance(item, tuple):
            out["result"] = item[1]
        else:
            yield {tab.log_box: item}


def _merge(ctx: AppContext, tab: MergeTab) -> Callable:
    @gpu(duration=300)
    def handler(values: dict, progress=gr.Progress()) -> Iterator[dict]:  # noqa: B008
        log: list[str] = []
        out: dict = {}
        try:
            recipe = tab.form.recipe(values)
            log.append(f"Recipe: {recipe.method} on {recipe.multimodal}; loading the VLM…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Loading the VLM and merging…"}
            yield from _drive(
                lambda cb: ctx.manager.merge(recipe, progress=cb), progress, log, tab, out
            )
            merged, result = out["result"]
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            log.append(_err(exc))
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: _err(exc)}
            return
        s = result.plan.summary()
        log.append(
            f"Done in {result.seconds:.1f} s; merged model on {merged.placement.describe()}."
        )
        yield {
            tab.plan_box: result.plan.describe(),
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.status: _ok(
                f"Merged {s['merged']} tensors and copied {s['copied']} in "
                f"{result.seconds:.1f} s. Open the **Chat** tab to compare."
            ),
        }

    return handler


def _save(ctx: AppContext, tab: MergeTab) -> Callable:
    @gpu(duration=300)
    def handler(values: dict, progress=gr.Progress()) -> Iterator[dict]:  # noqa: B008
        log: list[str] = []
        out: dict = {}
        try:
            name = (values[tab.folder] or "").strip()
            if not FOLDER_NAME.match(name):
                raise ValueError(
                    "the folder name must be a simple name (letters, digits, . _ -), "
                    f"not a path; it is created under {ctx.output_root}"
                )
            recipe = tab.form.recipe(values)
            dest = ctx.output_root / name
            overwrite = bool(values[tab.overwrite])
            if dest.exists() and any(dest.iterdir()) and not overwrite:
                raise ValueError(
                    f"a folder named {name!r} already exists in {ctx.output_root}; "
                    "choose another name or tick Overwrite"
                )
            ctx.output_root.mkdir(parents=True, exist_ok=True)
            log.append(f"Writing the {recipe.method} merge to {dest}…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Saving…"}
            yield from _drive(
                lambda cb: engine.merge_to_folder(
                    recipe, dest, overwrite=overwrite, progress=cb, allowed_roots=ctx.allowed_roots
                ),
                progress,
                log,
                tab,
                out,
            )
            result = out["result"]
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            log.append(_err(exc))
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: _err(exc)}
            return
        log.append(f"Saved in {result.seconds:.1f} s.")
        yield {
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.saved: str(result.out_dir),
            tab.status: _ok(
                f"Saved to `{result.out_dir}`; it loads with "
                "`AutoModelForImageTextToText.from_pretrained`."
            ),
        }

    return handler


def _push(tab: MergeTab) -> Callable:
    def handler(values: dict) -> dict:
        secret = (values[tab.token] or "").strip()
        try:
            folder, repo_id = values[tab.saved], (values[tab.repo] or "").strip()
            if not folder or not Path(folder).is_dir():
                raise ValueError("nothing to push yet: save the merge to a folder first")
            if not REPO_ID.match(repo_id):
                raise ValueError("the Hub repository must look like your-name/model-name")
            if not secret:
                raise ValueError(
                    "a Hub token with write access is needed to push; create one at "
                    "https://huggingface.co/settings/tokens"
                )
            url = upload(Path(folder), repo_id, secret, private=bool(values[tab.private]))
        except ValueError as exc:
            return {tab.status: _err(exc)}
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            return {tab.status: f"❌ {hub_error_text(_without(exc, secret))}"}
        return {tab.status: _ok(f"Pushed to [{repo_id}]({url}).")}

    return handler


def upload(folder: Path, repo_id: str, token: str, *, private: bool) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the repo URL."""
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, commit_message="Upload DiM3 merge"
    )
    return str(url)


def hub_error_text(exc: BaseException) -> str:
    """Why a push to the Hub failed, in plain words."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"the Hub refused the token (HTTP {status}): use a token with write access to that "
            "repository"
        )
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
        return "cannot reach the Hugging Face Hub (no network?); try again when online"
    return f"the push failed ({name}): {exc}"


def _without(exc: BaseException, secret: str | None) -> BaseException:
    """The exception, with the token blanked out of its message should it appear there."""
    if secret and secret.strip() and secret.strip() in str(exc):
        return RuntimeError(str(exc).replace(secret.strip(), "***"))
    return exc
