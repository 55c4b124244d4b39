"""The figures of DiM3 Studio, built once for the CLI's PNGs and the app's plots.

Diagnostics (line panels and the heat map of DiM3's weights), evaluation bars, the sweep's
Pareto plot and the representation curves are drawn here; the representation map
(``dim3.represent.map_figure``, colour = language) is drawn beside its projection code on
:func:`new_figure`.

One house style (DESIGN.md, point 20):

- each method and model role has one colour *and* one marker (:data:`STYLES`, :func:`style`),
  the same in every figure; a sweep's ``ties density=0.2`` or an evaluation's ``dim3 (default)``
  takes its method's style;
- layer axes have integer ticks (plus ``embed`` / ``out`` for tensors outside the layers);
- axis titles are words, not column names; legends sit outside the axes, below them, in columns;
- a series that is constant carries no information as a line: it is said in one line of text
  under the panels instead (:func:`constant_value`), and a panel that repeats another is named,
  not drawn twice.

Figures are matplotlib ``Figure`` objects (the Agg backend, no display); the app shows them with
``gr.Plot`` and the CLI writes them with :func:`save`. This module knows the shapes of the
diagnostics rows, sweep points, evaluation results and representation metrics it draws; it reads
no checkpoint and imports no UI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class Style:
    """How one method or model is drawn: a colour (hex) and a matplotlib marker."""

    color: str
    marker: str


# Colour-blind-aware colours (Okabe-Ito and Tol's muted set); every method its own colour and
# marker, so that a greyscale print or a colour-blind reader still tells them apart.
STYLES: dict[str, Style] = {
    "dim3": Style("#D55E00", "*"),
    "task_arithmetic": Style("#0072B2", "o"),
    "linear": Style("#56B4E9", "s"),
    "ties": Style("#009E73", "^"),
    "dare_task_arithmetic": Style("#CC79A7", "v"),
    "dare_ties": Style("#882255", "<"),
    "breadcrumbs": Style("#E69F00", "D"),
    "pcb": Style("#117733", ">"),
    "tsv": Style("#332288", "P"),
    "iso_c": Style("#44AA99", "X"),
    "iso_cts": Style("#999933", "h"),
    "wudi": Style("#AA4499", "p"),
    "optmerge": Style("#8C564B", "d"),
    "neuromerging": Style("#DDCC77", "1"),
    "stf": Style("#661100", "2"),
    "fisher": Style("#6699CC", "3"),
    # model roles
    "original": Style("#444444", "H"),
    "merged": Style("#E31A1C", "8"),
    "base": Style("#777777", "x"),
    "multilingual": Style("#6A3D9A", "+"),
}
ALIASES = {"multimodal": "original", "original vlm": "original"}
_SPARE = (
    Style("#1F78B4", "o"),
    Style("#33A02C", "s"),
    Style("#FB9A99", "^"),
    Style("#FDBF6F", "v"),
    Style("#B15928", "D"),
)
_WORD = re.compile(r"[A-Za-z0-9_]+")


def style_key(name: str) -> str | None:
    """The :data:`STYLES` key that ``name`` belongs to: the name itself, or its first word
    (``ties density=0.2`` -> ``ties``, ``dim3 (default)`` -> ``dim3``,
    ``multilingual-2`` -> ``multilingual``); None when it belongs to none."""
    low = name.strip().lower()
    low = ALIASES.get(low, low)
    if low in STYLES:
        return low
    first = _WORD.match(low)
    if first:
        word = ALIASES.get(first.group(0), first.group(0))
        if word in STYLES:
            return word
    head = low.split("-")[0]
    return head if head in STYLES else None


def style(name: str) -> Style:
    """The colour and marker of a method or model ``name`` (see :func:`style_key`); an unknown
    name gets a fixed spare style chosen from its letters (stable across runs)."""
    key = style_key(name)
    if key is not None:
        return STYLES[key]
    return _SPARE[sum(map(ord, name)) % len(_SPARE)]


# ---------------------------------------------------------------------------- helpers


def constant_value(values: Sequence[float], rtol: float = 1e-6, atol: float = 1e-9) -> float | None:
    """The value of a series whose finite values are all the same (within ``rtol``/``atol``),
    or None when it varies or has no finite value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    return finite[0] if hi - lo <= atol + rtol * max(abs(lo), abs(hi)) else None


