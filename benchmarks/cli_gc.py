"""The garbage collector's time in a whole ``python -m dim3 merge`` command, as shipped against
the same command line run without ``dim3/__main__.py``'s setup (the collector as Python sets it,
numpy's and scipy's OpenBLAS threads started as they load).

A command imports torch and numpy (a merge also numba): some 185,000 objects that live as long as
the process. Python's full collections walk every one of them, while every thread waits.
``dim3/__main__.py`` turns the collector off while the command imports them and then sets them
aside (``gc.freeze``), so a full collection walks only what came after. Each run is a fresh
process (alternating the two ways, ``--repeat`` rounds, after a merge not counted, which fills
the layout cache as every merge of a config but its first finds it); a ``sitecustomize`` module
put on its path records each collection's generation and seconds (``gc.callbacks``) into a
file. Prints per run the wall time, the process's user and system time (``getrusage`` of the
child, as ``/usr/bin/time`` gives them) and the collections, then the medians.

    python benchmarks/merge_throughput.py --shape qwen2-vl-2b --workdir /tmp/b18 ...  # the trio
    python benchmarks/cli_gc.py --trio /tmp/b18/trio --method dim3 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOOK = """
import gc, os, time
_out = open(os.environ["DIM3_GC_LOG"], "a", buffering=1)
_t = [0.0]
def _cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        _out.write(f"{info['generation']} {time.perf_counter() - _t[0]:.6f}\\n")
gc.callbacks.append(_cb)
"""

# the CLI without dim3/__main__.py's setup; ends as that module does (no interpreter teardown)
PLAIN = (
    "import os, sys; from dim3.cli import main; code = main(sys.argv[1:]); "
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)"
)


def run(way: str, args: argparse.Namespace, hook_dir: Path, log: Path, out: Path) -> dict:
    trio = Path(args.trio)
    command = [
        "merge",
        *("--base", str(trio / "base"), "--multilingual", str(trio / "multilingual")),
        *("--multimodal", str(trio / "multimodal"), "--out", str(out)),
        *("--method", args.method, "--device", "cpu"),
    ]
    head = ["-m", "dim3"] if way == "shipped" else ["-c", PLAIN]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), str(ROOT)])}
    env["DIM3_GC_LOG"] = str(log)
    env.pop("OPENBLAS_NUM_THREADS", None)
    log.write_text("")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *head, *command],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out)
    gens: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for line in log.read_text().split("\n"):
        if line:
            g, s = line.split()
            gens[int(g)].append(float(s))
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "gc": sum(map(sum, gens.values())),
        "full": sum(gens[2]),
        "full_n": len(gens[2]),
        "young_n": len(gens[0]) + len(gens[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trio", required=True, help="a folder with base/, multilingual/, multimodal/"
    )
    parser.add_argument("--method", default="dim3")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dim3-cli-gc-"))
    try:
        (work / "hook").mkdir()
        (work / "hook" / "sitecustomize.py").write_text(HOOK)
        runs: dict[str, list[dict]] = {"shipped": [], "plain": []}
        # a merge first, not counted: a config's first merge derives its layout (importing
        # transformers' model classes), and a fresh install compiles the kernels
        run("shipped", args, work / "hook", work / "gc.log", work / "out")
        for r in range(args.repeat):
            for way in ("plain", "shipped"):
                got = run(way, args, work / "hook", work / "gc.log", work / "out")
                runs[way].append(got)
                print(
                    f"round {r + 1} {way:8s} wall {got['wall']:6.2f} s  user {got['user']:5.2f}"
                    f"  sys {got['sys']:5.2f}  collector {got['gc']:.3f} s (full: {got['full_n']}"
                    f" taking {got['full']:.3f} s; young: {got['young_n']})  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        print(f"medians of {args.repeat} ({args.method}):")
        for way, got in runs.items():
            med = {k: statistics.median(g[k] for g in got) for k in got[0]}
            print(
                f"  {way:8s} wall {med['wall']:.2f} s, user {med['user']:.2f} s, sys "
                f"{med['sys']:.2f} s, collector {med['gc']:.3f} s (full {med['full']:.3f} s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
