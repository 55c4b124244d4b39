"""The Merge tab: pick the checkpoints, a method and its options, check the plan, merge.

Layout and wiring only. Handlers turn the form into a ``dim3.engine.Recipe`` and call the engine
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

import dataclasses
import json
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
from dim3.paths import save_destination
from dim3.presets import presets
from dim3.recipe import DEVICES, DTYPES, ROLES
from dim3.ui.common import (
    MAX_REF_CHARS,
    AppContext,
    check_text,
    clock,
    error_text,
    gpu,
    md_escape,
    size,
)

HEAVY = "dim3-heavy"  # concurrency id shared by merge, save and push: one at a time per server
PRIVATE = {"api_visibility": "private"}  # UI-only events: not part of the API
LOG_LINES = 14
REPO_ID_CHARS = 96
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
    """The merge tab's input components, by role, and their API parameter names.

    ``fixed`` is the showcase's recipe: then the form only displays it and :meth:`recipe`
    returns it whatever the values say.
    """

    preset: gr.Dropdown
    refs: dict[str, gr.Textbox]
    revisions: dict[str, gr.Textbox]
    method: gr.Dropdown
    options: dict[tuple[str, str], gr.components.Component]  # (method, field) -> widget
    option_groups: dict[str, gr.Group]
    dtype: gr.Dropdown
    device: gr.Dropdown
    fixed: Recipe | None = None

    def inputs(self) -> set:
        """The form's components (for events that take a ``values`` dict keyed by component)."""
        return set(self.kwargs().values())

    def kwargs(self) -> dict[str, gr.components.Component]:
        """API parameter name -> component: ``base``, ``base_revision``, ..., ``method``,
        ``<method>_<option>``, ``dtype``, ``device`` (for ``inputs_kwargs``)."""
        out: dict[str, gr.components.Component] = {}
        for role in ROLES:
            out[role] = self.refs[role]
            out[f"{role}_revision"] = self.revisions[role]
        out["method"] = self.method
        out |= {f"{m}_{f}": w for (m, f), w in self.options.items()}
        return out | {"dtype": self.dtype, "device": self.device}

    def recipe(self, values: dict) -> Recipe:
        """The form's values (keyed by component or by API name) -> a validated ``Recipe``
        (``ValueError`` says what is wrong)."""
        if self.fixed is not None:
            return self.fixed
        names = self.kwargs()

        def get(name: str) -> Any:
            return values[name] if name in values else values[names[name]]

        method = get("method")
        if method not in METHODS:
            raise ValueError(
                f"unknown method {str(method)[:40]!r}; choose one of {', '.join(METHODS)}"
            )
        options = {f: get(f"{m}_{f}") for (m, f) in self.options if m == method}
        sources = {}
        for role in ROLES:
            ref = check_text(get(role), f"{ROLE_LABELS[role]} reference")
            if not ref:
                raise ValueError(f"the {ROLE_LABELS[role]} is empty: pick a preset or enter one")
            revision = check_text(get(f"{role}_revision"), f"{role} revision")
            sources[role] = Source(ref, revision or None)
        return Recipe(
            **sources, method=method, options=options, dtype=get("dtype"), device=get("device")
        )


