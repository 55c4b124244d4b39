"""numba kernels: TIES' passes, DARE-TIES, DiM3's two passes and task arithmetic over a tile
of two updates, and DARE's draws from torch's CPU generator (see :mod:`dim3.fused`, which calls
them on torch tensors; this module imports numba and knows numpy arrays only).

The same float32 operations, in the same order, as the eager code: no fast-math, no contraction
into fused multiply-adds (numba's defaults), but for :func:`columns2_fma`, which matches torch's
own contraction where torch has it (:mod:`dim3.fused` finds out which matches), and in the
order of torch's own code where it is not the formula's (:func:`column_sums2`). Compiled on first
use and kept in numba's cache (``__pycache__`` beside this file, else the user's cache folder);
where no cache folder is writable, compiled in each process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, event
from numba.extending import intrinsic, overload

_ABS = 0x7FFFFFFF  # all bits but the sign
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


class _SetupClock(event.Listener):
    """The wall time during which some thread was inside numba's compiler lock (or waiting
    for it): compiling a kernel for a new type signature, or loading one from numba's cache
    (at a process's first call, numba also loads its own implementations then). One-off work
    of a process, not of the merge it happens in: the engine leaves it out of the time it
    reports (:func:`dim3.compiled.setup_seconds`), which the app's time budget projects from."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._seconds, self._inside, self._since = 0.0, 0, 0.0
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's depth of nested lock events

    def on_start(self, event: Any) -> None:  # noqa: ARG002
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            with self._lock:
                if self._inside == 0:
                    self._since = self._clock()
                self._inside += 1

    def on_end(self, event: Any) -> None:  # noqa: ARG002
        self._local.depth -= 1
        if self._local.depth == 0:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._seconds += self._clock() - self._since

    def seconds(self) -> float:
        """The seconds so far, counting a stretch still going on."""
        with self._lock:
            ongoing = self._clock() - self._since if self._inside else 0.0
            return self._seconds + ongoing


SETUP = _SetupClock()
event.register("numba:compiler_lock", SETUP)


def _jit(**kw: Any) -> Any:
    def wrap(fn: Any) -> Any:
        try:
            return numba.njit(nogil=True, cache=True, **kw)(fn)
        except RuntimeError:  # no writable cache folder
            return numba.njit(nogil=True, **kw)(fn)

    return wrap


def _load(a, i):  # noqa: ANN001, ANN202
    """Entry ``i`` of ``a`` as a float32: a float32 array's own, or a bfloat16 one's (its bits
    as int16, numpy having no bfloat16) widened exactly, as torch converts it."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(_load, inline="always")
def _load_overload(a, i):  # noqa: ANN001, ANN202
    if a.dtype == numba.types.int16:
        return lambda a, i: np.uint32((np.uint32(a[i]) & np.uint32(0xFFFF)) << np.uint32(16)).view(
            np.float32
        )
    return lambda a, i: a[i]


def _store(out, i, x):  # noqa: ANN001, ANN202
    """Write float32 ``x`` as entry ``i`` of ``out``: as it is into a float32 array, rounded as
    torch converts it into a bfloat16 one (its bits as int16, :func:`_bfloat16`). Returns
    whether the bits written are not torch's: a NaN into bfloat16 (whose bits torch's vector
    and scalar code do not agree on); the caller then converts with torch instead. Compiled
    as its own function, which LLVM inlines: numba's own inlining of it (``inline="always"``)
    kept the loops that call it from being vectorized (7 times slower)."""
    raise NotImplementedError  # compiled only (the overload below)


@overload(_store)
def _store_overload(out, i, x):  # noqa: ANN001, ANN202
    if out.dtype == numba.types.int16:

        def rounded(out, i, x):  # noqa: ANN001, ANN202
            out[i] = _bfloat16(x)
            return x != x

        return rounded

    def stored(out, i, x):  # noqa: ANN001, ANN202
        out[i] = x
        return False

    return stored


@_jit(inline="always")
def _magnitude(x):  # noqa: ANN001, ANN202
    """|x| of a float32 as its int32 bit pattern (ordered like the magnitudes), in an int64."""
    return np.int64(np.float32(abs(x)).view(np.int32))


@_jit(inline="always")
def _merged(bi, x0, x1, f0, f1, lam):  # noqa: ANN001, ANN202
    """One merged value: ``f`` is -1 where the update's value is among the first k (trimmed:
    +0.0, as the eager code's bitwise and), 0 elsewhere; then disjoint_mean_ · λ + base."""
    x0 = np.int32(np.float32(x0).view(np.int32) & ~f0).view(np.float32)
    x1 = np.int32(np.float32(x1).view(np.int32) & ~f1).view(np.float32)
    total = x0 + x1
    elected = -_ONE if total < 0 else _ONE  # sign(sign(Σ) + ½): a zero or NaN sum elects +
    g0 = _ONE if x0 * elected > 0 else _ZERO  # clamp(sign(x · elected), min=0); sign(NaN) = 0
    g1 = _ONE if x1 * elected > 0 else _ZERO
    count = g0 + g1
    count = _ONE if count < _ONE else count  # clamp(min=1)
    return (x0 * g0 + x1 * g1) / count * lam + bi


