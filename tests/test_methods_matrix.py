"""The SVD and optimisation rules (tsv, iso_c, iso_cts, wudi, optmerge) and PCB.

Each rule against a straightforward float64 reading of its paper's reference code, written
plainly here; SVD identities; the optimisers' losses; N = 1, zero, rank-deficient and all-zero
updates; reproducibility; the optional randomized SVD's reconstruction error; and merges of the
tiny trios through the engine, embeddings (transposed) included.
"""

from __future__ import annotations

import math

import pytest
import torch

from dim3.methods import METHODS, get_method, iso, optmerge, pcb, tsv, wudi
from dim3.methods import _svd as S

NEW = ["tsv", "iso_c", "iso_cts", "wudi", "optmerge", "pcb"]
# methods whose reference case lives in this file (tests/test_methods.py checks the coverage)
REFERENCED = set(NEW)


def updates(shape, n, seed=0, scale=0.1):
    """A random base and n tuned tensors near it (float32)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def run(method, base, tuned, **options):
    m = get_method(method)
    return m.merge(base, tuned, m.make_options(options), name="w")


def deltas64(base, tuned):
    return [(t - base).double() for t in tuned]


def svd64(a):
    return torch.linalg.svd(a, full_matrices=False)


def polar64(x):
    p, _, qh = svd64(x)
    return p @ qh


def _recipe(trio, method, **options):
    from dim3.recipe import Recipe, Source

    return Recipe(
        Source(str(trio.base)),
        Source(str(trio.multilingual)),
        Source(str(trio.multimodal)),
        method=method,
        options=options,
        device="cpu",
    )


# --------------------------------------------------------------------------- references


def ref_tsv(base, tuned, scaling=1.0):
    d = deltas64(base, tuned)
    k = max(1, min(base.shape) // len(d))
    us, ss, vs = [], [], []
    for x in d:
        u, s, vh = svd64(x)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return base.double() + scaling * polar64(u) @ torch.diag(s) @ polar64(v).T


def ref_iso_c(base, tuned, scaling=1.0):
    u, s, vh = svd64(sum(deltas64(base, tuned)))
    return base.double() + scaling * s.mean() * u @ vh


def ref_iso_cts(base, tuned, fraction=0.8, scaling=1.0):
    d = deltas64(base, tuned)
    r, n = min(base.shape), len(d)
    common = int(r * fraction)
    per_task = min(round((r - common) / n), r // n)
    common = r - n * per_task
    u, s, vh = svd64(sum(d))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    for x in d:
        own = x - us[0] @ us[0].T @ x
        u, s, vh = svd64(own)
        us.append(u[:, :per_task]), ss.append(s[:per_task]), vs.append(vh[:per_task].T)
    s = torch.cat(ss)
    iso_s = torch.full_like(s, float(s.mean()))
    u, v = polar64(torch.cat(us, 1)), polar64(torch.cat(vs, 1))
    return base.double() + scaling * u @ torch.diag(iso_s) @ v.T


def wudi_loss64(theta, d):
    return sum(((theta - x) @ x.T).square().sum() / x.square().sum() for x in d)


def ref_wudi(base, tuned, iterations, lr, scaling=1.0):
    """The paper's loop: autograd through the literal loss, torch.optim.Adam, in float64."""
    d = deltas64(base, tuned)
    theta = torch.nn.Parameter(sum(d).clone())
    opt = torch.optim.Adam([theta], lr=lr)
    losses = []
    for _ in range(iterations):
        loss = wudi_loss64(theta, d)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(float(wudi_loss64(theta.detach(), d)))
    return base.double() + scaling * theta.detach(), losses


def ref_optmerge_problem(base, tuned):
    d = deltas64(base, tuned)
    k = max(1, min(base.shape) // len(d))
    targets, inputs = [], []
    for x in d:
        u, s, vh = svd64(x)
        targets.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
        inputs.append(torch.diag(s[:k]) @ vh[:k])
    return d, targets, inputs


def ref_optmerge(base, tuned, iterations, lr, momentum=0.9, scaling=1.0):
    """The reference code's loop: SGD with momentum on the literal loss, in float64."""
    d, targets, inputs = ref_optmerge_problem(base, tuned)
    theta = torch.nn.Parameter(sum(d) / len(d))
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)

    def loss_of(th):
        return sum(
            ((th - t) @ li.T).square().sum() / x.square().sum()
            for x, t, li in zip(d, targets, inputs, strict=True)
        )

    losses = []
    for _ in range(iterations):
        loss = loss_of(theta)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(float(loss_of(theta.detach())))
    return base.double() + scaling * theta.detach(), losses


