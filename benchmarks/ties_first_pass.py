"""Where the time of TIES' first statistics pass goes, per tile: the engine's kernels against the
one they replaced and against their loops taken apart.

TIES' first pass over a tile reads the base and two updates (bfloat16 rows as stored) and, for
each update, gathers what finds its threshold (the k-th smallest magnitude) exactly. The engine
guesses, per tensor, a window of magnitude bits around the threshold from a sample
(:meth:`dim3.slices.ExactSelect.window`); with it, the pass counts the values below the window
and keeps those inside (``dim3.kernels.window2``); without one, it counts the histogram of the
magnitudes' high 16 bits (``dim3.kernels.hist2``, the first of two radix passes). This times, on
one thread, medians of ``--repeat`` timings of ``--calls`` calls, in milliseconds a tile and
nanoseconds an entry:

- ``counts2 (before)``: the kernel of the engine until 2026-12-01, kept here as it was: a
  65,536-bin histogram of each update and the values inside the windows stored branch-free,
  in one loop (on that day's 2-core machine, 8.1 s of a Qwen2-VL-2B TIES merge's 15 s of CPU
  time, timed by hand);
- ``window2``: the engine's kernel with a guess: a first loop that counts the values below each
  window and marks those inside (a byte per entry), which LLVM vectorizes, a second that lists
  the words of eight marks with a mark, without a branch, and a third that takes the marked
  values of each listed word;
- ``window2 (before)``: the engine's kernel until 2026-12-02, kept here as it was: its second
  loop went over every word, skipping those without a mark;
- ``window2's first loop``: that first loop alone (``dim3.kernels.marks2``);
- ``hist2``: the engine's kernel without a guess (the histograms alone);
- ``loop alone``: reading the rows and making the magnitudes, neither counted nor stored;
- ``apply2``: TIES' apply pass on the same tile, for scale.

The window is placed around the k-th value of each update for ``--density`` (TIES trims all but
that share) and holds ``--inside`` of its values (the engine's guesses held 3.1% at the median
tile of the 2B trio, counted by hand). Before timing, the kernels are checked against one
another: ``window2`` and the kernel it replaced keep what ``counts2`` kept and count below each
window what the histogram does; ``hist2`` counts the histograms ``counts2`` counts; the first loop alone counts
what ``window2`` counts (exit status 1 if not).

    python benchmarks/ties_first_pass.py                  # a 117 x 8960 tile: 2**20 entries
    python benchmarks/ties_first_pass.py --inside 0.01
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

from dim3 import compiled  # noqa: E402
from dim3.slices import BINS  # noqa: E402


def variants() -> dict:
    """The kernels before, and the loop alone (compiled as the package's kernels are,
    uncached)."""
    import numba

    from dim3 import kernels as k

    load, magnitude, mask = k._load, k._magnitude, k._ABS  # noqa: SLF001 - the kernels' own

    @numba.njit(nogil=True)
    def counts2(b, v0, v1, h0, h1, lo0, w0, lo1, w1, in0, in1):  # noqa: ANN001, ANN202
        n0 = n1 = 0
        for i in range(b.size):
            bi = load(b, i)
            a0, a1 = magnitude(load(v0, i) - bi), magnitude(load(v1, i) - bi)
            h0[a0 >> 16] += 1
            h1[a1 >> 16] += 1
            in0[n0] = a0
            n0 += ((a0 - lo0) & mask) < w0
            in1[n1] = a1
            n1 += ((a1 - lo1) & mask) < w1
        return n0, n1

    keep, marks, cttz = k._keep, k.marks2, k._cttz  # noqa: SLF001
    to_byte, byte, byte_bits = k._TO_BYTE, k._BYTE, k._BYTE_BITS  # noqa: SLF001

    @numba.njit(nogil=True)
    def window2_before(b, v0, v1, lo0, w0, lo1, w1, flags, in0, in1):  # noqa: ANN001, ANN202
        c0, c1 = marks(b, v0, v1, lo0, w0, lo1, w1, flags)
        n0 = n1 = 0
        whole = b.size // 8
        words = flags[: whole * 8].view(np.uint64)
        for j in range(whole):
            w = words[j]
            while w != 0:
                t = cttz(w)
                n0, n1 = keep(b, v0, v1, flags, in0, in1, 8 * j + np.int64(t >> to_byte), n0, n1)
                w &= ~(byte << (t & byte_bits))
        for i in range(8 * whole, b.size):
            n0, n1 = keep(b, v0, v1, flags, in0, in1, i, n0, n1)
        return n0, n1, c0, c1

    @numba.njit(nogil=True)
    def alone(b, v0, v1):  # noqa: ANN001, ANN202
        s = 0
        for i in range(b.size):
            bi = load(b, i)
            s += (magnitude(load(v0, i) - bi) >> 16) + (magnitude(load(v1, i) - bi) >> 16)
        return s

    return {"counts2": counts2, "window2 (before)": window2_before, "loop alone": alone}


def window(ordered: np.ndarray, q: float, share: float) -> tuple[int, int]:
    """``[lo, hi)`` around the ``q`` quantile of the sorted bits ``ordered`` holding about
    ``share`` of them, ``lo`` a whole bin (as the engine's guesses are)."""
    n = ordered.size
    lo = int(ordered[max(0, int((q - share / 2) * n))]) >> 16 << 16
    first = int(np.searchsorted(ordered, lo))
    hi = int(ordered[min(n - 1, first + max(1, int(share * n)) - 1)]) + 1
    return lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=117)
    parser.add_argument("--cols", type=int, default=8960, help="columns (Qwen2-VL-2B's MLP: 8960)")
    parser.add_argument("--density", type=float, default=0.2, help="TIES' density (default 0.2)")
    parser.add_argument("--inside", type=float, default=0.031, help="share in each window")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not compiled.available():
        sys.exit("the compiled kernels are not available here (numba?)")
    torch.set_num_threads(1)  # as a tile thread
    kern = compiled.kernels()  # the kernels themselves, as fused calls them
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    base = torch.randn(shape, generator=g) * 0.02
    tuned = [base + torch.randn(shape, generator=g) * s for s in (1e-3, 2e-3)]
    b, v0, v1 = (t.bfloat16().reshape(-1).view(torch.int16).numpy() for t in (base, *tuned))
    n = b.size
    wins, kth = [], []  # per update: its window, and its k-th magnitude bits (for apply2)
    for t in tuned:
        bits = (t.bfloat16().float() - base.bfloat16().float()).abs().reshape(-1)
        ordered = np.sort(bits.view(torch.int32).numpy())
        wins.append(window(ordered, 1 - args.density, args.inside))
        kth.append(int(ordered[int((1 - args.density) * n)]))
    (lo0, hi0), (lo1, hi1) = wins
    ws = (lo0, hi0 - lo0, lo1, hi1 - lo1)
    kept = [np.empty(n + 1, dtype=np.int32) for _ in range(2)]
    hists = [np.zeros(BINS, dtype=np.int64) for _ in range(2)]
    flags = np.empty(n, dtype=np.uint8)
    marked = np.empty((n + 7) // 8, dtype=np.int32)
    out = np.empty(n, dtype=np.float32)
    parts = variants()
    runs = {
        "counts2 (before)": lambda: parts["counts2"](b, v0, v1, *hists, *ws, *kept),
        "window2": lambda: kern.window2(b, v0, v1, *ws, flags, marked, *kept),
        "window2 (before)": lambda: parts["window2 (before)"](b, v0, v1, *ws, flags, *kept),
        "window2's first loop": lambda: kern.marks2(b, v0, v1, *ws, flags),
        "hist2": lambda: kern.hist2(b, v0, v1, *hists),
        "loop alone": lambda: parts["loop alone"](b, v0, v1),
        "apply2": lambda: kern.apply2(b, v0, v1, *kth, -1, -1, 0, 0, np.float32(1.0), out),
    }
    # the kernels count and keep what the kernel before did
    for h in hists:
        h[:] = 0
    before = runs["counts2 (before)"]()
    want_h = [h.copy() for h in hists]
    want_kept = [kept[i][: before[i]].copy() for i in range(2)]
    want_below = [int(want_h[0][: lo0 >> 16].sum()), int(want_h[1][: lo1 >> 16].sum())]
    for h in hists:
        h[:] = 0
    runs["hist2"]()
    ok = all(np.array_equal(h, w) for h, w in zip(hists, want_h, strict=True))
    n0, n1, c0, c1 = runs["window2"]()
    ok = ok and (n0, n1) == tuple(before) and [c0, c1] == want_below
    ok = ok and all(np.array_equal(kept[i][: before[i]], want_kept[i]) for i in range(2))
    ok = ok and tuple(runs["window2 (before)"]()) == (n0, n1, c0, c1)
    # the kernel before wrote into the same arrays: what it kept is checked in turn
    ok = ok and all(np.array_equal(kept[i][: before[i]], want_kept[i]) for i in range(2))
    ok = ok and list(runs["window2's first loop"]()) == want_below
    if not ok:
        print("the kernels do not count and keep what counts2 did", file=sys.stderr)
        sys.exit(1)
    print(
        f"tile {args.rows} x {args.cols} bfloat16 ({n:,} entries), one thread, torch {torch.__version__}"
    )
    print("load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print(f"windows hold {before[0] / n:.1%} and {before[1] / n:.1%} of the updates' values")
    words = flags[: n // 8 * 8].view(np.uint64)
    print(
        f"window2's second loop lists {np.count_nonzero(words) / max(1, words.size):.0%} of the words"
    )
    print("checked: the kernels count and keep what counts2 did")
    for name, run in runs.items():
        ms = median_ms(run, args.calls, args.repeat)
        print(f"{name:<22} {ms:7.3f} ms a tile, {ms * 1e6 / n:6.2f} ns an entry")


def median_ms(run: Callable[[], object], calls: int, repeat: int) -> float:
    """The median of ``repeat`` timings of ``calls`` calls of ``run``, in milliseconds a call,
    after one call first (a kernel compiled, or loaded from numba's cache)."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