@_jit()
def apply2(b, v0, v1, k0, k1, e0, e1, l0, l1, lam, out):  # noqa: ANN001, ANN201
    """TIES' apply pass over a tile: ``out = base + λ · disjoint_mean`` of the two updates
    ``v_t − b``, each trimmed of its first k: the values whose magnitude bits are below ``k_t``
    (in [0, 2**31]), then the first ``l_t`` of those whose bits are ``e_t`` (tied with the
    k-th value), in flat order. ``lam``: float32."""
    for i in range(b.size):
        bi = _load(b, i)
        x0, x1 = _load(v0, i) - bi, _load(v1, i) - bi
        f0 = np.int32((_magnitude(x0) - k0) >> 63)  # -1 below k
        f1 = np.int32((_magnitude(x1) - k1) >> 63)
        out[i] = _merged(bi, x0, x1, f0, f1, lam)
    if l0 <= 0 and l1 <= 0:
        return
    s0 = s1 = 0  # tied values met so far
    for i in range(b.size):
        bi = _load(b, i)
        x0, x1 = _load(v0, i) - bi, _load(v1, i) - bi
        a0, a1 = _magnitude(x0), _magnitude(x1)
        t0 = a0 == e0 and s0 < l0
        t1 = a1 == e1 and s1 < l1
        s0 += a0 == e0
        s1 += a1 == e1
        if t0 or t1:
            f0 = np.int32(-1) if t0 or a0 < k0 else np.int32(0)
            f1 = np.int32(-1) if t1 or a1 < k1 else np.int32(0)
            out[i] = _merged(bi, x0, x1, f0, f1, lam)
        if s0 >= l0 and s1 >= l1:
            return


@_jit()
def hist2(b, v0, v1, h0, h1):  # noqa: ANN001, ANN201
    """A first statistics pass over a tile without a guess: add the high 16 bits of the two
    updates' magnitude bits to the histograms ``h_t`` (65,536 int64 bins each)."""
    for i in range(b.size):
        bi = _load(b, i)
        a0, a1 = _magnitude(_load(v0, i) - bi), _magnitude(_load(v1, i) - bi)
        h0[a0 >> 16] += 1
        h1[a1 >> 16] += 1


