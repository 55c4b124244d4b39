"""NeuroMerging and STF against float64 readings of the DiM3 paper's reference code, the SVD rules
exact at a real matrix shape, and what the optional randomized SVD does to a merged update.

The references here are written from the reference code (``NeuroMerging.py``: ``ours_kernel``,
``inner_ties_kernel``, ``ties_kernel``; ``utils.py``: ``merge_matrix``; and, for the SVD rules,
FusionBench's TSV-M / Iso-C / Iso-CTS and the MLLM benchmark's OptMerge, as in
tests/test_methods_matrix.py), literally and in float64, batched the way that code batches, and use
none of the project's helpers. The comparison: the largest difference on a tensor must stay
within 1e-4 of the largest entry of the reference's update.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dim3.methods import METHODS, get_method

# methods whose reference case lives in this file (tests/test_methods.py checks the coverage)
REFERENCED = {"neuromerging", "stf"}


def updates(shape, n, seed=0, scale=0.1, base_scale=1.0):
    """A random base and n tuned tensors near it (float32)."""
    g = torch.Generator().manual_seed(seed)
    base = base_scale * torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def run(method, base, tuned, **options):
    m = get_method(method)
    return m.merge(base, tuned, m.make_options(options), name="w")


def assert_exact(got, want, base):
    """``max |got − want| ≤ 1e-4 · max |want − base|`` (the reference's update)."""
    err = float((got.double() - want).abs().max())
    top = float((want - base.double()).abs().max())
    assert err <= 1e-4 * top, f"error {err:.3g} vs 1e-4 × {top:.3g}"


# --------------------------------------------------------------------------- NeuroMerging


def ref_inner_ties(scales):
    """``inner_ties_kernel``: (N, k) -> (k,); a zero column sum takes the majority sign."""
    sign = torch.sign(scales.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, scales > 0, scales < 0)
    kept = scales * keep
    return kept.sum(dim=0) / torch.clamp((kept != 0).sum(dim=0).double(), min=1)


def ref_neuromerging(base, tuned, cum_threshold=1.0, parallel="reference", scaling=1.0):
    w = base.double()
    d = torch.stack([(t - base).double() for t in tuned])  # (N, ...)
    if w.dim() != 2:  # ties_kernel over the flattened entries
        return w + scaling * ref_inner_ties(d.reshape(len(tuned), -1)).reshape(w.shape)
    w_ = w.unsqueeze(0)  # (1, m, n)
    scale = (d * w_).sum(dim=2) / (w_ * w_).sum(dim=2)  # (N, m)
    perp = d - scale.unsqueeze(2) * w_
    merged_scale = ref_inner_ties(scale)  # (m,)
    if parallel == "reference":
        proj = merged_scale.unsqueeze(1) * (w_ / w_.norm(dim=2, keepdim=True)).squeeze(0)
    else:
        proj = merged_scale.unsqueeze(1) * w
    perp = perp.permute(1, 0, 2)  # (m, N, n)
    _, s, vt = torch.linalg.svd(perp, full_matrices=False)
    cum = torch.cumsum(s**2, dim=1) / torch.sum(s**2, dim=1, keepdim=True)
    rank = torch.clamp((cum < cum_threshold).sum(dim=1) + 1, max=vt.shape[-2])
    v = vt.permute(0, 2, 1)  # (m, n, N)
    coords = perp @ v  # (m, N, N)
    rows = []
    for r in range(coords.shape[0]):
        merged = ref_inner_ties(coords[r])
        rows.append((merged[: rank[r]] * v[r, :, : rank[r]]).sum(dim=1))
    return w + scaling * (proj + torch.stack(rows))


NEURO_CASES = [
    ({}, {}),
    ({"parallel": "projection", "scaling": 0.6}, {"parallel": "projection", "scaling": 0.6}),
    ({"cum_threshold": 0.6}, {"cum_threshold": 0.6}),
]


@pytest.mark.parametrize("options,ref_options", NEURO_CASES)
@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (40, 3), (17,)])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_neuromerging_matches_the_reference_kernel(options, ref_options, shape, n):
    base, tuned = updates(shape, n, seed=n * 100 + shape[0], base_scale=0.3)
    got = run("neuromerging", base, tuned, **options)
    assert_exact(got, ref_neuromerging(base, tuned, **ref_options), base)


