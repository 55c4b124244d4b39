"""numba kernels of TIES' two passes over a tile of two updates (see :mod:`dim3.fused`, which
calls them on torch tensors; this module imports numba and knows numpy arrays only).

The same float32 operations, in the same order, as the eager code: no fast-math, no
contraction into fused multiply-adds (numba's defaults). Compiled on first use and kept in
numba's cache (``__pycache__`` beside this file, else the user's cache folder); where no cache
folder is writable, compiled in each process.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_ABS = 0x7FFFFFFF  # all bits but the sign
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


def _jit(**kw: Any) -> Any:
    def wrap(fn: Any) -> Any:
        try:
            return numba.njit(nogil=True, cache=True, **kw)(fn)
        except RuntimeError:  # no writable cache folder
            return numba.njit(nogil=True, **kw)(fn)

    return wrap


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
        bi = b[i]
        x0, x1 = v0[i] - bi, v1[i] - bi
        f0 = np.int32((_magnitude(x0) - k0) >> 63)  # -1 below k
        f1 = np.int32((_magnitude(x1) - k1) >> 63)
        out[i] = _merged(bi, x0, x1, f0, f1, lam)
    if l0 <= 0 and l1 <= 0:
        return
    s0 = s1 = 0  # tied values met so far
    for i in range(b.size):
        bi = b[i]
        x0, x1 = v0[i] - bi, v1[i] - bi
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
def counts2(b, v0, v1, h0, h1, lo0, w0, lo1, w1, in0, in1):  # noqa: ANN001, ANN201
    """The first statistics pass over a tile: add the high 16 bits of the updates' magnitude
    bits to the histograms ``h_t``; put those in ``[lo_t, lo_t + w_t)`` into ``in_t``, in flat
    order. Returns how many each got."""
    n0 = n1 = 0
    for i in range(b.size):
        bi = b[i]
        a0, a1 = _magnitude(v0[i] - bi), _magnitude(v1[i] - bi)
        h0[a0 >> 16] += 1
        h1[a1 >> 16] += 1
        if ((a0 - lo0) & _ABS) < w0:  # bits − lo wraps above w below the window
            in0[n0] = a0
            n0 += 1
        if ((a1 - lo1) & _ABS) < w1:
            in1[n1] = a1
            n1 += 1
    return n0, n1
