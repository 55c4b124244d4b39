"""Diagnostics against the merge on the same synthetic trio: wall time and peak memory.

Issue 4 asks that computing the diagnostics need no more memory than the merge. This script builds
the synthetic LLaVA-shaped trio of ``merge_throughput.py`` once, then runs, each in a fresh Python
process so that one run's freed memory cannot hide the other's peak, a merge with each requested
method and ``dim3.diagnostics.diagnose``, and prints wall time, peak anonymous RSS (RssAnon plus RssShmem,
excluding the safetensors files' mapped pages) and peak GPU memory.

    python benchmarks/diagnostics_memory.py --shape tiny
    python benchmarks/diagnostics_memory.py --shape tiny --methods dim3,ties,dare_ties
    python benchmarks/diagnostics_memory.py --shape 7b --device cuda        # ~40 GB of disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a clone, no install
sys.path.insert(0, str(HERE))

from merge_throughput import DTYPES, SHAPES, AnonPeak, build_trio  # noqa: E402

from dim3 import diagnostics, engine  # noqa: E402
from dim3.recipe import Recipe, Source  # noqa: E402


def _recipe(trio: Path, method: str, device: str) -> Recipe:
    return Recipe(
        Source(str(trio / "base")),
        Source(str(trio / "multilingual")),
        Source(str(trio / "multimodal")),
        method=method,
        device=device,
    )


def run_one(kind: str, trio: Path, method: str, device: str, out: Path) -> dict:
    """One measured run in this process: ``kind`` is "merge" or "diagnose"."""
    recipe = _recipe(trio, method, device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with AnonPeak() as mem:
        if kind == "merge":
            engine.merge_to_folder(recipe, out)
        else:
            rows = diagnostics.diagnose(recipe)
            diagnostics.write_report(rows, out)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"seconds": seconds, "peak_rss": mem.peak, "peak_gpu": gpu}


def _child(kind: str, trio: Path, method: str, device: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--trio", str(trio), "--method", method]
    cmd += ["--device", device, "--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="dim3", help="comma-separated merge methods to time")
    parser.add_argument("--workdir", default=None, help="where to write the trio (default: temp)")
    parser.add_argument("--child", choices=("merge", "diagnose"), help=argparse.SUPPRESS)
    parser.add_argument("--trio", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dim3", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child, Path(args.trio), args.method, args.device, Path(args.out))
        print(json.dumps(result))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="dim3-diag-bench-"))
    try:
        t0 = time.perf_counter()
        build_trio(root / "trio", args.shape, DTYPES[args.dtype])
        print(f"built {args.shape} trio ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
        device = engine.resolve_device(args.device)
        runs = [("merge", m) for m in args.methods.split(",")] + [("diagnose", "dim3")]
        gib = 2**30
        print(f"{'run':<28} {'wall s':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}")
        for kind, method in runs:
            out = root / f"{kind}-{method}"
            r = _child(kind, root / "trio", method, str(device), out)
            shutil.rmtree(out, ignore_errors=True)
            label = f"{kind} ({method})" if kind == "merge" else "diagnose (all metrics)"
            gpu = f"{r['peak_gpu'] / gib:.2f}" if r["peak_gpu"] else "n/a"
            print(f"{label:<28} {r['seconds']:>8.2f} {r['peak_rss'] / gib:>13.2f} {gpu:>13}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
