"""Compiled kernels for the CPU's hot loops of TIES and DARE: one pass over a tile where eager
torch makes a dozen or more, each a Python call under the global lock.

The kernels (:mod:`dim3.kernels`, compiled by numba with LLVM: no C compiler needed) release
the lock, and here get torch tensors:

- :func:`counts`: the first statistics pass of TIES' :class:`dim3.slices.ExactSelect` over a
  tile of two updates (the values below and inside each guessed window, or without a guess
  the histogram of the magnitudes' high 16 bits);
- :func:`apply`: TIES' apply pass over a tile (trim by each update's
  :class:`dim3.slices.FirstMask`, elect the sign, disjoint mean, ``· λ + base``);
- :class:`DareDraws`: DARE's keep masks from torch's own CPU generator's numbers (MT19937),
  number for number;
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
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dim3.slices import BINS, ExactSelect, FirstMask

_ALL = 1 << 31  # above every magnitude's bits


_IMPORT_SECONDS = 0.0  # importing dim3.kernels (numba) in this process


@cache
def _kernels() -> Any:
    """The compiled kernels (:mod:`dim3.kernels`), or None where numba does not import."""
    global _IMPORT_SECONDS
    started = time.perf_counter()
    try:
        from dim3 import kernels
    except ImportError:
        return None
    finally:
        _IMPORT_SECONDS += time.perf_counter() - started
    return kernels


def setup_seconds() -> float:
    """Wall seconds this process has spent so far readying the kernels: importing numba,
    compiling a kernel or loading it from numba's cache (:data:`dim3.kernels.SETUP`). One-off
    work: the first merge of a process, or of a fresh install (a cold cache: 10 s and more on
    a small machine for a DiM3 merge), would otherwise take it for merging. Nothing is
    imported to answer: 0 before the kernels are."""
    clock = getattr(sys.modules.get("dim3.kernels"), "SETUP", None)  # None: not (yet) imported
    return _IMPORT_SECONDS + (clock.seconds() if clock is not None else 0.0)


def available() -> bool:
    """Whether the kernels run here (numba imports, ``DIM3_FUSED`` is not ``0``)."""
    return os.environ.get("DIM3_FUSED", "1") != "0" and _kernels() is not None


# numpy's type of each dtype a kernel reads or writes (a bfloat16 value as its int16 bits)
_NUMPY = {
    dtype: np.dtype(kind).str
    for dtype, kind in (
        (torch.float32, np.float32),
        (torch.bfloat16, np.int16),
        (torch.float16, np.float16),
        (torch.float64, np.float64),
        (torch.int64, np.int64),
        (torch.int32, np.int32),
        (torch.int16, np.int16),
        (torch.int8, np.int8),
        (torch.uint8, np.uint8),
        (torch.bool, np.bool_),
    )
}


class _Held:
    """The memory of a tensor as numpy sees it (``__array_interface__``), holding the tensor:
    the array made from it keeps the tensor, and so its memory, alive."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: Tensor):
        self.tensor = t
        self.__array_interface__ = {
            "data": (t.data_ptr(), False),
            "shape": (t.numel(),),
            "typestr": _NUMPY[t.dtype],
            "version": 3,
        }