def test_neuromerging_real_rows_and_row_slices_agree_with_the_whole():
    # rows of an MLP-like matrix: base entries ~0.02, updates ~1e-3 (the real scale)
    base, tuned = updates((64, 1536), 2, seed=3, scale=1e-3, base_scale=0.02)
    whole = run("neuromerging", base, tuned)
    assert_exact(whole, ref_neuromerging(base, tuned), base)
    m = METHODS["neuromerging"]
    assert m.kind == "elementwise"
    opts = m.make_options({})
    parts = [m.fn(base[a:b], [t[a:b] for t in tuned], opts, offset=a) for a, b in ((0, 5), (5, 64))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_neuromerging_one_update_and_the_parallel_choice():
    base, (t,) = updates((6, 5), 1, seed=4, base_scale=0.5)
    d = (t - base).double()
    w = base.double()
    a = (d * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
    # 'projection': the parallel and perpendicular parts add back to the update
    torch.testing.assert_close(run("neuromerging", base, [t], parallel="projection"), t)
    # 'reference': the parallel part is a / ‖w‖ along the unit row, as the code has it
    want = w + (d - a * w) + a * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(run("neuromerging", base, [t]).double(), want, rtol=1e-5, atol=1e-6)


def test_neuromerging_ties_and_zero_rows_by_hand():
    base = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    tuned = [
        base + torch.tensor([[0.5, 0.3], [0.2, 0.4]]),
        base + torch.tensor([[-0.5, 0.1], [0.2, 0.4]]),
    ]
    out = run("neuromerging", base, tuned, parallel="projection")
    # row 0: parallel scales +0.5 and −0.5 sum to zero: + is elected (the code would take the
    # tensor's majority sign), so 0.5 along w = (1, 0); the perpendicular parts (0, 0.3) and
    # (0, 0.1) share one direction with coordinates of one sign: their mean, (0, 0.2)
    assert out[0].tolist() == pytest.approx([1.5, 0.2])
    # row 1: a zero base row has no direction (the code divides 0 by 0): all perpendicular
    assert out[1].tolist() == pytest.approx([0.2, 0.4])


# --------------------------------------------------------------------------- STF


def ref_stf(base, tuned, scaling=1.0, mm=0.9, ml=0.1):
    w = base.double()
    d = [(t - base).double() for t in tuned]
    if w.dim() != 2:
        return w + mm * d[0] + ml * sum(d[1:])
    u, s, vh = torch.linalg.svd(torch.stack(d), full_matrices=False)  # batched, as merge_matrix
    u_m = u.permute(1, 0, 2).reshape(u.shape[1], -1)
    s_m = s.reshape(-1)
    vh_m = vh.reshape(-1, vh.shape[2])
    coef = (u_m.T @ u_m) * (vh_m @ vh_m.T) * s_m.reshape(1, -1)
    x = torch.linalg.solve(coef, s_m)
    return w + scaling * (u_m @ ((x * s_m).reshape(-1, 1) * vh_m))


@pytest.mark.parametrize(
    "options", [{}, {"scaling": 0.5, "multimodal_weight": 0.3, "multilingual_weight": 0.7}]
)
@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (16, 16), (40, 3), (17,)])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_stf_matches_merge_matrix(options, shape, n):
    base, tuned = updates(shape, n, seed=n * 10 + shape[0])
    keys = {"scaling": "scaling", "multimodal_weight": "mm", "multilingual_weight": "ml"}
    want = ref_stf(base, tuned, **{keys[k]: v for k, v in options.items()})
    assert_exact(run("stf", base, tuned, **options), want, base)


