"""Merge rules: invariants over every registered method, each method against an independent
straightforward implementation and against values worked by hand, DARE's reproducibility, and the
DiM3 rule step by step against a loop-per-column reading of issue 2."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from dim3.methods import METHODS, get_method, option_fields
from dim3.methods import _utils as U
from dim3.methods import dim3 as D
from dim3.slices import Buffers

ALL = sorted(METHODS)


def sig(x: float) -> float:
    """The logistic function: a two-way softmax, ``e^a / (e^a + e^b) = sig(a − b)``."""
    return 1.0 / (1.0 + math.exp(-x))


def trio(shape: tuple[int, ...], seed: int = 0, scale: float = 0.1):
    """A random base and two tuned tensors near it (float32)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tuned = [base + scale * torch.randn(shape, generator=g) for _ in range(2)]
    return base, tuned


def run(method: str, base, tuned, name: str = "layer.weight", **options):
    m = get_method(method)
    return m.merge(base, tuned, m.make_options(options), name=name)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("method", ALL)
def test_registry_entry_is_complete(method):
    m = METHODS[method]
    assert m.name == method
    assert m.paper.startswith("https://arxiv.org/abs/")
    assert m.summary and "\n" not in m.summary
    defaults = m.make_options({})
    for f in option_fields(method):
        assert f.metadata["help"]
        if "choices" in f.metadata:  # a named choice: the default is one of them
            assert getattr(defaults, f.name) == f.default in f.metadata["choices"]
            continue
        lo, hi = f.metadata["min"], f.metadata["max"]
        assert lo <= getattr(defaults, f.name) <= hi
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.__setattr__(option_fields(method)[0].name, 0.5)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ties") as e:
        get_method("tie")
    assert all(name in str(e.value) for name in ALL)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("shape", [(5, 7), (13,), (3, 4, 2)])
@pytest.mark.parametrize("method", ALL)
def test_zero_deltas_give_the_base(method, shape):
    base, _ = trio(shape)
    out = run(method, base, [base.clone(), base.clone()])
    assert torch.equal(out, base)


@pytest.mark.parametrize("shape", [(5, 7), (13,)])
@pytest.mark.parametrize("method", ALL)
def test_shape_dtype_finite_and_inputs_untouched(method, shape):
    base, tuned = trio(shape, seed=1)
    base[..., 0] = 0.0  # a zero column/element in the base
    tuned[0][..., 1] = 0.0  # and in a tuned model
    tuned[1] = tuned[1] * 1e4  # wildly different scales
    copies = [base.clone()] + [t.clone() for t in tuned]
    out = run(method, base, tuned)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(copies, [base, *tuned], strict=True))
    assert not torch.equal(out, base)


@pytest.mark.parametrize("method", ALL)
def test_unknown_option_is_refused_by_name(method):
    with pytest.raises(ValueError, match="no_such_option"):
        get_method(method).make_options({"no_such_option": 1})


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", text)]


NUMBERS = [(m, f.name) for m in ALL for f in option_fields(m) if "choices" not in f.metadata]
CHOICES = [(m, f.name) for m in ALL for f in option_fields(m) if "choices" in f.metadata]


@pytest.mark.parametrize("method,field", CHOICES, ids=str)
def test_unknown_choice_names_option_and_choices(method, field):
    f = next(f for f in option_fields(method) if f.name == field)
    for bad in ("fastest", 1, None):
        with pytest.raises(ValueError) as e:
            get_method(method).make_options({field: bad})
        assert field in str(e.value) and all(repr(c) in str(e.value) for c in f.metadata["choices"])
    for good in f.metadata["choices"]:
        assert getattr(get_method(method).make_options({field: good}), field) == good


@pytest.mark.parametrize("method,field", NUMBERS, ids=str)
@pytest.mark.parametrize("where", ["below", "above", "text"])
def test_out_of_range_option_names_option_and_range(method, field, where):
    f = next(f for f in option_fields(method) if f.name == field)
    lo, hi = f.metadata["min"], f.metadata["max"]
    bad = {"below": lo - 1, "above": hi + 1, "text": "high"}[where]
    with pytest.raises(ValueError) as e:
        get_method(method).make_options({field: bad})
    message = str(e.value)
    assert field in message
    if where != "text":  # a wrong type is named; a wrong value also shows the range
        assert lo in _numbers(message) and hi in _numbers(message)


def test_a_huge_integer_option_is_shown_short():
    """``int(1e308)``, what a number field gives for 1e308, was echoed as 309 digits."""
    for bad, shown in ((int(1e308), "got 1e+308"), (10**5000, "got a number of about 5001 digits")):
        with pytest.raises(ValueError, match=r"wudi option iterations must lie in \[") as e:
            get_method("wudi").make_options({"iterations": bad})
        assert str(e.value).endswith(shown) and len(str(e.value)) < 120


