"""Two ways to read a cached bfloat16 safetensors file into float32 slices, timed side by side.

``mapped``: the file mapped, each slice converted straight from the mapped pages (what the engine
does: the page cache's pages are mapped in by page faults, about one per 16 pages with the
kernel's fault-around, and read once). ``pread``: each slice read into one reused buffer with
``preadv`` (no faults after the first slice: the kernel copies every byte into the buffer), then
converted. Each run is a fresh process on one thread; the modes alternate, and the medians of
``--repeat`` runs each are printed with the load average. The file should be in the page cache
(the first, uncounted run of each mode reads it once).

    python benchmarks/read_paths.py /tmp/b18/trio/base/model.safetensors --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SLICE = 1 << 23  # float32 elements a slice (32 MiB), as the engine's default chunk budget


def one(path: str, mode: str) -> dict:
    import mmap

    import torch

    torch.set_num_threads(1)
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")  # after the header
    count = (os.path.getsize(path) - start) // 2 // SLICE * SLICE  # whole slices of bfloat16
    out = torch.empty(SLICE, dtype=torch.float32)
    fd = os.open(path, os.O_RDONLY)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if mode == "mapped":
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        whole = torch.frombuffer(memoryview(mapped).toreadonly(), dtype=torch.uint8)
        for first in range(0, count, SLICE):
            out.copy_(whole[start + 2 * first : start + 2 * (first + SLICE)].view(torch.bfloat16))
        del whole
    else:
        buf = torch.empty(SLICE, dtype=torch.bfloat16)
        view = memoryview(buf.view(torch.uint8).numpy())
        for first in range(0, count, SLICE):
            os.preadv(fd, [view], start + 2 * first)
            out.copy_(buf)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
    return {
        "seconds": seconds,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "minflt": after.ru_minflt - before.ru_minflt,
        "gib": 2 * count / 2**30,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a bfloat16 safetensors file, ideally in the page cache")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    def run(mode: str) -> dict:
        argv = [sys.executable, __file__, "--child", args.file, mode]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    modes = ("mapped", "pread")
    for mode in modes:  # warm-up: the file into the page cache, uncounted
        run(mode)
    got: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    for i in range(args.repeat):
        loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))
        for mode in modes if i % 2 == 0 else reversed(modes):
            got[mode].append(run(mode))
    print(f"{args.file}: {got['mapped'][0]['gib']:.2f} GiB of bfloat16 -> float32, one thread")
    print(
        f"runs {args.repeat} each, alternating; load average before each pair: {'; '.join(loads)}"
    )
    for mode in modes:
        med = {k: statistics.median(r[k] for r in got[mode]) for k in got[mode][0]}
        print(
            f"{mode:<7} {med['seconds']:.2f} s  user {med['user']:.2f} s  sys {med['sys']:.2f} s  "
            f"minor faults {med['minflt']:,.0f}  ({med['gib'] / med['seconds']:.2f} GiB/s)"
        )
    pairs = [p["seconds"] / m["seconds"] for m, p in zip(got["mapped"], got["pread"], strict=True)]
    print(f"pread / mapped wall time, pair by pair: median {statistics.median(pairs):.2f}")


if __name__ == "__main__":
    main()
