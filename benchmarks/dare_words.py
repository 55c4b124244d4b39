"""Where the time of DARE's keep words goes, per tile: the engine's kernel against the one it
replaced, against torch.rand, and against the pass that uses the words.

DARE drops each entry of an update at random (``r < p``, ``r`` from ``torch.rand`` of a
generator seeded per tensor block and model). On the CPU the engine draws those very numbers
with a compiled MT19937 (:class:`dim3.compiled.DareDraws`): ``dim3.kernels.dare_words`` twists
the generator's state and tempers each word into a keep word (-1 kept, 0 dropped). A
DARE-TIES tile of two updates draws two tiles of words, then merges them in one pass
(``dim3.kernels.dare_ties2``). This times, on one thread, medians of ``--repeat`` timings of
``--calls`` calls, in milliseconds a tile and nanoseconds a word:

- ``dare_words (before)``: the kernel of the engine until 2026-12-01, kept here as it was: the
  tempering loop indexed the state and the words from the arrays' starts (``s[pos + j]``), so
  numba checked each index for a negative one, and LLVM did not vectorize it;
- ``dare_words``: the engine's kernel: the tempering loop over two slices, vectorized;
- ``torch.rand and two passes``: the eager words (``dim3.methods._utils._dare_keep_bits``
  without numba): torch.rand into the words' buffer, then their sign from an integer
  subtraction and shift;
- ``twists alone``: MT19937's state twists the words need (one per 624), without tempering;
- ``dare_ties2``: the merge pass over a tile of two updates' words, for scale (a tile takes
  two tiles of words and one of these).

Before timing, the words are checked against one another: both kernels give torch.rand's
numbers compared with p, from a generator seeded alike (exit status 1 if not).

    python benchmarks/dare_words.py                 # 2**20 words, p = 0.9 (DARE's default)
    python benchmarks/dare_words.py --words 5000 --drop-rate 0.3
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

from benchmarks.ties_first_pass import median_ms  # noqa: E402
from dim3 import compiled, fused  # noqa: E402


def variants() -> tuple:
    """The keep-word kernel before and the twists alone (compiled as the package's kernels
    are, uncached), over the package's own twist: ``before(state, pos, t, out)`` returns the
    new ``pos``; ``twists(state, count)``."""
    import numba

    from dim3 import kernels as k

    n, twist, u = k._N, k._twist, np.uint32  # noqa: SLF001 - the kernels' own

    @numba.njit(nogil=True)
    def temper(s, pos, out, at, m, t):  # noqa: ANN001, ANN202
        for j in range(m):
            y = s[pos + j]
            y ^= y >> u(11)
            y ^= (y << u(7)) & u(0x9D2C5680)
            y ^= (y << u(15)) & u(0xEFC60000)
            y ^= y >> u(18)
            out[at + j] = ~np.int32((np.int32(y & u(0xFFFFFF)) - np.int32(t)) >> np.int32(31))

    @numba.njit(nogil=True)
    def words(state, pos, t, out):  # noqa: ANN001, ANN202
        i, size = 0, out.size
        while i < size:
            if pos >= n:
                twist(state)
                pos = 0
            m = min(n - pos, size - i)
            temper(state, pos, out, i, m, t)
            pos += m
            i += m
        return pos

    @numba.njit(nogil=True)
    def twists(state, count):  # noqa: ANN001, ANN202
        for _ in range(count):
            twist(state)

    return words, twists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=1 << 20, help="a tile's entries")
    parser.add_argument("--drop-rate", type=float, default=0.9, help="p (DARE's default 0.9)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not compiled.available():
        print("numba is not available: no compiled kernel to time", file=sys.stderr)
        sys.exit(2)
    from dim3 import kernels as k

    n, p = args.words, args.drop_rate
    t = math.ceil(float(np.float32(p)) * 2**24)  # as DareDraws.words compares
    old_words, twists = variants()

    # checked: a few tiles of each, from one seed, against torch.rand's numbers
    gen = torch.Generator().manual_seed(args.seed)
    new, old = compiled.DareDraws(args.seed), compiled.DareDraws(args.seed)
    ok = True
    for _ in range(3):
        want = -(torch.rand(n, generator=gen) >= torch.tensor(p)).to(torch.int32)
        got = new.words(p, torch.empty(n, dtype=torch.int32))
        was = torch.empty(n, dtype=torch.int32)
        old.pos = old_words(old.state, old.pos, t, was.numpy())
        ok = ok and torch.equal(got, want) and torch.equal(was, want)
    if not ok:
        print("the kernels' words are not torch.rand's numbers against p", file=sys.stderr)
        sys.exit(1)

    out = torch.empty(n, dtype=torch.int32)
    state = compiled.DareDraws(args.seed)
    cpu = torch.Generator().manual_seed(args.seed)
    p_bits = int(torch.tensor(p, dtype=torch.float32).view(torch.int32))
    count = max(1, -(-n // k._N))  # noqa: SLF001 - the state's words

    def eager() -> None:
        torch.rand(out.shape, generator=cpu, out=out.view(torch.float32))
        torch.sub(p_bits - 1, out, out=out).bitwise_right_shift_(31)

    def twist_only() -> None:
        twists(state.state, count)

    g = torch.Generator().manual_seed(args.seed)
    base, v0, v1 = (torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3))
    w0, w1 = (compiled.DareDraws(s).words(p, torch.empty(n, dtype=torch.int32)) for s in (1, 2))
    merged = torch.empty(n)
    runs = {
        "dare_words (before)": lambda: setattr(
            state, "pos", old_words(state.state, state.pos, t, out.numpy())
        ),
        "dare_words": lambda: state.words(p, out),
        "torch.rand and two passes": eager,
        "twists alone": twist_only,
        "dare_ties2": lambda: fused.dare_ties(base, [v0, v1], [w0, w1], p, 1.0, merged),
    }
    torch.set_num_threads(1)
    print(f"{n:,} words a tile, p = {p}, one thread, torch {torch.__version__}")
    print("load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print("checked: the kernels' words are torch.rand's numbers against p")
    for name, run in runs.items():
        ms = median_ms(run, args.calls, args.repeat)
        print(f"{name:<26} {ms:7.3f} ms a tile, {ms * 1e6 / n:6.2f} ns a word")


if __name__ == "__main__":
    main()