def test_linear_refuses_two_zero_weights():
    with pytest.raises(ValueError, match="multimodal_weight and multilingual_weight"):
        get_method("linear").make_options({"multimodal_weight": 0, "multilingual_weight": 0})


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])  # per-model weights
def test_each_multilingual_model_gets_the_multilingual_weight(method):
    base, (mm, ml) = trio((2, 3))
    ml2 = ml * 0.5 + base * 0.5
    options = {"multimodal_weight": 0.7, "multilingual_weight": 0.4}
    got = run(method, base, [mm, ml, ml2], **options)
    w = (0.7, 0.4, 0.4)
    deltas = [t - base for t in (mm, ml, ml2)]
    scale = 1.0 / sum(w) if method == "linear" else 1.0
    want = base + scale * sum(wt * d for wt, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- references
# Straightforward element-by-element implementations, in float64 Python, written from the papers.


def ref_task_arithmetic(base, tuned, scaling=1.0, w=(1.0, 1.0)):
    b, ts = base.double().flatten().tolist(), [t.double().flatten().tolist() for t in tuned]
    out = [
        bi + scaling * sum(wt * (t[i] - bi) for wt, t in zip(w, ts, strict=True))
        for i, bi in enumerate(b)
    ]
    return torch.tensor(out).reshape(base.shape)


def ref_linear(base, tuned, w=(1.0, 1.0)):
    ts = [t.double().flatten().tolist() for t in tuned]
    out = [(w[0] * a + w[1] * c) / (w[0] + w[1]) for a, c in zip(*ts, strict=True)]
    return torch.tensor(out).reshape(base.shape)


def ref_keep(delta: list[float], keep: int, drop_large: int) -> list[bool]:
    """Keep ``keep`` entries after dropping ``drop_large`` largest and the smallest rest."""
    order = sorted(range(len(delta)), key=lambda i: (abs(delta[i]), i))
    n = len(delta)
    kept = set(order[n - keep - drop_large : n - drop_large])
    return [i in kept for i in range(n)]


def ref_disjoint(columns: list[list[float]]) -> list[float]:
    out = []
    for values in zip(*columns, strict=True):
        elected = 1.0 if sum(values) >= 0 else -1.0
        agree = [v for v in values if v != 0 and math.copysign(1.0, v) == elected]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def ref_ties(base, tuned, density=0.2, scaling=1.0):
    b = base.double().flatten().tolist()
    n = len(b)
    trimmed = []
    for t in tuned:
        d = (t - base).double().flatten().tolist()
        keep = ref_keep(d, max(1, math.floor(density * n + 0.5)), 0)
        trimmed.append([x if k else 0.0 for x, k in zip(d, keep, strict=True)])
    merged = ref_disjoint(trimmed)
    return torch.tensor([bi + scaling * m for bi, m in zip(b, merged, strict=True)]).reshape(
        base.shape
    )


def ref_breadcrumbs(base, tuned, density=0.9, gamma=0.01, scaling=1.0):
    b = base.double().flatten().tolist()
    n = len(b)
    keep = max(1, math.floor(density * n + 0.5))
    drop_large = min(math.floor(gamma * n + 0.5), n - keep)
    total = [0.0] * n
    for t in tuned:
        d = (t - base).double().flatten().tolist()
        mask = ref_keep(d, keep, drop_large)
        total = [s + (x if k else 0.0) for s, x, k in zip(total, d, mask, strict=True)]
    return torch.tensor([bi + scaling * s for bi, s in zip(b, total, strict=True)]).reshape(
        base.shape
    )


def ref_dare_vectors(base, tuned, p, seed, name):
    """DARE'd task vectors; the masks come from the documented seeding contract."""
    b = base.double().flatten().tolist()
    out = []
    for i, t in enumerate(tuned):
        keep = U.dare_keep_mask(base.shape, p, seed, name, i).flatten().tolist()
        d = (t - base).double().flatten().tolist()
        out.append([x / (1 - p) if k else 0.0 for x, k in zip(d, keep, strict=True)])
    return b, out


def ref_dare_ta(base, tuned, p=0.9, seed=0, scaling=1.0, name="layer.weight"):
    b, vs = ref_dare_vectors(base, tuned, p, seed, name)
    out = [bi + scaling * sum(col) for bi, col in zip(b, zip(*vs, strict=True), strict=True)]
    return torch.tensor(out).reshape(base.shape)


def ref_dare_ties(base, tuned, p=0.9, seed=0, scaling=1.0, name="layer.weight"):
    b, vs = ref_dare_vectors(base, tuned, p, seed, name)
    out = [bi + scaling * m for bi, m in zip(b, ref_disjoint(vs), strict=True)]
    return torch.tensor(out).reshape(base.shape)


CASES = [
    ("task_arithmetic", {}, lambda b, t: ref_task_arithmetic(b, t)),
    (
        "task_arithmetic",
        {"scaling": 0.4, "multimodal_weight": 0.5, "multilingual_weight": 2.0},
        lambda b, t: ref_task_arithmetic(b, t, 0.4, (0.5, 2.0)),
    ),
    ("linear", {}, lambda b, t: ref_linear(b, t)),
    (
        "linear",
        {"multimodal_weight": 1.0, "multilingual_weight": 3.0},
        lambda b, t: ref_linear(b, t, (1.0, 3.0)),
    ),
    ("ties", {}, lambda b, t: ref_ties(b, t)),
    ("ties", {"density": 0.7, "scaling": 0.5}, lambda b, t: ref_ties(b, t, 0.7, 0.5)),
    ("dare_task_arithmetic", {}, lambda b, t: ref_dare_ta(b, t)),
    (
        "dare_task_arithmetic",
        {"drop_rate": 0.3, "seed": 7, "scaling": 0.5},
        lambda b, t: ref_dare_ta(b, t, 0.3, 7, 0.5),
    ),
    ("dare_ties", {}, lambda b, t: ref_dare_ties(b, t)),
    ("dare_ties", {"drop_rate": 0.5, "seed": 3}, lambda b, t: ref_dare_ties(b, t, 0.5, 3)),
    ("breadcrumbs", {}, lambda b, t: ref_breadcrumbs(b, t)),
    (
        "breadcrumbs",
        {"density": 0.5, "gamma": 0.1, "scaling": 2.0},
        lambda b, t: ref_breadcrumbs(b, t, 0.5, 0.1, 2.0),
    ),
    (
        "breadcrumbs",  # gamma > 1 - density: fewer large ones dropped so density holds
        {"density": 0.8, "gamma": 0.5},
        lambda b, t: ref_breadcrumbs(b, t, 0.8, 0.5),
    ),
]


@pytest.mark.parametrize("shape", [(6, 9), (31,), (120, 5)])
@pytest.mark.parametrize(
    "method,options,reference", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_method_matches_straightforward_reference(method, options, reference, shape):
    base, tuned = trio(shape, seed=sum(shape))
    out = run(method, base, tuned, **options)
    expected = reference(base, tuned).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_every_method_has_a_reference_case():
    from tests.test_methods_matrix import REFERENCED  # SVD, optimisation and PCB rules
    from tests.test_methods_reference import REFERENCED as NEW  # NeuroMerging, STF

    fisher = {"fisher"}  # tests/test_fisher.py: against a float64 computation of its definition
    assert {c[0] for c in CASES} | {"dim3"} | REFERENCED | NEW | fisher == set(ALL)


# --------------------------------------------------------------------------- worked by hand


def test_task_arithmetic_by_hand():
    base = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    mm = base + torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.0, 0.0]])
    ml = base + torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    out = run("task_arithmetic", base, [mm, ml], scaling=0.5, multilingual_weight=2.0)
    # base + 0.5 (Δmm + 2 Δml)
    assert torch.equal(out, torch.tensor([[2.5, 4.0, 2.5], [0.25, -1.0, 4.5]]))
    assert torch.equal(run("task_arithmetic", base, [mm, ml]) - base, (mm - base) + (ml - base))


