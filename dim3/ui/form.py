"""The merge form: checkpoint references, method, options, dtype and device, as components.

Layout only: ``build_form`` lays the form out (read-only with a showcase's recipe) and returns a
:class:`MergeForm`, which names every input for the API (``kwargs``) and turns values into a
validated ``Recipe``; :class:`MergeTab` holds it with the tab's other components, for the
handlers of the Merge tab and of the tabs that merge with its form. The checkpoint inputs are built in one function, ``checkpoint_inputs``:
one row per role, plus up to ``MAX_EXPERTS - 1`` more multilingual rows (language experts) that
"Add a multilingual model" shows and "Remove" hides and clears.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from dim3.engine import Recipe, Source
from dim3.methods import METHODS, option_fields
from dim3.presets import presets
from dim3.recipe import DEVICES, DTYPES, ROLES
from dim3.ui.common import MAX_REF_CHARS, AppContext, check_text

# one-line labels (at 1400 px), so that the three boxes stay in line
ROLE_LABELS = {
    "base": "Base LLM",
    "multilingual": "Multilingual LLM (from the base)",
    "multimodal": "Multimodal VLM (from the base)",
}
MAX_EXPERTS = 4  # multilingual models the form offers (the engine takes any number)
EXTRA_ROLES = tuple(f"multilingual_{i}" for i in range(2, MAX_EXPERTS + 1))
ROLE_LABELS |= {r: f"Multilingual LLM {r.rsplit('_', 1)[1]} (another expert)" for r in EXTRA_ROLES}
FIELDS = (*ROLES, *EXTRA_ROLES)  # every checkpoint field, in API order


@dataclasses.dataclass
class MergeForm:
    """The merge tab's input components, by role, and their API parameter names.

    ``fixed`` is the showcase's recipe: then the form only displays it and :meth:`recipe`
    returns it whatever the values say.
    """

    preset: gr.Dropdown
    refs: dict[str, gr.Textbox]  # base, multilingual, multimodal, multilingual_2, ...
    revisions: dict[str, gr.Textbox]
    extra_rows: list[gr.Row]  # the rows of multilingual_2, ... (hidden until added)
    experts_shown: gr.State  # how many extra rows are shown
    method: gr.Dropdown
    options: dict[tuple[str, str], gr.components.Component]  # (method, field) -> widget
    option_groups: dict[str, gr.Group]
    dtype: gr.Dropdown
    device: gr.Dropdown
    fixed: Recipe | None = None
    # the Fisher method's estimation inputs: data source, examples per model, labels
    fisher: dict[str, gr.components.Component] = dataclasses.field(default_factory=dict)

    def inputs(self) -> set:
        """The form's components (for events that take a ``values`` dict keyed by component)."""
        return set(self.kwargs().values())

    def kwargs(self) -> dict[str, gr.components.Component]:
        """API parameter name -> component: ``base``, ``base_revision``, ..., ``multilingual_2``
        (optional experts), ..., ``method``, ``<method>_<option>``, ``dtype``, ``device``."""
        out: dict[str, gr.components.Component] = {}
        for role in FIELDS:
            out[role] = self.refs[role]
            out[f"{role}_revision"] = self.revisions[role]
        out["method"] = self.method
        out |= {f"{m}_{f}": w for (m, f), w in self.options.items()}
        out |= {f"fisher_{k}": w for k, w in self.fisher.items()}
        return out | {"dtype": self.dtype, "device": self.device}

    def options_for(self, values: dict, method: str) -> dict[str, Any]:
        """``method``'s options as the form holds them (its widgets, keyed by component or by
        API name), whichever method is selected."""
        names = self.kwargs()
        return {
            f: values[f"{m}_{f}"] if f"{m}_{f}" in values else values[names[f"{m}_{f}"]]
            for (m, f) in self.options
            if m == method
        }

    def recipe(self, values: dict, fisher: dict[str, str] | None = None) -> Recipe:
        """The form's values (keyed by component or by API name) -> a validated ``Recipe``
        (``ValueError`` says what is wrong). ``fisher``: the Fisher folders of a fisher merge."""
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
        options = self.options_for(values, method)
        sources: dict[str, Any] = {}
        for role in FIELDS:
            ref = check_text(get(role), f"{ROLE_LABELS[role]} reference")
            revision = check_text(get(f"{role}_revision"), f"{role} revision")
            if ref:
                sources[role] = Source(ref, revision or None)
            elif role in ROLES:
                raise ValueError(f"the {ROLE_LABELS[role]} is empty: pick a preset or enter one")
        experts = [sources.pop(r) for r in ("multilingual", *EXTRA_ROLES) if r in sources]
        return Recipe(
            **sources,
            multilingual=tuple(experts),
            method=method,
            options=options,
            dtype=get("dtype"),
            device=get("device"),
            fisher=fisher or {},
        )


