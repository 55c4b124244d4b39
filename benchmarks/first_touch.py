"""What this machine's kernel spends to give a process fresh memory: system time per MiB the
first time the pages of a new buffer are touched, in 2 MiB pages (the engine's buffers:
``dim3.slices.huge_pages``) and in 4 KiB pages, and the same buffer size once more right after
the first was freed.

A merge touches its buffers (the write pipe's output slots, the tile threads' float32 tiles,
the writer's staging buffers: some 100-125 MiB for the 2B trio) once and reuses them, so this
is a fixed cost per merge in its system time, the one that does not scale with the model.
On a virtual machine whose host takes back the memory the guest frees (virtio-balloon's free
page reporting) a new 2 MiB page is backed by the host on first touch, which costs several
times what zeroing it does on bare metal; 4 KiB pages come from memory the guest used a moment
ago. Each variant runs in a fresh process, ``--repeat`` times; medians and the load average.

    python benchmarks/first_touch.py                 # 128 MiB, 5 runs of each: seconds
    python benchmarks/first_touch.py --pause 5       # each run after 5 s of rest
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

VARIANTS = ("huge", "small", "huge_again")


def touch(nbytes: int, variant: str) -> dict:
    """Map ``nbytes``, touch one byte of every 4 KiB page, and return the system time and
    minor faults that took (``getrusage``)."""
    import numpy as np

    from dim3.slices import huge_pages

    def one(huge: bool) -> dict:
        if huge:
            region = huge_pages(nbytes).numpy()  # the engine's own allocator
        else:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)
            region = np.frombuffer(m, dtype=np.uint8)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        region[::4096] = 1
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "sys": after.ru_stime - before.ru_stime,
            "seconds": time.perf_counter() - start,
            "minflt": after.ru_minflt - before.ru_minflt,
        }

    if variant == "huge_again":
        one(True)  # freed when it returns: the second buffer may take its pages
    return one(variant != "small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="buffer size (default 128 MiB)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds to wait before each run (a host that takes freed memory back does so "
        "after a moment: virtio-balloon reports free pages after 2 s)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    nbytes = args.mib << 20
    if args.child:
        print(json.dumps(touch(nbytes, args.child)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for _ in range(args.repeat):
        for variant in VARIANTS:  # interleaved: a quiet moment serves each alike
            time.sleep(args.pause)
            argv = [sys.executable, __file__, "--mib", str(args.mib), "--child", variant]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
        loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))

    def median(values: list[float]) -> float:
        v = sorted(values)
        return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2

    print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}")
    print(
        f"buffer: {args.mib} MiB, {args.repeat} runs of each (fresh processes, {args.pause:g} s "
        "of rest before each), load " + "; ".join(loads)
    )
    names = {
        "huge": "2 MiB pages, fresh (the engine's buffers)",
        "small": "4 KiB pages, fresh",
        "huge_again": "2 MiB pages, right after freeing as many",
    }
    for variant in VARIANTS:
        r = runs[variant]
        sys_ = median([x["sys"] for x in r])
        print(
            f"{names[variant]:<42} sys {sys_:.3f} s = {1000 * sys_ / args.mib:.2f} ms per MiB "
            f"(runs {min(x['sys'] for x in r):.3f}-{max(x['sys'] for x in r):.3f} s), "
            f"minor faults {median([x['minflt'] for x in r]):,.0f}"
        )


if __name__ == "__main__":
    main()