def _option_widget(
    field: dataclasses.Field, value: Any, interactive: bool
) -> gr.components.Component:
    """A widget for one option from its metadata (help, min, max) and default's type.

    Numbers carry no browser-side bounds: the method's options check them on the server and
    name the option in the message (a bounded ``gr.Number`` would refuse with a toast that names
    no field)."""
    meta, default = field.metadata, field.default
    label, info = field.name.replace("_", " "), meta.get("help")
    lo, hi = meta.get("min"), meta.get("max")
    common = {"label": label, "info": info, "interactive": interactive}
    if isinstance(default, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(default, int) and (lo is None or hi is None or hi - lo > 1000):
        return gr.Number(value=value, precision=0, **common)
    if isinstance(default, (int, float)) and lo is not None and hi is not None:
        step = 1 if isinstance(default, int) else 0.01
        return gr.Slider(lo, hi, value=value, step=step, **common)
    if isinstance(default, (int, float)):
        return gr.Number(value=value, **common)
    return gr.Textbox(value=str(value), **common)


def _checkpoint_inputs(
    refs: dict[str, str], interactive: bool
) -> tuple[dict[str, gr.Textbox], dict[str, gr.Textbox]]:
    """One column per role: the checkpoint reference and its revision (role -> textbox)."""
    boxes, revisions = {}, {}
    with gr.Row(equal_height=True):
        for role in ROLES:
            with gr.Column(min_width=240):
                boxes[role] = gr.Textbox(
                    refs.get(role, ""),
                    label=ROLE_LABELS[role],
                    elem_id=f"dim3-ref-{role}",
                    info="Hub id (org/name) or a local folder under the allowed roots",
                    max_length=MAX_REF_CHARS,
                    interactive=interactive,
                )
                revisions[role] = gr.Textbox(
                    refs.get(f"{role}_revision", ""),
                    label="Revision (optional)",
                    placeholder="main, a tag or a commit",
                    elem_id=f"dim3-rev-{role}",
                    max_length=MAX_REF_CHARS,
                    interactive=interactive,
                )
    return boxes, revisions


def _form(ctx: AppContext) -> tuple[MergeForm, gr.Markdown]:
    table = presets()
    first = table[ctx.default_preset]
    fixed = ctx.showcase.recipe if ctx.showcase else None
    edit = fixed is None
    with gr.Row():
        preset = gr.Dropdown(
            [(p.title, k) for k, p in table.items()],
            value=first.key,
            label="Preset",
            scale=3,
            visible=edit,
        )
        dtype = gr.Dropdown(
            list(DTYPES),
            value=fixed.dtype if fixed else "auto",
            label="dtype",
            scale=1,
            info="auto: bf16 on GPU, fp32 on CPU (a saved folder keeps the VLM's dtype)",
            interactive=edit,
        )
        device = gr.Dropdown(
            list(DEVICES),
            value=fixed.device if fixed else "auto",
            label="Device",
            scale=1,
            info="auto: GPU when there is one",
            interactive=edit,
        )
    note = gr.Markdown(
        first.note if edit else "", elem_id="dim3-preset-note", elem_classes="dim3-status"
    )
    refs, revisions = _checkpoint_inputs(_form_refs(ctx, first, fixed), edit)
    method_name = fixed.method if fixed else "dim3"
    with gr.Row():
        method = gr.Dropdown(
            [(f"{m.name}: {m.summary}", m.name) for m in METHODS.values()],
            value=method_name,
            label="Method",
            scale=2,
            interactive=edit,
        )
    options, groups = {}, {}
    for name in METHODS:
        with gr.Group(visible=name == method_name) as group:
            for field in option_fields(name):
                value = field.default
                if fixed and name == fixed.method:
                    value = fixed.options.get(field.name, field.default)
                options[(name, field.name)] = _option_widget(field, value, edit)
        groups[name] = group
    form = MergeForm(preset, refs, revisions, method, options, groups, dtype, device, fixed)
    return form, note


def _form_refs(ctx: AppContext, preset: Any, fixed: Recipe | None) -> dict[str, str]:
    """The checkpoint fields' first values: the preset's (or the showcase's) references, local
    folders shown relative to the working directory rather than as absolute server paths."""
    if fixed is None:
        return {role: ctx.manager.display_ref(getattr(preset, role)) for role in ROLES}
    out = {}
    for role, src in fixed.sources().items():
        out[role] = ctx.manager.display_ref(src.ref)
        out[f"{role}_revision"] = src.revision or ""
    return out


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
    """The Merge tab's components: the form, its outputs and the save/push controls (None in
    a showcase)."""

    form: MergeForm
    note: gr.Markdown
    plan_box: gr.Textbox
    log_box: gr.Textbox
    status: gr.Markdown
    folder: gr.Textbox | None = None
    overwrite: gr.Checkbox | None = None
    repo: gr.Textbox | None = None
    token: gr.Textbox | None = None
    private: gr.Checkbox | None = None
    saved: gr.State | None = None


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
    form, note = _form(ctx)
    with gr.Row():
        check = gr.Button("Check plan", variant="secondary", elem_id="dim3-check")
        merge = gr.Button("Merge", variant="primary", elem_id="dim3-merge")
    status = gr.Markdown("", elem_id="dim3-merge-status")
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
    return tab, {"check": check, "merge": merge, "save": save, "push": push}


def _plan_and_log(visible: bool = True) -> tuple[gr.Textbox, gr.Textbox]:
    with gr.Row(visible=visible):
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
        form, note = _form(ctx)
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
        outputs=[*form.refs.values(), *form.revisions.values(), tab.note],
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
    )
    buttons["save"].click(
        _save(ctx, tab),
        inputs_kwargs=form.kwargs() | {"folder": tab.folder, "overwrite": tab.overwrite},
        outputs=[tab.log_box, tab.status, tab.saved],
        api_name="save",
        **heavy,
    )
    buttons["push"].click(
        _push(ctx, tab),
        inputs_kwargs={
            "repo_id": tab.repo,
            "token": tab.token,
            "private": tab.private,
            "saved": tab.saved,
        },
        outputs=[tab.status],
        api_name="push",
        **heavy,
    )
    return tab


def _ok(text: str) -> str:
    return f"✅ {text}"


def _err(ctx: AppContext, exc: BaseException) -> str:
    """An error for a Markdown status line: no server paths, escaped, cut to length."""
    return f"❌ {md_escape(error_text(exc, ctx.allowed_roots), None)}"