@_jit()
def window2(b, v0, v1, lo0, w0, lo1, w1, flags, marked, in0, in1):  # noqa: ANN001, ANN201
    """The first statistics pass over a tile with guessed windows: per update, how many of its
    magnitude bits are below ``lo_t``, and those in ``[lo_t, lo_t + w_t)`` put into ``in_t``
    in flat order. Returns (how many each kept, how many each has below).

    Three loops. The first counts and marks, with no store but a byte of ``flags`` per entry
    (uint8, the tile's size; bit t: inside update t's window): LLVM vectorizes it. The second
    reads the flags eight at a time and lists the words with a flag in ``marked`` (int32, at
    least an eighth of the tile's size), storing each word's index and moving on where it has
    one: no branch. The third takes the flagged entries of each listed word again, found from
    its trailing zero bits (one instruction each), storing both values and keeping each where
    flagged by moving on (``in_t`` holds one more than the tile). A window holds a few percent
    of the values (the words with a flag: 42% of them at 3.3%). Looping over every word instead
    and skipping those without a flag mispredicts that branch for a good part of them: the
    listing took a third off the pass at 3.3% (``benchmarks/ties_first_pass.py``)."""
    c0, c1 = marks2(b, v0, v1, lo0, w0, lo1, w1, flags)
    n0 = n1 = 0
    whole = b.size // 8
    words = flags[: whole * 8].view(np.uint64)
    m = 0
    for j in range(whole):
        marked[m] = j
        m += words[j] != 0
    for q in range(m):
        j = np.int64(marked[q])
        w = words[j]
        while w != 0:  # each flagged entry of the eight: its byte's lowest set bit
            t = _cttz(w)
            n0, n1 = _keep(b, v0, v1, flags, in0, in1, 8 * j + np.int64(t >> _TO_BYTE), n0, n1)
            w &= ~(_BYTE << (t & _BYTE_BITS))
    for i in range(8 * whole, b.size):
        n0, n1 = _keep(b, v0, v1, flags, in0, in1, i, n0, n1)
    return n0, n1, c0, c1


@_jit(inline="always")
def marks2(b, v0, v1, lo0, w0, lo1, w1, flags):  # noqa: ANN001, ANN201
    """:func:`window2`'s first loop: per update, how many magnitude bits are below ``lo_t``;
    into ``flags``, per entry, bit t set where update t's are in ``[lo_t, lo_t + w_t)``."""
    c0 = c1 = 0
    for i in range(b.size):
        bi = _load(b, i)
        a0, a1 = _magnitude(_load(v0, i) - bi), _magnitude(_load(v1, i) - bi)
        c0 += a0 < lo0
        c1 += a1 < lo1
        # bits − lo wraps above w below the window (as a 31-bit word)
        f0 = np.uint8(((a0 - lo0) & _ABS) < w0)
        f1 = np.uint8(((a1 - lo1) & _ABS) < w1)
        flags[i] = f0 | (f1 << np.uint8(1))
    return c0, c1


# a flag byte in a word of eight: its index is the bit index >> 3, its bits 0xFF << (t & 0x38)
_TO_BYTE, _BYTE, _BYTE_BITS = np.uint64(3), np.uint64(0xFF), np.uint64(0x38)


@intrinsic
def _cttz(typingctx, x):  # noqa: ANN001, ANN202, ARG001
    """The number of trailing zero bits of a nonzero uint64 (LLVM's ``cttz``: one instruction)."""

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64"
        )
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return numba.types.uint64(numba.types.uint64), codegen


@_jit(inline="always")
def _keep(b, v0, v1, flags, in0, in1, i, n0, n1):  # noqa: ANN001, ANN202
    """:func:`window2`'s stores for entry ``i``: both values stored, each kept by moving on
    where flagged. Returns the new counts."""
    f = flags[i]
    bi = _load(b, i)
    in0[n0] = _magnitude(_load(v0, i) - bi)
    n0 += f & 1
    in1[n1] = _magnitude(_load(v1, i) - bi)
    n1 += f >> 1
    return n0, n1


@_jit()
def window_bin(values, first, bins, rank, counts):  # noqa: ANN001, ANN201
    """The bin (high 16 bits) of the ``rank``-th smallest (from 1) of the int32 ``values``, all
    in bins ``first`` to ``first + bins − 1``, and how many values lie in the bins below it;
    (-1, their count) when fewer than ``rank``. ``counts``: ``bins`` int64 of scratch."""
    counts[:] = 0
    for i in range(values.size):
        counts[(np.int64(values[i]) >> 16) - first] += 1
    below = 0
    for j in range(bins):
        if below + counts[j] >= rank:
            return first + j, below
        below += counts[j]
    return -1, below