def test_linear_by_hand():
    base = torch.zeros(2, 3)
    mm = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ml = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    out = run("linear", base, [mm, ml], multimodal_weight=1.0, multilingual_weight=3.0)
    assert torch.equal(out, torch.tensor([[2.5, 2.0, 1.5], [1.0, 1.25, 1.5]]))
    assert torch.equal(run("linear", base, [mm, ml]), (mm + ml) / 2)


def test_ties_by_hand():
    base = torch.full((2, 3), 10.0)
    d_mm = torch.tensor([[3.0, -1.0, 0.5], [-2.0, -3.5, 4.0]])
    d_ml = torch.tensor([[-1.5, -2.0, 0.2], [1.0, 3.0, 2.5]])
    # trim to 3 of 6:   mm -> [[3, 0, 0], [0, -3.5, 4]]    ml -> [[0, -2, 0], [0, 3, 2.5]]
    # summed mass:          [[3, -2, 0], [0, -0.5, 6.5]]  -> signs + - + / + - +
    # entry (1,1): one vote each, but more mass is negative: keeps -3.5 and drops +3
    # entry (1,2): both agree: mean (4 + 2.5) / 2
    out = run("ties", base, [base + d_mm, base + d_ml], density=0.5)
    assert torch.equal(out - base, torch.tensor([[3.0, -2.0, 0.0], [0.0, -3.5, 3.25]]))
    out = run("ties", base, [base + d_mm, base + d_ml], density=0.5, scaling=2.0)
    assert torch.equal(out - base, torch.tensor([[6.0, -4.0, 0.0], [0.0, -7.0, 6.5]]))


def test_ties_density_one_is_sign_resolved_mean():
    base = torch.zeros(4)
    d_mm, d_ml = torch.tensor([1.0, -2.0, 3.0, 1.0]), torch.tensor([3.0, 1.0, -1.0, -1.0])
    out = run("ties", base, [d_mm, d_ml], density=1.0)
    # sums 4, -1, 2, 0 -> elect + - + + ; agreeing means 2, -2, 3, 1
    assert torch.equal(out, torch.tensor([2.0, -2.0, 3.0, 1.0]))