def ref_pcb(base, tuned, ratio=0.1, scaling=1.0):
    """PCB_merge of the paper's code on the flattened tensor: sorts, min-max, exp, tanh."""
    tau = torch.stack([x.flatten() for x in deltas64(base, tuned)])  # (N, d)
    n, d = tau.shape

    def clamp_rows(x, lo_ratio, hi_ratio):
        srt = x.sort(dim=1).values
        lo = srt[:, int(d * lo_ratio)].unsqueeze(1)
        hi = srt[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def normalize_rows(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    mag = clamp_rows(tau.abs(), 1e-4, 1e-4)
    intra = torch.exp(n * normalize_rows(mag) ** 2)
    inter = torch.tanh(tau * tau.sum(dim=0))
    scale = normalize_rows(clamp_rows(intra * inter, 1 - ratio, 0))
    merged = (torch.sign(tau) * mag * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return base.double() + scaling * merged.reshape(base.shape)


SHAPES = [(12, 9), (9, 12), (16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(
    "method,options,reference",
    [
        ("tsv", {}, ref_tsv),
        ("tsv", {"scaling": 0.7}, lambda b, t: ref_tsv(b, t, 0.7)),
        ("iso_c", {"scaling": 1.3}, lambda b, t: ref_iso_c(b, t, 1.3)),
        ("iso_cts", {}, ref_iso_cts),
        ("iso_cts", {"common_space_fraction": 0.5}, lambda b, t: ref_iso_cts(b, t, 0.5)),
        ("pcb", {}, ref_pcb),
        ("pcb", {"ratio": 0.3, "scaling": 0.5}, lambda b, t: ref_pcb(b, t, 0.3, 0.5)),
    ],
)
def test_svd_rules_and_pcb_match_reference(method, options, reference, shape, n):
    base, tuned = updates(shape, n, seed=shape[0] * 10 + n)
    got = run(method, base, tuned, **options)
    torch.testing.assert_close(got, reference(base, tuned).float(), rtol=1e-4, atol=1e-5)


def test_pcb_matches_reference_on_a_larger_tensor_and_1d():
    for shape in [(120, 150), (3000,)]:  # d > 10^4: the 0.01 % clip bites at the top
        base, tuned = updates(shape, 3, seed=1)
        torch.testing.assert_close(run("pcb", base, tuned), ref_pcb(base, tuned).float())


# (3, 40): n > 2 N m, the gradient's wide form (transposed token embeddings); the others: Gram
@pytest.mark.parametrize("shape", [(12, 9), (9, 14), (3, 40)])
@pytest.mark.parametrize("n", [2, 3])
def test_wudi_matches_the_papers_adam_loop(shape, n):
    base, tuned = updates(shape, n, seed=n)
    want, _ = ref_wudi(base, tuned, iterations=60, lr=1e-3)
    got = run("wudi", base, tuned, iterations=60, lr=1e-3)
    assert not torch.allclose(got, run("wudi", base, tuned, iterations=0), atol=1e-3)  # it moved
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("shape", [(12, 9), (9, 14), (10, 10)])
@pytest.mark.parametrize("n", [2, 3])
def test_optmerge_closed_form_equals_the_sgd_loop(shape, n):
    base, tuned = updates(shape, n, seed=n + 7)
    momentum = 0.9 if n == 2 else 0.5
    want, _ = ref_optmerge(base, tuned, iterations=100, lr=1e-2, momentum=momentum)
    got = run("optmerge", base, tuned, iterations=100, lr=1e-2, momentum=momentum)
    start = run("optmerge", base, tuned, iterations=0)
    assert (got - start).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_optmerge_defaults_equal_the_sgd_loop_and_the_loss_decreases():
    base, tuned = updates((12, 10), 3, seed=7)
    want, ref_losses = ref_optmerge(base, tuned, iterations=300, lr=1e-4)
    torch.testing.assert_close(run("optmerge", base, tuned), want.float(), rtol=1e-5, atol=1e-6)
    p = optmerge.problem([t - base for t in tuned])
    losses = [optmerge.loss(optmerge.solve(p, t, 1e-4, 0.9), p) for t in range(0, 301, 20)]
    assert losses[-1] < 0.99 * losses[0]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-4)


# --------------------------------------------------------------------------- identities


def test_polar_factor_is_orthonormal_and_the_procrustes_solution():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=g)
    w = S.polar(x)
    torch.testing.assert_close(w.T @ w, torch.eye(8), atol=1e-5, rtol=0)
    # the nearest orthonormal-column matrix: no random orthonormal Y is closer to x
    best = (w - x).norm()
    for _ in range(20):
        y, _ = torch.linalg.qr(torch.randn(20, 8, generator=g))
        assert (y - x).norm() >= best - 1e-5
    torch.testing.assert_close(w, polar64(x.double()).float(), atol=1e-5, rtol=0)


def test_tsv_keeps_the_top_components_and_orthogonal_updates_add():
    # updates with mutually orthogonal singular vectors: TSV-M is exactly the sum of their
    # rank-k truncations (the concatenations are already orthonormal)
    g = torch.Generator().manual_seed(4)
    q_left, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    q_right, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    s1, s2 = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.tensor([6.0, 0.5, 0.4, 0.3, 0.2])
    d1 = (q_left[:, :5] * s1) @ q_right[:, :5].T
    d2 = (q_left[:, 5:10] * s2) @ q_right[:, 5:10].T
    base = torch.zeros(12, 10)
    out = run("tsv", base, [d1, d2])  # k = 10 // 2 = 5: both keep everything
    torch.testing.assert_close(out, d1 + d2, atol=1e-5, rtol=0)
    d3 = (q_left[:, 10:12] * torch.tensor([1.0, 0.9])) @ q_right[:, [0, 9]].T
    out = run("tsv", base, [d1, d2, d3])  # k = 3: each keeps its top 3
    top3 = (q_left[:, :3] * s1[:3]) @ q_right[:, :3].T + (q_left[:, 5:8] * s2[:3]) @ q_right[
        :, 5:8
    ].T
    assert torch.linalg.matrix_rank(out - top3) <= 3  # what is left is d3's share


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_spectrum_is_isotropic(method):
    base, tuned = updates((14, 10), 2, seed=5)
    update = (run(method, base, tuned) - base).double()
    s = torch.linalg.svdvals(update)
    assert s.max() - s.min() < 1e-4 * s.max()
    if method == "iso_c":  # the value is the mean singular value of the summed update
        want = torch.linalg.svdvals(sum(deltas64(base, tuned))).mean()
        torch.testing.assert_close(s, torch.full_like(s, float(want)), rtol=1e-5, atol=0)


def test_iso_cts_split_gives_every_update_the_same_share():
    assert iso.split_rank(100, 2, 0.8) == (80, 10)
    assert iso.split_rank(100, 3, 0.8) == (79, 7)
    assert iso.split_rank(7, 2, 0.0) == (1, 3)  # round(3.5) = 4 would overflow the rank
    assert iso.split_rank(10, 4, 1.0) == (10, 0)
    for r, n, f in [(256, 2, 0.8), (17, 5, 0.3), (3, 4, 0.5)]:
        common, per = iso.split_rank(r, n, f)
        assert common + n * per == r and common >= 0 and per >= 0


# --------------------------------------------------------------------------- the optimisers


def test_wudi_loss_decreases_with_the_defaults():
    base, tuned = updates((12, 10), 2, seed=6)
    losses: list[float] = []
    wudi.optimise([t - base for t in tuned], 300, 1e-5, losses)
    assert len(losses) == 301 and losses[-1] < 0.99 * losses[0]
    rises = sum(b > a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False))
    assert rises <= 15  # monotone but for float noise
    d = deltas64(base, tuned)
    assert losses[0] == pytest.approx(float(wudi_loss64(sum(d), d)), rel=1e-5)


@pytest.mark.parametrize("method", ["wudi", "optmerge", "tsv", "iso_cts", "pcb"])
def test_runs_repeat_bit_for_bit_and_leave_the_global_rng_alone(method):
    # (120, 200) with N = 5: k = 24, so TSV and Iso-CTS can take the randomized SVD (asked)
    base, tuned = updates((120, 200), 5, seed=8)
    options = {"iterations": 20} if method == "wudi" else {}
    if method in ("tsv", "iso_cts", "optmerge"):
        options = {"svd": "randomized"}
    torch.manual_seed(1)
    first = run(method, base, tuned, **options)
    after = torch.rand(3)
    torch.manual_seed(1)
    second = run(method, base, tuned, **options)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), after)  # the rule drew nothing from the global RNG


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", ["tsv", "wudi", "optmerge"])
@pytest.mark.parametrize("shape", [(9, 7), (7, 9), (11,)])
def test_one_update_gives_base_plus_scaled_update(method, shape):
    base, tuned = updates(shape, 1, seed=9)
    out = run(method, base, tuned, scaling=0.5)
    torch.testing.assert_close(out, base + 0.5 * (tuned[0] - base), atol=1e-5, rtol=1e-5)


