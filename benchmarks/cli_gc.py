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

With ``--app``, the same for the app's server: ``python app.py`` as shipped (the collector off
while it imports and builds the app, those objects then set aside) against the app built and
launched as ``app.py`` does without that setup. Each run starts a server, merges through the API
(``/merge``: ``--trio`` if given, else the built-in demo trio) and asks one question (``/chat``),
then stops it; the collections are counted from the moment it serves, and the requests timed
from the client.

    python benchmarks/merge_throughput.py --shape qwen2-vl-2b --workdir /tmp/b18 ...  # the trio
    python benchmarks/cli_gc.py --trio /tmp/b18/trio --method dim3 --repeat 3
    python benchmarks/cli_gc.py --app --repeat 3                 # the app on the demo trio
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a clone, no install

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
    gens = _collections(log.read_text().split("\n"))
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "gc": sum(map(sum, gens.values())),
        "full": sum(gens[2]),
        "full_n": len(gens[2]),
        "young_n": len(gens[0]) + len(gens[1]),
    }


# app.py without its collector setup
APP_PLAIN = (
    "from dim3.ui import build_app, configure_logging, launch_options; "
    "configure_logging(); build_app().launch(**launch_options())"
)


def _collections(lines: list[str]) -> dict[int, list[float]]:
    gens: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for line in lines:
        if line:
            g, s = line.split()
            gens[int(g)].append(float(s))
    return gens


def run_app(way: str, args: argparse.Namespace, hook_dir: Path, log: Path, scratch: Path) -> dict:
    """One server's life: start, a merge and a question through the API, stop."""
    import gradio_client

    from tests.app_server import running_app

    trio = Path(args.trio).resolve() if args.trio else None
    paths = {}
    if trio is not None:
        paths = {r: str(trio / r) for r in ("base", "multilingual", "multimodal")}
    roots = [ROOT / "assets", scratch, *([trio] if trio is not None else [])]
    argv = ["app.py"] if way == "shipped" else ["-c", APP_PLAIN]
    log.write_text("")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {"PYTHONPATH": str(hook_dir), "DIM3_GC_LOG": str(log), "DIM3_JOB_BUDGET": "0"}
    with running_app(scratch, roots, argv=argv, **env) as url:
        ready = len(log.read_text().split("\n")) - 1
        client = gradio_client.Client(url, verbose=False)
        start = time.perf_counter()
        *_, status = client.predict(method=args.method, **paths, api_name="/merge")
        merge = time.perf_counter() - start
        if not status.startswith("✅"):
            raise SystemExit(f"the app's merge failed: {status}")
        start = time.perf_counter()
        client.predict("Welche Farbe hat die Form?", max_new_tokens=8, api_name="/chat")
        chat = time.perf_counter() - start
        served = log.read_text().split("\n")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    gens, starting = _collections(served[ready:]), _collections(served[:ready])
    return {
        "merge": merge,
        "chat": chat,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "start_gc": sum(map(sum, starting.values())),
        "start_full_n": len(starting[2]),
        "gc": sum(map(sum, gens.values())),
        "full": sum(gens[2]),
        "full_n": len(gens[2]),
        "young_n": len(gens[0]) + len(gens[1]),
    }


def rounds(
    args: argparse.Namespace,
    one: Callable[[str, int], dict],
    row: Callable[[dict], str],
    title: str,
    summary: Callable[[dict], str],
) -> None:
    """``--repeat`` rounds of ``one(way, round)``, the two ways alternating, each printed as
    ``row`` gives it; then the medians, as ``summary`` gives them."""
    runs: dict[str, list[dict]] = {"shipped": [], "plain": []}
    for r in range(args.repeat):
        for way in ("plain", "shipped"):
            got = one(way, r)
            runs[way].append(got)
            print(f"round {r + 1} {way:8s} {row(got)}  load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"medians of {args.repeat} ({title}):")
    for way, got in runs.items():
        print(f"  {way:8s} {summary({k: statistics.median(g[k] for g in got) for k in got[0]})}")


def main_app(args: argparse.Namespace, work: Path) -> None:
    def one(way: str, r: int) -> dict:
        scratch = work / f"{way}{r}"
        scratch.mkdir()
        return run_app(way, args, work / "hook", work / "gc.log", scratch)

    rounds(
        args,
        one,
        lambda got: (
            f"/merge {got['merge']:6.2f} s  /chat {got['chat']:5.2f} s  server user "
            f"{got['user']:5.2f} sys {got['sys']:5.2f}  collector while serving {got['gc']:.3f} s "
            f"(full: {got['full_n']} taking {got['full']:.3f} s; young: {got['young_n']}), while "
            f"starting {got['start_gc']:.3f} s (full: {got['start_full_n']})"
        ),
        f"the app, {args.method}, {args.trio or 'the demo trio'}",
        lambda med: (
            f"/merge {med['merge']:.2f} s, /chat {med['chat']:.2f} s, collector while serving "
            f"{med['gc']:.3f} s (full {med['full']:.3f} s), while starting {med['start_gc']:.3f} s"
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trio", help="a folder with base/, multilingual/, multimodal/")
    parser.add_argument("--app", action="store_true", help="the app's server, not the CLI")
    parser.add_argument("--method", default="dim3")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dim3-cli-gc-"))
    try:
        (work / "hook").mkdir()
        (work / "hook" / "sitecustomize.py").write_text(HOOK)
        if args.app:
            main_app(args, work)
            return
        if not args.trio:
            parser.error("--trio is needed for the command line")
        # a merge first, not counted: a config's first merge derives its layout (importing
        # transformers' model classes), and a fresh install compiles the kernels
        run("shipped", args, work / "hook", work / "gc.log", work / "out")
        rounds(
            args,
            lambda way, _: run(way, args, work / "hook", work / "gc.log", work / "out"),
            lambda got: (
                f"wall {got['wall']:6.2f} s  user {got['user']:5.2f}  sys {got['sys']:5.2f}  "
                f"collector {got['gc']:.3f} s (full: {got['full_n']} taking {got['full']:.3f} s; "
                f"young: {got['young_n']})"
            ),
            args.method,
            lambda med: (
                f"wall {med['wall']:.2f} s, user {med['user']:.2f} s, sys {med['sys']:.2f} s, "
                f"collector {med['gc']:.3f} s (full {med['full']:.3f} s)"
            ),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