def test_breadcrumbs_by_hand():
    base = torch.zeros(10)
    d = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -3.0, 0.4, 0.6])
    # density 0.6 keeps 6; gamma 0.1 drops the largest (-5), then the 3 smallest (0.05, 0.1, -0.2)
    out = run("breadcrumbs", base, [d, torch.zeros(10)], density=0.6, gamma=0.1)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.3, 2.0, 0.0, 1.0, 0.0, -3.0, 0.4, 0.6]))
    # gamma 0.5 > 1 - density: only 1 large one can go, no small ones
    out = run("breadcrumbs", base, [d, torch.zeros(10)], density=0.9, gamma=0.5)
    assert torch.equal(out, torch.where(d.abs() == 5.0, 0.0, d))
    # density 1 keeps everything whatever gamma says: plain task arithmetic
    out = run("breadcrumbs", base, [d, 2 * d], density=1.0, gamma=0.2, scaling=0.5)
    assert torch.equal(out, 1.5 * d)


def test_dare_by_hand_given_the_mask():
    base = torch.ones(2, 3)
    d_mm = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    d_ml = torch.tensor([[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    tuned = [base + d_mm, base + d_ml]
    k_mm, k_ml = (U.dare_keep_mask((2, 3), 0.5, 11, "w", i).float() for i in (0, 1))
    out = run("dare_task_arithmetic", base, tuned, drop_rate=0.5, seed=11, name="w")
    torch.testing.assert_close(out, base + 2 * (k_mm * d_mm + k_ml * d_ml))
    # dare_ties: where both survive and disagree, the larger (mm here) wins alone
    out = run("dare_ties", base, tuned, drop_rate=0.5, seed=11, name="w")
    both = (k_mm * k_ml).bool()
    agree_ml = both & (d_ml > 0)  # both survive and both positive: mean of the two
    expected = torch.where(k_mm.bool(), 2 * d_mm, 2 * d_ml * k_ml)
    expected = torch.where(agree_ml, (2 * d_mm + 2 * d_ml) / 2, expected)
    torch.testing.assert_close(out, base + expected)


# --------------------------------------------------------------------------- identical tuned models


def test_identical_tuned_models():
    base, (x, _) = trio((8, 10), seed=4)
    d = x - base
    tuned = [x, x.clone()]
    torch.testing.assert_close(run("task_arithmetic", base, tuned), base + 2 * d)  # both added
    torch.testing.assert_close(run("linear", base, tuned), x)  # the average of x and x
    trimmed = torch.where(U.trim_mask(d, 0.2), d, 0.0)
    torch.testing.assert_close(run("ties", base, tuned), base + trimmed)  # mean of equals
    bc = torch.where(U.breadcrumbs_mask(d, 0.9, 0.01), d, 0.0)
    torch.testing.assert_close(run("breadcrumbs", base, tuned), base + 2 * bc)
    # DARE draws a different mask per model: survivors of either mask count (ties: once)
    k0, k1 = (U.dare_keep_mask(d.shape, 0.9, 0, "layer.weight", i) for i in (0, 1))
    assert not torch.equal(k0, k1)
    torch.testing.assert_close(
        run("dare_task_arithmetic", base, tuned), base + 10 * d * (k0.float() + k1.float())
    )
    torch.testing.assert_close(run("dare_ties", base, tuned), base + 10 * d * (k0 | k1).float())
    # DiM3: equal ranks -> softmax 1/2 each, or the calibration value where above average
    w = D.dim3_weights(base, tuned, D.DiM3Options()).weights
    assert torch.equal(w[0], w[1])
    assert set(w[0].unique().tolist()) <= {0.5, 0.75, 1.0}
    torch.testing.assert_close(run("dim3", base, tuned), base + d * (2 * w[0]))


# --------------------------------------------------------------------------- DARE reproducibility


def test_dare_mask_is_reproducible_and_keyed_by_seed_name_and_model():
    shape = (64, 32)
    m = U.dare_keep_mask(shape, 0.9, 0, "model.layers.0.mlp.up_proj.weight", 0)
    assert torch.equal(m, U.dare_keep_mask(shape, 0.9, 0, "model.layers.0.mlp.up_proj.weight", 0))
    for other in [
        U.dare_keep_mask(shape, 0.9, 0, "model.layers.1.mlp.up_proj.weight", 0),
        U.dare_keep_mask(shape, 0.9, 1, "model.layers.0.mlp.up_proj.weight", 0),
        U.dare_keep_mask(shape, 0.9, 0, "model.layers.0.mlp.up_proj.weight", 1),
    ]:
        assert not torch.equal(m, other)
    assert m.device.type == "cpu" and m.dtype == torch.bool


@pytest.mark.parametrize("cut", [None, (2, 9)])
def test_dare_mask_is_its_blocks_uniform_numbers_at_least_p(cut, monkeypatch):
    """The definition, computed again: block b of rows draws ``torch.rand`` from a generator
    seeded by ``dare_seed(seed, name + "\\0b" + b, index)``; an entry is kept where its number
    is at least p as float32, equal included (p is set to one of the numbers drawn)."""
    monkeypatch.setattr(U, "DARE_BLOCK", 4 * 7)  # blocks of 4 rows of 7
    name = "model.layers.3.mlp.up_proj.weight"
    blocks = []
    for b in range(3):
        gen = torch.Generator().manual_seed(U.dare_seed(5, f"{name}\0b{b}", 1))
        blocks.append(torch.rand((4, 7), generator=gen))
    uniform = torch.cat(blocks)[:11]
    p = float(uniform[6, 3])  # an entry exactly at p: kept
    want = uniform >= torch.tensor(p, dtype=torch.float32)
    a, b = cut or (0, 11)
    got = U.dare_keep_mask((b - a, 7), p, 5, name, 1, offset=a)
    assert torch.equal(got, want[a:b]) and bool(want[6, 3])
    d = torch.randn(b - a, 7)
    d[0, 0], d[1, 1] = float("inf"), float("nan")
    expected = torch.where(want[a:b], d / (1 - p), 0.0)
    with U.reuse_buffers(Buffers()):  # the engine's path: kept blocks, bit masks
        got_d = U.dare_(d.clone(), p, 5, name, 1, offset=a)
    assert torch.equal(got_d.isnan(), expected.isnan())
    assert torch.equal(got_d.nan_to_num(), expected.nan_to_num())
    assert not got_d.signbit()[~want[a:b]].any()  # dropped entries are +0.0


@pytest.mark.parametrize("method", ["dare_task_arithmetic", "dare_ties"])
def test_dare_merge_is_reproducible_and_order_independent(method):
    a, ta = trio((40, 30), seed=1)
    b, tb = trio((50,), seed=2)
    first_a = run(method, a, ta, name="a", seed=5)
    first_b = run(method, b, tb, name="b", seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(run(method, b, tb, name="b", seed=5), first_b)
    assert torch.equal(run(method, a, ta, name="a", seed=5), first_a)
    assert not torch.equal(run(method, a, ta, name="b", seed=5), first_a)
    assert not torch.equal(run(method, a, ta, name="a", seed=6), first_a)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drops_the_stated_fraction_and_keeps_the_expectation(p):
    n = 200_000
    keep = U.dare_keep_mask((n,), p, 0, "x", 0)
    sd = math.sqrt(n * p * (1 - p))
    assert abs((~keep).sum().item() - n * p) < 5 * sd
    d = torch.ones(n)
    assert abs(U.dare(d, p, 0, "x", 0).mean().item() - 1.0) < 5 * sd / n / (1 - p)


def test_dare_without_drop_is_task_arithmetic_and_ties_without_trim():
    base, tuned = trio((7, 9), seed=9)
    torch.testing.assert_close(
        run("dare_task_arithmetic", base, tuned, drop_rate=0.0), run("task_arithmetic", base, tuned)
    )
    torch.testing.assert_close(
        run("dare_ties", base, tuned, drop_rate=0.0), run("ties", base, tuned, density=1.0)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ALL)
def test_cuda_matches_cpu(method):
    base, tuned = trio((96, 80), seed=3)
    if method in ("iso_c", "stf"):
        # Each merges through one exact SVD of an update, which LAPACK (CPU) and cuSOLVER (GPU)
        # compute in float32 only to about eps * |update| / (gap between singular values):
        # on an H200 (torch 2.11, 2026-11-30) they differed by 4.9e-6 (iso_c) and 2.2e-5 (stf)
        # here, as float32 and float64 differ on the CPU alone (4.7e-6 for stf). In float64 the
        # two devices must agree to the tolerance below.
        base, tuned = base.double(), [t.double() for t in tuned]
    cpu = run(method, base, tuned, name="model.layers.3.self_attn.q_proj.weight")
    gpu = run(
        method,
        base.cuda(),
        [t.cuda() for t in tuned],
        name="model.layers.3.self_attn.q_proj.weight",
    )
    assert gpu.device.type == "cuda"
    if method.startswith("dare"):  # the same mask on both devices
        kept_cpu, kept_gpu = cpu != base, gpu.cpu() != base
        assert torch.equal(kept_cpu, kept_gpu)
    # Adam (wudi) normalises each step: where a gradient entry is ~0, rounding differences
    # between devices can flip a step of ±lr (1e-5), so its tolerance is a few steps
    atol = 1e-4 if method == "wudi" else 1e-6
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- helpers


def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    assert [U.keep_count(f, 10) for f in (0.0, 0.01, 0.2, 0.25, 0.9, 1.0)] == [0, 1, 2, 3, 9, 10]
    assert U.keep_count(0.2, 3) == 1 and U.keep_count(0.5, 3) == 2


@pytest.mark.parametrize(
    "drop_small,drop_large", [(0, 0), (7, 0), (0, 9), (13, 5), (49, 1), (0, 50)]
)
def test_band_mask_equals_a_stable_sort_even_with_many_ties(drop_small, drop_large):
    g = torch.Generator().manual_seed(drop_small * 100 + drop_large)
    d = torch.randint(-3, 4, (5, 10), generator=g).float()  # magnitudes 0..3: ties everywhere
    n = d.numel()
    keep = n - drop_small - drop_large
    expected = ref_keep(d.flatten().tolist(), keep, drop_large)
    assert U.band_mask(d, drop_small, drop_large).flatten().tolist() == expected


def test_trim_mask_breaks_ties_by_position():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5])
    # two of four: the three equal magnitudes compete; the later positions count as larger
    assert U.trim_mask(d, 0.5).tolist() == [False, True, True, False]


# --------------------------------------------------------------------------- the DiM3 rule
# A loop-per-column reading of issue 2, in float32 like the reference implementation.


def ref_rank(values: list[float]) -> list[float]:
    """Stable argsort over columns, rank value position / n."""
    n = len(values)
    order = sorted(range(n), key=lambda j: (values[j], j))
    r = [0.0] * n
    for position, j in enumerate(order):
        r[j] = position / n
    return r


def ref_score(S: list[list[float]], ratio: float, calibration: float):
    """Softmax over models per column; ``calibration`` where S > row mean × ratio.

    The comparison is made in float32, as the reference implementation makes it: with an odd
    number of columns the median rank equals the mean in exact arithmetic, and only float32
    rounding decides whether that column is calibrated.
    """
    T, n = len(S), len(S[0])
    thresholds = [torch.tensor(row, dtype=torch.float32).mean() * ratio for row in S]
    out = [[0.0] * n for _ in range(T)]
    calibrated = [[False] * n for _ in range(T)]
    for j in range(n):
        exps = [math.exp(S[t][j]) for t in range(T)]
        for t in range(T):
            calibrated[t][j] = bool(torch.tensor(S[t][j], dtype=torch.float32) > thresholds[t])
            out[t][j] = calibration if calibrated[t][j] else exps[t] / sum(exps)
    return out, calibrated


def ref_dim3_weights(base, tuned, ratio=1.0, calibration=1.0):
    """(weights T × n, magnitude calibrated, direction calibrated) as nested lists."""
    if base.dim() == 1:
        S = [[abs(float(a) - float(b)) for a, b in zip(t, base, strict=True)] for t in tuned]
        w, mask = ref_score(S, ratio, calibration)
        return w, mask, mask
    mag, dirc = [], []
    for t in tuned:
        mags, dirs = [], []
        for j in range(base.shape[1]):
            cb, ct = base[:, j], t[:, j]
            mb, mt = torch.linalg.vector_norm(cb), torch.linalg.vector_norm(ct)
            db, dt = cb / (mb + 1e-8), ct / (mt + 1e-8)
            mags.append(float(abs(mt - mb)))
            dirs.append(float(1.0 - F.cosine_similarity(dt, db, dim=0)))
        mag.append(ref_rank(mags))
        dirc.append(ref_rank(dirs))
    s_mag, c_mag = ref_score(mag, ratio, calibration)
    s_dir, c_dir = ref_score(dirc, ratio, calibration)
    w = [
        [0.5 * (a + b) for a, b in zip(ra, rb, strict=True)]
        for ra, rb in zip(s_mag, s_dir, strict=True)
    ]
    return w, c_mag, c_dir


def ref_dim3(base, tuned, ratio=1.0, calibration=1.0):
    w, _, _ = ref_dim3_weights(base, tuned, ratio, calibration)
    merged = base.clone().double()
    for t, w_t in zip(tuned, w, strict=True):
        delta = (t - base).double()
        if base.dim() == 1:
            merged += delta * torch.tensor(w_t, dtype=torch.float64)
        else:
            for j in range(base.shape[1]):
                merged[:, j] += delta[:, j] * w_t[j]
    return merged.float()


@pytest.mark.parametrize("shape", [(6, 9), (17,), (4, 33), (33, 4)])
@pytest.mark.parametrize("ratio,calibration", [(1.0, 1.0), (0.8, 0.5), (1.3, 2.0), (0.0, 1.0)])
def test_dim3_matches_loop_reference(shape, ratio, calibration):
    base, tuned = trio(shape, seed=len(shape) * 10 + shape[0])
    options = D.DiM3Options(above_average_ratio=ratio, calibration=calibration)
    got = D.dim3_weights(base, tuned, options)
    w, c_mag, c_dir = ref_dim3_weights(base, tuned, ratio, calibration)
    torch.testing.assert_close(got.weights, torch.tensor(w), rtol=1e-6, atol=1e-7)
    assert got.magnitude_calibrated.tolist() == c_mag
    assert got.direction_calibrated.tolist() == c_dir
    torch.testing.assert_close(
        D.merge(base, tuned, options),
        ref_dim3(base, tuned, ratio, calibration),
        rtol=1e-6,
        atol=1e-6,
    )


def test_dim3_three_models_match_loop_reference():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(5, 12, generator=g)
    tuned = [base + 0.2 * torch.randn(5, 12, generator=g) for _ in range(3)]
    w, _, _ = ref_dim3_weights(base, tuned)
    got = D.dim3_weights(base, tuned, D.DiM3Options()).weights
    torch.testing.assert_close(got, torch.tensor(w), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(D.merge(base, tuned, D.DiM3Options()), ref_dim3(base, tuned))


# A 2 × 4 case worked by hand. Columns of the base: (1,0) (0,1) (2,0) (0,3).
# multimodal: column 0 grows to (2,0): magnitude change 1, direction unchanged.
# multilingual: column 2 -> (2,2) (|Δm| = 2√2−2 ≈ 0.83, 1−cos ≈ 0.29) and column 3 -> (1,3)
# (|Δm| = √10−3 ≈ 0.16, 1−cos ≈ 0.05).
# Ranks (stable, position / 4; unchanged columns tie and keep column order):
#   magnitude  mm: [.75, 0, .25, .5]   ml: [0, .25, .75, .5]
#   direction  mm: [0, .25, .5, .75]   ml: [0, .25, .75, .5]
# Every row's mean is .375, so with ratio 1 ranks .5 and .75 are calibrated.
HAND_BASE = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]])
HAND_MM = torch.tensor([[2.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]])
HAND_ML = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])