def test_one_update_iso_flattens_it_and_pcb_keeps_its_top_share():
    base, tuned = updates((9, 7), 1, seed=10)
    d = (tuned[0] - base).double()
    u, s, vh = svd64(d)
    want = base.double() + s.mean() * u @ vh
    for method in ("iso_c", "iso_cts"):
        torch.testing.assert_close(run(method, base, tuned), want.float(), atol=1e-5, rtol=1e-5)
    out = run("pcb", base, tuned, ratio=0.2)
    kept = out != base
    assert 0 < kept.sum() <= math.ceil(0.2 * d.numel())
    # kept entries are the update's, clipped at the code's upper order statistic
    hi = d.abs().flatten().sort().values[int(d.numel() * (1 - 1e-4) - 1)]
    clipped = (torch.sign(d) * d.abs().clamp(max=hi)).float()
    torch.testing.assert_close(out[kept], (base + clipped)[kept])


@pytest.mark.parametrize("method", NEW)
def test_all_zero_and_rank_deficient_updates(method):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(10, 8, generator=g)
    rank1 = torch.outer(torch.randn(10, generator=g), torch.randn(8, generator=g))
    rank2 = rank1 + torch.outer(torch.randn(10, generator=g), torch.randn(8, generator=g))
    zero = torch.zeros(10, 8)
    cases = [
        [zero, zero, zero],  # all zero: the base, exactly
        [rank1, zero],  # one model changed nothing
        [rank1, rank2, 2 * rank1],  # low rank, and two updates in the same direction
        [rank1, rank1],  # identical
        [zero],
    ]
    for case in cases:
        out = run(method, base, [base + x for x in case])
        assert torch.isfinite(out).all(), case
        if all(bool((x == 0).all()) for x in case):
            assert torch.equal(out, base)
        elif method not in ("pcb", "wudi"):  # elementwise rules (Adam's steps are too)
            # no arbitrary (null-space) direction appears: the update stays in the span
            update = (out - base).double()
            stacked = torch.cat([x.double() for x in case], dim=1)
            assert torch.linalg.matrix_rank(update, rtol=1e-5) <= torch.linalg.matrix_rank(
                stacked, rtol=1e-5
            )


