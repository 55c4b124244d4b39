"""Pieces the engine uses to merge a tensor larger than its memory budget, slice by slice.

- :func:`row_slices`: cut dim 0 of a tensor into slices of at most a budget of float32 bytes.
- :class:`ExactSelect`: the k-th smallest magnitude of a tensor seen only in slices, exactly
  (a two-pass radix select over the float32 bit patterns, 16 bits per pass), with how many
  entries equal to it belong to the first k, so that selection rules (TIES, Breadcrumbs) get the
  very same masks as :func:`dim3.methods._utils.first_by_magnitude` on the whole tensor.
- :class:`FirstMask`: applies one such selection to successive slices (ties go to the lower flat
  index, counted across slices).
- :func:`order_keys` / :func:`key_value`: signed float32 values as keys the same selection
  orders (PCB's balance scores can be negative).
- :class:`Buffers`: named buffers a merge allocates once and reuses for every slice, counting
  its allocations (the steady state of the loop allocates nothing).

This module knows tensors and budgets only: no files, no rules, no models.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dim3 import compiled
from dim3.compiled import BINS


def row_slices(shape: Sequence[int], budget: int, rows: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering rows ``0:rows`` (default all) of a tensor of ``shape``,
    each slice at most ``budget`` bytes in float32 (at least one row)."""
    total = shape[0] if shape else 1
    rows = total if rows is None else rows
    per_row = 4 * max(1, math.prod(shape[1:]))
    step = max(1, budget // per_row)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


def magnitude_bits(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``|x|`` as int32 bit patterns (flat), which order like the float magnitudes.

    ``out``: a float32 buffer of at least ``x.numel()`` entries to write ``|x|`` into (reused by
    the engine); a new tensor otherwise."""
    if out is None:
        return x.abs().reshape(-1).contiguous().view(torch.int32)
    if out.shape == x.shape and out.is_contiguous():  # the engine's buffers: no views to make
        return torch.abs(x, out=out).view(-1).view(torch.int32)
    flat = out.reshape(-1)[: x.numel()].view(x.shape)
    return torch.abs(x, out=flat).reshape(-1).view(torch.int32)


def order_keys(x: Tensor) -> Tensor:
    """Float32 values of any sign as int64 keys in ``[0, 2**32)`` that order like the values
    (flat; −0 counts as +0), for :class:`ExactSelect`; :func:`key_value` turns a key back."""
    bits = (x.reshape(-1) + 0.0).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + (1 << 31))


def key_value(key: int) -> float:
    """The float32 value of an :func:`order_keys` key."""
    bits = key - (1 << 31) if key >= 1 << 31 else -1 - key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


class ExactSelect:
    """Find, for several ranks k, the k-th smallest of a set of non-negative float32 values seen
    in slices: two passes over the data (:meth:`observe` then :meth:`next_pass`, twice).

    After the second pass, :meth:`result` gives per k ``(bits of the k-th value, need, equal)``:
    the first k values are those below it plus the first ``need`` of the ``equal`` values equal
    to it (in flat order). k ≤ 0 selects nothing and k ≥ n everything (``None`` there).

    A pass may also be cut among threads: :meth:`partial` of each piece (any order, any
    thread: it only reads what the last pass found), then :meth:`add` of every partial: counts
    are integers, so the sum is the same in any order.

    One pass is enough when each k-th value's bit patterns are guessed beforehand (from a
    sample: :meth:`window`): the first pass then counts, per k, the values below its guessed
    range and keeps each piece's values inside it (:meth:`keep`), with no histogram; if every
    k-th value is among those, :meth:`next_pass` finds it exactly (:attr:`known`), with how
    many values equal to it each piece holds (:attr:`ties`). Otherwise the select starts over
    as without a guess (:attr:`missed`): two more passes, the histogram's and the low bits'.
    A wrong guess costs time, never exactness; :attr:`done` says when :meth:`result` is known.
    """

    def __init__(
        self,
        ks: Sequence[int],
        n: int,
        device: torch.device,
        buffers: Buffers | None = None,
        slot: str = "",
    ):
        self.ks, self.n, self.device = list(ks), n, device
        self.buffers = buffers  # where a slice's temporaries live (the engine's, reused)
        # names this select's own buffers: selects of one Buffers may end their passes at once
        self.slot = slot
        self.stage = 0
        # the high bits' histogram, made at its pass's first count: a first pass with guessed
        # windows counts none (a 512 KiB zeroing per select saved, on the loop's thread)
        self.hist: Tensor | None = None
        self.hi: list[int] = []  # per k: the high 16 bits of the k-th value
        self.below: list[int] = []  # per k: how many values have smaller high bits
        self.lo_hist: Tensor | None = None
        self.windows: list[tuple[int, int] | None] | None = None  # per k: [lo, hi) guessed
        self.below_window = torch.zeros(len(self.ks), dtype=torch.int64)  # per k: below lo
        self.missed = False  # the guesses were tried and missed: the passes without them
        self._kept: list[tuple[int, list[Tensor]]] = []  # (piece key, values in each window)
        self._compacted = 0  # pieces of _kept gathered by compact()
        self._found: list[tuple[int, int, int] | None] | None = None
        self.ties: list[list[tuple[int, int]]] | None = None  # per k: (piece key, equal values)

    @property
    def summed(self) -> int:
        """How many leading tensors of a :meth:`partial` are counts to add (the rest are the
        values inside the windows, to :meth:`keep`)."""
        return 0 if self.known else 1 if self.stage == 0 else len(self.ks)

    @property
    def known(self) -> bool:
        """Whether :meth:`result` is known after the first pass (the guesses held)."""
        return self._found is not None

    @property
    def done(self) -> bool:
        """Whether :meth:`result` is known: after the first pass where the guesses held, else
        after the second pass without them."""
        return self.known or self.stage == 2

    def window(self, windows: Sequence[tuple[int, int] | None]) -> None:
        """Before the first pass: per k, the bit patterns ``[lo, hi)`` its k-th value is
        guessed to lie in (None: no guess, for a k that selects nothing or everything). Any
        ``lo``: the values below it are counted, not binned (until 2026-12-02 it was a
        multiple of 2**16, a whole histogram bin, as when the first pass made a histogram)."""
        assert self.stage == 0 and not self.missed and len(windows) == len(self.ks)
        for w in windows:
            assert w is None or 0 <= w[0] < w[1] <= 1 << 31, w
        self.windows = list(windows)

    def keep(self, key: int, values: list[Tensor]) -> None:
        """A first-pass piece's values inside each window (``partial()[summed:]``), under a key
        that orders the pieces (their first row)."""
        self._kept.append((key, values))

    def compact(self) -> None:
        """Gather the values kept since the last call into one tensor per window, the pieces'
        becoming views of it: the pieces' own small tensors, made on the tile threads and kept
        until the pass ends, would otherwise keep those threads' heaps from shrinking."""
        fresh = range(self._compacted, len(self._kept))
        self._compacted = len(self._kept)
        if len(fresh) < 2:
            return
        columns = [torch.cat([self._kept[i][1][j] for i in fresh]) for j in range(len(self.ks))]
        sizes = [[self._kept[i][1][j].numel() for i in fresh] for j in range(len(self.ks))]
        parts = [col.split(size) for col, size in zip(columns, sizes, strict=True)]
        for n, i in enumerate(fresh):
            self._kept[i] = (self._kept[i][0], [part[n] for part in parts])

    def observe(self, bits: Tensor) -> None:
        """One slice's bit patterns (flat int32, from :func:`magnitude_bits`)."""
        self.add(self.partial(bits, self.buffers))

    def partial(self, bits: Tensor, buffers: Buffers | None = None) -> list[Tensor]:
        """The counts of this pass over one piece's bit patterns, for :meth:`add`: in a first
        pass with guessed windows, per k how many values lie below its window, then per k the
        values inside it (to :meth:`keep`); in a first pass without, the histogram of the
        high 16 bits; in the second, per k that of the low 16 bits of the values whose high
        bits are the k-th value's. Temporaries from ``buffers``."""
        if self.done:  # found in the first pass: a second has nothing to count
            return []
        if self.stage == 0 and self.windows is not None:
            below = torch.zeros(len(self.ks), dtype=torch.int64, device=bits.device)
            kept = []
            d = _take(buffers, "select.hi", bits)
            mask = _take(buffers, "select.mask", bits, torch.bool)
            for i, w in enumerate(self.windows):
                if w is None:
                    kept.append(bits[:0])
                    continue
                below[i] = torch.lt(bits, w[0], out=mask).sum()
                # the values in [lo, hi): bits − lo as a 31-bit word is below hi − lo just for
                # them (one below lo wraps to at least 2**31 − lo ≥ hi − lo)
                torch.sub(bits, w[0], out=d).bitwise_and_(0x7FFFFFFF)
                kept.append(bits[torch.lt(d, w[1] - w[0], out=mask)])
            return [below, *kept]
        hi = torch.bitwise_right_shift(bits, 16, out=_take(buffers, "select.hi", bits))
        if self.stage == 0:
            return [torch.bincount(hi, minlength=BINS)]
        if bits.dtype == torch.int32:  # magnitudes (0 ≤ bits < 2**31): no bool masks
            # bits − (h << 16) is the low 16 bits of a value in bin h and outside [0, 2**16)
            # for the others; with the sign bit cleared a negative one is at least 2**16 too
            # (h < 2**15), and every one of those is counted in one bin past the last
            idx = _take(buffers, "select.lo", bits)
            return [
                torch.bincount(
                    torch.sub(bits, h << 16, out=idx).bitwise_and_(0x7FFFFFFF).clamp_(max=BINS),
                    minlength=BINS + 1,
                )[:BINS]
                for h in self.hi
            ]
        lo = torch.bitwise_and(bits, 0xFFFF, out=_take(buffers, "select.lo", bits))
        inside = _take(buffers, "select.mask", bits, torch.bool)
        # the values in the k-th value's high bin: few
        return [torch.bincount(lo[torch.eq(hi, h, out=inside)], minlength=BINS) for h in self.hi]

    def add(self, partial: list[Tensor]) -> None:
        """Count one piece's :meth:`partial` in."""
        if self.done:
            return
        if self.stage == 0:
            if self.windows is not None:
                self.below_window += partial[0].cpu()
            else:
                self._histogram().add_(partial[0])
            return
        assert self.lo_hist is not None
        for i, counts in enumerate(partial):
            self.lo_hist[i] += counts

    def next_pass(self) -> None:
        """End a pass: after a first with guessed windows, each k's value where they held (then
        no other pass), else start over without them; after a first without, fix each k's
        high bits; after the second, its value."""
        if self.done:
            return
        if self.stage == 0 and self.windows is not None:
            self._from_windows()
            self._kept, self._compacted = [], 0
            if self.known:
                self.stage = 2
            else:  # the next pass is the histogram's, as without a guess
                self.windows, self.missed = None, True
            return
        if self.stage == 0:
            cum = torch.cumsum(self._histogram(), 0).cpu()
            for k in self.ks:
                kk = min(max(k, 1), self.n)
                h = int(torch.searchsorted(cum, kk))  # first bin whose cumulative count ≥ k
                self.hi.append(h)
                self.below.append(int(cum[h - 1]) if h > 0 else 0)
            self.lo_hist = torch.zeros((len(self.ks), BINS), dtype=torch.int64, device=self.device)
        self.stage += 1

    def _histogram(self) -> Tensor:
        if self.hist is None:
            self.hist = torch.zeros(BINS, dtype=torch.int64, device=self.device)
        return self.hist

    def _from_windows(self) -> None:
        """Each k-th value from the first pass's counts and the values kept in its window, if
        it lies there: with ``below`` values under the window, the k-th smallest is the
        (k − below)-th of those inside when that is at least the first and at most their
        count; found exactly from them, with how many values are below it and equal to it
        (every value equal to it is inside)."""
        assert self.windows is not None
        self._kept.sort(key=lambda kv: kv[0])
        below_window = self.below_window.tolist()
        found: list[tuple[int, int, int] | None] = []
        ties: list[list[tuple[int, int]]] = []
        for i, (k, w) in enumerate(zip(self.ks, self.windows, strict=True)):
            if k <= 0 or k >= self.n:
                found.append(None)
                ties.append([])
                continue
            rank = k - below_window[i]  # its rank among the values inside
            if w is None or rank < 1:
                return  # no guess, or the k-th value lies below the window
            pieces = [values[i].to(self.device) for _, values in self._kept]
            got = _kth_in_window(
                pieces, w[0], w[1], rank, self.device, self.buffers, f"select.window{self.slot}"
            )
            if got is None:
                return  # above the window's end
            kth, less, equal, each = got
            found.append((kth, k - below_window[i] - less, equal))
            ties.append([(key, c) for (key, _), c in zip(self._kept, each, strict=True)])
        self._found, self.ties = found, ties

    def result(self) -> list[tuple[int, int, int] | None]:
        """Per k: (bits of the k-th smallest value, how many equal to it are in the first k, how
        many equal it in all)."""
        if self._found is not None:
            return list(self._found)
        assert self.stage == 2 and self.lo_hist is not None
        out: list[tuple[int, int, int] | None] = []
        for i, k in enumerate(self.ks):
            if k <= 0 or k >= self.n:
                out.append(None)
                continue
            cum = torch.cumsum(self.lo_hist[i], 0).cpu()
            rest = k - self.below[i]  # rank of the k-th value within its high bin
            lo = int(torch.searchsorted(cum, rest))
            less = self.below[i] + (int(cum[lo - 1]) if lo > 0 else 0)
            out.append(((self.hi[i] << 16) | lo, k - less, int(self.lo_hist[i, lo])))
        return out


SORT_MAX = 1 << 16  # a whole tensor of at most this many values is selected by a sort


def select_by_sort(bits: Tensor, ks: Sequence[int]) -> list[tuple[int, int, int] | None]:
    """:meth:`ExactSelect.result` for the int32 magnitude bits of one whole tensor, from a
    sort: for a few values (a norm's weight, a bias) the two passes' 2**16-bin histograms cost
    far more than a sort of them."""
    flat = bits.reshape(-1)
    n = flat.numel()
    ordered = torch.sort(flat).values
    out: list[tuple[int, int, int] | None] = []
    for k in ks:
        if k <= 0 or k >= n:
            out.append(None)
            continue
        kth = ordered[k - 1 : k]
        less = int(torch.searchsorted(ordered, kth))
        upto = int(torch.searchsorted(ordered, kth, right=True))
        out.append((int(kth), k - less, upto - less))
    return out


def _kth_in_window(
    pieces: list[Tensor],
    lo: int,
    hi: int,
    rank: int,
    device: torch.device,
    buffers: Buffers | None = None,
    name: str = "select.window",
) -> tuple[int, int, int, list[int]] | None:
    """Among the values of ``pieces`` (int32 bit patterns, all in ``[lo, hi)``), the
    ``rank``-th smallest (from 1): (its bits, how many of them are below it, how many equal it,
    per piece how many equal it); None when fewer than ``rank``. Its bin from a count per bin
    of the window, then :func:`_kth_in_bin`; on the CPU, compiled where the kernels run
    (:func:`dim3.compiled.kth_in_window`, the pieces joined in ``buffers``' buffer ``name``):
    the same numbers."""
    if device.type == "cpu" and compiled.available():
        return compiled.kth_in_window(pieces, lo, hi, rank, buffers, name)
    inside = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32, device=device)
    if rank > inside.numel():
        return None
    first = lo >> 16
    per_bin = torch.bincount(torch.bitwise_right_shift(inside, 16).sub_(first))
    at = torch.cumsum(per_bin, 0).cpu()
    j = int(torch.searchsorted(at, rank))  # first bin whose cumulative count reaches it
    below = int(at[j - 1]) if j > 0 else 0
    got = _kth_in_bin(pieces, first + j, rank - below, device, buffers)
    assert got is not None  # the bin holds at least rank − below values
    low, less, equal, each = got
    return ((first + j) << 16) | low, below + less, equal, each