def test_dim3_hand_worked_ranks():
    mag, dirc = D.column_changes(HAND_BASE, [HAND_MM, HAND_ML])
    assert D.ranks(mag).tolist() == [[0.75, 0.0, 0.25, 0.5], [0.0, 0.25, 0.75, 0.5]]
    assert D.ranks(dirc).tolist() == [[0.0, 0.25, 0.5, 0.75], [0.0, 0.25, 0.75, 0.5]]


def test_dim3_hand_worked_default():
    got = D.dim3_weights(HAND_BASE, [HAND_MM, HAND_ML], D.DiM3Options())
    # magnitude scores: col0 (1 calibrated, sig(-.75)), col1 (sig(-.25), sig(.25)),
    # col2 (sig(-.5), 1 calibrated), col3 (1, 1); direction: (.5,.5) (.5,.5) (1,1) (1,1)
    expected = [
        [0.5 * (1 + 0.5), 0.5 * (sig(-0.25) + 0.5), 0.5 * (sig(-0.5) + 1), 1.0],
        [0.5 * (sig(-0.75) + 0.5), 0.5 * (sig(0.25) + 0.5), 1.0, 1.0],
    ]
    torch.testing.assert_close(got.weights, torch.tensor(expected))
    assert got.magnitude_calibrated.tolist() == [
        [True, False, False, True],
        [False, False, True, True],
    ]
    assert got.direction_calibrated.tolist() == [
        [False, False, True, True],
        [False, False, True, True],
    ]
    # only weights on changed columns matter: 0.75 on column 0, 1 on columns 2 and 3
    merged = D.merge(HAND_BASE, [HAND_MM, HAND_ML], D.DiM3Options())
    assert torch.equal(merged, torch.tensor([[1.75, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]]))


