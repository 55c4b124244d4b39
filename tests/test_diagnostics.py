"""Diagnostics on tiny real trios, checked against direct computation on the loaded tensors."""

from __future__ import annotations

import csv
import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dim3 import diagnostics as dg
from dim3 import plots
from dim3.cli import main
from dim3.methods.dim3 import DiM3Options, dim3_weights
from dim3.recipe import Recipe, Source

pytestmark = pytest.mark.slow

LLAMA_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "norm",
    "embed_tokens",
}


def recipe_of(trio, **options) -> Recipe:
    return Recipe(
        Source(str(trio.base)),
        Source(str(trio.multilingual)),
        Source(str(trio.multimodal)),
        options=options,
        device="cpu",
    )


def load_all(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def vlm_language_key(vlm: dict, name: str) -> str:
    """The VLM's key for a canonical LLM name, in either layout or the Qwen2-VL one."""
    rest = name.removeprefix("model.")
    candidates = [
        f"language_model.model.{rest}",
        f"model.language_model.{rest}",
        f"language_model.{name}",
        name,
    ]
    return next(k for k in candidates if k in vlm)


def direct(base: torch.Tensor, mm: torch.Tensor, ml: torch.Tensor) -> dict[str, float]:
    """The metrics straight from their definitions, in float64."""
    b, m, l_ = (t.double() for t in (base, mm, ml))
    cols = (lambda t: t.reshape(-1, 1)) if b.dim() == 1 else (lambda t: t)
    out = {}
    for tag, t in (("mm", m), ("ml", l_)):
        delta = t - b
        out[f"{tag}_norm"] = (delta.norm() / b.norm()).item() if b.norm() > 0 else math.nan
        cos = [
            (ct @ cb / ((ct.norm() + 1e-8) * (cb.norm() + 1e-8))).item()
            for ct, cb in zip(cols(t).T, cols(b).T, strict=True)
        ]
        out[f"{tag}_reorientation"] = sum(min(2.0, max(0.0, 1 - c)) for c in cos) / len(cos)
    d_mm, d_ml = (m - b).flatten(), (l_ - b).flatten()
    out["cross_alignment"] = (d_ml @ d_mm / (d_ml.norm() * d_mm.norm())).item()
    return out


@pytest.mark.parametrize("trio_name", ["tiny_llava_trio", "tiny_qwen2vl_trio"])
def test_rows_match_direct_computation(trio_name, request):
    trio = request.getfixturevalue(trio_name)
    rows = dg.diagnose(recipe_of(trio))
    base, ml, vlm = load_all(trio.base), load_all(trio.multilingual), load_all(trio.multimodal)
    tokens = len(AutoTokenizer.from_pretrained(trio.base))  # rows beyond stay the VLM's
    checked = 0
    for row in rows:
        b, m = base[row.name], ml[row.name]
        v = vlm[vlm_language_key(vlm, row.name)]
        if row.name.endswith("embed_tokens.weight") or row.name == "lm_head.weight":
            rows_shared = min(b.shape[0], m.shape[0], v.shape[0], tokens)
            b, v, m = b[:rows_shared], v[:rows_shared], m[:rows_shared]
            if "embed" in row.name:  # the rule sees columns = tokens
                b, v, m = b.T, v.T, m.T
        b, v, m = b.float(), v.float(), m.float()
        assert row.shape == tuple(b.shape)
        assert row.columns == (b.shape[1] if b.dim() == 2 else b.numel())
        expected = direct(b, v, m)
        for metric, value in expected.items():
            got = getattr(row, metric)
            if math.isnan(value):
                assert math.isnan(got), (row.key, metric)
            else:
                assert got == pytest.approx(value, rel=1e-4, abs=1e-6), (row.key, metric)
        w = dim3_weights(b, [v, m], DiM3Options())
        assert row.dim3_mm_weight == pytest.approx(w.weights[0].mean().item(), rel=1e-6)
        assert row.dim3_ml_weight == pytest.approx(w.weights[1].mean().item(), rel=1e-6)
        assert row.dim3_ml_calibrated_magnitude == pytest.approx(
            w.magnitude_calibrated[1].float().mean().item()
        )
        assert row.dim3_mm_calibrated_direction == pytest.approx(
            w.direction_calibrated[0].float().mean().item()
        )
        checked += 1
    assert checked == len(rows) > 0


def test_rows_cover_exactly_the_language_model(tiny_llava_trio, tiny_qwen2vl_trio):
    llava = dg.diagnose(recipe_of(tiny_llava_trio))
    assert {r.module for r in llava} == LLAMA_MODULES | {"lm_head"}
    assert not any("vision" in r.key or "projector" in r.key for r in llava)
    assert sorted({r.layer for r in llava if r.layer is not None}) == [0, 1]
    assert sum(r.module == "q_proj" for r in llava) == 2
    qwen = dg.diagnose(recipe_of(tiny_qwen2vl_trio))
    # tied embeddings: the head is the embedding, measured once; Qwen2 has q/k/v biases
    assert {r.module for r in qwen} == LLAMA_MODULES | {"q_proj.bias", "k_proj.bias", "v_proj.bias"}
    assert not any(r.key.startswith("visual.") for r in qwen)
    groups = {r.module: r.group for r in qwen}
    assert groups["q_proj.bias"] == "attention" and groups["up_proj"] == "mlp"
    assert groups["norm"] == "norm" and groups["embed_tokens"] == "embedding"


def test_dim3_options_change_the_dim3_columns_only(tiny_llava_trio):
    default = dg.diagnose(recipe_of(tiny_llava_trio))
    tuned = dg.diagnose(recipe_of(tiny_llava_trio, above_average_ratio=2.0, calibration=0.5))
    for a, b in zip(default, tuned, strict=True):
        assert (a.mm_norm, a.cross_alignment) == (b.mm_norm, b.cross_alignment)
        if len(b.shape) == 2:  # ranks (n-1)/n at most never exceed 2 × their mean (n-1)/2n
            assert b.dim3_mm_calibrated_magnitude == 0.0 < a.dim3_mm_calibrated_magnitude
    assert any(a.dim3_ml_weight != b.dim3_ml_weight for a, b in zip(default, tuned, strict=True))


def test_describe_name():
    assert dg.describe_name("model.layers.12.self_attn.q_proj.weight") == (
        12,
        "q_proj",
        "attention",
    )
    assert dg.describe_name("model.layers.0.self_attn.k_proj.bias") == (
        0,
        "k_proj.bias",
        "attention",
    )
    assert dg.describe_name("model.layers.3.mlp.down_proj.weight") == (3, "down_proj", "mlp")
    assert dg.describe_name("model.layers.3.input_layernorm.weight") == (
        3,
        "input_layernorm",
        "norm",
    )
    assert dg.describe_name("model.norm.weight") == (None, "norm", "norm")
    assert dg.describe_name("model.embed_tokens.weight") == (None, "embed_tokens", "embedding")
    assert dg.describe_name("lm_head.weight") == (None, "lm_head", "embedding")


def test_reorientation_and_undefined_values():
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    turned = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # column 0 turned 90°, column 1 scaled
    assert dg.reorientation(base, turned) == pytest.approx(0.5)
    assert dg.reorientation(base, -base) == pytest.approx(2.0)
    values = dg.measure(torch.zeros(4), torch.ones(4), torch.zeros(4), DiM3Options())
    assert math.isnan(values["mm_norm"])  # zero base
    assert math.isnan(values["cross_alignment"])  # zero multilingual update


def test_csv_summary_and_plot_data(tiny_llava_trio):
    rows = dg.diagnose(recipe_of(tiny_llava_trio))
    parsed = list(csv.DictReader(io.StringIO(dg.to_csv(rows))))
    assert len(parsed) == len(rows)
    assert [p["key"] for p in parsed] == [r.key for r in rows]
    assert float(parsed[3]["ml_norm"]) == rows[3].ml_norm
    assert parsed[0]["layer"] == "" if rows[0].layer is None else int(parsed[0]["layer"])
    summary = dg.summarize(rows)
    q = next(s for s in summary if s["module"] == "q_proj")
    q_rows = [r for r in rows if r.module == "q_proj"]
    assert q["tensors"] == 2
    assert q["cross_alignment"] == pytest.approx(sum(r.cross_alignment for r in q_rows) / 2)
    assert [s["group"] for s in summary] == sorted(
        (s["group"] for s in summary), key=dg.GROUPS.index
    )
    data = dg.long_table(rows, ["mm_norm", "dim3_ml_weight"])
    layered = [r for r in rows if r.layer is not None]
    assert len(data) == 2 * len(layered)
    assert {d["metric"] for d in data} == {"mm_norm", "dim3_ml_weight"}
    first = next(d for d in data if d["metric"] == "dim3_ml_weight")
    assert first["value"] == layered[0].dim3_ml_weight and first["module"] == layered[0].module


def test_plot_writes_png(tiny_qwen2vl_trio, tmp_path):
    rows = dg.diagnose(recipe_of(tiny_qwen2vl_trio))
    path = dg.plot(rows, tmp_path / "sub" / "all.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300
    with pytest.raises(ValueError, match="unknown metric"):
        dg.plot(rows, tmp_path / "bad.png", ["no_such_metric"])


def test_progress_reports_every_tensor_and_can_abort(tiny_llava_trio):
    seen = []
    rows = dg.diagnose(recipe_of(tiny_llava_trio), progress=seen.append)
    assert [p.done for p in seen] == list(range(1, len(rows) + 1))
    assert seen[-1].bytes_done == seen[-1].bytes_total and seen[-1].total == len(rows)

    def stop(p):
        if p.done == 3:
            raise RuntimeError("stopped by the user")

    with pytest.raises(RuntimeError, match="stopped"):
        dg.diagnose(recipe_of(tiny_llava_trio), progress=stop)


def test_cli_writes_csv_and_pngs(tiny_llava_trio, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(
        [
            "diagnose",
            "--base",
            str(tiny_llava_trio.base),
            "--multilingual",
            str(tiny_llava_trio.multilingual),
            "--multimodal",
            str(tiny_llava_trio.multimodal),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--calibration",
            "0.5",
        ]
    )
    assert code == 0
    names = {p.name for p in out.iterdir()}
    expected_files = {dg.CSV_FILE, dg.SUMMARY_FILE, dg.HEATMAP_FILE}
    assert expected_files | {f"{n}.png" for n in dg.FIGURES} == names
    rows = list(csv.DictReader((out / dg.CSV_FILE).open()))
    expected = dg.diagnose(recipe_of(tiny_llava_trio, calibration=0.5))
    assert [float(r["dim3_ml_weight"]) for r in rows] == [e.dim3_ml_weight for e in expected]
    assert "q_proj" in capsys.readouterr().out


def test_cli_error_is_one_line(tmp_path, capsys):
    code = main(
        [
            "diagnose",
            "--base",
            str(tmp_path / "missing"),
            "--multilingual",
            str(tmp_path / "missing"),
            "--multimodal",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- the Analysis tab


def _analysis_app(trio, tmp_path):
    """A Blocks with the real Merge tab and the Analysis tab, its refs set to ``trio``."""
    import gradio as gr

    from dim3.models import ModelManager
    from dim3.ui.analysis import build_analysis_tab
    from dim3.ui.common import AppContext
    from dim3.ui.merge import build_merge_tab

    roots = [trio.base.parent, tmp_path]
    ctx = AppContext(
        manager=ModelManager(allowed_roots=roots), allowed_roots=roots, output_root=tmp_path / "o"
    )
    with gr.Blocks() as app:
        with gr.Tab("Merge"):
            merge = build_merge_tab(ctx)
        with gr.Tab("Analysis"):
            analysis = build_analysis_tab(ctx, merge)
    return app, ctx, merge, analysis


def _form_values(merge, trio, **changes):
    """The form's values by API parameter name (what the handlers receive)."""
    values = {name: getattr(c, "value", None) for name, c in merge.form.kwargs().items()}
    for role in ("base", "multilingual", "multimodal"):
        values[role] = str(getattr(trio, role))
        values[f"{role}_revision"] = ""
    values["device"] = "cpu"
    values |= {f"dim3_{field}": value for field, value in changes.items()}
    return values


def test_analysis_handler_shows_plots_table_and_csv(tiny_llava_trio, tmp_path):
    from dim3.ui.analysis import _compute

    app, ctx, merge, tab = _analysis_app(tiny_llava_trio, tmp_path)
    handler = _compute(ctx, merge, tab)
    seen = []
    values = _form_values(merge, tiny_llava_trio, calibration=0.5)
    run = handler(progress=lambda *a, **k: seen.append(a[0]), **values)
    out = next(run)  # the handler removes its CSV's folder once Gradio has copied the file
    assert out[tab.status].startswith("✅"), out[tab.status]
    rows = dg.diagnose(recipe_of(tiny_llava_trio, calibration=0.5))
    assert seen[-1] == (len(rows), len(rows))
    # the heat map's cells are DiM3's weights with the Merge tab's DiM3 options
    mm_ax, ml_ax = (ax for ax in out[tab.heatmap].axes if ax.images)
    layers, modules, grid = plots.weights_grid(rows, "dim3_ml_weight")
    shown = np.asarray(ml_ax.images[0].get_array())
    np.testing.assert_allclose(shown, grid.T if mm_ax.get_ylabel() == "module" else grid)
    assert len(layers) == len({r.layer for r in rows if r.layer is not None})
    # each figure below it has its panels' titles in words and integer layer ticks
    norms = out[tab.plots["residual_norms"]]
    titles = {ax.get_title() for ax in norms.axes}
    assert dg.AXES["ml_norm"][0] in titles
    table = out[tab.table]
    assert set(table["module"]) == {r.module for r in rows}
    assert "Δml size" in table.columns  # headers in words
    assert open(out[tab.download], encoding="utf-8").read() == dg.to_csv(rows)
    assert list(run) == [] and not os.path.exists(os.path.dirname(out[tab.download]))


def test_analysis_handler_shows_errors_as_messages(tiny_llava_trio, tmp_path):
    from dim3.ui.analysis import _compute

    app, ctx, merge, tab = _analysis_app(tiny_llava_trio, tmp_path)
    values = _form_values(merge, tiny_llava_trio)
    values["multilingual"] = "/definitely/not/allowed"
    out = next(_compute(ctx, merge, tab)(progress=lambda *a, **k: None, **values))
    assert out[tab.status].startswith("❌") and "allowed" in out[tab.status]
    assert set(out) == {tab.status}


@pytest.mark.browser
def test_analysis_tab_in_a_browser(tiny_qwen2vl_trio, tmp_path):
    from playwright.sync_api import sync_playwright

    app, _ctx, _merge, _tab = _analysis_app(tiny_qwen2vl_trio, tmp_path)
    app.queue()
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page()
            page.goto(url)
            for role in ("base", "multilingual", "multimodal"):
                box = page.locator(f"#dim3-ref-{role} textarea, #dim3-ref-{role} input").first
                box.fill(str(getattr(tiny_qwen2vl_trio, role)))
            page.get_by_role("tab", name="Analysis").click()
            page.locator("#dim3-diagnose").click()
            status = page.locator("#dim3-analysis-status")
            status.get_by_text("language-model tensors").wait_for(timeout=60_000)
            assert "✅" in status.inner_text()
            page.locator("#dim3-analysis-heatmap img").wait_for(timeout=30_000)
            page.locator("#dim3-plot-cross_alignment img").wait_for(timeout=30_000)
            assert not page.locator("#dim3-analysis-empty").is_visible()
            assert "q_proj" in page.locator("#dim3-analysis-table").inner_text()
            link = page.locator("#dim3-analysis-csv a").first
            link.wait_for(timeout=30_000)
            csv_text = page.request.get(link.get_attribute("href")).text()
            assert csv_text.startswith("key,name,layer,module,group")
            assert len(csv_text.strip().splitlines()) == 1 + len(
                dg.diagnose(recipe_of(tiny_qwen2vl_trio))
            )
            if os.environ.get("DIM3_SCREENSHOTS"):
                page.screenshot(path=os.environ["DIM3_SCREENSHOTS"], full_page=True)
            browser.close()
    finally:
        app.close()