def test_tsv_of_identical_updates_is_their_truncation():
    base, (t, _) = updates((10, 8), 2, seed=12)
    d = (t - base).double()
    u, s, vh = svd64(d)
    want = base.double() + u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # k = 8 // 2
    torch.testing.assert_close(run("tsv", base, [t, t.clone()]), want.float(), atol=1e-5, rtol=0)


def test_wudi_skips_all_zero_updates_in_the_loss():
    base, (t,) = updates((8, 6), 1, seed=13)
    out = run("wudi", base, [t, base.clone()], iterations=50, lr=1e-3)
    # the zero update has no row space: θ = τ is the minimum of what is left and stays
    torch.testing.assert_close(out, t, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- randomized SVD


def _reconstruction_excess(a, k):
    u, s, vh = S.top_svd(a, k, randomized=True)
    opt = torch.linalg.svdvals(a.double())[k:].square().sum().sqrt()
    return float((a.double() - (u * s).double() @ vh.double()).norm() / opt - 1)


@pytest.mark.parametrize(
    "spectrum,bound", [("geometric", 1e-4), ("power", 0.02), ("gaussian", 0.03)]
)
def test_randomized_svd_error_is_as_documented(spectrum, bound):
    g = torch.Generator().manual_seed(14)
    m, n = 200, 500
    if spectrum == "gaussian":
        a = torch.randn(m, n, generator=g)
    else:
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
        j = torch.arange(m, dtype=torch.float32)
        s = 0.9**j if spectrum == "geometric" else (1 + j) ** -0.5
        a = (u * s) @ v.T
    for k in (10, 40):
        assert 4 * (k + S.OVERSAMPLE) <= m  # the randomized path
        excess = _reconstruction_excess(a, k)
        assert -1e-5 <= excess <= bound, (k, excess)
    u64, s64, vh64 = svd64(a.double())
    for k, randomized in ((100, True), (10, False)):  # a large share of the rank, or not asked
        u, s, vh = S.top_svd(a, k, randomized=randomized)  # the exact SVD
        want = u64[:, :k] @ torch.diag(s64[:k]) @ vh64[:k]
        torch.testing.assert_close((u * s) @ vh, want.float(), atol=1e-5 * float(s64[0]), rtol=0)


def test_top_svd_drops_zero_singular_values():
    a = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))  # rank 1, (6, 4)
    u, s, vh = S.top_svd(a, 3)
    assert s[1:].abs().max() == 0 and u[:, 1:].abs().max() == 0 and vh[1:].abs().max() == 0
    torch.testing.assert_close((u * s) @ vh, a)
    assert S.numerical_rank(torch.zeros(4), (6, 4)) == 0