def test_dim3_hand_worked_ratio_and_calibration():
    tuned = [HAND_MM, HAND_ML]
    # ratio 10: nothing is calibrated, pure softmax shares
    w = D.dim3_weights(HAND_BASE, tuned, D.DiM3Options(above_average_ratio=10.0)).weights
    assert w[0, 0].item() == pytest.approx(0.5 * (sig(0.75) + 0.5))
    assert w[1, 2].item() == pytest.approx(0.5 * (sig(0.5) + sig(0.25)))
    assert w[1, 3].item() == pytest.approx(0.5 * (0.5 + sig(-0.25)))  # mag ranks tie at .5
    # calibration 0: the above-average updates are switched off
    merged = D.merge(HAND_BASE, tuned, D.DiM3Options(calibration=0.0))
    assert torch.equal(merged, torch.tensor([[1.25, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]]))
    # ratio 0: every positive rank is above 0 × mean, so only rank-0 columns get softmax
    got = D.dim3_weights(HAND_BASE, tuned, D.DiM3Options(above_average_ratio=0.0, calibration=2.0))
    assert got.magnitude_calibrated.tolist() == [
        [True, False, True, True],
        [False, True, True, True],
    ]
    assert got.weights[1, 1].item() == pytest.approx(0.5 * (2.0 + 2.0))


