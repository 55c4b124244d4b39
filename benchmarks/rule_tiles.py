"""Time of one rule on one tile, with and without the compiled kernels (``DIM3_FUSED``).

A tile as the engine's tile threads see it: rows of a real matrix stored in bfloat16, two
updates, one thread. With the kernels the rule gets the rows as stored (the engine's tiles pass
them unconverted); without, it gets them converted to float32 first, as the engine converts them,
and that conversion is counted. Prints the median of ``--repeat`` timings of ``--calls`` calls
each, in nanoseconds an entry, and the load average.

    python benchmarks/rule_tiles.py                       # task arithmetic and DARE-TIES
    python benchmarks/rule_tiles.py --rows 16 --cols 8960 --methods task_arithmetic
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

from dim3.compiled import available  # noqa: E402
from dim3.methods import get_method  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="task_arithmetic,dare_ties")
    parser.add_argument("--rows", type=int, default=16, help="rows of the tile")
    parser.add_argument("--cols", type=int, default=8960, help="columns (Qwen2-VL-2B's MLP: 8960)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a tile thread
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=g) * 0.02
    tuned = [base + torch.randn(args.rows, args.cols, generator=g) * 1e-3 for _ in range(2)]
    stored = [t.bfloat16() for t in (base, *tuned)]
    widened = [torch.empty(args.rows, args.cols) for _ in stored]
    n = base.numel()
    print(f"tile {args.rows} x {args.cols} bfloat16, one thread, torch {torch.__version__}")
    print("load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    for name in args.methods.split(","):
        method = get_method(name)
        options = method.make_options({})

        def compiled(method=method, options=options) -> None:
            method.merge(stored[0], stored[1:], options, name="w")

        def eager(method=method, options=options) -> None:
            for dst, src in zip(widened, stored, strict=True):
                dst.copy_(src)
            method.merge(widened[0], widened[1:], options, name="w")

        figures = {}
        for label, run, flag in (("compiled", compiled, "1"), ("eager", eager, "0")):
            os.environ["DIM3_FUSED"] = flag
            if label == "compiled" and not available():
                print(f"{name}: the kernels are not available here (numba?)")
                break
            run()  # compiles, or loads the compiled kernel from the cache
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                for _ in range(args.calls):
                    run()
                times.append((time.perf_counter() - start) / args.calls / n * 1e9)
            figures[label] = statistics.median(times)
        os.environ.pop("DIM3_FUSED", None)
        if len(figures) == 2:
            print(
                f"{name:<16} compiled {figures['compiled']:.2f} ns an entry, eager (with the "
                f"conversion) {figures['eager']:.2f} ns: {figures['eager'] / figures['compiled']:.1f}x"
            )


if __name__ == "__main__":
    main()
