"""Residual geometry of a trio, per layer and module: the paper's Figure 1 and DiM3's own weights.

For every language-model tensor that a merge would merge, streamed one trio at a time through the
engine's plan (the same tensors, rows and transposes the rule sees, so memory stays that of the
merge), it measures:

With several multilingual models (language experts) there is one row per tensor and multilingual
update (``update``: ``multilingual_1``, ``multilingual_2``, ...): its ``ml_*`` figures are that
update's, DiM3's weights are computed over all N+1 updates as the merge does.

- ``mm_norm`` / ``ml_norm``: ‖Δ‖ / ‖base‖ (Frobenius) of the multimodal and multilingual updates;
- ``mm_reorientation`` / ``ml_reorientation``: mean over columns of 1 − cos(tuned column, base
  column) (a 1-D tensor counts as one column);
- ``cross_alignment``: cos(Δml, Δmm) over the flattened tensor;
- ``dim3_*_weight``: the mean weight DiM3 gives each update, and ``dim3_*_calibrated_magnitude`` /
  ``_direction``: the share of columns where that score was replaced by the calibration value.

Undefined values (a zero base or a zero update) are NaN. Rows come from :func:`iter_diagnostics`
(or :func:`diagnose` for a recipe); :func:`to_csv`, :func:`summarize`, :func:`long_table` and
:func:`plot` turn them into a CSV, a per-module table, plot data and PNG line plots over layers (one
line per module type). The ``diagnose`` CLI subcommand writes all of them. This module knows the
plan and the DiM3 rule; it writes no checkpoint and imports no UI.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dim3.engine import Inputs, Progress, open_inputs, resolve_device
from dim3.layout import layout_for
from dim3.methods.dim3 import EPS, DiM3Options, dim3_weights
from dim3.plan import Entry, MergePlan, build_plan
from dim3.recipe import Recipe, multilingual_labels

CSV_FILE = "diagnostics.csv"
SUMMARY_FILE = "diagnostics_by_module.csv"

# metric -> label for plots and tables
METRICS: dict[str, str] = {
    "mm_norm": "‖Δmm‖ / ‖base‖",
    "ml_norm": "‖Δml‖ / ‖base‖",
    "mm_reorientation": "multimodal: mean 1 − cos(col, base col)",
    "ml_reorientation": "multilingual: mean 1 − cos(col, base col)",
    "cross_alignment": "cos(Δml, Δmm)",
    "dim3_mm_weight": "DiM3 mean weight of Δmm",
    "dim3_ml_weight": "DiM3 mean weight of Δml",
    "dim3_mm_calibrated_magnitude": "multimodal: share calibrated (magnitude)",
    "dim3_ml_calibrated_magnitude": "multilingual: share calibrated (magnitude)",
    "dim3_mm_calibrated_direction": "multimodal: share calibrated (direction)",
    "dim3_ml_calibrated_direction": "multilingual: share calibrated (direction)",
}

# figure name -> (title, metrics); one PNG each from the CLI
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "residual_norms": ("Residual norm relative to the base", ("mm_norm", "ml_norm")),
    "reorientation": (
        "Base-relative reorientation",
        ("mm_reorientation", "ml_reorientation"),
    ),
    "cross_alignment": ("Cross-residual alignment", ("cross_alignment",)),
    "dim3_weights": ("DiM3: mean weight of each update", ("dim3_mm_weight", "dim3_ml_weight")),
    "dim3_calibrated": (
        "DiM3: share of calibrated columns",
        (
            "dim3_mm_calibrated_magnitude",
            "dim3_ml_calibrated_magnitude",
            "dim3_mm_calibrated_direction",
            "dim3_ml_calibrated_direction",
        ),
    ),
}

# metric -> (panel title, y-axis title), in words, for the figures
AXES: dict[str, tuple[str, str]] = {
    "mm_norm": ("Size of the multimodal update", "‖Δmm‖ / ‖base‖"),
    "ml_norm": ("Size of the multilingual update", "‖Δml‖ / ‖base‖"),
    "mm_reorientation": ("How far Δmm turns the base's columns", "mean 1 − cos(column, base)"),
    "ml_reorientation": ("How far Δml turns the base's columns", "mean 1 − cos(column, base)"),
    "cross_alignment": ("Do the two updates point the same way?", "cos(Δml, Δmm)"),
    "dim3_mm_weight": ("DiM3's weight of the multimodal update", "mean weight"),
    "dim3_ml_weight": ("DiM3's weight of the multilingual update", "mean weight"),
    "dim3_mm_calibrated_magnitude": ("Multimodal: columns calibrated by magnitude", "share"),
    "dim3_ml_calibrated_magnitude": ("Multilingual: columns calibrated by magnitude", "share"),
    "dim3_mm_calibrated_direction": ("Multimodal: columns calibrated by direction", "share"),
    "dim3_ml_calibrated_direction": ("Multilingual: columns calibrated by direction", "share"),
}
HEATMAP_FILE = "dim3_weights_heatmap.png"

GROUPS = ("attention", "mlp", "norm", "embedding", "other")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class DiagnosticRow:
    """The diagnostics of one language-model tensor (see the module docstring for each metric).

    key: the VLM tensor's name; name: its canonical LLM name; layer: decoder layer index (None for
    embeddings, the final norm and the head); module: e.g. ``q_proj``, ``q_proj.bias``,
    ``input_layernorm``, ``embed_tokens``; group: attention, mlp, norm, embedding or other;
    shape: the tensor as the rule sees it (shared rows only, token embeddings transposed);
    columns: its number of columns (elements for 1-D tensors).
    """

    key: str
    name: str
    layer: int | None
    module: str
    group: str
    shape: tuple[int, ...]
    columns: int
    base_norm: float
    mm_norm: float
    ml_norm: float
    mm_reorientation: float
    ml_reorientation: float
    cross_alignment: float
    dim3_mm_weight: float
    dim3_ml_weight: float
    dim3_mm_calibrated_magnitude: float
    dim3_ml_calibrated_magnitude: float
    dim3_mm_calibrated_direction: float
    dim3_ml_calibrated_direction: float
    update: str = "multilingual"  # which multilingual model the ml_* figures describe


# ---------------------------------------------------------------------------- naming


def describe_name(name: str) -> tuple[int | None, str, str]:
    """(layer, module label, group) of a canonical LLM tensor name.

    ``model.layers.3.self_attn.q_proj.weight`` -> (3, "q_proj", "attention");
    ``model.layers.3.self_attn.q_proj.bias`` -> (3, "q_proj.bias", "attention");
    ``model.embed_tokens.weight`` -> (None, "embed_tokens", "embedding").
    """
    match = LAYER.search(name)
    layer = int(match.group(1)) if match else None
    parts = name.split(".")
    param, module = parts[-1], parts[-2] if len(parts) > 1 else parts[-1]
    label = module if param == "weight" else f"{module}.{param}"
    parents = ".".join(parts[:-2])
    if module in ("embed_tokens", "lm_head", "wte", "wpe"):
        group = "embedding"
    elif "norm" in module:
        group = "norm"
    elif "attn" in parents or "attention" in parents:
        group = "attention"
    elif "mlp" in parents or "feed_forward" in parents:
        group = "mlp"
    else:
        group = "other"
    return layer, label, group


# ---------------------------------------------------------------------------- measurements


def _ratio(num: Tensor, den: Tensor) -> float:
    den_f = float(den)
    return float(num) / den_f if den_f > 0 else math.nan


def _cosine(a: Tensor, b: Tensor) -> float:
    """cos of two flattened tensors; NaN when either is zero."""
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    return float((a.reshape(-1) @ b.reshape(-1)) / (na * nb))


def reorientation(base: Tensor, tuned: Tensor) -> float:
    """Mean over columns of ``1 − cos(tuned column, base column)``; a 1-D tensor is one column.

    base, tuned (out, in) or (n,). Cosines use DiM3's convention ``d = col / (‖col‖ + 1e-8)``,
    so a zero column counts as fully reoriented (cos 0).
    """
    b = base.reshape(-1, 1) if base.dim() < 2 else base.reshape(base.shape[0], -1)
    t = tuned.reshape(-1, 1) if tuned.dim() < 2 else tuned.reshape(tuned.shape[0], -1)
    m_b, m_t = torch.linalg.vector_norm(b, dim=0), torch.linalg.vector_norm(t, dim=0)  # (in,)
    cos = (t * b).sum(dim=0) / ((m_t + EPS) * (m_b + EPS))  # (in,)
    return float((1.0 - cos).clamp(0.0, 2.0).mean())  # clamp: rounding can put cos past ±1


def measure(
    base: Tensor,
    mm: Tensor,
    ml: Tensor,
    options: DiM3Options,
    others: Sequence[Tensor] = (),
) -> dict[str, float | int]:
    """All metrics of one trio shaped as the rule sees it: base, mm, ml (out, in) or (n,).

    ``others``: further multilingual tensors merged alongside ``ml``; DiM3's weights are then
    computed over all updates ``[mm, ml, *others]``, as the merge computes them.
    """
    w = dim3_weights(base, [mm, ml, *others], options)  # weights (T, columns)
    out: dict[str, float | int] = {
        "columns": int(w.weights.shape[1]),
        "base_norm": float(torch.linalg.vector_norm(base)),
        "mm_reorientation": reorientation(base, mm),
        "ml_reorientation": reorientation(base, ml),
        "dim3_mm_weight": float(w.weights[0].mean()),
        "dim3_ml_weight": float(w.weights[1].mean()),
        "dim3_mm_calibrated_magnitude": float(w.magnitude_calibrated[0].float().mean()),
        "dim3_ml_calibrated_magnitude": float(w.magnitude_calibrated[1].float().mean()),
        "dim3_mm_calibrated_direction": float(w.direction_calibrated[0].float().mean()),
        "dim3_ml_calibrated_direction": float(w.direction_calibrated[1].float().mean()),
    }
    del w
    base_norm = torch.tensor(out["base_norm"])
    d_mm = mm - base
    out["mm_norm"] = _ratio(torch.linalg.vector_norm(d_mm), base_norm)
    d_ml = ml - base
    out["ml_norm"] = _ratio(torch.linalg.vector_norm(d_ml), base_norm)
    out["cross_alignment"] = _cosine(d_ml, d_mm)
    return out


# ---------------------------------------------------------------------------- streaming


def _merged_entries(plan: MergePlan) -> list[Entry]:
    """The entries a merge computes (tied heads repeat their embedding and are skipped)."""
    return [e for e in plan.entries if e.action == "merge" and not e.tied_to]


def _read(entry: Entry, inputs: Inputs) -> tuple[Tensor, ...]:
    """(base, multimodal, *multilingual) tensors of one entry."""
    mls = zip(inputs.multilingual, entry.multilingual_keys, strict=True)
    return (
        inputs.base.get(entry.base_key),
        inputs.multimodal.get(entry.key),
        *(ml.get(k) for ml, k in mls),
    )


def _shape_for_rule(entry: Entry, t: Tensor, device: torch.device) -> Tensor:
    """As the engine hands it to the rule: float32, shared rows only, embeddings transposed."""
    t = t.to(device).float()
    if entry.rows is not None:
        t = t[: entry.rows]
    return t.T if entry.transpose else t


def iter_diagnostics(
    plan: MergePlan,
    inputs: Inputs,
    *,
    options: DiM3Options | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[DiagnosticRow]:
    """Yield one :class:`DiagnosticRow` per merged tensor (and multilingual model), in plan
    order, one entry's tensors in memory (plus the next one's, prefetched on a thread)."""
    options = options or DiM3Options()
    device = torch.device(device)
    layout = layout_for(inputs.multimodal.config, inputs.multimodal.keys())
    entries = _merged_entries(plan)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dim3-diag") as pool:
        pending = pool.submit(_read, entries[0], inputs) if entries else None
        for i, entry in enumerate(entries):
            raw = pending.result()
            pending = pool.submit(_read, entries[i + 1], inputs) if i + 1 < len(entries) else None
            base, mm, *mls = (_shape_for_rule(entry, t, device) for t in raw)
            del raw
            name = (layout.classify(entry.key) or ("", entry.key))[1] or entry.key
            layer, module, group = describe_name(name)
            labels = multilingual_labels(len(mls))
            for i, (label, ml) in enumerate(zip(labels, mls, strict=True)):
                values = measure(base, mm, ml, options, mls[:i] + mls[i + 1 :])
                yield DiagnosticRow(
                    key=entry.key,
                    name=name,
                    layer=layer,
                    module=module,
                    group=group,
                    shape=tuple(base.shape),
                    update=label,
                    **values,
                )
            del base, mm, mls


def diagnose(
    recipe: Recipe,
    *,
    progress: Callable[[Progress], None] | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> list[DiagnosticRow]:
    """Diagnostics of a recipe's three checkpoints (its DiM3 options when its method is dim3).

    ``progress`` gets one :class:`dim3.engine.Progress` per tensor; if it raises, nothing more is
    read and the exception propagates.
    """
    options = recipe.method_options() if recipe.method == "dim3" else DiM3Options()
    device = resolve_device(recipe.device)
    rows: list[DiagnosticRow] = []
    with open_inputs(recipe, allowed_roots=allowed_roots, token=token) as inputs:
        plan = build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        entries = _merged_entries(plan)
        total_bytes = sum(e.nbytes for e in entries)
        start, done_bytes = time.perf_counter(), 0
        per_entry = len(recipe.multilingual)
        for i, row in enumerate(iter_diagnostics(plan, inputs, options=options, device=device)):
            rows.append(row)
            if (i + 1) % per_entry:
                continue
            done = (i + 1) // per_entry
            done_bytes += entries[done - 1].nbytes
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(Progress(done, len(entries), row.key, done_bytes, total_bytes, elapsed))
    return rows


# ---------------------------------------------------------------------------- tables


def table(rows: Sequence[DiagnosticRow]) -> list[dict[str, Any]]:
    """One plain dict per row (shape as ``"out×in"``), in row order."""
    out = []
    for row in rows:
        d = dataclasses.asdict(row)
        d["shape"] = "×".join(str(s) for s in row.shape)
        out.append(d)
    return out


def to_csv(rows: Sequence[DiagnosticRow] | Sequence[dict[str, Any]]) -> str:
    """CSV text of :func:`table` (or of :func:`summarize`'s dicts), with a header line."""
    records = table(rows) if rows and isinstance(rows[0], DiagnosticRow) else list(rows)
    if not records:
        records_fields = [f.name for f in dataclasses.fields(DiagnosticRow)]
    else:
        records_fields = list(records[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=records_fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(rows: Sequence[DiagnosticRow]) -> list[dict[str, Any]]:
    """Per module type: how many tensors, and each metric's mean over them (NaNs ignored)."""
    modules: dict[str, list[DiagnosticRow]] = {}
    for row in rows:
        modules.setdefault(row.module, []).append(row)
    out = []
    for module, group_rows in sorted(modules.items(), key=lambda kv: _module_order(kv[0], rows)):
        record: dict[str, Any] = {
            "module": module,
            "group": group_rows[0].group,
            "tensors": len(group_rows),
        }
        for metric in METRICS:
            record[metric] = _nanmean([getattr(r, metric) for r in group_rows])
        out.append(record)
    return out


def _module_order(module: str, rows: Sequence[DiagnosticRow]) -> tuple[int, int]:
    """Modules in group order, then in the order they first appear."""
    first = next(i for i, r in enumerate(rows) if r.module == module)
    return GROUPS.index(rows[first].group), first


def long_table(
    rows: Sequence[DiagnosticRow], metrics: Sequence[str] = tuple(METRICS)
) -> list[dict[str, Any]]:
    """Plot data: one ``{layer, module, metric, value}`` per layered row and metric.

    Tensors outside the decoder layers (embeddings, final norm, head) have no layer and are left
    out; they are in :func:`table` and :func:`summarize`.
    """
    return [
        {"layer": r.layer, "module": r.module, "metric": m, "value": getattr(r, m)}
        for m in metrics
        for r in rows
        if r.layer is not None
    ]


# ---------------------------------------------------------------------------- plots


def plot(
    rows: Sequence[DiagnosticRow],
    path: str | Path,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of line plots over layers (one panel per metric, one line per module type;
    ``dim3.plots.diagnostics_figure``, the figure the app shows too).

    Tensors outside the decoder layers are drawn as markers left of layer 0 ("embed": the token
    embeddings) and right of the last layer ("out": final norm, head). Constant series and
    repeated panels are said in words under the panels. Returns the path written.
    """
    from dim3 import plots

    return plots.save(figure(rows, metrics, title), path)


def figure(
    rows: Sequence[DiagnosticRow], metrics: Sequence[str] | None = None, title: str | None = None
):
    """The matplotlib figure of :func:`plot` (for the app, which shows it without a file)."""
    from dim3 import plots

    metrics = list(metrics or METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {', '.join(METRICS)}")
    return plots.diagnostics_figure(rows, metrics, AXES, title)


def heatmap(rows: Sequence[DiagnosticRow], title: str | None = None):
    """DiM3's mean weight per layer and module, Δmm beside Δml (``dim3.plots.weights_heatmap``)."""
    from dim3 import plots

    return plots.weights_heatmap(rows, title)


def updates(rows: Sequence[DiagnosticRow]) -> list[str]:
    """The multilingual updates the rows describe, in order."""
    return list(dict.fromkeys(r.update for r in rows))


def summarize_updates(rows: Sequence[DiagnosticRow]) -> list[dict[str, Any]]:
    """:func:`summarize` per multilingual update (with an ``update`` column when several)."""
    labels = updates(rows)
    if len(labels) == 1:
        return summarize(rows)
    return [
        {"update": u, **s} for u in labels for s in summarize([r for r in rows if r.update == u])
    ]


def write_report(rows: Sequence[DiagnosticRow], out_dir: str | Path) -> list[Path]:
    """Write ``diagnostics.csv``, ``diagnostics_by_module.csv``, one PNG per figure (per
    multilingual update when there are several: ``NAME_multilingual_2.png``) and the heat map of
    DiM3's weights (``dim3_weights_heatmap.png``, every update side by side)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / CSV_FILE, out / SUMMARY_FILE]
    written[0].write_text(to_csv(rows), encoding="utf-8")
    labels = updates(rows)
    written[1].write_text(to_csv(summarize_updates(rows)), "utf-8")
    for u in labels:
        own = [r for r in rows if r.update == u]
        suffix = f"_{u}" if len(labels) > 1 else ""
        for name, (title, metrics) in FIGURES.items():
            label = f"{title} ({u})" if suffix else title
            written.append(plot(own, out / f"{name}{suffix}.png", metrics, label))
    from dim3 import plots

    written.append(plots.save(heatmap(rows), out / HEATMAP_FILE))
    return written


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m dim3 diagnose``."""
    from dim3.cli import add_dim3_arguments, add_source_arguments
    from dim3.recipe import DEVICES

    add_source_arguments(parser, required=True)
    parser.add_argument("--out", required=True, help="folder for the CSV files and PNGs")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}, cuda:N")
    add_dim3_arguments(parser, prefix="DiM3 (for its weights)")


def run(args: argparse.Namespace) -> int:
    """Compute the diagnostics of ``--base/--multilingual/--multimodal`` and write the report."""
    from tqdm.auto import tqdm

    from dim3.cli import dim3_options_from_args, fetch, sources_from_args

    options = dim3_options_from_args(args)
    recipe = Recipe(**sources_from_args(args), method="dim3", options=options, device=args.device)
    fetch(recipe)  # the trio's downloads, sized together, with their bar
    bars: list[Any] = []  # made at the first tensor, so that an early error prints one line

    def progress(p: Progress) -> None:
        if not bars:
            bars.append(tqdm(total=p.total, unit="tensor", desc="diagnosing"))
        bars[0].update(p.done - bars[0].n)

    try:
        rows = diagnose(recipe, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    for path in write_report(rows, args.out):
        print(f"wrote {path}")
    labels = updates(rows)
    summary = summarize_updates(rows)
    for s in summary:
        print(
            (f"{s['update']:>16} " if len(labels) > 1 else "")
            + f"{s['module']:>26}  ‖Δmm‖/‖b‖ {s['mm_norm']:.4f}  ‖Δml‖/‖b‖ {s['ml_norm']:.4f}  "
            f"cos(Δml,Δmm) {s['cross_alignment']:+.4f}  w_mm {s['dim3_mm_weight']:.3f}  "
            f"w_ml {s['dim3_ml_weight']:.3f}"
        )
    return 0