def test_dim3_hand_worked_1d():
    base = torch.zeros(4)
    mm = torch.tensor([1.0, 0.2, 0.0, 0.0])
    ml = torch.tensor([0.0, 0.1, 2.0, 0.0])
    # significance is |Δ| itself (not ranked); means .3 and .525; ratio 1
    got = D.dim3_weights(base, [mm, ml], D.DiM3Options())
    assert got.magnitude_calibrated.tolist() == [
        [True, False, False, False],
        [False, False, True, False],
    ]
    assert torch.equal(got.magnitude_calibrated, got.direction_calibrated)
    torch.testing.assert_close(got.weights[:, 1], torch.tensor([sig(0.1), sig(-0.1)]))
    merged = D.merge(base, [mm, ml], D.DiM3Options())
    expected = torch.tensor([1.0, 0.2 * sig(0.1) + 0.1 * sig(-0.1), 2.0, 0.0])
    torch.testing.assert_close(merged, expected)


def test_dim3_ranks_are_stable_on_ties():
    changes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 1.0, 0.5]])
    # equal changes keep column order: the earlier column gets the lower rank
    positions = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 4.0, 2.0, 0.0]])
    assert torch.equal(D.ranks(changes), positions / 5)
    assert torch.equal(D.ranks(changes), torch.tensor([ref_rank(r) for r in changes.tolist()]))


