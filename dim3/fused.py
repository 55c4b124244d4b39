"""Compiled kernels for the CPU's hot loops of TIES and DARE: one pass over a tile where eager
torch makes a dozen or more, each a Python call under the global lock.

The kernels (:mod:`dim3.kernels`, compiled by numba with LLVM: no C compiler needed, loaded by
:mod:`dim3.compiled`, which also holds the selection's and DARE's draws' primitives) release
the lock, and here get torch tensors:

- :func:`counts`: the first statistics pass of TIES' :class:`dim3.slices.ExactSelect` over a
  tile of two updates (the values below and inside each guessed window, or without a guess
  the histogram of the magnitudes' high 16 bits);
- :func:`apply`: TIES' apply pass over a tile (trim by each update's
  :class:`dim3.slices.FirstMask`, elect the sign, disjoint mean, ``· λ + base``);
- :func:`dare_ties`: DARE-TIES over a tile of two updates, from their keep masks;
- :func:`dim3_stats_runs`, :func:`chain_sums`: DiM3's column sums over a tile of two updates,
  in runs of its rows, and a step's runs added up (its statistics pass);
- :func:`dim3_apply`: DiM3's apply pass over a tile of two updates, from its column weights.

Each gives the very bits of the eager code (``dim3.methods._utils.disjoint_mean_``,
``FirstMask.words``, ``torch.rand``; tests/test_fused.py compares them on adversarial values):
the same float32 operations in the same order, no fast-math, no contraction into fused
multiply-adds. The engine and the rules take them for two updates (the VLM's and one
multilingual model's) on the CPU; more updates, other devices, and a machine where numba does
not import keep the eager code. ``DIM3_FUSED=0`` turns them off (to measure against them).
This module knows tensors, selections and generators only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dim3.compiled import as_numpy, available, kernels
from dim3.slices import BINS, ExactSelect, FirstMask

_ALL = 1 << 31  # above every magnitude's bits


def widens(t: Tensor) -> bool:
    """Whether the kernels read ``t`` as it is: float32, or bfloat16 (widened as they read)."""
    return t.dtype in (torch.float32, torch.bfloat16)


def counts(
    base: Tensor,
    tuned: list[Tensor],
    selects: list[ExactSelect],
    scratch: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    into: list[Tensor] | None = None,
) -> list[list[Tensor]]:
    """:meth:`ExactSelect.partial` of the two updates ``tuned_t − base`` of a tile, in one pass
    (each select in its first pass, one rank each): with guessed windows
    (:meth:`ExactSelect.window`) how many values lie below each window and the values inside
    it (:func:`dim3.kernels.window2`), else the histogram of the magnitudes' high 16 bits
    (:func:`dim3.kernels.hist2`). ``scratch``, for windows: two int32 buffers of one more than
    the tile's size for the values inside (copied out), a uint8 one of its size for the
    kernel's flags and an int32 one of an eighth of its size, rounded up, for the words it
    lists. ``into``: the counts of the tiles before (histograms, or counts below), to
    count into, which then need no adding up; else new ones.

    base, tuned: contiguous float32 or bfloat16 (:func:`widens`) CPU tensors of one shape.
    Returns per update ``[histogram (int64, BINS)]``, or with windows ``[count below (int64,
    1), values inside (int32)]``."""
    flat = [as_numpy(base), *map(as_numpy, tuned)]
    if all(s.windows is None for s in selects):
        hists = into if into is not None else [torch.zeros(BINS, dtype=torch.int64) for _ in tuned]
        kernels().hist2(*flat, *map(as_numpy, hists))
        return [[h] for h in hists]
    assert scratch is not None and all(s.windows is not None for s in selects)
    kept0, kept1, flags, marked = scratch
    assert kept0.numel() > base.numel() and kept1.numel() > base.numel()
    assert flags.numel() >= base.numel() and 8 * marked.numel() >= base.numel()
    windows = [s.windows[0] if s.windows[0] else (0, 0) for s in selects]  # type: ignore[index]
    (lo0, hi0), (lo1, hi1) = windows
    n0, n1, c0, c1 = kernels().window2(
        *flat, lo0, hi0 - lo0, lo1, hi1 - lo1, *map(as_numpy, (flags, marked, kept0, kept1))
    )
    below = into if into is not None else [torch.zeros(1, dtype=torch.int64) for _ in tuned]
    below[0] += c0
    below[1] += c1
    return [[below[0], kept0[:n0].clone()], [below[1], kept1[:n1].clone()]]


def fits_counts(selects: list[ExactSelect]) -> bool:
    """Whether :func:`counts` does these selects' pass: two updates, one rank, a first pass,
    both with guessed windows or neither."""
    return (
        len(selects) == 2
        and all(len(s.ks) == 1 and s.stage == 0 and not s.known for s in selects)
        and (selects[0].windows is None) == (selects[1].windows is None)
    )


def _threshold(first: FirstMask, left: int, tied: int) -> tuple[int, int, int]:
    """A :class:`FirstMask` of one tile as (k, e, l): first iff bits < k, and the first ``l`` of
    the values whose bits are ``e`` (as :meth:`FirstMask.words` with ``left``; the tile holds
    ``tied`` values equal to the k-th one, when ``left`` > 0). The kernel's second loop, over
    the tile again, runs only for the one tile where the first k stop among the tied values:
    a tile takes all of its own or none as a rule (bfloat16 weights' updates tie by thousands)."""
    if first.all or first.none:
        return (_ALL if first.all else 0), -1, 0
    if first.need == first.equal:  # every tied value is in
        return first.bits + 1, -1, 0
    if left <= 0:  # none of the tile's
        return first.bits, -1, 0
    if left >= tied:  # all of the tile's
        return first.bits + 1, -1, 0
    return first.bits, first.bits, left


def apply(
    base: Tensor,
    tuned: list[Tensor],
    firsts: list[FirstMask],
    lefts: list[tuple[int, int]],
    scaling: float,
    out: Tensor,
) -> Tensor:
    """TIES' apply pass over one tile: ``base + λ · disjoint_mean(trim(tuned_t − base))``, each
    update trimmed by its :class:`FirstMask` (``lefts``: the tile's share of the tied values,
    as for :meth:`FirstMask.words`, and how many it holds), into float32 ``out`` (shaped like
    base; returned). base, tuned: contiguous float32 or bfloat16 (:func:`widens`) CPU tensors
    of one shape."""
    assert out.dtype == torch.float32
    (k0, e0, l0), (k1, e1, l1) = (
        _threshold(f, left, tied) for f, (left, tied) in zip(firsts, lefts, strict=True)
    )
    kernels().apply2(
        as_numpy(base),
        *map(as_numpy, tuned),
        k0,
        k1,
        e0,
        e1,
        l0,
        l1,
        np.float32(scaling),
        as_numpy(out),
    )
    return out


def _two_updates(base: Tensor, tuned: list[Tensor]) -> bool:
    """Two updates, base and both contiguous float32 or bfloat16 (:func:`widens`) CPU tensors
    of one shape: what every two-update kernel here reads."""
    return len(tuned) == 2 and all(
        t.device.type == "cpu" and widens(t) and t.is_contiguous() and t.shape == base.shape
        for t in (base, *tuned)
    )


def fits_dare(base: Tensor, tuned: list[Tensor], drop_rate: float) -> bool:
    """Whether :func:`dare_ties` merges these: two updates, contiguous float32 or bfloat16
    (:func:`widens`) CPU tensors of one shape (at least one dimension), some entries dropped."""
    return drop_rate > 0.0 and base.dim() > 0 and _two_updates(base, tuned) and available()


def dare_ties(
    base: Tensor,
    tuned: list[Tensor],
    words: list[Tensor],
    drop_rate: float,
    scaling: float,
    out: Tensor,
) -> Tensor:
    """DARE-TIES in one pass: ``base + λ · disjoint_mean((tuned_t − base) ⊙ keep_t / (1 − p))``
    with each update's keep ``words`` (int32, -1 kept, 0 dropped, shaped like base), into
    float32 ``out`` (returned). base, tuned: as for :func:`fits_dare`."""
    assert out.dtype == torch.float32
    kernels().dare_ties2(
        as_numpy(base),
        *map(as_numpy, tuned),
        *(as_numpy(w.contiguous()) for w in words),
        np.float32(1.0 - drop_rate),
        np.float32(scaling),
        as_numpy(out),
    )
    return out


def fits_sum(base: Tensor, tuned: list[Tensor]) -> bool:
    """Whether :func:`task_arithmetic` merges these: two updates, contiguous float32 or
    bfloat16 (:func:`widens`) CPU tensors of one shape (at least one dimension)."""
    return base.dim() > 0 and _two_updates(base, tuned) and available()


def task_arithmetic(
    base: Tensor, tuned: list[Tensor], weight: float, scaling: float, out: Tensor
) -> Tensor:
    """Task arithmetic of two updates in one pass, the bits of
    ``dim3.methods.task_arithmetic.merge`` when the second update's weight is 1:
    ``base + λ ((tuned_0 − base) · weight + (tuned_1 − base))``, into float32 ``out`` (returned).
    base, tuned: as for :func:`fits_sum`. The weights are rounded to float32 first, as torch
    rounds a Python number it multiplies a float32 tensor by."""
    assert out.dtype == torch.float32
    kernels().sum2(
        as_numpy(base),
        *map(as_numpy, tuned),
        np.float32(weight),
        np.float32(scaling),
        as_numpy(out),
    )
    return out


def writes(out: Tensor, base: Tensor) -> bool:
    """Whether :func:`task_arithmetic_into` and :func:`dim3_apply_into` write into ``out``: a
    contiguous CPU tensor shaped like ``base``, float32 or bfloat16."""
    return (
        out.device.type == "cpu"
        and out.dtype in (torch.float32, torch.bfloat16)
        and out.is_contiguous()
        and out.shape == base.shape
    )


def task_arithmetic_into(
    base: Tensor, tuned: list[Tensor], weight: float, scaling: float, out: Tensor
) -> bool:
    """:func:`task_arithmetic` written straight into ``out`` in its own dtype (:func:`writes`):
    the bits of computing it in float32 and converting it with ``out.copy_``, in one pass and
    no float32 buffer. False, with ``out`` holding nothing meaningful, where a value is NaN and
    ``out`` bfloat16 (torch's conversion gives NaN bits of its own): convert those with torch."""
    nans = kernels().sum2(
        as_numpy(base),
        *map(as_numpy, tuned),
        np.float32(weight),
        np.float32(scaling),
        as_numpy(out),
    )
    return nans == 0


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread meanwhile, as the engine's tile threads run it: the
    probes below compare with the eager code as the tiles would compute it (how a reduction
    is cut among threads may change which of torch's loops adds which columns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@cache
def _columns_kernel() -> Any:
    """The kernel of :func:`dim3_apply` that gives ``apply_weights``' very bits on this machine,
    or None if neither does. torch's ``addcmul_`` rounds each multiply-add once on x86 CPUs
    with AVX2 or AVX-512 (its compiler contracts them), twice where it runs its plain code
    (``ATEN_CPU_CAPABILITY=default``, other CPUs): tried once a process, on random tiles
    through ``dim3.methods.dim3.apply_weights`` itself, laid out as the engine passes them
    (columns along the stored rows, and a transposed tensor's)."""
    from dim3.methods.dim3 import apply_weights

    g = torch.Generator().manual_seed(0)
    rows, cols = 12, 1003  # a row's tail past the vector width, too
    base = torch.randn(rows, cols, generator=g)
    tuned = [base + torch.randn(rows, cols, generator=g) * 0.01 for _ in range(2)]
    by_col, by_row = torch.rand(2, cols, generator=g), torch.rand(2, rows, generator=g)
    with _one_thread():
        wants = (
            (apply_weights(base, tuned, by_col), by_col, False),
            (apply_weights(base.T, [t.T for t in tuned], by_row).T, by_row, True),
        )
    compiled = kernels()
    for kernel in (compiled.columns2_fma, compiled.columns2):
        out = torch.empty_like(base)
        if all(
            _columns(kernel, base, tuned, w, by, out) == 0 and torch.equal(out, want)
            for want, w, by in wants
        ):
            return kernel
    return None


def weight_rows(weights: Tensor) -> tuple[Any, Any]:
    """DiM3's weights (2, n) as the apply kernel reads them: each update's row, a float32 numpy
    array. Made once for a step's tiles (:func:`dim3_apply` takes them so), not per tile: the
    conversion, the rows and their copies are torch calls, each handing Python's lock over."""
    w0, w1 = (as_numpy(x.contiguous()) for x in weights.float())
    return w0, w1


def _columns(
    kernel: Any, base: Tensor, tuned: list[Tensor], w: Any, by_row: bool, out: Tensor
) -> int:
    """``kernel`` over the tile into ``out``; how many values written are NaN in bfloat16."""
    cols = max(1, math.prod(base.shape[1:]))
    w0, w1 = w if isinstance(w, tuple) else weight_rows(w)
    return kernel(as_numpy(base), *map(as_numpy, tuned), w0, w1, cols, by_row, as_numpy(out))


def fits_dim3(base: Tensor, tuned: list[Tensor]) -> bool:
    """Whether :func:`dim3_apply` merges these: two updates, contiguous float32 or bfloat16
    (:func:`widens`) CPU tensors of one shape with rows and columns, on a machine where the
    kernel gives torch's bits (``_columns_kernel``)."""
    return base.dim() >= 2 and _two_updates(base, tuned) and gives_dim3_bits()


def gives_dim3_bits() -> bool:
    """Whether :func:`dim3_apply` runs here (:func:`available`) and gives torch's bits."""
    return available() and _columns_kernel() is not None


def dim3_apply(
    base: Tensor, tuned: list[Tensor], weights: Any, by_row: bool, out: Tensor
) -> Tensor:
    """DiM3's apply pass over a tile of rows in one loop, the bits of
    ``dim3.methods.dim3.apply_weights``: ``base + Σ_t (tuned_t − base) · w_t`` with ``weights``
    (2, columns) per column of the rows (the trailing dims flattened), or (2, rows) per row when
    ``by_row`` (a tensor whose columns are its stored rows: the engine's transposed ones), into
    float32 ``out`` (shaped like base; returned); ``weights`` may also be
    :func:`weight_rows`' pair. base, tuned: as for :func:`fits_dim3`."""
    assert out.dtype == torch.float32 and len(weights) == 2
    _columns(_columns_kernel(), base, tuned, weights, by_row, out)
    return out


def dim3_apply_into(
    base: Tensor, tuned: list[Tensor], weights: Any, by_row: bool, out: Tensor
) -> bool:
    """:func:`dim3_apply` written straight into ``out`` in its own dtype (:func:`writes`): the
    bits of computing it in float32 and converting it with ``out.copy_``, in one pass and no
    float32 buffer (torch's conversion of a tile took 0.1-0.2 ms of a 2**20-entry tile's
    0.3-0.6 ms; docs/performance-log.md). False, with ``out`` holding nothing meaningful, where
    a value is NaN and ``out`` bfloat16 (torch's conversion gives NaN bits of its own): convert
    those with torch."""
    assert len(weights) == 2
    return _columns(_columns_kernel(), base, tuned, weights, by_row, out) == 0


SUM_COLUMNS = 64  # torch sums these blocks of columns in the cascade column_sums2 follows


@cache
def _sums_match() -> bool:
    """Whether :func:`dim3_stats_runs` gives ``dim3.methods.dim3.column_stats``' very bits here:
    torch's ``sum(dim=0)`` adds each block of 4 vectors of columns (64 floats with AVX-512,
    32 with AVX2) in the cascade the kernel follows, its last columns otherwise (so the kernel
    takes widths that are multiples of 64 only). Tried once a process, on float32 and
    bfloat16 tiles of rows that take every branch of the cascade."""
    from dim3.methods.dim3 import column_stats

    g = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16, 17, 33, 170, 257, 1100):
        for cols in (SUM_COLUMNS, 3 * SUM_COLUMNS):
            base = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
            tuned = [base + torch.randn(rows, cols, generator=g) * 0.01 for _ in range(2)]
            for dtype in (torch.float32, torch.bfloat16):
                b, t = base.to(dtype), [x.to(dtype) for x in tuned]
                with _one_thread():
                    want = column_stats(b.float(), [x.float() for x in t])
                got = chain_sums([_sums_runs(b, t, rows, torch.empty(4, 5, cols))])
                if not all(torch.equal(vars(got)[f], vars(want)[f]) for f in vars(want)):
                    return False
    return True


def fits_dim3_stats(base: Tensor, tuned: list[Tensor]) -> bool:
    """Whether :func:`dim3_stats_runs` sums these: two updates, contiguous float32 or bfloat16
    (:func:`widens`) CPU matrices of one shape, a multiple of 64 columns, on a machine where
    the kernel gives torch's bits (``_sums_match``)."""
    return (
        base.dim() == 2
        and base.shape[1] % SUM_COLUMNS == 0
        and _two_updates(base, tuned)
        and sums_match()
    )


def sums_match() -> bool:
    """Whether :func:`dim3_stats_runs` runs here (:func:`available`) and gives torch's bits."""
    return available() and _sums_match()


def dim3_stats_runs(base: Tensor, tuned: list[Tensor], run: int, scratch: Tensor) -> Any:
    """DiM3's column sums (``dim3.methods.dim3.column_stats``' bits: see :func:`_sums_match`) of
    each ``run`` rows of a tile in turn (the last run shorter), in one pass over its rows, read
    as stored: a numpy array (runs, 5, columns) of each run's Σ b², Σ t0², Σ t1², Σ t0·b,
    Σ t1·b, for :func:`chain_sums`. base, tuned: as for :func:`fits_dim3_stats`; ``scratch``:
    (4, 5, columns) float32. No torch tensor is made: each would hand Python's global lock over
    when freed (see :func:`as_numpy`)."""
    return _sums_runs(base, tuned, run, scratch)


def _sums_runs(base: Tensor, tuned: list[Tensor], run: int, scratch: Tensor) -> Any:
    # the kernel's call, for dim3_stats_runs and for the probe (_sums_match), which is not a
    # tile's statistics (as _columns is the apply kernel's, for dim3_apply and its probe)
    cols = base.shape[1]
    out = np.empty((-(-base.shape[0] // run), 5, cols), np.float32)
    acc = as_numpy(scratch).reshape(4, 5, cols)
    kernels().column_sums2_runs(as_numpy(base), *map(as_numpy, tuned), cols, run, acc, out)
    return out


def chain_sums(parts: list[Any]) -> Any:
    """The ColumnStats of :func:`dim3_stats_runs`' arrays, in order, added one run after
    another (``ColumnStats.add`` of each run's sums in turn, bit for bit): the first run's
    sums are the total's start. The arrays are spent (the total is made in the first)."""
    from dim3.methods.dim3 import ColumnStats

    first = parts[0]
    total = first[0]
    chain = kernels().chain_add
    chain(total, first[1:])
    for p in parts[1:]:
        chain(total, p)
    t = torch.from_numpy(total)
    return ColumnStats(t[0], t[1:3], t[3:5])
