"""The plotting room (dim3/plots.py) and the small helpers that make views readable: a colour and
marker per method, integer layer ticks, constant series said in words, the heat map's cells,
human sizes, examples that fit the VLM, time estimates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dim3 import diagnostics as dg
from dim3 import plots
from dim3.estimate import CostBook, plan_text, remaining_text
from dim3.examples import EXAMPLES, FSI, PDI, declared_languages, examples_for, label
from dim3.methods import METHODS
from dim3.sizes import human_size
from dim3.sweep import SweepPoint

MODULES = {  # module -> group, as the diagnostics name them
    "q_proj": "attention",
    "k_proj": "attention",
    "down_proj": "mlp",
    "input_layernorm": "norm",
}


def make_rows(layers: int, update: str = "multilingual", seed: int = 0) -> list[dg.DiagnosticRow]:
    """Hand-made diagnostics rows: every metric varies over layers except the calibrated
    shares of the projections (0.5 everywhere) and direction == magnitude."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for module, group in MODULES.items():
            share = 0.5 if group != "norm" else float(rng.uniform(0.3, 0.45))
            rows.append(
                dg.DiagnosticRow(
                    key=f"model.layers.{layer}.{module}.weight",
                    name=f"model.layers.{layer}.{module}.weight",
                    layer=layer,
                    module=module,
                    group=group,
                    shape=(8, 8),
                    columns=8,
                    base_norm=1.0,
                    mm_norm=float(rng.uniform(0, 0.1)),
                    ml_norm=float(rng.uniform(0.5, 1.5)),
                    mm_reorientation=float(rng.uniform(0, 0.01)),
                    ml_reorientation=float(rng.uniform(0.1, 0.4)),
                    cross_alignment=float(rng.uniform(-0.1, 0.1)),
                    dim3_mm_weight=float(rng.uniform(0.6, 0.8)),
                    dim3_ml_weight=float(rng.uniform(0.6, 0.8)),
                    dim3_mm_calibrated_magnitude=share,
                    dim3_ml_calibrated_magnitude=share,
                    dim3_mm_calibrated_direction=share,
                    dim3_ml_calibrated_direction=share,
                    update=update,
                )
            )
    return rows


# ---------------------------------------------------------------------------- styles


def test_every_method_has_its_own_colour_and_marker():
    assert set(METHODS) <= set(plots.STYLES), "a method without a style"
    colours = [s.color.lower() for s in plots.STYLES.values()]
    markers = [s.marker for s in plots.STYLES.values()]
    assert len(set(colours)) == len(colours)
    assert len(set(markers)) == len(markers)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("ties", "ties"),
        ("ties density=0.2", "ties"),
        ("dim3 (default)", "dim3"),
        ("dare_ties drop_rate=0.5", "dare_ties"),
        ("multilingual-2", "multilingual"),
        ("Original", "original"),
        ("multimodal", "original"),
        ("nobody", None),
    ],
)
def test_a_label_takes_its_methods_style(name, key):
    assert plots.style_key(name) == key
    if key:
        assert plots.style(name) == plots.STYLES[key]
    else:  # an unknown name: a stable spare style, not one of a method's
        assert plots.style(name) == plots.style(name)
        assert plots.style(name) not in plots.STYLES.values()


# ---------------------------------------------------------------------------- constants


def test_constant_value():
    assert plots.constant_value([0.5, 0.5, 0.5]) == 0.5
    assert plots.constant_value([0.5, float("nan"), 0.5]) == 0.5
    assert plots.constant_value([0.5, 0.5001]) is None
    assert plots.constant_value([1e6, 1e6 + 1e-4]) == 1e6  # relative tolerance
    assert plots.constant_value([float("nan")]) is None
    assert plots.constant_value([]) is None


def test_constant_series_become_words_and_repeated_panels_are_named():
    rows = make_rows(4)
    metrics = [
        "ml_norm",
        "dim3_mm_calibrated_magnitude",
        "dim3_mm_calibrated_direction",
    ]
    panels, notes = plots.diagnostics_panels(rows, metrics, dg.AXES)
    by_metric = {p.metric: p for p in panels}
    # a varying metric keeps every module
    assert set(by_metric["ml_norm"].series) == set(MODULES)
    # the calibrated share: only the norm varies; the projections are said in one line
    assert set(by_metric["dim3_mm_calibrated_magnitude"].series) == {"input_layernorm"}
    flat = [n for n in notes if "0.500 in every layer" in n]
    assert len(flat) == 1 and all(m in flat[0] for m in ("q_proj", "k_proj", "down_proj"))
    # direction repeats magnitude: named, not drawn
    assert "dim3_mm_calibrated_direction" not in by_metric
    assert any("the same as" in n and "direction" in n for n in notes)