def test_dim3_ratio_calibrates_more_columns_as_it_falls():
    base, tuned = trio((8, 40), seed=12)
    shares = []
    for ratio in (2.0, 1.5, 1.0, 0.5, 0.0):
        w = D.dim3_weights(base, tuned, D.DiM3Options(above_average_ratio=ratio))
        shares.append(w.magnitude_calibrated.float().mean().item())
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == pytest.approx(39 / 40)
    # with ranks in [0, 1) and mean ≈ 0.5, ratio 1 calibrates about half the columns
    assert shares[2] == pytest.approx(0.5, abs=0.05)


def test_dim3_calibration_scales_only_calibrated_columns():
    base, tuned = trio((6, 20), seed=13)
    w1 = D.dim3_weights(base, tuned, D.DiM3Options(calibration=1.0))
    w3 = D.dim3_weights(base, tuned, D.DiM3Options(calibration=3.0))
    assert torch.equal(w1.magnitude_calibrated, w3.magnitude_calibrated)
    none = ~w1.magnitude_calibrated & ~w1.direction_calibrated
    assert torch.equal(w1.weights[none], w3.weights[none])
    both = w1.magnitude_calibrated & w1.direction_calibrated
    assert torch.all(w3.weights[both] == 3.0) and torch.all(w1.weights[both] == 1.0)


# --------------------------------------------------------------------------- through the engine

E2E_OPTIONS = {
    "dim3": {"above_average_ratio": 0.9},
    "task_arithmetic": {"scaling": 0.5, "multilingual_weight": 1.5},
    "linear": {"multimodal_weight": 2.0},
    "ties": {"density": 0.3},
    "dare_task_arithmetic": {"drop_rate": 0.5, "seed": 4},
    "dare_ties": {"drop_rate": 0.5, "seed": 4},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "tsv": {"scaling": 0.8},
    "iso_c": {"scaling": 0.5},
    "iso_cts": {"common_space_fraction": 0.6},
    "wudi": {"iterations": 10, "lr": 1e-4},
    "optmerge": {"lr": 1e-3},
    "pcb": {"ratio": 0.2},
    "neuromerging": {"parallel": "projection"},
    "stf": {"scaling": 0.9},
}
LANGUAGE_KEY = "language_model.model.layers.1.mlp.up_proj.weight"
VISION_KEY = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
PROJECTOR_KEY = "multi_modal_projector.linear_1.weight"


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# methods with extra inputs (fisher) merge through the engine in their own tests (test_fisher.py)
DATA_FREE = [m for m in ALL if not METHODS[m].extra_inputs]


@pytest.mark.slow
@pytest.mark.parametrize("method", DATA_FREE)
def test_each_method_merges_a_tiny_trio_through_the_engine(method, tiny_llava_trio, tmp_path):
    from dim3.engine import merge_to_folder
    from dim3.recipe import Recipe, Source

    trio = tiny_llava_trio
    assert set(E2E_OPTIONS) == set(DATA_FREE)
    recipe = Recipe(
        Source(str(trio.base)),
        Source(str(trio.multilingual)),
        Source(str(trio.multimodal)),
        method=method,
        options=E2E_OPTIONS[method],
        device="cpu",
    )
    merge_to_folder(recipe, tmp_path / "out")
    out = _tensors(tmp_path / "out")
    base, ml, vlm = _tensors(trio.base), _tensors(trio.multilingual), _tensors(trio.multimodal)
    canonical = LANGUAGE_KEY.removeprefix("language_model.")
    m = get_method(method)
    expected = m.fn(
        base[canonical].float(),
        [vlm[LANGUAGE_KEY].float(), ml[canonical].float()],
        m.make_options(E2E_OPTIONS[method]),
        name=LANGUAGE_KEY,
    )
    assert torch.equal(out[LANGUAGE_KEY], expected.to(out[LANGUAGE_KEY].dtype))
    assert not torch.equal(out[LANGUAGE_KEY], vlm[LANGUAGE_KEY])
    for key in (VISION_KEY, PROJECTOR_KEY):
        assert out[key].dtype == vlm[key].dtype and torch.equal(out[key], vlm[key])
    card = (tmp_path / "out" / "README.md").read_text()
    assert method in card and m.paper in card


@pytest.mark.slow
def test_cli_method_and_options(tiny_qwen2vl_trio, tmp_path):
    from dim3.cli import main

    trio = tiny_qwen2vl_trio
    args = ["--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    args += ["--multimodal", str(trio.multimodal), "--device", "cpu", "--method", "dare_ties"]
    for seed, out in ((1, "a"), (1, "b"), (2, "c")):
        opts = ["--option", "drop_rate=0.3", "--option", f"seed={seed}"]
        assert main(["merge", *args, *opts, "--out", str(tmp_path / out)]) == 0
    a, b, c = (_tensors(tmp_path / x) for x in "abc")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    recipe = (tmp_path / "a" / "dim3_recipe.json").read_text()
    assert '"dare_ties"' in recipe and '"drop_rate": 0.3' in recipe
    assert main(["merge", *args, "--option", "drop_rate=1.5", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