def same_series(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when two series are equal value for value (NaN equal to NaN)."""
    if len(a) != len(b):
        return False
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True))


# modules in reading order: attention, then MLP, then norms; others after, as found
MODULE_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)


def module_order(modules: Sequence[str]) -> list[str]:
    """``modules`` (unique, in order found) with the usual ones first in reading order."""
    found = list(dict.fromkeys(modules))
    rank = {m: i for i, m in enumerate(MODULE_ORDER)}
    return sorted(found, key=lambda m: (rank.get(m.split(".")[0], len(rank)), found.index(m)))


def layer_ticks(ax: Any, layers: Sequence[int], before: str = "", after: str = "") -> None:
    """Integer ticks on ``ax``'s x axis at ``layers``; ``before``/``after`` label an extra tick
    left of the first and right of the last layer (tensors outside the decoder layers)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    layers = sorted(set(int(x) for x in layers))
    lo, hi = (layers[0], layers[-1]) if layers else (0, 0)
    extra = {lo - 1: before, hi + 1: after}
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 10**9) if len(layers) / s <= 16)
    shown = [x for x in layers if x % step == 0]
    ticks = [*(t for t, s in extra.items() if s and t < lo), *shown]
    ticks += [t for t, s in extra.items() if s and t > hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))

    def label(x: float, _pos: int) -> str:
        r = round(x)
        return extra.get(r) or str(r)

    ax.xaxis.set_major_formatter(FuncFormatter(label))


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` with constrained layout, outside pyplot (no global registry, so
    handlers in several threads each own theirs; nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _legend_below(fig: Any, handles: list, labels: list[str], max_cols: int = 5) -> None:
    """One legend for the whole figure, outside the axes, under them."""
    if not handles:
        return
    cols = min(max_cols, len(labels))
    fig.legend(handles, labels, loc="outside lower center", ncols=cols, fontsize=8, frameon=False)


def _notes_text(notes: Sequence[str], width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.fill("• " + n, width, subsequent_indent="  ") for n in notes)


def save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def message_figure(text: str, width: float = 8.0):
    """A small figure that only says ``text`` (for a figure whose panels all say nothing)."""
    fig = new_figure(width, 0.9)
    fig.text(0.01, 0.5, _notes_text([text]), va="center", ha="left", fontsize=9)
    return fig


# ---------------------------------------------------------------------------- diagnostics


@dataclass(frozen=True)
class Panel:
    """One panel to draw: a title, a y-axis title, and the series worth a line."""

    metric: str
    title: str
    ylabel: str
    series: dict[str, list[tuple[int, float]]]  # module -> [(x, value)], x = layer or embed/out


def _module_series(rows: Sequence[Any], metric: str, last: int) -> dict[str, list]:
    """module -> sorted [(x, value)] with x = layer, -1 for the embeddings, last+1 for the
    final norm and the head."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.layer is not None:
            x = r.layer
        else:
            x = -1 if r.group == "embedding" and "embed" in r.module else last + 1
        out.setdefault(r.module, []).append((x, float(getattr(r, metric))))
    return {m: sorted(v) for m, v in out.items()}


def diagnostics_panels(
    rows: Sequence[Any], metrics: Sequence[str], titles: Mapping[str, tuple[str, str]]
) -> tuple[list[Panel], list[str]]:
    """The panels worth drawing for ``metrics`` and one line of text for everything left out.

    A module whose series is constant becomes a line ("k_proj, q_proj: 0.500 everywhere");
    a panel whose series all repeat an earlier panel's is named, not drawn; a panel left with no
    series is not drawn. ``titles``: metric -> (panel title, y-axis title)."""
    layers = [r.layer for r in rows if r.layer is not None]
    last = max(layers) if layers else 0
    panels: list[Panel] = []
    notes: list[str] = []
    shown: dict[str, dict[str, list]] = {}
    for metric in metrics:
        title, ylabel = titles[metric]
        series = _module_series(rows, metric, last)
        twin = next(
            (
                m
                for m, s in shown.items()
                if s.keys() == series.keys()
                and all(same_series([v for _, v in s[k]], [v for _, v in series[k]]) for k in s)
            ),
            None,
        )
        if twin is not None:
            notes.append(f"{title}: the same as {titles[twin][0]} in every tensor.")
            continue
        shown[metric] = series
        flat: dict[float, list[str]] = {}
        varying = {}
        for module in module_order(list(series)):
            pts = series[module]
            value = constant_value([v for _, v in pts]) if len(pts) > 1 else None
            if value is not None:
                flat.setdefault(round(value, 3), []).append(module)
            elif any(math.isfinite(v) for _, v in pts):
                varying[module] = pts  # one point (embeddings, head) is drawn as a marker
        for value, modules in flat.items():
            where = "every module" if not varying and len(flat) == 1 else ", ".join(modules)
            notes.append(f"{title}: {value:.3f} in every layer for {where}.")
        if varying:
            panels.append(Panel(metric, title, ylabel, varying))
    return panels, notes


def diagnostics_figure(
    rows: Sequence[Any],
    metrics: Sequence[str],
    titles: Mapping[str, tuple[str, str]],
    title: str | None = None,
):
    """Line plots over layers, one panel per metric worth drawing, one line per module type
    (colour per module, line style per group: attention solid, MLP dashed, norms dotted),
    integer layer ticks, the legend below the panels and the constant or repeated series said in
    words under them."""
    panels, notes = diagnostics_panels(rows, metrics, titles)
    if not panels:
        return message_figure(" ".join(notes) if notes else "Nothing to draw.")
    layers = sorted({r.layer for r in rows if r.layer is not None})
    modules = module_order([r.module for r in rows])
    groups = {r.module: r.group for r in rows}
    cmap = _cmap("tab20" if len(modules) > 10 else "tab10")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(modules)}
    lines = {"attention": "-", "mlp": "--", "norm": ":", "embedding": "-", "other": "-."}
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    height = 2.9 * nrows + 1.0 + 0.18 * len(notes)
    fig = new_figure(5.2 * ncols + (0 if ncols > 1 else 2.0), height)
    spec = fig.add_gridspec(
        nrows + (1 if notes else 0),
        ncols,
        height_ratios=[2.9] * nrows + ([0.2 * len(notes) + 0.1] if notes else []),
    )
    handles: dict[str, Any] = {}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(spec[i // ncols, i % ncols])
        for module in (m for m in modules if m in panel.series):
            pts = panel.series[module]
            inner = [(x, v) for x, v in pts if layers and layers[0] <= x <= layers[-1]]
            outer = [(x, v) for x, v in pts if (x, v) not in inner]
            style_ = lines.get(groups[module], "-")
            if inner:
                (h,) = ax.plot(*zip(*inner, strict=True), style_, color=colors[module], marker=".")
                handles.setdefault(module, h)
            if outer:
                (h,) = ax.plot(*zip(*outer, strict=True), "D", color=colors[module], ls="none")
                handles.setdefault(module, h)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(panel.ylabel, fontsize=9)
        xs = {x for pts in panel.series.values() for x, _ in pts}
        first, last = (layers[0], layers[-1]) if layers else (0, 0)
        before = "embed" if any(x < first for x in xs) else ""
        layer_ticks(ax, layers, before=before, after="out" if any(x > last for x in xs) else "")
        ax.grid(alpha=0.3)
    if notes:
        ax = fig.add_subplot(spec[nrows, :])
        ax.axis("off")
        ax.text(
            0,
            1,
            _notes_text(notes, 60 * ncols + 20),
            va="top",
            ha="left",
            fontsize=8.5,
            transform=ax.transAxes,
        )
    _legend_below(fig, list(handles.values()), list(handles))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def weights_grid(rows: Sequence[Any], metric: str) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, modules, matrix (layers, modules)) of ``metric`` over the layered tensors;
    NaN where a layer lacks a module."""
    layered = [r for r in rows if r.layer is not None]
    layers = sorted({r.layer for r in layered})
    modules = module_order([r.module for r in layered])
    grid = np.full((len(layers), len(modules)), np.nan)
    li, mi = {x: i for i, x in enumerate(layers)}, {m: i for i, m in enumerate(modules)}
    for r in layered:
        grid[li[r.layer], mi[r.module]] = float(getattr(r, metric))
    return layers, modules, grid


def weights_heatmap(rows: Sequence[Any], title: str | None = None):
    """DiM3's mean weight per layer and module: Δmm beside Δml (one panel per multilingual
    update), one colour scale, the value written in each cell when they are few. The longer of
    the two axes runs down (modules down for a small model, layers down for a real one)."""
    updates = list(dict.fromkeys(getattr(r, "update", "multilingual") for r in rows))
    own = [r for r in rows if getattr(r, "update", "multilingual") == updates[0]]
    panels = [("Δmm (multimodal update)", own, "dim3_mm_weight")]
    for u in updates:
        label = "Δml (multilingual update)" if len(updates) == 1 else f"Δml ({u})"
        panels.append(
            (
                label,
                [r for r in rows if getattr(r, "update", "multilingual") == u],
                "dim3_ml_weight",
            )
        )
    grids = [weights_grid(rs, metric) for _, rs, metric in panels]
    layers, modules, _ = grids[0]
    if not layers:
        return message_figure("No decoder-layer tensors: nothing to draw as a heat map.")
    values = np.concatenate([g.ravel() for _, _, g in grids])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    # the longer axis runs down the page: modules down when they outnumber the layers (a small
    # model), layers down otherwise (a real one), so that the figure stays compact and module
    # names read horizontally
    modules_down = len(modules) > len(layers)
    across, down = (len(layers), len(modules)) if modules_down else (len(modules), len(layers))
    label_w = 1.9 if modules_down else 0.6
    width = min(7.0, label_w + 0.5 * across + (0 if modules_down else 0.4))
    height = min(9.0, (1.4 if modules_down else 2.3) + 0.32 * down)
    fig = new_figure(width * len(panels) + 1.0, height)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    annotate = len(layers) * len(modules) <= 160
    image = None
    layer_labels = [str(x) for x in layers]
    if len(layers) > 24:  # every k-th layer labelled
        step = math.ceil(len(layers) / 16)
        layer_ticks_ = list(range(0, len(layers), step))
    else:
        layer_ticks_ = list(range(len(layers)))
    for ax, (label, _, _), (_, mods, grid) in zip(axes[0], panels, grids, strict=True):
        shown = grid.T if modules_down else grid  # (down, across)
        image = ax.imshow(shown, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_title(label, fontsize=10)
        module_ticks = (range(len(mods)), mods)
        layer_ticks_at = (layer_ticks_, [layer_labels[i] for i in layer_ticks_])
        if modules_down:
            ax.set_xticks(*layer_ticks_at, fontsize=8)
            ax.set_yticks(*module_ticks, fontsize=8)
            ax.set_xlabel("layer")
        else:
            ax.set_xticks(*module_ticks, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(*layer_ticks_at, fontsize=8)
            ax.set_xlabel("module")
        if annotate:
            for (i, j), v in np.ndenumerate(shown):
                if math.isfinite(v):
                    light = (v - vmin) / (vmax - vmin) > 0.6
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if light else "white",
                    )
    axes[0][0].set_ylabel("module" if modules_down else "layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="mean DiM3 weight", shrink=0.9)
    fig.suptitle(title or "What DiM3 did: the weight of each update", fontsize=11)
    return fig


# ---------------------------------------------------------------------------- evaluation


def accuracy_figure(results: Mapping[str, Mapping[str, float]]):
    """Grouped bars: one group per language (and ``overall``), one bar per model in its
    colour; the y axis from 0 to 1 with room above the top tick, the legend below."""
    columns = list(next(iter(results.values())))
    n = len(results)
    fig = new_figure(min(10.0, max(6.0, 0.3 * len(columns) * (n + 1) + 1.5)), 3.8)
    ax = fig.subplots()
    width = 0.8 / n
    for i, (name, accs) in enumerate(results.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(columns))]
        s = style(name)
        ax.bar(
            xs,
            [accs.get(c, 0.0) for c in columns],
            width,
            label=name,
            color=s.color,
            edgecolor="white",
            linewidth=0.5,
        )
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 1.08)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("question language")
    ax.set_ylabel("accuracy (exact match)")
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        ):
            front.append(i)
    return front


def pareto_figure(
    points: Sequence[Any], half: str = "tuning", chosen: str | None = None, english: str = "en"
):
    """English accuracy (x) against the mean of the other languages (y), one point per model:
    the swept method's settings in its colour with their Pareto front joined, the default and
    every reference method in their own colour and marker, the chosen setting ringed; the
    legend below the axes."""
    from matplotlib.markers import MarkerStyle

    fig = new_figure(6.4, 5.6)
    ax = fig.subplots()

    def xy(p: Any) -> tuple[float, float]:
        a = p.tuning if half == "tuning" else p.report
        return a.get(english, float("nan")), a["others"]

    grid = [p for p in points if p.kind in ("grid", "default")]
    method = grid[0].method if grid else ""
    ms = style(method)
    coords = [xy(p) for p in grid]
    settings = [c for p, c in zip(grid, coords, strict=True) if p.kind == "grid"]
    if settings:
        ax.scatter(
            *zip(*settings, strict=True),
            s=30,
            color=ms.color,
            alpha=0.55,
            marker="o",
            label=f"{method} grid settings",
        )
    front = sorted(coords[i] for i in pareto_front(coords))
    if len(front) > 1:
        ax.plot(
            *zip(*front, strict=True),
            color=ms.color,
            alpha=0.5,
            lw=1.2,
            label="Pareto front of the settings",
        )
    for p in points:
        if p.kind in ("original", "reference", "default"):
            s = style(p.method or p.label)
            edge = "black" if p.kind == "default" else "none"
            ax.scatter(
                *xy(p),
                marker=s.marker,
                s=110 if p.kind == "default" else 70,
                color=s.color,
                # an unfilled marker ('x', '+') is all edge: it takes its colour, not an edge's
                **({"edgecolors": edge} if MarkerStyle(s.marker).is_filled() else {}),
                linewidths=0.6,
                label=p.label,
                zorder=3,
            )
    for p, c in zip(grid, coords, strict=True):
        if p.label == chosen:
            ax.scatter(
                *c,
                s=260,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                label=f"chosen: {p.label}",
                zorder=4,
            )
    ax.set_xlabel("English accuracy")
    ax.set_ylabel("mean accuracy over the other languages")
    ax.set_title(f"Sweep of {method}: {half} half", fontsize=10)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _legend_below(fig, *ax.get_legend_handles_labels(), max_cols=3)
    return fig


# ---------------------------------------------------------------------------- representations


def curves_figure(
    layers: Sequence[int],
    metrics: Mapping[str, Mapping[str, Sequence[float]]],
    titles: Mapping[str, str],
):
    """One panel per metric over layers (0 = embeddings), one line per model in its colour and
    marker (LLMs dashed), integer layer ticks, the legend below."""
    keys = list(titles)
    fig = new_figure(4.3 * len(keys), 3.9)
    axes = fig.subplots(1, len(keys), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, key in zip(axes[0], keys, strict=True):
        for name, m in metrics.items():
            s = style(name)
            dashed = style_key(name) in ("base", "multilingual")
            (h,) = ax.plot(
                layers,
                m[key],
                "--" if dashed else "-",
                marker=s.marker,
                color=s.color,
                label=name,
                markersize=6,
            )
            handles.setdefault(name, h)
        ax.set_title(titles[key], fontsize=9.5)
        ax.set_xlabel("layer (0 = embeddings)")
        layer_ticks(ax, layers)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    _legend_below(fig, list(handles.values()), list(handles))
    return fig