def _kth_in_bin(
    pieces: list[Tensor], h: int, rank: int, device: torch.device, buffers: Buffers | None = None
) -> tuple[int, int, int, list[int]] | None:
    """Among the values of ``pieces`` (int32 bit patterns) whose high 16 bits are ``h``, the
    ``rank``-th smallest (from 1): (its low 16 bits, how many of those are below it, how many
    equal it, per piece how many equal it); None when fewer than ``rank``. On the CPU, in one
    compiled loop where the kernels run (:func:`dim3.compiled.kth_in_bin`); the same numbers."""
    if device.type == "cpu" and compiled.available():
        return compiled.kth_in_bin(pieces, h, rank, buffers)
    inside = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32, device=device)
    low = inside[torch.bitwise_right_shift(inside, 16) == h].bitwise_and_(0xFFFF)
    if rank > low.numel():
        return None
    counts = torch.bincount(low, minlength=BINS)
    at = torch.cumsum(counts, 0).cpu()
    lo = int(torch.searchsorted(at, rank))  # first low bits whose count reaches it
    kth = (h << 16) | lo
    # each piece's values equal to it: the running count at the pieces' ends
    ends = torch.tensor([p.numel() for p in pieces], dtype=torch.int64).cumsum_(0)
    running = torch.cumsum(inside == kth, 0)
    upto = torch.where(ends > 0, running[(ends - 1).clamp_(min=0)], 0).tolist()
    each = [b - a for a, b in zip([0, *upto[:-1]], upto, strict=True)]
    return lo, (int(at[lo - 1]) if lo > 0 else 0), int(counts[lo]), each