def option_widget(
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
    if meta.get("choices"):  # a named choice (e.g. an SVD's kind): a menu of the names
        return gr.Dropdown(list(meta["choices"]), value=value, **common)
    if isinstance(default, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(default, int) and (lo is None or hi is None or hi - lo > 1000):
        return gr.Number(value=value, precision=0, **common)
    fine = isinstance(default, float) and default != round(default, 2)  # e.g. a learning rate
    if isinstance(default, (int, float)) and lo is not None and hi is not None and not fine:
        step = 1 if isinstance(default, int) else 0.01
        return gr.Slider(lo, hi, value=value, step=step, **common)
    if isinstance(default, (int, float)):
        return gr.Number(value=value, **common)
    return gr.Textbox(value=str(value), **common)


FISHER_NOTE = (
    "Merge first estimates the diagonal Fisher of the VLM and of each multilingual model on N "
    "examples of the data (one forward and backward pass per example; sampled labels add a "
    "forward pass per sampled token), then merges. The log shows the time per example and the "
    "time left once the first example of each model is done; on this app's CPU the demo models "
    "take about 0.2–2 s per example. Fishers are kept and reused for the same model, data, N and "
    "labels. `python -m dim3 fisher` estimates them outside the app."
)


def fisher_inputs(interactive: bool) -> dict[str, gr.components.Component]:
    """The Fisher method's estimation inputs (shown in its options group), with a note."""
    gr.Markdown(FISHER_NOTE)
    return {
        "data": gr.Textbox(
            "demo",
            label="Fisher data",
            info="demo (demo-world scenes the probe never shows), demo-text, demo-probe, or a "
            "probe JSONL file under the allowed folders",
            max_length=MAX_REF_CHARS,
            interactive=interactive,
        ),
        "n": gr.Slider(
            4, 512, value=32, step=4, label="Examples per model (N)", interactive=interactive
        ),
        "labels": gr.Dropdown(
            ["given", "sampled"],
            value="given",
            label="Labels",
            info="given: the data's answers (empirical Fisher); sampled: the model's own (paper)",
            interactive=interactive,
        ),
    }


def _ref_pair(role: str, refs: dict[str, str], interactive: bool) -> tuple[gr.Textbox, gr.Textbox]:
    box = gr.Textbox(
        refs.get(role, ""),
        label=ROLE_LABELS[role],
        elem_id=f"dim3-ref-{role}",
        info="Hub id (org/name) or a local folder under the allowed roots",
        max_length=MAX_REF_CHARS,
        interactive=interactive,
    )
    revision = gr.Textbox(
        refs.get(f"{role}_revision", ""),
        label="Revision (optional)",
        placeholder="main, a tag or a commit",
        elem_id=f"dim3-rev-{role}",
        max_length=MAX_REF_CHARS,
        interactive=interactive,
    )
    return box, revision


def checkpoint_inputs(
    refs: dict[str, str], interactive: bool
) -> tuple[dict[str, gr.Textbox], dict[str, gr.Textbox], list[gr.Row], gr.State]:
    """One column per role (reference and revision), then the extra multilingual rows, shown
    when ``refs`` has a value for them; with buttons to add and remove such rows."""
    boxes, revisions, rows = {}, {}, []
    with gr.Row(equal_height=True):
        for role in ROLES:
            with gr.Column(min_width=240):
                boxes[role], revisions[role] = _ref_pair(role, refs, interactive)
    for role in EXTRA_ROLES:
        with gr.Row(equal_height=True, visible=bool(refs.get(role))) as row:
            boxes[role], revisions[role] = _ref_pair(role, refs, interactive)
        rows.append(row)
    with gr.Row(visible=interactive):
        add = gr.Button("Add a multilingual model", size="sm", elem_id="dim3-add-expert")
        remove = gr.Button("Remove the last one", size="sm", elem_id="dim3-remove-expert")
    shown = gr.State(sum(bool(refs.get(r)) for r in EXTRA_ROLES))
    extra = [boxes[r] for r in EXTRA_ROLES] + [revisions[r] for r in EXTRA_ROLES]

    def change(n: int, step: int) -> list:
        n = min(max(n + step, 0), len(EXTRA_ROLES))
        visible = [gr.Row(visible=i < n) for i in range(len(EXTRA_ROLES))]
        keep = [gr.skip() if i < n else "" for i in range(len(EXTRA_ROLES))]  # removed: cleared
        return [n, *visible, *keep, *keep]

    for button, step in ((add, 1), (remove, -1)):
        button.click(
            lambda n, step=step: change(n, step),
            inputs=[shown],
            outputs=[shown, *rows, *extra],
            api_visibility="private",
        )
    return boxes, revisions, rows, shown


def build_form(ctx: AppContext) -> tuple[MergeForm, gr.Markdown]:
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
            min_width=300,  # a line of its own on a phone, not squeezed beside dtype
            visible=edit,
        )
        dtype = gr.Dropdown(
            list(DTYPES),
            value=fixed.dtype if fixed else "auto",
            label="dtype",
            scale=1,
            info="auto: bf16 on GPU, fp32 on CPU",  # one line, like Device's: boxes in line
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
    refs, revisions, extra_rows, shown = checkpoint_inputs(form_refs(ctx, first, fixed), edit)
    method_name = fixed.method if fixed else "dim3"
    with gr.Row():
        method = gr.Dropdown(
            [(f"{m.name}: {m.summary}", m.name) for m in METHODS.values()],
            value=method_name,
            label="Method",
            scale=2,
            interactive=edit,
        )
    options, groups, fisher = {}, {}, {}
    for name in METHODS:
        with gr.Group(visible=name == method_name) as group:
            for field in option_fields(name):
                value = field.default
                if fixed and name == fixed.method:
                    value = fixed.options.get(field.name, field.default)
                options[(name, field.name)] = option_widget(field, value, edit)
            if name == "fisher":
                fisher = fisher_inputs(edit)
        groups[name] = group
    form = MergeForm(
        preset, refs, revisions, extra_rows, shown, method, options, groups, dtype, device, fixed
    )
    form.fisher = fisher
    return form, note


def form_refs(ctx: AppContext, preset: Any, fixed: Recipe | None) -> dict[str, str]:
    """The checkpoint fields' first values: the preset's (or the showcase's) references, local
    folders shown relative to the working directory rather than as absolute server paths."""
    if fixed is None:
        return {role: ctx.manager.display_ref(getattr(preset, role)) for role in ROLES}
    out = {}
    fields = ("multilingual", *EXTRA_ROLES)
    named = {"base": fixed.base, **dict(zip(fields, fixed.multilingual, strict=False))}
    for role, src in (named | {"multimodal": fixed.multimodal}).items():
        out[role] = ctx.manager.display_ref(src.ref)
        out[f"{role}_revision"] = src.revision or ""
    return out


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
    weights: gr.Plot | None = None  # DiM3's weights as a heat map, after a DiM3 merge