# --------------------------------------------------------------------------- registry


def test_new_methods_are_registered_with_their_kind():
    kinds = {name: METHODS[name].kind for name in NEW}
    assert kinds == {
        "tsv": "matrix",
        "iso_c": "matrix",
        "iso_cts": "matrix",
        "wudi": "matrix",
        "optmerge": "matrix",
        "pcb": "ranked",
    }
    assert METHODS["iso_c"].paper == METHODS["iso_cts"].paper
    assert get_method("wudi").make_options({}).iterations == 300
    assert get_method("optmerge").make_options({}).momentum == 0.9
    assert tsv.TsvOptions().scaling == pcb.PcbOptions().scaling == 1.0
    with pytest.raises(ValueError, match="iterations"):
        get_method("wudi").make_options({"iterations": 2.5})


# --------------------------------------------------------------------------- through the engine

FAST = {"wudi": {"iterations": 10, "lr": 1e-4}, "optmerge": {"lr": 1e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW)
def test_tiny_qwen2vl_trio_merges_through_the_engine(method, tiny_qwen2vl_trio, tmp_path):
    from dim3.engine import merge_to_folder
    from tests.test_engine import base_name, load_all, tokenizer_len

    trio = tiny_qwen2vl_trio
    options = FAST.get(method, {})
    merge_to_folder(_recipe(trio, method, **options), tmp_path / "out")
    out, vlm = load_all(tmp_path / "out"), load_all(trio.multimodal)
    base, ml = load_all(trio.base), load_all(trio.multilingual)
    m = get_method(method)
    opts = m.make_options(options)
    rows = tokenizer_len(trio.base)
    checked = 0
    for key, tensor in out.items():
        name = base_name(key)
        if name is None:  # vision tower and projector: the VLM's, untouched
            assert torch.equal(tensor, vlm[key]), key
            continue
        b = base.get(name, base.get("model.embed_tokens.weight")).float()
        t = [vlm[key].float(), ml.get(name, ml.get("model.embed_tokens.weight")).float()]
        if name == "model.embed_tokens.weight":  # the engine merges (hidden, vocab)
            want = vlm[key].float().clone()
            want[:rows] = m.fn(b[:rows].T, [x[:rows].T for x in t], opts, name=key).T
        else:
            want = m.fn(b, t, opts, name=key)
        assert torch.equal(tensor, want.to(tensor.dtype)), key
        assert torch.isfinite(tensor.float()).all()
        checked += 1
    assert checked > 10


@pytest.mark.slow
def test_cli_merges_with_a_new_method_and_refuses_a_bad_option(tiny_qwen2vl_trio, tmp_path):
    from dim3.cli import main

    trio = tiny_qwen2vl_trio
    args = ["merge", "--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    args += ["--multimodal", str(trio.multimodal), "--device", "cpu", "--method", "optmerge"]
    assert main([*args, "--option", "momentum=0.5", "--out", str(tmp_path / "a")]) == 0
    recipe = (tmp_path / "a" / "dim3_recipe.json").read_text()
    assert '"optmerge"' in recipe and '"momentum": 0.5' in recipe
    assert "optmerge" in (tmp_path / "a" / "README.md").read_text()
    assert main([*args, "--option", "momentum=2", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_gram_svd_fallback_reconstructs_and_drops_zero_directions():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3, 2, 1, 0, 0]))
    u, s, vh = S.gram_svd(a)
    torch.testing.assert_close((u * s) @ vh, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-4, atol=1e-4)
    assert (s[4:] == 0).all() and (u[:, 4:] == 0).all()
    torch.testing.assert_close(u[:, :4].T @ u[:, :4], torch.eye(4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_precise_top_svd_and_polar_equal_float64_lapack(shape, monkeypatch):
    """The float64 Gram route (TSV and Iso-CTS) against LAPACK's float64 SVD, in small blocks so
    that the blocking is exercised, on a matrix with a spread spectrum and two zero directions."""
    monkeypatch.setattr(S, "BLOCK_ELEMENTS", 1000)  # 25 rows of 40 per block, 3 of 300
    g = torch.Generator().manual_seed(5)
    m, n = shape
    r = min(shape)
    spectrum = torch.cat([torch.logspace(0, -3, r - 2), torch.zeros(2)]).double()
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    a = ((q1 * spectrum) @ q2.T).float()
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    k = r - 5
    u, s, vh = S.top_svd(a, k, precise=True)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    assert u.shape == (m, k) and vh.shape == (k, n)
    torch.testing.assert_close(s, s64[:k], rtol=1e-9, atol=1e-12)
    # singular vectors up to sign, compared through the rank-k projectors
    torch.testing.assert_close(u @ u.T, u64[:, :k] @ u64[:, :k].T, rtol=0, atol=1e-8)
    torch.testing.assert_close(vh.T @ vh, vh64[:k].T @ vh64[:k], rtol=0, atol=1e-8)
    # all of it: the two zero directions are dropped, not arbitrary vectors
    u, s, vh = S.top_svd(a, r, precise=True)
    assert (s[-2:] == 0).all() and (u[:, -2:] == 0).all() and (vh[-2:] == 0).all()
    torch.testing.assert_close((u * s) @ vh, a.double(), rtol=0, atol=1e-6)
    # the polar factor over the numerical rank, against P Qᵀ of the float64 SVD
    want = u64[:, : r - 2] @ vh64[: r - 2]
    got = S.polar(a, precise=True)
    assert got.dtype == torch.float32 and got.shape == a.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-7)


def test_precise_polar_keeps_ill_conditioned_directions_and_drops_dependent_ones():
    """A concatenation of unit vectors with condition number 1e4 is full-rank: every direction
    stays (a float32 tolerance would drop the smallest); an exactly repeated block is not."""
    g = torch.Generator().manual_seed(8)
    q1, _ = torch.linalg.qr(torch.randn(2000, 60, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    x = (q1 * torch.logspace(0, -4, 60, dtype=torch.float64)) @ q2.T
    want = q1 @ q2.T
    torch.testing.assert_close(S.polar(x, precise=True).double(), want, rtol=0, atol=1e-6)
    u = q1[:, :30]
    twice = torch.cat([u, u], dim=1)  # rank 30 of 60: the polar factor over the rank only
    p = S.polar(twice, precise=True).double()
    torch.testing.assert_close(p, torch.cat([u, u], dim=1) / 2**0.5, rtol=0, atol=1e-6)


def test_tsv_and_iso_cts_are_exact_where_the_concatenation_is_ill_conditioned():
    """6 updates of a (384, 2240) matrix: TSV's concatenated left vectors are square and their
    condition number is in the hundreds; the float32 polar factor used to pass the per-update
    SVDs' rounding into the merge (3.7e-5 of the update here, 4.7e-4 at 1536 x 8960). Against a
    float64 LAPACK computation of the rules (tests/test_methods_reference.py's references)."""
    from tests.test_methods_reference import real_refs, updates

    base, tuned = updates((384, 2240), 6, seed=6, scale=1e-3, base_scale=0.02)
    refs = real_refs(base, tuned, ("tsv", "iso_cts"))
    for method in ("tsv", "iso_cts"):
        got = get_method(method).fn(base, tuned, get_method(method).make_options({}))
        want = refs[method]
        rel = float((got.double() - want).abs().max() / (want - base.double()).abs().max())
        assert rel < 2e-6, (method, rel)  # float32 rounding of the result, no amplification


# --------------------------------------------------------------------------- inner-step progress


@pytest.mark.parametrize(
    ("method", "options", "steps"), [("wudi", {"iterations": 7}, 7), ("tsv", {}, 4)]
)
def test_slow_rules_report_their_inner_steps_through_the_engine(
    method, options, steps, tiny_qwen2vl_trio, tmp_path
):
    from dim3 import engine
    from dim3.ui.progress import progress_fraction, progress_line

    events = []
    engine.merge_to_folder(
        _recipe(tiny_qwen2vl_trio, method, **options), tmp_path / "out", progress=events.append
    )
    inner = [p for p in events if p.steps]
    assert inner and all(p.steps == steps for p in inner)
    per_tensor: dict[str, list[int]] = {}
    for p in inner:
        per_tensor.setdefault(p.key, []).append(p.step)
    assert all(seen == list(range(1, steps + 1)) for seen in per_tensor.values()), per_tensor
    assert all(key.endswith("weight") for key in per_tensor)
    # the step events sit between the tensor counts: done is the tensors finished before
    finished = [p.done for p in events if not p.steps]
    assert finished == sorted(finished) and finished[-1] == events[-1].total
    fractions = [progress_fraction(p) for p in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    line = progress_line(inner[0])
    assert f"step 1/{steps}" in line, line


def test_a_merge_stops_inside_a_wudi_tensor_and_leaves_nothing(tiny_qwen2vl_trio, tmp_path):
    from dim3 import engine

    seen = []

    def stop(p):
        seen.append(p)
        if p.steps and p.step == 3:
            raise KeyboardInterrupt("user stopped")

    with pytest.raises(KeyboardInterrupt):
        engine.merge_to_folder(
            _recipe(tiny_qwen2vl_trio, "wudi", iterations=50), tmp_path / "out", progress=stop
        )
    assert seen[-1].step == 3 and seen[-1].steps == 50  # stopped within the tensor's optimisation
    assert list(tmp_path.iterdir()) == []


def test_report_step_is_silent_without_a_listener_and_scoped_with_one():
    from dim3.methods._utils import listen_steps, report_step

    report_step(1, 2)  # no listener: nothing happens
    heard = []
    with listen_steps(lambda d, t: heard.append((d, t))):
        wudi.optimise([torch.ones(3, 2), -torch.ones(3, 2)], 4, 1e-3)
    report_step(5, 6)
    assert heard == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.slow
def test_cli_bar_shows_the_steps_of_a_slow_rule(tiny_qwen2vl_trio, tmp_path, capsys):
    from dim3.cli import main

    trio = tiny_qwen2vl_trio
    args = ["merge", "--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    args += ["--multimodal", str(trio.multimodal), "--device", "cpu", "--method", "wudi"]
    assert main([*args, "--option", "iterations=4", "--out", str(tmp_path / "w")]) == 0
    err = capsys.readouterr().err
    assert "step 1/4" in err, err[-500:]  # the first step of the first optimised tensor is drawn