@_jit()
def window_kth(values, ends, h, rank, low, equal):  # noqa: ANN001, ANN201
    """The ``rank``-th smallest (from 1) of the int32 ``values`` whose high 16 bits are ``h``,
    with the pieces of ``values`` ending at ``ends``: per piece, how many values equal it, into
    ``equal``. Returns (its low 16 bits, how many of those are below it, how many equal it), or
    (-1, their count, 0) when fewer than ``rank``. ``low``: 2**16 + 1 int64 of scratch.

    A first loop counts them and finds their least and greatest low bits (no branch, no
    store: vectorized); when those differ, a second counts each low bits' values into ``low``
    (the others into its last bin, without a branch). Differences of bfloat16 weights have
    their low 16 bits zero as a rule: then there is no second loop."""
    count, least, most = 0, 1 << 16, -1
    for i in range(values.size):
        v = np.int64(values[i])
        inside = (v >> 16) == h
        count += inside
        least = min(least, v & 0xFFFF if inside else 1 << 16)
        most = max(most, v & 0xFFFF if inside else -1)
    if count < rank:
        return -1, count, 0
    if least == most:
        lo, below, same = least, 0, count
    else:
        low[:] = 0
        for i in range(values.size):
            v = np.int64(values[i])
            low[v & 0xFFFF if (v >> 16) == h else 1 << 16] += 1
        below = 0
        lo = least
        while below + low[lo] < rank:
            below += low[lo]
            lo += 1
        same = low[lo]
    kth = np.int32((h << 16) | lo)
    start = 0
    for p in range(ends.size):
        c = 0
        for i in range(start, ends[p]):
            c += values[i] == kth
        equal[p] = c
        start = ends[p]
    return lo, below, same


