"""Where the time of TIES' first statistics pass goes, per tile: ``dim3.kernels.counts2`` against
the same loop taken apart.

``counts2`` reads a tile of the base and two updates (bfloat16 rows as stored), adds the high 16
bits of each update's magnitude bits to a 65,536-bin histogram, and stores the values inside a
guessed window (:meth:`dim3.slices.ExactSelect.window`) branch-free. On the 2-core machine of
2026-12-01 afternoon it was 8.1 s of a Qwen2-VL-2B TIES merge's 15 s of CPU time (timed by
hand from Python, docs/performance.md). This times, on one thread, medians of ``--repeat`` timings of
``--calls`` calls, in milliseconds a tile and nanoseconds an entry:

- ``counts2``: the engine's kernel, its two histograms two allocations as the engine makes them
  (``torch.zeros`` each);
- ``counts2, one block``: the same, both histograms in one allocation;
- ``histograms only``: the loop without the window's stores;
- ``window stores only``: the loop without the histograms;
- ``loop alone``: reading the rows and making the magnitudes, neither counted nor stored;
- ``apply2``: TIES' apply pass on the same tile, for scale.

The window is placed around the k-th value of each update for ``--density`` (TIES trims all but
that share) and holds ``--inside`` of its values (the engine's guesses held 3.1% at the median
tile of the 2B trio, counted by hand). Before timing, the variants are checked against
``counts2``: the same histograms, the same counts and values kept (exit status 1 if not).

    python benchmarks/ties_first_pass.py                  # a 117 x 8960 tile: 2**20 entries
    python benchmarks/ties_first_pass.py --inside 0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

from dim3 import fused  # noqa: E402
from dim3.slices import BINS  # noqa: E402


def variants() -> dict:
    """The loop of ``counts2`` taken apart (compiled as the package's kernels are, uncached)."""
    import numba

    from dim3 import kernels as k

    load, magnitude, mask = k._load, k._magnitude, k._ABS  # noqa: SLF001 - the kernel's own

    @numba.njit(nogil=True)
    def histograms(b, v0, v1, h0, h1, lo0, w0, lo1, w1, in0, in1):  # noqa: ANN001, ANN202, ARG001
        for i in range(b.size):
            bi = load(b, i)
            a0, a1 = magnitude(load(v0, i) - bi), magnitude(load(v1, i) - bi)
            h0[a0 >> 16] += 1
            h1[a1 >> 16] += 1
        return 0, 0

    @numba.njit(nogil=True)
    def stores(b, v0, v1, h0, h1, lo0, w0, lo1, w1, in0, in1):  # noqa: ANN001, ANN202, ARG001
        n0 = n1 = 0
        for i in range(b.size):
            bi = load(b, i)
            a0, a1 = magnitude(load(v0, i) - bi), magnitude(load(v1, i) - bi)
            in0[n0] = a0
            n0 += ((a0 - lo0) & mask) < w0
            in1[n1] = a1
            n1 += ((a1 - lo1) & mask) < w1
        return n0, n1

    @numba.njit(nogil=True)
    def alone(b, v0, v1, h0, h1, lo0, w0, lo1, w1, in0, in1):  # noqa: ANN001, ANN202, ARG001
        s = 0
        for i in range(b.size):
            bi = load(b, i)
            s += (magnitude(load(v0, i) - bi) >> 16) + (magnitude(load(v1, i) - bi) >> 16)
        return s, 0

    return {"histograms only": histograms, "window stores only": stores, "loop alone": alone}


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
    if not fused.available():
        sys.exit("the compiled kernels are not available here (numba?)")
    torch.set_num_threads(1)  # as a tile thread
    kern = fused._kernels()  # noqa: SLF001 - the kernels themselves, as fused calls them
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
    kept = [np.empty(n + 1, dtype=np.int32) for _ in range(2)]
    apart = [torch.zeros(BINS, dtype=torch.int64).numpy() for _ in range(2)]
    block = np.zeros(2 * BINS, dtype=np.int64)

    def call(fn, hists) -> tuple:  # noqa: ANN001
        return fn(b, v0, v1, *hists, lo0, hi0 - lo0, lo1, hi1 - lo1, *kept)

    out = np.empty(n, dtype=np.float32)
    runs = {
        "counts2": lambda: call(kern.counts2, apart),
        "counts2, one block": lambda: call(kern.counts2, (block[:BINS], block[BINS:])),
        **{name: (lambda fn=fn: call(fn, apart)) for name, fn in variants().items()},
        "apply2": lambda: kern.apply2(b, v0, v1, *kth, -1, -1, 0, 0, np.float32(1.0), out),
    }
    # the variants count what counts2 counts
    for h in apart:
        h[:] = 0
    want = call(kern.counts2, apart)
    want_h = [h.copy() for h in apart]
    want_kept = [kept[i][: want[i]].copy() for i in range(2)]
    for h in apart:
        h[:] = 0
    runs["histograms only"]()
    ok = all(np.array_equal(h, w) for h, w in zip(apart, want_h, strict=True))
    got = runs["window stores only"]()
    ok = ok and tuple(got) == tuple(want)
    ok = ok and all(np.array_equal(kept[i][: want[i]], want_kept[i]) for i in range(2))
    if not ok:
        print("the variants do not count what counts2 counts", file=sys.stderr)
        sys.exit(1)
    print(
        f"tile {args.rows} x {args.cols} bfloat16 ({n:,} entries), one thread, torch {torch.__version__}"
    )
    print("load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print(f"windows hold {want[0] / n:.1%} and {want[1] / n:.1%} of the updates' values")
    print("checked: the variants count and keep what counts2 does")
    for name, run in runs.items():
        run()  # compiled, or loaded from numba's cache
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            times.append((time.perf_counter() - start) / args.calls)
        ms = statistics.median(times) * 1e3
        print(f"{name:<20} {ms:7.3f} ms a tile, {ms * 1e6 / n:6.2f} ns an entry")


if __name__ == "__main__":
    main()
