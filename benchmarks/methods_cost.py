"""Wall time and peak memory of a full ``merge_to_folder`` for every registered merge method.

Each method runs in its own child process on the same trio, so that its peak memory is its own:
anonymous RSS (RssAnon plus RssShmem sampled every 20 ms, as benchmarks/merge_throughput.py measures it; it
excludes the safetensors files' mapped pages) and, on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/methods_cost.py --shape tiny                  # the LLaVA-shaped tiny trio
    python benchmarks/methods_cost.py --shape tiny --methods tsv,wudi --option wudi.iterations=30
    python benchmarks/methods_cost.py --shape tiny --methods iso_cts --option iso_cts.svd=randomized
    python benchmarks/methods_cost.py --trio /path/to/trio --device cuda   # base/, multilingual/,
                                                                           # multimodal/ inside

``--shape`` takes the synthetic shapes of benchmarks/merge_throughput.py (its builder is reused);
``--shape qwen2-vl-2b`` is the real Qwen2-VL-2B layout, built from ../shared/realmaps by
``tests/realmaps.py`` (another task's builder of header-true checkpoints): when that module is not
there the script says so and stops; any trio folder can be measured with ``--trio``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_throughput import DTYPES, SHAPES, AnonPeak, build_trio  # noqa: E402

from dim3 import engine  # noqa: E402
from dim3.methods import METHODS  # noqa: E402
from dim3.recipe import Recipe, Source  # noqa: E402

REAL_SHAPES = {"qwen2-vl-2b": "qwen2-vl-2b"}  # names of tests/realmaps.py TRIOS


def trio_recipe(folder: Path, method: str, options: dict, device: str) -> Recipe:
    return Recipe(
        Source(str(folder / "base")),
        Source(str(folder / "multilingual")),
        Source(str(folder / "multimodal")),
        method=method,
        options=options,
        device=device,
    )


def build_real(root: Path, name: str, layers: int | None) -> None:
    """A header-true copy of a real trio with random data (tests/realmaps.py), cut to ``layers``
    decoder layers when given (the vocabulary stays whole; the real dtypes are kept)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import realmaps

    if not realmaps.available():
        sys.exit(f"--shape {name} needs the key maps in {realmaps.REALMAPS}")
    realmaps.build_trio(REAL_SHAPES[name], root, data="random", layers=layers)


def run_one(folder: Path, method: str, options: dict, device: str, out: Path) -> dict:
    """Merge once in this process; return seconds and peak memory."""
    recipe = trio_recipe(folder, method, options, device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    load = os.getloadavg()[0]
    with AnonPeak() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        engine.merge_to_folder(recipe, out)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,  # user + system, every thread: what a shared machine does not skew
        "load": load,
        "rss_peak": mem.peak,
        "rss_before": mem.start,
        "gpu_peak": gpu,
    }


def parse_options(pairs: list[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` pairs -> {method: {key: number or name}}."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        method, _, name = key.partition(".")
        if not (method and name and value):
            sys.exit(f"--option {pair!r}: expected METHOD.KEY=VALUE, e.g. wudi.iterations=30")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:  # a named choice, e.g. tsv.svd=randomized
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, *REAL_SHAPES], default="tiny")
    parser.add_argument("--trio", default=None, help="an existing trio folder (skips building)")
    parser.add_argument("--layers", type=int, default=None, help="real shapes: cut to N layers")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--workdir", default=None, help="where to write the trio (default: temp)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per merge (default: torch's)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one method
    args = parser.parse_args()
    options = parse_options(args.option)

    if args.one:  # a child: merge once, print one JSON line
        if args.threads:
            torch.set_num_threads(args.threads)
        folder, out = Path(args.trio), Path(args.workdir)
        result = run_one(folder, args.one, options.get(args.one, {}), args.device, out)
        print("RESULT " + json.dumps(result))
        return

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; valid: {', '.join(sorted(METHODS))}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dim3-methods-"))
    try:
        if args.trio:
            folder = Path(args.trio)
        else:
            folder = root / "trio"
            t0 = time.perf_counter()
            if args.shape in REAL_SHAPES:
                build_real(folder, args.shape, args.layers)
            else:
                build_trio(folder, args.shape, DTYPES[args.dtype])
            print(f"built {args.shape} trio ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        device = engine.resolve_device(args.device)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
            + f"; trio {size / 2**20:.0f} MB on disk; device {device}; torch threads "
            + f"{args.threads or torch.get_num_threads()}; load average "
            + " ".join(f"{x:.1f}" for x in os.getloadavg()),
            flush=True,
        )
        gib = 2**30
        print(
            "| method | options | wall time | CPU time | peak anon. RSS | peak GPU memory "
            "| load average at start |"
        )
        print("|---|---|---|---|---|---|---|")
        for method in methods:
            out = root / f"out-{method}"
            cmd = [sys.executable, __file__, "--one", method, "--trio", str(folder)]
            cmd += ["--device", args.device, "--workdir", str(out), "--threads", str(args.threads)]
            cmd += [f"--option={o}" for o in args.option if o.startswith(method + ".")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            shutil.rmtree(out, ignore_errors=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | | |")
                continue
            r = json.loads(line.removeprefix("RESULT "))
            gpu = f"{r['gpu_peak'] / gib:.2f} GiB" if r["gpu_peak"] else "n/a"
            opts = json.dumps(options.get(method, {})) if method in options else "defaults"
            print(
                f"| {method} | {opts} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s "
                f"| {r['rss_peak'] / gib:.2f} GiB ({r['rss_before'] / gib:.2f} before) | {gpu} "
                f"| {r['load']:.1f} |",
                flush=True,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