@_jit(inline="always")
def _columns2(b, v0, v1, w0, w1, cols, by_row, out):  # noqa: ANN001, ANN202
    """DiM3's apply pass over a tile: ``out = (b + (v0 − b) · w0) + (v1 − b) · w1``, each
    weight the entry's column's (``w_t[c]``, ``cols`` columns a row), or its row's
    (``w_t[r]``, ``by_row``: a tensor whose columns are its stored rows). Inlined into the two
    kernels below, which differ in their multiply-adds only. Row by row, on slices: a loop
    over ``r * cols + c`` does not vectorize (a third of the speed). ``out``: float32, or
    bfloat16 as its int16 bits (:func:`_store`). Returns how many values written are NaN in
    bfloat16 (0 for float32)."""
    nans = 0
    for r in range(b.size // cols):
        o, e = r * cols, (r + 1) * cols
        if by_row:
            nans += _row2(b[o:e], v0[o:e], v1[o:e], w0[r], w1[r], out[o:e])
        else:
            nans += _row2_columns(b[o:e], v0[o:e], v1[o:e], w0, w1, out[o:e])
    return nans


@_jit(inline="always")
def _row2_columns(b, v0, v1, w0, w1, out):  # noqa: ANN001, ANN202
    """One row of :func:`_columns2`, weights per column."""
    nans = 0
    for c in range(b.size):
        bi = _load(b, c)
        m = bi + (_load(v0, c) - bi) * w0[c]
        nans += _store(out, c, m + (_load(v1, c) - bi) * w1[c])
    return nans


@_jit(inline="always")
def _row2(b, v0, v1, x0, x1, out):  # noqa: ANN001, ANN202
    """One row of :func:`_columns2`, one weight per update for the whole row."""
    nans = 0
    for c in range(b.size):
        bi = _load(b, c)
        m = bi + (_load(v0, c) - bi) * x0
        nans += _store(out, c, m + (_load(v1, c) - bi) * x1)
    return nans


@_jit()
def columns2(b, v0, v1, w0, w1, cols, by_row, out):  # noqa: ANN001, ANN201
    """:func:`_columns2` with each multiply and add rounded (torch's scalar code)."""
    return _columns2(b, v0, v1, w0, w1, cols, by_row, out)


@_jit(fastmath={"contract"})
def columns2_fma(b, v0, v1, w0, w1, cols, by_row, out):  # noqa: ANN001, ANN201
    """:func:`_columns2` with each multiply-add rounded once (fused), as torch's vectorized
    ``addcmul_`` computes it on x86 CPUs with AVX2 or AVX-512 (the compiler contracts it)."""
    return _columns2(b, v0, v1, w0, w1, cols, by_row, out)


@_jit()
def sum2(b, v0, v1, w0, lam, out):  # noqa: ANN001, ANN201
    """Task arithmetic of two updates, the second weighted 1: ``((v0 − b) · w0 + (v1 − b)) · λ
    + b``, each operation rounded to float32 in the eager code's order (a factor of 1, a pass
    the eager code skips, changes no value: every operand is the result of a subtraction, never
    a signalling NaN). ``out``: float32, or bfloat16 as its int16 bits, each value rounded as
    torch's conversion rounds it (:func:`_store`). Returns how many values written are NaN in
    bfloat16, whose bits are then not torch's (its vector code writes 0xFFFF, its scalar code
    0x7FC0): the caller converts those itself."""
    nans = 0
    for i in range(b.size):
        bi = _load(b, i)
        m = (_load(v0, i) - bi) * w0
        m = m + (_load(v1, i) - bi)
        nans += _store(out, i, m * lam + bi)
    return nans


@_jit(inline="always")
def _bfloat16(x):  # noqa: ANN001, ANN202
    """A float32 that is not NaN as bfloat16 bits (an int16), rounded to nearest, ties to even,
    as torch converts it (its scalar and vector code agree but for NaN)."""
    u = np.uint32(np.float32(x).view(np.uint32))
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(u).view(np.int16)


_LEVELS = 4  # torch's cascade sum: levels of partial sums


@_jit()
def column_sums2(b, v0, v1, cols, acc, out):  # noqa: ANN001, ANN201
    """DiM3's column sums over a tile's rows in one pass: ``out`` (5, cols) gets Σ b², Σ v0²,
    Σ v1², Σ v0·b, Σ v1·b per column, each product rounded to float32 and the rows added in
    the cascade of torch's ``sum(dim=0)`` over a contiguous float32 matrix (its
    ``multi_row_sum``, which each block of 4 vectors of columns takes: all columns when
    ``cols`` is a multiple of 64): partial sums of ``2**p`` rows (p = max(4, ⌈log2 rows⌉ //
    4)) carried up 4 levels, the levels added last. ``acc``: (4, 5, cols) float32 scratch."""
    rows = b.size // cols
    power, n = 0, 1
    while n < rows:
        n, power = n * 2, power + 1
    power = max(4, power // _LEVELS)
    step = 1 << power
    mask = step - 1
    acc[:] = 0
    i = 0
    while i + step <= rows:
        for _ in range(step):
            o = i * cols
            _sums_row(b[o : o + cols], v0[o : o + cols], v1[o : o + cols], acc[0])
            i += 1
        for j in range(1, _LEVELS):
            _add(acc[j - 1], acc[j])  # one level carried up, then emptied
            acc[j - 1][:] = 0
            if (i & (mask << (j * power))) != 0:
                break
    while i < rows:
        o = i * cols
        _sums_row(b[o : o + cols], v0[o : o + cols], v1[o : o + cols], acc[0])
        i += 1
    for j in range(1, _LEVELS):
        _add(acc[j], acc[0])
    out[:] = acc[0]


@_jit()
def column_sums2_runs(b, v0, v1, cols, run, acc, out):  # noqa: ANN001, ANN201
    """:func:`column_sums2` of each ``run`` rows of a tile in turn (the last run shorter):
    ``out`` (runs, 5, cols) gets each run's sums, as that many calls would, in one call."""
    rows = b.size // cols
    for t in range(out.shape[0]):
        lo, hi = t * run * cols, min(rows, (t + 1) * run) * cols
        column_sums2(b[lo:hi], v0[lo:hi], v1[lo:hi], cols, acc, out[t])


@_jit()
def chain_add(total, parts):  # noqa: ANN001, ANN201
    """``total += parts[0]``, then ``+= parts[1]``, and so on: each element's float32 additions
    in the parts' order, as torch's ``add_`` of one after another gives them."""
    for t in range(parts.shape[0]):
        _add(parts[t], total)


@_jit(inline="always")
def _sums_row(b, v0, v1, acc):  # noqa: ANN001, ANN202
    """Add one row's five products to the level-0 sums ``acc`` (5, cols)."""
    s0, s1, s2, s3, s4 = acc[0], acc[1], acc[2], acc[3], acc[4]
    for c in range(b.size):
        bi, x0, x1 = _load(b, c), _load(v0, c), _load(v1, c)
        s0[c] += bi * bi
        s1[c] += x0 * x0
        s2[c] += x1 * x1
        s3[c] += x0 * bi
        s4[c] += x1 * bi


@_jit(inline="always")
def _add(src, dst):  # noqa: ANN001, ANN202
    """``dst += src`` (the cascade's levels added last, or one carried up)."""
    for k in range(src.shape[0]):
        d, s_ = dst[k], src[k]
        for c in range(s_.size):
            d[c] += s_[c]


# -- DARE's random keep masks: torch's CPU generator (MT19937), number for number
_U = np.uint32
_N, _M = 624, 397  # MT19937's state words and shift


@_jit()
def mt_seed(seed, state):  # noqa: ANN001, ANN201
    """``state`` (624 uint32) as ``torch.Generator().manual_seed(seed)`` sets it (MT19937's
    init_genrand of the seed's low 32 bits)."""
    state[0] = _U(seed & 0xFFFFFFFF)
    for j in range(1, _N):
        prev = state[j - 1]
        state[j] = _U(1812433253) * (prev ^ (prev >> _U(30))) + _U(j)


@_jit(inline="always")
def _mix(a, b, c):  # noqa: ANN001, ANN202
    y = (a & _U(0x80000000)) | (b & _U(0x7FFFFFFF))
    return c ^ (y >> _U(1)) ^ ((_U(0) - (y & _U(1))) & _U(0x9908B0DF))


@_jit()
def _twist(s):  # noqa: ANN001, ANN202
    for i in range(_N - _M):
        s[i] = _mix(s[i], s[i + 1], s[i + _M])
    for i in range(_N - _M, _N - 1):
        s[i] = _mix(s[i], s[i + 1], s[i + _M - _N])
    s[_N - 1] = _mix(s[_N - 1], s[0], s[_M - 1])


@_jit()
def _temper(src, dst, t):  # noqa: ANN001, ANN202
    # MT19937's tempering of the state words ``src`` into keep words ``dst`` (as long): kept
    # (-1) where the number's low 24 bits are at least t. A loop of its own over two slices,
    # which LLVM vectorizes: indexed from the start of the arrays (s[pos + j]), each index
    # took numba's check for a negative one, and the loop ran 4 times slower (2.2 against
    # 0.55 ms per 2**20 words; benchmarks/dare_words.py)
    for j in range(src.size):
        y = src[j]
        y ^= y >> _U(11)
        y ^= (y << _U(7)) & _U(0x9D2C5680)
        y ^= (y << _U(15)) & _U(0xEFC60000)
        y ^= y >> _U(18)
        dst[j] = -np.int32(np.int32(y & _U(0xFFFFFF)) >= np.int32(t))


@_jit()
def dare_words(state, pos, t, out):  # noqa: ANN001, ANN201
    """DARE's keep words from the generator ``state`` at word ``pos`` (624: none left): per
    entry of int32 ``out``, -1 where the number's low 24 bits are at least ``t`` (kept), else 0.
    torch.rand's float32 is those bits · 2**-24, exactly, so with t = ⌈p · 2**24⌉ (p a float32)
    that is where it is at least p. Returns the new ``pos``."""
    i, n = 0, out.size
    while i < n:
        if pos >= _N:
            _twist(state)
            pos = 0
        m = min(_N - pos, n - i)
        _temper(state[pos : pos + m], out[i : i + m], t)
        pos += m
        i += m
    return pos


@_jit()
def dare_ties2(b, v0, v1, w0, w1, kept, lam, out):  # noqa: ANN001, ANN201
    """DARE-TIES over a tile of two updates: ``out = base + λ · disjoint_mean`` of the updates
    ``v_t − b`` ANDed with their keep words ``w_t`` (-1 kept, 0 dropped: +0.0) and divided by
    ``kept`` = 1 − p (float32), as :func:`dim3.methods.dare.merge_ties` computes them."""
    for i in range(b.size):
        bi = _load(b, i)
        x0 = np.int32(np.float32(_load(v0, i) - bi).view(np.int32) & w0[i]).view(np.float32)
        x1 = np.int32(np.float32(_load(v1, i) - bi).view(np.int32) & w1[i]).view(np.float32)
        x0, x1 = x0 / kept, x1 / kept
        out[i] = _merged(bi, x0, x1, np.int32(0), np.int32(0), lam)