def _flat(t: Tensor) -> Any:
    """A contiguous CPU tensor as a flat numpy array (a bfloat16 one as its int16 bits),
    sharing its memory. Made from the tensor's address, without torch's ``reshape``, ``view``
    and ``numpy``: those dispatch, and each view they make releases Python's global lock when
    it is freed, about five hand-overs of the lock per call, several calls per tile, on the
    threads that share it (docs/performance-log.md). Other tensors take that way."""
    if t.device.type == "cpu" and t.dtype in _NUMPY and t.numel() and t.is_contiguous():
        return np.asarray(_Held(t))
    flat = t.reshape(-1)
    return (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()


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
    flat = [_flat(base), *map(_flat, tuned)]
    if all(s.windows is None for s in selects):
        hists = into if into is not None else [torch.zeros(BINS, dtype=torch.int64) for _ in tuned]
        _kernels().hist2(*flat, *map(_flat, hists))
        return [[h] for h in hists]
    assert scratch is not None and all(s.windows is not None for s in selects)
    kept0, kept1, flags, marked = scratch
    assert kept0.numel() > base.numel() and kept1.numel() > base.numel()
    assert flags.numel() >= base.numel() and 8 * marked.numel() >= base.numel()
    windows = [s.windows[0] if s.windows[0] else (0, 0) for s in selects]  # type: ignore[index]
    (lo0, hi0), (lo1, hi1) = windows
    n0, n1, c0, c1 = _kernels().window2(
        *flat, lo0, hi0 - lo0, lo1, hi1 - lo1, *map(_flat, (flags, marked, kept0, kept1))
    )
    below = into if into is not None else [torch.zeros(1, dtype=torch.int64) for _ in tuned]
    below[0] += c0
    below[1] += c1
    return [[below[0], kept0[:n0].clone()], [below[1], kept1[:n1].clone()]]


def kth_in_window(
    pieces: list[Tensor],
    lo: int,
    hi: int,
    rank: int,
    buffers: Any = None,
    name: str = "select.window",
) -> tuple[int, int, int, list[int]] | None:
    """:func:`dim3.slices._kth_in_window` on CPU int32 ``pieces``: the bin of the ``rank``-th
    smallest from a count of the values per bin of the window (:func:`dim3.kernels.window_bin`),
    then its low bits as :func:`kth_in_bin` finds them. The pieces are joined once (in
    ``buffers``' buffer ``name``)."""
    values, ends = _joined(pieces, buffers, name)
    first, bins = lo >> 16, ((hi - 1) >> 16) - (lo >> 16) + 1
    h, below = _kernels().window_bin(values.numpy(), first, bins, rank, np.empty(bins, np.int64))
    if h < 0:
        return None
    got = _kth_in_joined(values, ends, int(h), rank - int(below))
    assert got is not None  # the bin holds at least rank − below values
    low, less, equal, each = got
    return (int(h) << 16) | low, int(below) + less, equal, each


def _joined(
    pieces: list[Tensor], buffers: Any, name: str = "select.window"
) -> tuple[Tensor, np.ndarray]:
    """The pieces one after the other, in ``buffers`` (a :class:`dim3.slices.Buffers`: the same
    memory tensor after tensor) when given: a new tensor each time was a fresh mapping the
    kernel faulted in 4 KiB at a time, some 40% of a TIES merge's page faults. With the
    pieces' ends."""
    if not pieces:
        values = torch.zeros(0, dtype=torch.int32)
    else:
        total = (sum(p.numel() for p in pieces),)
        cpu = torch.device("cpu")
        values = torch.cat(
            pieces,
            out=buffers.take(name, total, torch.int32, cpu)
            if buffers is not None
            else torch.empty(total, dtype=torch.int32),
        )
    return values, np.cumsum([p.numel() for p in pieces], dtype=np.int64)


def _kth_in_joined(
    values: Tensor, ends: np.ndarray, h: int, rank: int
) -> tuple[int, int, int, list[int]] | None:
    low = np.empty(BINS + 1, dtype=np.int64)
    each = np.empty(ends.size, dtype=np.int64)
    lo, less, equal = _kernels().window_kth(values.numpy(), ends, h, rank, low, each)
    if lo < 0:
        return None
    return int(lo), int(less), int(equal), each.tolist()


def kth_in_bin(
    pieces: list[Tensor], h: int, rank: int, buffers: Any = None
) -> tuple[int, int, int, list[int]] | None:
    """:func:`dim3.slices._kth_in_bin` on CPU int32 ``pieces``, in one compiled loop over their
    values (the eager ops took a tenth of a TIES merge, while the tile threads waited), the
    pieces joined as :func:`_joined` joins them."""
    return _kth_in_joined(*_joined(pieces, buffers), h, rank)


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
    _kernels().apply2(
        _flat(base), *map(_flat, tuned), k0, k1, e0, e1, l0, l1, np.float32(scaling), _flat(out)
    )
    return out


class DareDraws:
    """The numbers of ``torch.Generator().manual_seed(seed)`` (MT19937 on the CPU) as DARE's
    keep words, drawn by :func:`dim3.kernels.dare_words` where ``torch.rand`` and two integer
    passes took three times as long; the stream goes on from one call to the next."""

    def __init__(self, seed: int):
        self.state = np.empty(624, dtype=np.uint32)
        _kernels().mt_seed(seed, self.state)
        self.pos = 624  # no word left: the first call twists

    def words(self, drop_rate: float, out: Tensor) -> Tensor:
        """``out`` (contiguous int32, CPU): -1 where the next number, as ``torch.rand``'s
        float32, is at least ``drop_rate`` (kept), 0 where it is below (dropped)."""
        # kept ⟺ bits · 2**-24 ≥ p ⟺ bits ≥ p · 2**24 (exact in a double) ⟺ bits ≥ ⌈p · 2**24⌉
        t = math.ceil(float(np.float32(drop_rate)) * 2**24)
        self.pos = _kernels().dare_words(self.state, self.pos, t, _flat(out))
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
    _kernels().dare_ties2(
        _flat(base),
        *map(_flat, tuned),
        *(_flat(w.contiguous()) for w in words),
        np.float32(1.0 - drop_rate),
        np.float32(scaling),
        _flat(out),
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
    _kernels().sum2(
        _flat(base), *map(_flat, tuned), np.float32(weight), np.float32(scaling), _flat(out)
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
    nans = _kernels().sum2(
        _flat(base), *map(_flat, tuned), np.float32(weight), np.float32(scaling), _flat(out)
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
    kernels = _kernels()
    for kernel in (kernels.columns2_fma, kernels.columns2):
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
    w0, w1 = (_flat(x.contiguous()) for x in weights.float())
    return w0, w1


def _columns(
    kernel: Any, base: Tensor, tuned: list[Tensor], w: Any, by_row: bool, out: Tensor
) -> int:
    """``kernel`` over the tile into ``out``; how many values written are NaN in bfloat16."""
    cols = max(1, math.prod(base.shape[1:]))
    w0, w1 = w if isinstance(w, tuple) else weight_rows(w)
    return kernel(_flat(base), *map(_flat, tuned), w0, w1, cols, by_row, _flat(out))


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
    when freed (see :func:`_flat`)."""
    return _sums_runs(base, tuned, run, scratch)


def _sums_runs(base: Tensor, tuned: list[Tensor], run: int, scratch: Tensor) -> Any:
    # the kernel's call, for dim3_stats_runs and for the probe (_sums_match), which is not a
    # tile's statistics (as _columns is the apply kernel's, for dim3_apply and its probe)
    cols = base.shape[1]
    out = np.empty((-(-base.shape[0] // run), 5, cols), np.float32)
    acc = _flat(scratch).reshape(4, 5, cols)
    _kernels().column_sums2_runs(_flat(base), *map(_flat, tuned), cols, run, acc, out)
    return out


def chain_sums(parts: list[Any]) -> Any:
    """The ColumnStats of :func:`dim3_stats_runs`' arrays, in order, added one run after
    another (``ColumnStats.add`` of each run's sums in turn, bit for bit): the first run's
    sums are the total's start. The arrays are spent (the total is made in the first)."""
    from dim3.methods.dim3 import ColumnStats

    first = parts[0]
    total = first[0]
    chain = _kernels().chain_add
    chain(total, first[1:])
    for p in parts[1:]:
        chain(total, p)
    t = torch.from_numpy(total)
    return ColumnStats(t[0], t[1:3], t[3:5])
