"""The compiled kernels (:mod:`dim3.kernels`, numba) as the rest of the package reaches them:
loaded once a process, where numba imports (:func:`kernels`, :func:`available`, the time that
took: :func:`setup_seconds`), tensors handed over as numpy arrays sharing their memory
(:func:`as_numpy`), and the primitives that know no rule: the k-th smallest of a selection's
values (:func:`kth_in_window`, :func:`kth_in_bin`, for :class:`dim3.slices.ExactSelect`) and
torch's CPU generator's numbers as DARE's keep words (:class:`DareDraws`). The kernels of whole
rules over a tile are :mod:`dim3.fused`'s. This module imports nothing of dim3 but the kernels,
and those only when first asked for (importing numba takes seconds).
"""

from __future__ import annotations

import math
import os
import sys
import time
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

BINS = 1 << 16  # a radix pass's bins: 16 bits of a float32's bit pattern at a time


_IMPORT_SECONDS = 0.0  # importing dim3.kernels (numba) in this process


@cache
def kernels() -> Any:
    """The compiled kernels (:mod:`dim3.kernels`), or None where numba does not import."""
    global _IMPORT_SECONDS
    started = time.perf_counter()
    try:
        from dim3 import kernels as module
    except ImportError:
        return None
    finally:
        _IMPORT_SECONDS += time.perf_counter() - started
    return module


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
    return os.environ.get("DIM3_FUSED", "1") != "0" and kernels() is not None


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


def as_numpy(t: Tensor) -> Any:
    """A contiguous CPU tensor as a flat numpy array (a bfloat16 one as its int16 bits),
    sharing its memory. Made from the tensor's address, without torch's ``reshape``, ``view``
    and ``numpy``: those dispatch, and each view they make releases Python's global lock when
    it is freed, about five hand-overs of the lock per call, several calls per tile, on the
    threads that share it (docs/performance-log.md). Other tensors take that way."""
    if t.device.type == "cpu" and t.dtype in _NUMPY and t.numel() and t.is_contiguous():
        return np.asarray(_Held(t))
    flat = t.reshape(-1)
    return (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()


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
    h, below = kernels().window_bin(values.numpy(), first, bins, rank, np.empty(bins, np.int64))
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
    lo, less, equal = kernels().window_kth(values.numpy(), ends, h, rank, low, each)
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


class DareDraws:
    """The numbers of ``torch.Generator().manual_seed(seed)`` (MT19937 on the CPU) as DARE's
    keep words, drawn by :func:`dim3.kernels.dare_words` where ``torch.rand`` and two integer
    passes took three times as long; the stream goes on from one call to the next."""

    def __init__(self, seed: int):
        self.state = np.empty(624, dtype=np.uint32)
        kernels().mt_seed(seed, self.state)
        self.pos = 624  # no word left: the first call twists

    def words(self, drop_rate: float, out: Tensor) -> Tensor:
        """``out`` (contiguous int32, CPU): -1 where the next number, as ``torch.rand``'s
        float32, is at least ``drop_rate`` (kept), 0 where it is below (dropped)."""
        # kept ⟺ bits · 2**-24 ≥ p ⟺ bits ≥ p · 2**24 (exact in a double) ⟺ bits ≥ ⌈p · 2**24⌉
        t = math.ceil(float(np.float32(drop_rate)) * 2**24)
        self.pos = kernels().dare_words(self.state, self.pos, t, as_numpy(out))
        return out