def _on_preset(ctx: AppContext, tab: MergeTab) -> Callable:
    def handler(key: str) -> dict:
        p = presets()[key]
        out: dict = {tab.form.refs[r]: ctx.manager.display_ref(getattr(p, r)) for r in ROLES}
        out |= {tab.form.revisions[r]: "" for r in ROLES}
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
            recipe = tab.form.recipe(values)
            plan = engine.plan(recipe, allowed_roots=ctx.allowed_roots)
        except Exception as exc:  # noqa: BLE001 - the UI boundary: shown, never raised
            return {tab.plan_box: ctx.public(_plain(ctx, exc)), tab.status: _err(ctx, exc)}
        s = plan.summary()
        return {
            tab.plan_box: ctx.public(plan.describe()),
            tab.status: _ok(
                f"The three fit together: {s['merged']} tensors will be merged, "
                f"{s['copied']} copied. Press Merge."
            ),
        }

    return plan


def _plain(ctx: AppContext, exc: BaseException) -> str:
    return f"❌ {error_text(exc, ctx.allowed_roots)}"


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
    def merge(progress=gr.Progress(), **values: Any) -> Iterator[dict]:  # noqa: B008
        """Merge in memory and serve the result to every chat (when complete); streams the log."""
        log: list[str] = []
        out: dict = {}
        try:
            recipe = tab.form.recipe(values)
            shown = ctx.manager.display_ref(recipe.multimodal.ref)
            log.append(f"Recipe: {recipe.method} on {shown}; loading a staging copy of the VLM…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Loading the VLM and merging…"}
            yield from _drive(
                lambda cb: ctx.manager.merge(recipe, progress=cb), progress, log, tab, out
            )
            merged, result = out["result"]
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            log.append(_plain(ctx, exc))
            log.append("The models being served have not changed.")
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: _err(ctx, exc)}
            return
        s = result.plan.summary()
        log.append(
            f"Done in {result.seconds:.1f} s; merged model on {merged.placement.describe()}."
        )
        log.append(ctx.manager.memory_note())
        yield {
            tab.plan_box: ctx.public(result.plan.describe()),
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.status: _ok(
                f"Merged {s['merged']} tensors and copied {s['copied']} in "
                f"{result.seconds:.1f} s. Open the **Chat** tab to compare; every open chat "
                "now answers with this merge."
            ),
        }

    return merge


def _save(ctx: AppContext, tab: MergeTab) -> Callable:
    @gpu(duration=300)
    def save(
        progress=gr.Progress(),  # noqa: B008
        folder: str = "",
        overwrite: bool = False,
        **values: Any,
    ) -> Iterator[dict]:
        """Merge to a new checkpoint folder inside the server's output folder."""
        log: list[str] = []
        out: dict = {}
        try:
            name = check_text(folder, "folder name", 100)
            dest = save_destination(ctx.output_root, name)
            recipe = tab.form.recipe(values)
            if dest.exists() and any(dest.iterdir()) and not overwrite:
                raise ValueError(
                    f"a folder named {name!r} already exists in the output folder; "
                    "choose another name or tick Overwrite"
                )
            ctx.output_root.mkdir(parents=True, exist_ok=True)
            log.append(f"Writing the {recipe.method} merge to {name} in the output folder…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Saving…"}
            yield from _drive(
                lambda cb: engine.merge_to_folder(
                    recipe,
                    save_destination(ctx.output_root, name),
                    overwrite=bool(overwrite),
                    progress=cb,
                    allowed_roots=ctx.allowed_roots,
                ),
                progress,
                log,
                tab,
                out,
            )
            result = out["result"]
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            log.append(_plain(ctx, exc))
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: _err(ctx, exc)}
            return
        log.append(f"Saved in {result.seconds:.1f} s.")
        yield {
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.saved: str(result.out_dir),
            tab.status: _ok(
                f"Saved as `{md_escape(name)}` in the output folder; it loads with "
                "`AutoModelForImageTextToText.from_pretrained`."
            ),
        }

    return save


def _push(ctx: AppContext, tab: MergeTab) -> Callable:
    def push(repo_id: str = "", token: str = "", private: bool = True, saved=None) -> dict:
        """Upload the folder saved last in this session to a Hub repository."""
        secret = (token or "").strip()
        try:
            repo = check_text(repo_id, "Hub repository", REPO_ID_CHARS)
            if not saved or not Path(saved).is_dir():
                raise ValueError("nothing to push yet: save the merge to a folder first")
            if not REPO_ID.match(repo):
                raise ValueError("the Hub repository must look like your-name/model-name")
            if not secret:
                raise ValueError(
                    "a Hub token with write access is needed to push; create one at "
                    "https://huggingface.co/settings/tokens"
                )
            url = upload(Path(saved), repo, secret, private=bool(private))
        except ValueError as exc:
            return {tab.status: _err(ctx, exc)}
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            text = ctx.public(hub_error_text(_without(exc, secret)))
            return {tab.status: f"❌ {md_escape(text, 600)}"}
        return {tab.status: _ok(f"Pushed to [{md_escape(repo)}]({url}).")}

    return push


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