def test_stf_keeps_every_feature_at_its_strength():
    base, tuned = updates((20, 14), 3, seed=5)
    update = (run("stf", base, tuned) - base).double()
    for t in tuned:
        u, s, vh = torch.linalg.svd((t - base).double(), full_matrices=False)
        along = torch.einsum("ma,mn,an->a", u, update, vh)  # u_aᵀ M v_a
        torch.testing.assert_close(along, s, rtol=1e-4, atol=1e-5)


def test_stf_identical_and_rank_deficient_updates():
    base, (t,) = updates((10, 8), 1, seed=6)
    # identical updates: the system is singular (every feature twice); the minimum-norm solution
    # gives the update back, where merge_matrix's solve would fail
    torch.testing.assert_close(run("stf", base, [t, t.clone()]), t, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(7)
    rank1 = torch.outer(torch.randn(10, generator=g), torch.randn(8, generator=g))
    out = run("stf", base, [base + rank1, base.clone()])  # a zero update takes no part
    torch.testing.assert_close(out, base + rank1, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SVD rules, real shape
# One MLP matrix of Qwen2-VL-2B (hidden 1,536 × intermediate 8,960), updates at the real scale.


def svd64(a):
    return torch.linalg.svd(a, full_matrices=False)


def polar64(x):
    p, _, qh = svd64(x)
    return p @ qh


def real_refs(base, tuned, only=("tsv", "iso_c", "iso_cts", "optmerge")):
    """Float64 TSV-M, Iso-C, Iso-CTS and OptMerge (300 literal steps of SGD with momentum), those
    in ``only``, from one set of SVDs."""
    d = [(t - base).double() for t in tuned]
    n, r = len(d), min(base.shape)
    k = max(1, r // n)
    svds = [svd64(x) for x in d] if {"tsv", "optmerge"} & set(only) else []
    w = base.double()
    out = {}
    if "tsv" in only:
        out["tsv"] = ref_tsv_from(w, svds, k)
    if {"iso_c", "iso_cts"} & set(only):
        out.update(ref_iso_from(w, d, r, "iso_cts" in only))
    if "optmerge" in only:
        out["optmerge"] = ref_optmerge_from(w, d, svds, k)
    return out


def ref_tsv_from(w, svds, k):
    u = torch.cat([a[:, :k] for a, _, _ in svds], 1)
    s = torch.cat([b[:k] for _, b, _ in svds])
    v = torch.cat([c[:k].T for _, _, c in svds], 1)
    return w + polar64(u) @ torch.diag(s) @ polar64(v).T


def ref_iso_from(w, d, r, cts=True):
    n = len(d)
    out = {}
    us, ss, vhs = svd64(sum(d))
    out["iso_c"] = w + ss.mean() * us @ vhs
    if not cts:
        return out
    # Iso-CTS (common_space_fraction 0.8)
    common = int(r * 0.8)
    per = min(round((r - common) / n), r // n)
    common = r - n * per
    uc = us[:, :common]
    parts_u, parts_s, parts_v = [uc], [ss[:common]], [vhs[:common].T]
    for x in d:
        a, b, c = svd64(x - uc @ (uc.T @ x))
        parts_u.append(a[:, :per]), parts_s.append(b[:per]), parts_v.append(c[:per].T)
    s_all = torch.cat(parts_s)
    pu, pv = polar64(torch.cat(parts_u, 1)), polar64(torch.cat(parts_v, 1))
    out["iso_cts"] = w + s_all.mean() * pu @ pv.T
    return out


def ref_optmerge_from(w, d, svds, k):
    n = len(d)
    # OptMerge: loss Σ ‖(θ − τ̂_i) L_iᵀ‖² / ‖τ_i‖², gradient 2 (θ M − P), M = Σ L_iᵀ L_i / ‖τ_i‖²
    # (n, n), P = Σ τ̂_i L_iᵀ L_i / ‖τ_i‖². Every gradient's rows lie in the span of the L_i's rows,
    # so θ_t = θ_0 + Z_t Qᵀ with Q an orthonormal basis of that span (QR); the 300 steps of
    # SGD(lr 1e-4, momentum 0.9) run literally on Z in the eigenbasis of QᵀMQ (NK × NK)
    # instead of on the (m, n) θ with an (n, n) M.
    theta0 = sum(d) / n
    targets = [(a[:, :k] * b[:k]) @ c[:k] for a, b, c in svds]
    inputs = [b[:k, None] * c[:k] for _, b, c in svds]  # L_i (k, n)
    norms = [float(x.square().sum()) for x in d]
    q, _ = torch.linalg.qr(torch.cat([li.T for li in inputs], 1))  # (n, NK)
    lq = [li @ q for li in inputs]  # (k, NK)
    m_red = sum(a.T @ a / nn for a, nn in zip(lq, norms, strict=True))  # QᵀMQ
    c_red = sum(
        (theta0 - t) @ li.T @ a / nn
        for t, li, a, nn in zip(targets, inputs, lq, norms, strict=True)
    )  # (θ_0 M − P) Q, (m, NK)
    lam, e = torch.linalg.eigh(m_red)
    c_eig = c_red @ e
    z, buf = torch.zeros_like(c_eig), torch.zeros_like(c_eig)
    for _ in range(300):
        buf = 0.9 * buf + 2 * (c_eig + z * lam)
        z = z - 1e-4 * buf
    return w + theta0 + (z @ e.T) @ q.T


SIX_AT_REAL_SHAPE = pytest.mark.skipif(
    not os.environ.get("DIM3_REAL_SHAPE_N6"),
    reason="6 updates at 1536 x 8960 take about an hour on 2 CPU cores; set DIM3_REAL_SHAPE_N6=1",
)


@pytest.fixture(
    scope="module", params=[2, pytest.param(6, marks=SIX_AT_REAL_SHAPE)], ids=["N2", "N6"]
)
def real_case(request):
    base, tuned = updates(
        (1536, 8960), request.param, seed=request.param, scale=1e-3, base_scale=0.02
    )
    return base, tuned, {}  # references, computed when a test first needs them


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "optmerge"])
def test_svd_rules_are_exact_at_the_real_mlp_shape(method, real_case):
    base, tuned, refs = real_case
    if method not in refs:
        refs.update(real_refs(base, tuned, (method,)))
    assert_exact(run(method, base, tuned), refs[method], base)


# --------------------------------------------------------------------------- randomized, opt-in


def test_randomized_svd_is_opt_in_and_changes_the_merge():
    # (192, 160) with 6 updates: k = 26, so the randomized path applies when asked
    base, tuned = updates((192, 160), 6, seed=9)
    from tests.test_methods_matrix import ref_iso_cts, ref_tsv

    refs = {"tsv": ref_tsv(base, tuned), "iso_cts": ref_iso_cts(base, tuned)}
    for method, want in refs.items():
        assert_exact(run(method, base, tuned), want, base)  # the default: exact
        fast = run(method, base, tuned, svd="randomized")
        torch.testing.assert_close(fast, run(method, base, tuned, svd="randomized"), rtol=0, atol=0)
        rel = float((fast.double() - want).abs().max() / (want - base.double()).abs().max())
        assert rel > 1e-2, (method, rel)  # the approximation shows in the merged update


# --------------------------------------------------------------------------- where methods appear


def test_new_rules_are_registered_and_reach_eval_and_sweeps():
    from dim3.cli import build_parser
    from dim3.evaluate import parse_methods
    from dim3.sweep import grid_points, parse_grid

    assert METHODS["neuromerging"].kind == "elementwise"  # row by row: streamed in row slices
    assert METHODS["stf"].kind == "matrix"
    assert {"neuromerging", "stf"} <= set(parse_methods("all"))
    args = build_parser().parse_args(["merge", "--method", "stf", "--option", "scaling=0.5"])
    assert args.method == "stf"
    points = grid_points("neuromerging", parse_grid(["parallel=reference,projection"]))
    assert [p["parallel"] for p in points] == ["reference", "projection"]
    points = grid_points("tsv", parse_grid(["svd=exact,randomized"]))
    assert [p["svd"] for p in points] == ["exact", "randomized"]
    with pytest.raises(ValueError, match="svd"):
        grid_points("tsv", parse_grid(["svd=fast"]))


def test_app_shows_a_named_choice_as_a_menu_with_help():
    import gradio as gr

    from dim3.methods import option_fields
    from dim3.ui.form import option_widget

    with gr.Blocks():
        for method, name in (("tsv", "svd"), ("neuromerging", "parallel")):
            field = next(f for f in option_fields(method) if f.name == name)
            widget = option_widget(field, field.default, True)
            assert isinstance(widget, gr.Dropdown)
            assert [c[1] for c in widget.choices] == list(field.metadata["choices"])
            assert widget.value == field.default and widget.info == field.metadata["help"]


@pytest.mark.slow
def test_cli_merges_with_the_new_rules_and_records_the_svd_choice(
    tiny_qwen2vl_trio, tmp_path, capsys
):
    import json

    from dim3.cli import main

    trio = tiny_qwen2vl_trio
    args = ["merge", "--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    args += ["--multimodal", str(trio.multimodal), "--device", "cpu"]
    runs = {
        "neuromerging": ["--option", "parallel=projection", "--option", "cum_threshold=0.9"],
        "stf": ["--option", "scaling=0.8"],
        "tsv": ["--option", "svd=randomized"],
    }
    for method, options in runs.items():
        out = tmp_path / method
        capsys.readouterr()
        assert main([*args, "--method", method, *options, "--out", str(out)]) == 0
        printed = capsys.readouterr().out  # the plan says what the approximation does
        assert ("Note: svd=randomized: tsv's per-update SVDs" in printed) == (method == "tsv")
        assert ("0.80 (tsv)" in printed) == (method == "tsv")
        recipe = json.loads((out / "dim3_recipe.json").read_text())
        card = (out / "README.md").read_text()
        assert recipe["method"] == method and METHODS[method].paper in card
        for pair in options[1::2]:
            key, value = pair.split("=")
            assert str(recipe["options"][key]) == value
            assert f'"{key}": ' in card
    assert main([*args, "--method", "stf", "--option", "svd=exact", "--out", str(tmp_path / "x")])


# --------------------------------------------------------------------------- the reference's outer tensors


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neuromerging", "stf"])
def test_outer_tensors_linear_merges_them_as_the_reference_code_does(
    method, tiny_llava_trio, tmp_path
):
    """``outer_tensors=linear``: token embeddings, LM head and final norm become
    base + 0.9 τ_VLM + 0.1 τ_multilingual (the DiM3 reference code's split) on the rows the three
    share, the VLM-only rows stay the VLM's, and every other tensor is the rule's as before."""
    from dim3 import engine
    from tests.test_engine import base_name, load_all, recipe_of

    trio = tiny_llava_trio
    folders = {}
    for outer in ("rule", "linear"):
        recipe = recipe_of(trio, method=method, options={"outer_tensors": outer})
        engine.merge_to_folder(recipe, tmp_path / outer)
        folders[outer] = load_all(tmp_path / outer)
    base, ml, vlm = (load_all(Path(p)) for p in (trio.base, trio.multilingual, trio.multimodal))
    outer_keys = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    seen = set()
    for key, got in folders["linear"].items():
        name = base_name(key)
        if name not in outer_keys:
            torch.testing.assert_close(got, folders["rule"][key], rtol=0, atol=0, msg=key)
            continue
        seen.add(name)
        b, m, v = base[name].double(), ml[name].double(), vlm[key].double()
        rows = b.shape[0] if b.dim() == 2 else None
        want = v.clone()
        if rows is None:
            want = b + 0.9 * (v - b) + 0.1 * (m - b)
        else:
            want[:rows] = b + 0.9 * (v[:rows] - b) + 0.1 * (m[:rows] - b)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, msg=key)
        if got.dim() == 2 or method == "neuromerging":  # STF merges 1-D tensors linearly anyway
            assert not torch.equal(got, folders["rule"][key]), key  # the rule differs there
    assert seen == outer_keys