def _take(
    buffers: Buffers | None, name: str, like: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """A temporary shaped like ``like``: from ``buffers`` (reused) when given, else new."""
    dtype = dtype or like.dtype
    if buffers is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return buffers.take(name, tuple(like.shape), dtype, like.device)


class FirstMask:
    """The ``first_k`` mask of one selection, slice after slice in flat order. With ``buffers``
    the mask lives in the buffer ``name`` (reused by the next call).

    Only the values equal to the k-th one make the order matter, and only while some but not
    all of them are in the first k (:attr:`ordered`): pieces cut among threads then need to
    know how many of them come before each piece (:meth:`count`), and each piece takes
    :meth:`mask` with its share ``left``; :meth:`took` counts the pieces' equal values in.
    """

    def __init__(
        self,
        k: int,
        n: int,
        found: tuple[int, int, int] | None,
        buffers: Buffers | None = None,
        name: str = "select.first",
    ):
        self.all = k >= n
        self.none = k <= 0
        self.bits, self.need, self.equal = found if found else (0, 0, 0)
        self.seen = 0  # entries equal to the k-th value met so far
        self.buffers, self.name = buffers, name

    @property
    def left(self) -> int:
        """Entries equal to the k-th value still to take (the next ones in flat order)."""
        return max(0, self.need - self.seen)

    @property
    def ordered(self) -> bool:
        """Whether the next piece's mask depends on the equal values before it."""
        return not (self.all or self.none) and 0 < self.left and self.need < self.equal

    def __call__(self, bits: Tensor) -> Tensor:
        temp = _take(self.buffers, "select.mask", bits, torch.bool)  # a passing temporary
        ordered = self.ordered
        mask = self.mask(bits, self.left, _take(self.buffers, self.name, bits, torch.bool), temp)
        if ordered:
            self.took(self.count(bits, temp))
        return mask

    def count(self, bits: Tensor, temp: Tensor) -> int:
        """How many of a piece's values equal the k-th one (``temp``: a bool buffer like bits)."""
        # count_nonzero, not sum: a bool tensor's sum makes an int64 copy of it first
        return int(torch.count_nonzero(torch.eq(bits, self.bits, out=temp)))

    def took(self, equal: int) -> None:
        """A piece holding ``equal`` values equal to the k-th one has been masked."""
        self.seen += equal

    def words(self, bits: Tensor, left: int, out: Tensor, temp: Tensor) -> Tensor:
        """:meth:`mask` of int32 magnitude bits as int32 words, -1 (every bit set) for the first
        k and 0 for the others (into int32 ``out``), made with integer passes, several times
        faster on a CPU than comparisons into bool tensors: a < b ⟺ the sign bit of a − b
        (no overflow: both are in [0, 2**31))."""
        if self.all or self.none:
            return out.fill_(-1 if self.all else 0)
        if self.need == self.equal:  # every equal value is in: bits ≤ k-th
            if self.bits == 0x7FFFFFFF:
                return out.fill_(-1)
            return torch.sub(bits, self.bits + 1, out=out).bitwise_right_shift_(31)
        torch.sub(bits, self.bits, out=out).bitwise_right_shift_(31)  # bits < k-th
        if left > 0:
            equal = torch.nonzero(torch.eq(bits, self.bits, out=temp)).reshape(-1)
            out[equal[:left]] = -1
        return out

    def mask(self, bits: Tensor, left: int, out: Tensor, temp: Tensor) -> Tensor:
        """The mask of one piece (into bool ``out``, shaped like ``bits``) whose first ``left``
        values equal to the k-th one belong to the first k (``temp``: a bool buffer like bits,
        overwritten)."""
        if self.all or self.none:
            return out.fill_(self.all)
        if self.need == self.equal:  # every equal value is in: no order to keep
            return torch.le(bits, self.bits, out=out)
        torch.lt(bits, self.bits, out=out)
        if left > 0:
            equal = torch.nonzero(torch.eq(bits, self.bits, out=temp)).reshape(-1)
            out[equal[:left]] = True
        return out


HUGE = 2 * 2**20  # a transparent huge page


def _allocate(nbytes: int, device: torch.device, pin: bool) -> Tensor:
    """``nbytes`` of uninitialised memory. A large CPU buffer is its own private anonymous
    mapping with transparent huge pages asked for (:func:`huge_pages`)."""
    if device.type != "cpu" or pin or nbytes < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
    return huge_pages(nbytes)


def huge_pages(nbytes: int) -> Tensor:
    """``nbytes`` of uninitialised CPU memory in a private anonymous mapping of whole 2 MiB
    pages, with transparent huge pages asked for (``MADV_HUGEPAGE``, where the kernel offers
    them): the kernel then faults it in 2 MiB at a time, 512 times fewer faults than 4 KiB
    pages. Private, not Python's default shared mapping: shared anonymous memory is shmem,
    which takes huge pages only where ``shmem_enabled`` says so (``never`` by default) and
    which the kernel counts as ``RssShmem``, not ``RssAnon``. The length is rounded up to a
    whole number of huge pages, which makes Linux place the mapping on a huge-page boundary;
    huge pages are asked for only over the whole huge pages that ``nbytes`` fills, so that the
    rest (a write buffer's ``ALIGN`` bytes to spare, say) is faulted in 4 KiB at a time, as far
    as it is used: asked for too, it would cost a whole fresh 2 MiB page, zeroed, for a few KiB
    (five such pages for task arithmetic's five 8 MiB write buffers: a quarter more memory
    touched; docs/performance.md).
    """
    size = -(-nbytes // HUGE) * HUGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # POSIX only
    whole = nbytes // HUGE * HUGE
    if hasattr(mmap, "MADV_HUGEPAGE") and whole:
        try:
            region.madvise(mmap.MADV_HUGEPAGE, 0, whole)
        except OSError:  # THP not built in: ordinary pages
            pass
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # keeps the mapping alive


class Buffers:
    """Named buffers reused across the slices of a merge: :meth:`take` returns a view of the
    buffer called ``name``, allocated at the first request and again only when a request is
    larger than all before it (sized for the chunk budget up front, it never grows).

    ``allocations`` counts the buffers made, ``nbytes`` what they hold now. ``pin`` asks for
    page-locked host memory (for non-blocking copies to a GPU). Requests above ``limit`` bytes
    (a whole tensor of a "matrix" rule) get a fresh tensor that is not kept.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.allocations = 0
        self._flat: dict[str, Tensor] = {}
        self._holds: dict[str, object] = {}  # buffer name -> key of what it holds (:meth:`kept`)
        self._views: dict[tuple, Tensor] = {}  # (name, shape, dtype, device, pin) -> a view
        self._lock = threading.Lock()  # the read thread and the computation take buffers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self._flat.values())

    def reserve(self, name: str, nbytes: int, device: torch.device, *, pin: bool = False) -> None:
        """Make buffer ``name`` hold at least ``nbytes`` on ``device`` now."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            have = self._flat.get(name)
            if have is not None and have.numel() >= nbytes and have.device == device:
                return
            self._flat.pop(name, None)  # free the smaller one first: peak memory stays one buffer
            self._holds.pop(name, None)
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
            self._flat[name] = _allocate(nbytes, device, pin)
            self.allocations += 1

    def take(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        pin: bool = False,
    ) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` and ``dtype`` in buffer ``name``.

        A request met before gets the same tensor object back (while the buffer stays): the
        tile threads ask for a few buffers per tile, many thousands of times per merge, and
        making a view costs several tensor objects, all under Python's global lock that those
        threads share. Callers change what the tensor holds, not its shape; one that did (an
        ``out=`` of another shape is resized in place) gets a fresh view the next time."""
        key = (name, tuple(shape), dtype, device, pin)
        view = self._views.get(key)
        if view is not None and view.shape == key[1]:
            return view
        numel = math.prod(shape)
        nbytes = max(1, numel * dtype.itemsize)
        if self.limit is not None and nbytes > self.limit:
            return torch.empty(tuple(shape), dtype=dtype, device=device, pin_memory=pin)
        device = torch.device(device)
        self.reserve(name, nbytes, device, pin=pin)
        with self._lock:
            flat = self._flat[name]
            view = flat[: numel * dtype.itemsize].view(dtype).view(tuple(shape))
            if not (device.type == "cuda" and device.index is None):  # else: the current one
                self._views[key] = view
        return view

    def kept(
        self,
        name: str,
        key: object,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        fill: Callable[[Tensor, Any], Any],
    ) -> Tensor:
        """:meth:`take`, filled by ``fill(tensor, held)``, which returns what the buffer now holds
        (how far it is filled, say): ``held`` is what the last fill of this buffer returned when
        that was for the same ``key`` (and shape and dtype) and the buffer still holds it, else
        None (fill from scratch). Values that take long to make and are asked for again by the
        next few calls (a DARE block's keep mask, drawn from slow random numbers and shared by
        several tiles of rows) are made once, as far as they are needed. A fill that raises
        leaves nothing held."""
        t = self.take(name, shape, dtype, device)
        key = (key, tuple(shape), dtype, str(device))
        with self._lock:
            flat = self._flat.get(name)
            ours = flat is not None and flat.data_ptr() == t.data_ptr()  # not a fresh oversized one
            last = self._holds.pop(name, None)  # a fill that fails leaves nothing to be reused
        held = fill(t, last[1] if ours and last is not None and last[0] == key else None)
        if ours:
            with self._lock:
                self._holds[name] = (key, held)
        return t

    def like(self, name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A buffer shaped, strided and placed like ``t`` (a transposed ``t`` gets a transposed
        view), of ``dtype`` (default ``t``'s)."""
        dtype = dtype or t.dtype
        if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
            return self.take(name, t.T.shape, dtype, t.device).T
        return self.take(name, t.shape, dtype, t.device)