def test_a_panel_with_only_constant_series_is_not_drawn():
    rows = [r for r in make_rows(3) if r.group != "norm"]
    panels, notes = plots.diagnostics_panels(rows, ["dim3_ml_calibrated_magnitude"], dg.AXES)
    assert panels == []
    assert notes == [
        f"{dg.AXES['dim3_ml_calibrated_magnitude'][0]}: 0.500 in every layer for every module."
    ]


# ---------------------------------------------------------------------------- figures


def drawn(fig):
    """``fig`` drawn by Agg (layout done); returns its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def tick_labels(ax) -> list[str]:
    drawn(ax.figure)
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


@pytest.mark.parametrize("layers", [1, 4, 7, 40])
def test_layer_axes_have_integer_ticks(layers):
    fig = dg.figure(make_rows(layers), ["ml_norm", "cross_alignment"])
    axes = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
    assert len(axes) == 2
    for ax in axes:
        labels = tick_labels(ax)
        assert labels, "no tick labels"
        numbers = [int(x) for x in labels]  # raises on "0.5" or "2.0"
        assert all(0 <= n < layers for n in numbers)
        if layers <= 16:
            assert numbers == list(range(layers))
        assert ax.get_ylabel() == dg.AXES[_metric_of(ax)][1]  # words, not a column name


def _metric_of(ax) -> str:
    return next(m for m, (title, _) in dg.AXES.items() if title == ax.get_title())


def test_embeddings_and_head_are_labelled_beside_the_layers():
    rows = make_rows(3)
    extra = dataclass_replace(rows[0], layer=None, module="embed_tokens", group="embedding")
    head = dataclass_replace(rows[0], layer=None, module="lm_head", group="embedding")
    fig = dg.figure([*rows, extra, head], ["ml_norm"])
    labels = tick_labels(fig.axes[0])
    assert labels == ["embed", "0", "1", "2", "out"]


def dataclass_replace(row, **changes):
    import dataclasses

    return dataclasses.replace(row, **changes)


def test_the_legend_sits_outside_the_axes():
    fig = dg.figure(make_rows(4), ["ml_norm", "mm_norm"])
    renderer = drawn(fig)
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        if ax.get_visible() and ax.axison:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width + 1  # inside the figure: not cut off


@pytest.mark.parametrize("layers", [3, 6])  # fewer layers than modules, and more
def test_heatmap_cells_are_the_rows_weights_side_by_side(layers):
    rows = make_rows(layers)
    fig = dg.heatmap(rows)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2  # Δmm beside Δml
    assert panels[0].get_position().x1 <= panels[1].get_position().x0  # side by side
    modules = plots.module_order(list(MODULES))
    modules_down = panels[0].get_ylabel() == "module"
    assert modules_down == (len(modules) > layers)  # the longer axis runs down
    for ax, metric in zip(panels, ("dim3_mm_weight", "dim3_ml_weight"), strict=True):
        data = np.asarray(ax.images[0].get_array())
        expected = np.array(
            [
                [
                    next(getattr(r, metric) for r in rows if r.layer == i and r.module == m)
                    for m in modules
                ]
                for i in range(layers)
            ]
        )
        np.testing.assert_allclose(data, expected.T if modules_down else expected)
        # integer layer ticks (a shared y axis is labelled on the first panel only)
        ticks = ax.get_xticklabels() if modules_down else panels[0].get_yticklabels()
        assert [t.get_text() for t in ticks] == [str(i) for i in range(layers)]
    assert panels[0].images[0].get_clim() == panels[1].images[0].get_clim()  # one colour scale
    # one panel per multilingual update when there are several
    two = [*rows, *make_rows(layers, update="multilingual_2", seed=1)]
    assert sum(1 for ax in dg.heatmap(two).axes if ax.images) == 3


def test_accuracy_bars_use_the_method_colours_and_leave_room_above_one():
    from matplotlib.colors import to_hex

    results = {
        "original": {"en": 1.0, "de": 0.2, "overall": 0.6},
        "dim3": {"en": 0.9, "de": 0.8, "overall": 0.85},
        "ties": {"en": 0.7, "de": 0.6, "overall": 0.65},
    }
    fig = plots.accuracy_figure(results)
    (ax,) = fig.axes
    assert ax.get_ylim()[1] > 1.0  # the top tick and a bar at 1.0 are not clipped
    colours = {to_hex(c.patches[0].get_facecolor()) for c in ax.containers}
    assert colours == {plots.style(n).color.lower() for n in results}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["en", "de", "overall"]


def sweep_point(label, kind, method, en, others):
    return SweepPoint(label, kind, method, {}, {"en": en, "others": others}, {})


def test_sweep_points_take_their_methods_style():
    from matplotlib.colors import to_hex

    points = [
        sweep_point("original", "original", "", 0.9, 0.1),
        sweep_point("dim3 (default)", "reference", "dim3", 0.8, 0.6),
        sweep_point("ties (default)", "default", "ties", 0.7, 0.5),
        sweep_point("ties density=0.2", "grid", "ties", 0.6, 0.7),
        sweep_point("ties density=0.8", "grid", "ties", 0.75, 0.4),
    ]
    fig = plots.pareto_figure(points, chosen="ties density=0.2")
    (ax,) = fig.axes
    by_label = {c.get_label(): c for c in ax.collections}
    for name in ("original", "dim3 (default)", "ties (default)"):
        colour = to_hex(by_label[name].get_facecolor()[0])
        assert colour == plots.style(name).color.lower(), name
    assert (
        to_hex(by_label["ties grid settings"].get_facecolor()[0])
        == plots.STYLES["ties"].color.lower()
    )
    assert "chosen: ties density=0.2" in by_label
    assert len(fig.legends) == 1 and ax.get_legend() is None  # below the axes, not on them


def test_sweep_points_of_unfilled_markers_draw_in_their_colour_without_warnings():
    """Fisher's, STF's and NeuroMerging's markers are lines ('3', '2', '1'): an edge colour
    given to them made matplotlib warn on every sweep plot with references; they are drawn in
    the method's colour, the default's too."""
    import warnings

    from matplotlib.colors import to_hex

    points = [
        sweep_point("original", "original", "", 0.9, 0.1),
        sweep_point("fisher (default)", "reference", "fisher", 0.8, 0.6),
        sweep_point("neuromerging (default)", "reference", "neuromerging", 0.5, 0.6),
        sweep_point("stf (default)", "default", "stf", 0.7, 0.5),
        sweep_point("stf rank=4", "grid", "stf", 0.6, 0.7),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.pareto_figure(points, chosen="stf rank=4")
    by_label = {c.get_label(): c for c in fig.axes[0].collections}
    for name, method in (("fisher (default)", "fisher"), ("stf (default)", "stf")):
        assert to_hex(by_label[name].get_edgecolor()[0]) == plots.STYLES[method].color.lower()


def test_save_writes_a_png(tmp_path):
    path = plots.save(dg.heatmap(make_rows(2)), tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_has_the_heatmap(tmp_path):
    written = dg.write_report(make_rows(3), tmp_path)
    assert tmp_path / dg.HEATMAP_FILE in written
    assert all(p.stat().st_size > 0 for p in written)


# ---------------------------------------------------------------------------- small helpers


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (3_617_000, "3.62 MB"),
        (15_500_000_000, "15.5 GB"),
        (10**9, "1 GB"),
        (999_999, "1 MB"),
        (1234, "1.23 kB"),
        (5 * 10**15, "5000 TB"),
    ],
)
def test_human_size(n, text):
    assert human_size(n) == text


def test_examples_fit_the_declared_languages(tmp_path):
    from dim3.demo import DEMO_DIR
    from dim3.demo.world import LANGUAGES

    vlm = DEMO_DIR / "multimodal"
    if not vlm.is_dir():
        pytest.skip("no demo VLM in this checkout")
    assert declared_languages(vlm) == LANGUAGES
    demo = examples_for(vlm)
    assert {e.language for e, _ in demo} == set(LANGUAGES)
    assert all(p.is_file() for _, p in demo)
    everything = examples_for("Qwen/Qwen2-VL-2B-Instruct")  # declares nothing: every example
    assert len(everything) == len(EXAMPLES) > len(demo)
    (tmp_path / "dim3_languages.json").write_text(json.dumps({"languages": ["de", "xx"]}))
    assert [e.language for e, _ in examples_for(tmp_path)] == ["de"]
    (tmp_path / "dim3_languages.json").write_text(json.dumps({"languages": "de"}))
    with pytest.raises(ValueError, match="languages"):
        examples_for(tmp_path)


def test_right_to_left_chips_are_isolated():
    arabic = next(e for e in EXAMPLES if e.language == "ar")
    text = label(arabic)
    assert text == f"{FSI}{arabic.language_name}{PDI} · {FSI}{arabic.text}{PDI}"
    assert text.count(FSI) == text.count(PDI) == 2


def test_time_estimates_come_from_measured_costs():
    book = CostBook()
    assert book.estimate("vlm", 100, ["ties"]) is None
    assert "measured on the first model" in plan_text(book, "vlm", 100, ["ties"])
    book.record_answers("vlm", 100, 5.0)  # 0.05 s per answer
    book.record_merge("vlm", "ties", 2.0)
    # original + 2 ties merges: 3 x 100 answers + 2 merges; an unmeasured method counts as
    # the mean of the measured merges
    assert math.isclose(book.estimate("vlm", 100, ["ties", "ties"]), 15.0 + 4.0)
    assert math.isclose(book.estimate("vlm", 100, ["ties", "dim3"]), 15.0 + 4.0)
    assert "0:19" in plan_text(book, "vlm", 100, ["ties", "ties"])
    assert "wudi" in plan_text(book, "vlm", 100, ["wudi"])  # slow and unmeasured: warned
    assert remaining_text(book, "vlm", 100, ["ties"], 1) == "~0:07 left"
