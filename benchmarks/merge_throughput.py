"""Merge a synthetic or header-true trio and print wall time, CPU, page faults and peak memory
beside the I/O floor measured in the same rounds.

The I/O floor is reading every byte of the three inputs once and writing as many bytes as the
output has, each in a fresh process, in two variants: buffered writes plus ``fsync`` (through the
page cache, as ``cat`` and ``dd`` would) and ``O_DIRECT`` writes (past it, as the engine writes its
shards). Each round runs both floors and then every method's merge (``--method a,b,...``) back to
back, each in a fresh process, recording before each the load average and how much of the inputs
is in the page cache (``fincore``); ratios are taken within a round (every method's against that
round's floors; the methods' order turns by one each round, so that none always runs right after
the floors) and the medians over ``--repeat`` rounds reported.
``--against OTHER_CHECKOUT`` also runs that checkout's engine in every round (paired old/new;
this checkout's first in rounds 1, 3, ..., the other's first in rounds 2, 4, ...; an odd
``--repeat`` gets one round more, so that each engine runs first as often: the one run right
after the floors tends to be the slower, 10 of 12 pairs on 2026-12-02);
``--cli`` also times ``python -m dim3 merge`` as a whole process (interpreter start and imports
included) right after each round's merge, against the same round's floor, and ``python -m dim3
plan`` on the same trio (the same command's start: interpreter, torch and the package imported,
checkpoints checked, the plan made, nothing merged), so that the report can tell the merge's own
share of the command's kernel time from the start's (importing torch alone is 10-15% kernel time
on a 2-core VM).

"mapping the inputs", in each round: a fresh process maps every input file, has every page
mapped in (``MADV_POPULATE_READ``, as the engine's read thread does), then unmaps them all
(as a merge does once it is done), and reports the system time of each half: the kernel time
that reading the inputs from the page cache without a copy costs, whoever reads them. It
depends on how the page cache holds them: one fault per 2 MiB page where it holds 2 MiB folios
(a read from disk, large writes), one per 16 pages of 4 KiB (the kernel's fault-around) where
it holds small ones (a copy made with ``cp``, a partial eviction); "inputs mapped in 2 MiB pages"
says which. ``--reread`` drops the inputs from the page cache and reads them back as a read from
disk does (large folios, where the file system has them); ``--small-pages`` reads them back with
``POSIX_FADV_RANDOM`` instead, which leaves them in 4 KiB pages (as a file system without large
folios, or one page at a time, caches a file): the two states a stranger's machine may be in.
With ``--cli``, "its kernel floor" adds up, round by round, the system time the
command cannot avoid here: its start's, mapping the inputs, and the direct floor's writing alone
(``O_DIRECT`` from one reused buffer); beside the command's CPU time it is the least kernel share
the command could have on this machine and page cache.

    python benchmarks/merge_throughput.py --shape tiny          # seconds, any machine
    python benchmarks/merge_throughput.py --shape 1b --dtype bfloat16
    python benchmarks/merge_throughput.py --shape 7b --device cuda   # ~55 GB of disk
    python benchmarks/merge_throughput.py --shape qwen2-vl-2b --workdir /tmp/b2b   # ~20 GB of disk
    python benchmarks/merge_throughput.py --shape qwen2-vl-7b --device cuda   # ~75 GB of disk

The synthetic shapes (tiny, 1b, 7b) are written straight to safetensors (random weights; the
multilingual and multimodal models are the base plus small residuals), in the older LLaVA key
layout with a small CLIP-like vision tower and projector, so the plan, vocabulary padding and
copying all take part. The real shapes (qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-7b, llava-1.5-7b) are
header-true copies of real Hub trios built by ``tests/realmaps.py`` from ``../shared/realmaps``:
real names, dtypes, shapes, shard splits, vocabularies (151,936 / 152,064 / 32,064 rows) and tied
embeddings, with random data (``--data random``, the default: a benchmark must not merge zeros).
``--workdir`` keeps the trio for the next run.

A merge derives its layout from the VLM's transformers class once per config and transformers
version, then reads it from the layout cache (``dim3.layout.layout_cache_dir``): the first merge
of a config pays seconds that no later one does. ``--layout-cache warm`` (the default) points every
child at a cache in the work folder, filled before the rounds by one plan, as for every merge but
a config's first; ``--layout-cache off`` turns it off, so each merge derives the layout (the first
merge's cost). The line "layout cache" says which.

Each merge runs in a fresh child process, so its figures are its own: user and system CPU time
and minor page faults of the merge call (``getrusage``), the slice buffers it allocated, peak
anonymous RSS (RssAnon plus RssShmem, sampled every 20 ms; it excludes the safetensors files' mapped
pages; before 2026-11-30's late evening RssAnon alone, which missed the engine's large buffers, then
shared anonymous mappings) and the figure the memory target uses, that peak minus the process's
anonymous RSS once the package is imported, as a share of one output model. The disk needed (inputs, output and the floor's output)
is checked before anything is written. "of which the middle half": the same CPU time and faults
between the merge's progress reports at a quarter and at three quarters of the bytes (the loop's
steady state: its buffers made, its threads started, the headers read, nothing left to close),
with the faults per GiB merged there; what the whole merge takes beyond that is set-up and close.
"and the two ends": the same before the first of those reports (the set-up: buffers touched for
the first time, the compiled kernels loaded, threads started; and the first quarter of the bytes)
and after the second (the last quarter, the close and the ``fsync``): each end's excess over half
the middle half's figures is its set-up or close.
"its system time, switches": that system time and the context switches (voluntary and
involuntary) there by thread (``/proc/self/task``, in clock ticks of 10 ms): the main loop, the
read-ahead thread, the tile threads, the write thread and the flusher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# run from a clone, no install; DIM3_BENCH_ROOT: another checkout's engine (paired comparisons)
sys.path.insert(0, os.environ.get("DIM3_BENCH_ROOT") or str(Path(__file__).resolve().parent.parent))

from dim3 import engine
from dim3.recipe import Recipe, Source
from dim3.writer import ShardedWriter, TensorSpec
from tests import realmaps

ROOT = Path(__file__).resolve().parent.parent  # this checkout
SHAPES = {  # hidden, layers, intermediate, vocab, heads
    "tiny": (256, 4, 688, 32000, 8),
    "1b": (2048, 16, 5632, 32000, 16),
    "7b": (4096, 32, 11008, 32000, 32),
}
REAL_SHAPES = ("qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-7b", "llava-1.5-7b")  # realmaps.TRIOS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llm_specs(hidden: int, layers: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    specs = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        specs[p + "mlp.gate_proj.weight"] = (inter, hidden)
        specs[p + "mlp.up_proj.weight"] = (inter, hidden)
        specs[p + "mlp.down_proj.weight"] = (hidden, inter)
        specs[p + "input_layernorm.weight"] = (hidden,)
        specs[p + "post_attention_layernorm.weight"] = (hidden,)
    return specs


def vlm_key(key: str) -> str:
    return "language_model." + key


def write_model(
    folder: Path,
    specs: dict,
    dtype: torch.dtype,
    seed: int,
    base_seed: int,
    residual: float,
    config: dict,
    rename=lambda k: k,
    pad_rows: int = 0,
    device: str = "cpu",
) -> None:
    """Write base-plus-residual weights tensor by tensor (memory: one tensor). ``device``: where
    the normal draws are made (a CPU draws ~100 million a second on one thread: the 7b trio's
    33 billion take minutes; a GPU draws them in seconds, other numbers from the same seeds)."""
    vocab = ("embed_tokens.weight", "lm_head.weight")
    out = {
        rename(k): (s[0] + pad_rows, *s[1:]) if k.endswith(vocab) else s for k, s in specs.items()
    }
    original = {
        rename(k): k for k in specs
    }  # seeds follow the LLM name, so the VLM shares the base
    out.update(config.get("vision", {}))
    tensor_specs = [TensorSpec(k, dtype, tuple(s)) for k, s in out.items()]
    with ShardedWriter(folder, tensor_specs, shard_size="2GB") as w:
        for spec in tensor_specs:
            key = original.get(spec.name, spec.name)
            g = torch.Generator(device).manual_seed(base_seed + hash_key(key))
            t = torch.randn(spec.shape, generator=g, device=device) * 0.02
            if residual:
                g2 = torch.Generator(device).manual_seed(seed + hash_key(key))
                t += torch.randn(spec.shape, generator=g2, device=device) * 0.02 * residual
            w.write(spec.name, t.to(dtype).cpu())
        (w.folder / "config.json").write_text(json.dumps(config["json"]))


def llava_config(text: dict, vocab: int, tower_layers: int) -> tuple[dict, dict]:
    """A LLaVA-1.5-style config (a CLIP ViT-L/14-336 tower of ``tower_layers`` layers) and the
    shapes of its vision tower and projector under the names ``save_pretrained`` stores, taken
    from the transformers model built on the meta device: a VLM transformers loads as stored."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        text_config=LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}),
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=tower_layers,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        image_token_index=vocab - 64,
    )
    config.text_config.vocab_size = vocab
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    stored = {
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    }
    vision = {
        stored[prefix] + key[len(prefix) :]: tuple(t.shape)
        for key, t in model.state_dict().items()
        for prefix in stored
        if key.startswith(prefix)
    }
    return config.to_dict(), vision


def hash_key(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode())


def build_trio(root: Path, shape: str, dtype: torch.dtype, device: str = "cpu") -> Recipe:
    """The synthetic trio; its random draws made on ``device`` (the merge's: cuda or cpu)."""
    hidden, layers, inter, vocab, heads = SHAPES[shape]
    specs = llm_specs(hidden, layers, inter, vocab)
    text = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "num_attention_heads": heads,
    }
    llava, vision = llava_config(text, vocab + 64, tower_layers=2 if shape == "tiny" else 24)
    llm = sum(math.prod(s) for s in specs.values())
    vlm = llm + 2 * 64 * hidden + sum(math.prod(s) for s in vision.values())
    root.mkdir(parents=True, exist_ok=True)
    check_disk(root, (2 * llm + 2 * vlm) * dtype.itemsize)  # the inputs and one output
    write_model(root / "base", specs, dtype, 0, 0, 0.0, {"json": text}, device=device)
    write_model(root / "multilingual", specs, dtype, 1, 0, 0.3, {"json": text}, device=device)
    write_model(
        root / "multimodal",
        specs,
        dtype,
        2,
        0,
        0.3,
        {"json": llava, "vision": vision},
        rename=vlm_key,
        pad_rows=64,
        device=device,
    )
    return Recipe(
        Source(str(root / "base")),
        Source(str(root / "multilingual")),
        Source(str(root / "multimodal")),
    )


class AnonPeak:
    """Sample resident memory in a thread: anonymous (``RssAnon`` plus ``RssShmem``, shared
    anonymous mappings, which the kernel counts apart), excluding mapped file pages, and apart
    the mapped file pages (``RssFile``: the inputs' mapped pages, and the libraries')."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self.file_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    @staticmethod
    def now(fields: tuple[str, ...] = ("RssAnon:", "RssShmem:")) -> int:
        total = 0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(fields):
                total += int(line.split()[1]) * 1024
        return total

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())
            self.file_peak = max(self.file_peak, self.now(("RssFile:",)))

    def __enter__(self):
        self.start = self.peak = self.now()
        self.file_start = self.file_peak = self.now(("RssFile:",))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def input_files(recipe: Recipe) -> list[Path]:
    return [
        p for src in recipe.sources().values() for p in sorted(Path(src.ref).glob("*.safetensors"))
    ]


def io_floor(spec: dict) -> dict:
    """Read every byte of the three inputs once and write as many bytes as the output has, in
    this (fresh) process: ``readinto`` a reused 16 MiB buffer, then either buffered writes and
    ``fsync`` (``direct`` false) or ``O_DIRECT`` writes from an aligned buffer, as the engine
    writes its shards. Returns wall seconds and this process's CPU and page-fault counts, and
    (``write``) those of the writing alone."""
    import mmap
    import resource

    files = [Path(f) for f in spec["inputs"]]
    written = int(spec["written"])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    chunk = 16 * 2**20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    read = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    mid = resource.getrusage(resource.RUSAGE_SELF)  # the writing's own CPU, for the kernel floor
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(out / "floor.bin", flags | (os.O_DIRECT if spec["direct"] else 0), 0o644)
    try:
        left = written - written % 4096 if spec["direct"] else written
        while left > 0:
            left -= os.write(fd, view[: min(left, chunk)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "read": read, "write": usage(mid, after), **usage(before, after)}


def mapping_floor(spec: dict) -> dict:
    """Map every input file read-only, have each page mapped in (``MADV_POPULATE_READ``, where
    the kernel has it; else one byte of every page read), then unmap them all, as a merge keeps
    its inputs mapped until it is done, in this (fresh) process: wall seconds, CPU and page
    faults, and (``in``, ``out``) the CPU of mapping the pages in and of unmapping them."""
    import ctypes
    import mmap
    import resource
    import warnings

    from dim3.mapped import MADV_POPULATE_READ as populate

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    mapped, maps = 0, []
    for file in spec["inputs"]:
        with open(file, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append(m)
        with warnings.catch_warnings():  # torch warns that the buffer is not writable
            warnings.simplefilter("ignore", UserWarning)
            at = torch.frombuffer(m, dtype=torch.uint8).data_ptr()
        span = 64 * 2**20  # a few slices' worth per call, as the read thread asks
        for lo in range(0, len(m), span):
            if populate is None or libc.madvise(at + lo, min(span, len(m) - lo), populate):
                view = memoryview(m)
                sum(view[lo :: mmap.PAGESIZE])  # one byte of every page left
                view.release()
                break
        mapped += len(m)
    mid = resource.getrusage(resource.RUSAGE_SELF)
    for m in maps:
        m.close()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "mapped": mapped,
        "in": usage(before, mid),
        "out": usage(mid, after),
        **usage(before, after),
    }


def usage(before, after) -> dict:
    return {
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "minflt": after.ru_minflt - before.ru_minflt,
        "majflt": after.ru_majflt - before.ru_majflt,
    }


def drop_cached(files: list[Path]) -> None:
    """Ask the kernel to drop the files' pages from the page cache (``POSIX_FADV_DONTNEED``,
    after ``fsync``: dirty pages are not dropped)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def huge_mapped(files: list[Path]) -> float:
    """Share of the files' bytes that a read-only mapping of them maps in 2 MiB pages once
    every page is touched (``FilePmdMapped`` in ``/proc/self/smaps``): the bytes the page
    cache holds in 2 MiB folios, each one page fault, where the rest of the file takes one fault
    per 16 pages at most (the kernel's fault-around). Run in a fresh process; the files should
    be cached (touching reads what is not)."""
    import mmap
    import re

    total = huge = 0
    for file in files:
        with open(file, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(m)
        sum(view[::4096])  # one byte of every page
        maps = Path("/proc/self/smaps").read_text()
        huge += sum(int(k) for k in re.findall(r"FilePmdMapped:\s+(\d+) kB", maps)) * 1024
        total += len(m)
        view.release()
        m.close()
    return huge / total if total else 0.0


def read_back_small(files: list[Path]) -> float:
    """Read the files through the page cache with ``POSIX_FADV_RANDOM`` advice: the kernel then
    reads no further ahead than asked and caches the pages one by one, in 4 KiB folios, as a
    file system without large folios caches any file (after ``drop_cached``: pages already
    cached stay as they are). Seconds taken."""
    start = time.perf_counter()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            while os.read(fd, 2**20):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - start


def resident(files: list[Path]) -> float:
    """Share of the files' pages in the page cache now (``fincore``), or -1 if unknown."""
    try:
        done = subprocess.run(
            [
                "fincore",
                "--bytes",
                "--noheadings",
                "--raw",
                "--output",
                "RES,SIZE",
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return -1.0
    res = size = 0
    for line in done.stdout.split("\n"):
        if line.strip():
            r, z = line.split()
            res, size = res + int(r), size + int(z)
    return res / size if size else -1.0


def build_real_trio(root: Path, shape: str, data: str, layers: int | None) -> Recipe:
    """A header-true copy of a real trio (tests/realmaps.py), random or sparse data."""
    if not realmaps.available():
        sys.exit(f"the real shapes need the key maps in {realmaps.REALMAPS}")
    marker, built = root / "built.json", {"shape": shape, "data": data, "layers": layers}
    if marker.is_file() and json.loads(marker.read_text()) == built:  # --workdir reuse
        paths = [root / r for r in ("base", "multilingual", "multimodal")]
    else:
        paths = realmaps.build_trio(shape, root, data=data, layers=layers)
        marker.write_text(json.dumps(built))
    return Recipe(*(Source(str(p)) for p in paths))


def disk_needed(shape: str, layers: int | None) -> tuple[int, int]:
    """(bytes of the three inputs, bytes of one output) of a real shape, from the key maps."""
    maps = [realmaps.load_keymap(n) for n in realmaps.TRIOS[shape]]
    keep = realmaps.kept_layers(maps[2], layers) if layers else None
    sizes = [realmaps.cut(km, keep).nbytes for km in maps]
    return sum(sizes), sizes[2]


def check_disk(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if need * 1.05 > free:
        sys.exit(
            f"this run needs ~{need / 2**30:.1f} GiB of disk under {root} but "
            f"{free / 2**30:.1f} GiB are free; choose --workdir elsewhere or a smaller shape"
        )


def threads_now() -> dict[str, list[int]]:
    """CPU time (user, system: clock ticks) and context switches (voluntary, involuntary) of
    each of this process's threads now, by thread name (``/proc/self/task``; the engine names
    its threads dim3-read, dim3-tile, dim3-write, dim3-flush; a pool's threads are added up;
    threads Python did not start, such as torch's, are "other"). Empty where /proc is missing."""
    names = {str(t.native_id): re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()}
    got: dict[str, list[int]] = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        switches = [int(line.split()[1]) for line in status if "ctxt_switches" in line]
        row = got.setdefault(names.get(task.name, "other"), [0, 0, 0, 0])
        for i, value in enumerate([int(stat[11]), int(stat[12]), *switches]):
            row[i] += value
    return got


def child(spec: dict) -> None:
    """Run one merge (or the I/O floor) in this (fresh) process and print its figures as JSON."""
    import resource

    if spec.get("floor"):
        print(json.dumps(io_floor(spec)))
        return
    if spec.get("huge"):
        print(json.dumps({"share": huge_mapped([Path(f) for f in spec["inputs"]])}))
        return
    if spec.get("mapping"):
        print(json.dumps(mapping_floor(spec)))
        return
    if spec.get("layout"):  # derive the VLM's layout once, filling the layout cache
        from dim3.checkpoints import Checkpoint
        from dim3.layout import layout_for
        from dim3.plan import weight_keys

        vlm = Checkpoint(spec["multimodal"])
        start = time.perf_counter()
        layout_for(vlm.config, weight_keys(vlm))
        print(json.dumps({"seconds": time.perf_counter() - start}))
        return
    recipe = Recipe(
        *(Source(spec[r]) for r in ("base", "multilingual", "multimodal")),
        method=spec["method"],
        device=spec["device"],
    )
    imported = AnonPeak.now()  # dim3, torch and safetensors are imported: the baseline
    cuda = torch.cuda.is_available() and engine.resolve_device(spec["device"]).type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    out = Path(spec["out"])
    before = resource.getrusage(resource.RUSAGE_SELF)
    marks: list = []  # rusage once a quarter and once three quarters of the bytes are merged

    def progress(p) -> None:
        if (
            len(marks) < 2
            and p.bytes_total
            and p.bytes_done >= p.bytes_total * (1 + 2 * len(marks)) / 4
        ):
            marks.append((resource.getrusage(resource.RUSAGE_SELF), p.bytes_done, threads_now()))

    with AnonPeak() as mem:
        start = time.perf_counter()  # the whole call: plan, merge, side files, fsync
        result = engine.merge_to_folder(recipe, out, progress=progress)
        for f in out.glob("*.safetensors"):  # the floor includes fsync; so does the merge
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    gpu = torch.cuda.max_memory_allocated() if cuda else 0
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    figures = {"seconds": seconds, "peak": mem.peak, "start": mem.start, "imported": imported}
    figures["mapped"] = mem.file_peak - mem.file_start  # the inputs' pages, mostly
    extra = {"buffers": getattr(result, "buffers", None), **usage(before, after)}
    extra["unstaged"] = getattr(result, "unstaged", None)  # (an --against engine may lack it)
    if len(marks) == 2:  # the loop's steady state: buffers made, threads started, headers read
        (a, done_a, ta), (b, done_b, tb) = marks
        tick = os.sysconf("SC_CLK_TCK")
        threads = {  # user s, system s, voluntary and involuntary switches, per thread name
            name: [(y - x) / tick for x, y in zip(ta.get(name, [0] * 4)[:2], row[:2], strict=True)]
            + [y - x for x, y in zip(ta.get(name, [0] * 4)[2:], row[2:], strict=True)]
            for name, row in tb.items()
        }
        extra["middle"] = {**usage(a, b), "bytes": done_b - done_a, "threads": threads}
        # before the first mark: the set-up (buffers touched, kernels loaded, threads started)
        # and a quarter of the bytes; after the second: a quarter, the close and the fsync
        extra["ends"] = {"head": usage(before, a), "tail": usage(b, after)}
    print(json.dumps({**figures, "gpu": gpu, "written": written, **extra}))


def run_child(spec: dict, root: Path | None = None) -> dict:
    """Run :func:`child` in a fresh process, importing ``dim3`` from ``root`` (default: this
    checkout; another checkout's engine for a paired old-against-new comparison)."""
    env = dict(os.environ)
    if root is not None:
        env["DIM3_BENCH_ROOT"] = str(root)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        sys.exit(f"the run failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(recipe: Recipe, out: Path, method: str, device: str, command: str = "merge") -> dict:
    """``python -m dim3 merge`` on the trio as a whole new process (interpreter start, imports,
    plan, merge, side files and card included): wall seconds and the child's CPU and faults.
    ``command="plan"``: the same arguments to ``python -m dim3 plan``, which stops before the
    merge (writes nothing)."""
    import resource

    src = {r: s.ref for r, s in recipe.sources().items()}
    argv = [sys.executable, "-m", "dim3", command, "--base", src["base"], "--multilingual"]
    argv += [src["multilingual"], "--multimodal", src["multimodal"], "--out", str(out)]
    argv += ["--method", method, "--device", device]
    env = {**os.environ, "PYTHONPATH": os.environ.get("DIM3_BENCH_ROOT") or str(ROOT)}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, used = os.wait4(child.pid, 0)  # this child's own figures, maxrss too
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            sys.exit(f"the CLI {command} failed:\n{err.read().decode()[-2000:]}")
    zero = resource.struct_rusage((0.0,) * 16)
    # ru_maxrss in KiB: the largest resident size, as /usr/bin/time -v prints it
    return {"seconds": seconds, **usage(zero, used), "maxrss": used.ru_maxrss * 1024}


def merge_spec(recipe: Recipe, out: Path, method: str, device: str) -> dict:
    spec = {r: s.ref for r, s in recipe.sources().items()}
    return {**spec, "out": str(out), "method": method, "device": device}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, *REAL_SHAPES], default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="synthetic shapes")
    parser.add_argument(
        "--data", choices=["random", "sparse"], default="random", help="real shapes"
    )
    parser.add_argument("--layers", type=int, default=None, help="real shapes: cut to N layers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="dim3", help="a method, or several: dim3,ties,...")
    parser.add_argument("--workdir", default=None, help="where to write the trio (default: temp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (medians reported)")
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also time `python -m dim3 merge` as a whole process in every round",
    )
    parser.add_argument(
        "--layout-cache",
        choices=["warm", "off"],
        default="warm",
        help="merges read the derived layout from a cache filled before the rounds (warm), or "
        "derive it each time (off: a config's first merge)",
    )
    parser.add_argument(
        "--reread",
        action="store_true",
        help="drop the inputs from the page cache before the warm-up read, so that they are "
        "cached as a read from disk leaves them (after a reboot, or the engine's own read of an "
        "uncached checkpoint), not as writing the trio left them",
    )
    parser.add_argument(
        "--small-pages",
        action="store_true",
        help="as --reread, but read the inputs back with POSIX_FADV_RANDOM, which leaves them "
        "in 4 KiB pages of the page cache (as a file system without large folios holds a file)",
    )
    parser.add_argument(
        "--against",
        default=None,
        help="another checkout of this repository: its engine is run on the same trio in each "
        "round, for a paired comparison (an even number of rounds: one more for an odd --repeat)",
    )
    args = parser.parse_args()
    if args.against and args.repeat % 2:
        args.repeat += 1
        print(f"--against: {args.repeat} rounds, each engine first in half of them", flush=True)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="dim3-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    real = args.shape in REAL_SHAPES
    try:
        t0 = time.perf_counter()
        if real:
            inputs, output = disk_needed(args.shape, args.layers)
            data = args.data == "random"
            check_disk(root, (inputs if data else 0) + 2 * output)
            recipe = build_real_trio(root / "trio", args.shape, args.data, args.layers)
            dtype = "real dtypes"
        else:
            drawn = engine.resolve_device(args.device).type  # random draws where it merges
            recipe = build_trio(root / "trio", args.shape, DTYPES[args.dtype], drawn)
            dtype = args.dtype
        print(f"built {args.shape} trio ({dtype}) in {time.perf_counter() - t0:.1f} s", flush=True)
        files = input_files(recipe)
        written = sum(p.stat().st_size for p in Path(recipe.multimodal.ref).glob("*.safetensors"))
        floor_spec = {"floor": True, "inputs": [str(f) for f in files], "written": written}
        if args.reread or args.small_pages:
            drop_cached(files)
            print(
                f"inputs dropped from the page cache: {100 * resident(files):.0f}% left", flush=True
            )
        if args.small_pages:
            seconds = read_back_small(files)
            print(
                f"inputs read back in 4 KiB pages (POSIX_FADV_RANDOM): {seconds:.1f} s, "
                f"{100 * resident(files):.0f}% cached",
                flush=True,
            )
        warm = run_child({**floor_spec, "out": str(root / "floor"), "direct": False})
        print(f"warm-up read of the inputs: {warm['seconds']:.1f} s", flush=True)
        huge = run_child({"huge": True, "inputs": floor_spec["inputs"]})["share"]
        print(
            f"inputs mapped in 2 MiB pages: {100 * huge:.0f}% (the rest in 4 KiB pages)", flush=True
        )
        if args.layout_cache == "warm":
            os.environ["DIM3_CACHE_DIR"] = str(root / "cache")  # every child's, this run only
            got = run_child({"layout": True, "multimodal": recipe.multimodal.ref})
            print(f"layout cache filled: {got['seconds']:.1f} s to derive the layout", flush=True)
        else:
            os.environ["DIM3_CACHE_DIR"] = "off"
        methods = args.method.split(",")
        rounds: dict[str, list[dict]] = {method: [] for method in methods}
        for i in range(args.repeat):
            for method, got in one_round(args, recipe, root, methods, floor_spec, files, i).items():
                rounds[method].append(got)
        for method in methods:
            report(argparse.Namespace(**{**vars(args), "method": method}), real, rounds[method])
            print(flush=True)
    finally:
        shutil.rmtree(root / "floor", ignore_errors=True)
        shutil.rmtree(root / "cache", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def one_round(
    args, recipe, root: Path, methods: list[str], floor_spec: dict, files, i: int
) -> dict[str, dict]:
    """The floors (buffered and direct writes) and the inputs' mapping once, then every method's
    merge, back to back, each in a fresh process, with the inputs' page-cache residency and the
    load average before each. Every method's ratios in the round are taken against the same
    floors; the methods' order turns by one each round, so that none always runs right after
    the floors."""
    started = time.perf_counter()
    shared: dict = {}
    for name, spec in (
        ("floor_buffered", {**floor_spec, "out": str(root / "floor"), "direct": False}),
        ("floor_direct", {**floor_spec, "out": str(root / "floor"), "direct": True}),
        ("mapping", {"mapping": True, "inputs": floor_spec["inputs"]}),
    ):
        cached, loadavg = resident(files), load()
        shared[name] = {**run_child(spec), "cached": cached, "load": loadavg}
        shutil.rmtree(root / "floor", ignore_errors=True)
        print_run(i, name, shared[name])
    turn = i % len(methods)
    got: dict[str, dict] = {}
    for method in methods[turn:] + methods[:turn]:
        label = "" if len(methods) == 1 else f" {method}"  # on each line
        got[method] = {**shared, **merges(args, recipe, root, method, files, i, label)}
    took = time.perf_counter() - started
    print(f"  round {i + 1} took {took:.1f} s in all (each child's start included)", flush=True)
    return {method: got[method] for method in methods}


def merges(args, recipe, root: Path, method: str, files, i: int, label: str) -> dict:
    """One method's merge in round ``i`` (and the other checkout's, with ``--against``; the whole
    command's, with ``--cli``), its lines labelled with ``label``."""
    got: dict = {}
    engines = [("merge", merge_spec(recipe, root / "out", method, args.device), None)]
    if args.against:
        engines.append(("old", merge_spec(recipe, root / "out", method, args.device), args.against))
        if i % 2:  # every other round the other engine first: neither always runs right after
            engines.reverse()  # the floors (a cache state, a quiet moment) or right after a merge
    for name, spec, where in engines:
        cached, loadavg = resident(files), load()
        got[name] = {**run_child(spec, where), "cached": cached, "load": loadavg}
        if name == "merge" and args.cli:  # the whole command line, right after the merge
            for key, command in (("cli", "merge"), ("cli_plan", "plan")):
                shutil.rmtree(root / "out", ignore_errors=True)
                r = run_cli(recipe, root / "out", method, args.device, command)
                got[key] = {**r, "cached": cached}
                print(
                    f"  round {i + 1} {key + label:<14} {r['seconds']:7.2f} s  user "
                    f"{r['user']:6.2f}  sys {r['sys']:6.2f}  minflt {r['minflt']:>9}",
                    flush=True,
                )
        shutil.rmtree(root / "out", ignore_errors=True)
        print_run(i, name + label, got[name])
    return got


def print_run(i: int, name: str, r: dict) -> None:
    """One child's line: wall, CPU, faults, the cache and load before it, the middle half."""
    cached = f"{100 * r['cached']:.0f}%" if r["cached"] >= 0 else "unknown"
    print(
        f"  round {i + 1} {name:<14} {r['seconds']:7.2f} s  user {r['user']:6.2f}  "
        f"sys {r['sys']:6.2f}  minflt {r['minflt']:>9}  inputs cached {cached}  load {r['load']}"
        + (
            f"  middle half: user {r['middle']['user']:.2f} sys {r['middle']['sys']:.2f} "
            f"minflt {r['middle']['minflt']}"
            if "middle" in r
            else ""
        ),
        flush=True,
    )


def median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def report(args, real: bool, rounds: list[dict]) -> None:
    """Medians over the rounds; each ratio is taken within its round (same cache, same load)."""
    device = engine.resolve_device(args.device)
    gib = 2**30
    merges = [r["merge"] for r in rounds]
    best = min(merges, key=lambda r: r["seconds"])
    written = best["written"]
    read_b = rounds[0]["floor_buffered"]["read"]
    shape = args.shape
    if real and args.layers:
        vlm = realmaps.load_keymap(realmaps.TRIOS[args.shape][2])
        shape += f" (cut to layers {realmaps.kept_layers(vlm, args.layers)})"
    data = f"{args.data} data" if real else args.dtype

    def med(name: str, field: str = "seconds") -> float:
        return median([r[name][field] for r in rounds])

    def ratio(name: str, floor: str) -> float:
        return median([r[name]["seconds"] / r[floor]["seconds"] for r in rounds])

    def cpu(name: str) -> str:
        user, sys_ = med(name, "user"), med(name, "sys")
        share = median(
            [r[name]["sys"] / max(1e-9, r[name]["sys"] + r[name]["user"]) for r in rounds]
        )
        return f"user {user:.1f} s, sys {sys_:.2f} s ({100 * share:.0f}% kernel), minor faults {med(name, 'minflt'):,.0f}"

    def middle(name: str) -> str:
        got = [r[name]["middle"] for r in rounds if "middle" in r[name]]
        if not got:
            return "n/a"
        share = median([m["sys"] / max(1e-9, m["sys"] + m["user"]) for m in got])
        per_gib = median([m["minflt"] / max(1, m["bytes"]) * gib for m in got])
        return (
            f"user {median([m['user'] for m in got]):.1f} s, sys {median([m['sys'] for m in got]):.2f} s "
            f"({100 * share:.0f}% kernel), minor faults {median([m['minflt'] for m in got]):,.0f} "
            f"({per_gib:,.0f} per GiB merged), over {median([m['bytes'] for m in got]) / gib:.2f} GiB"
        )

    def ends(name: str) -> str:
        got = [r[name]["ends"] for r in rounds if "ends" in r[name]]
        if not got:
            return "n/a"
        parts = []
        for key, label in (("head", "to a quarter"), ("tail", "from three quarters")):
            user, sys_ = median([g[key]["user"] for g in got]), median([g[key]["sys"] for g in got])
            faults = median([g[key]["minflt"] for g in got])
            parts.append(
                f"{label}: user {user:.2f} s, sys {sys_:.2f} s, minor faults {faults:,.0f}"
            )
        return "; ".join(parts)

    def by_thread(name: str) -> str:
        got = [r[name]["middle"].get("threads", {}) for r in rounds if "middle" in r[name]]
        names = sorted({n for g in got for n in g}, key=lambda n: (n == "other", n))
        parts = []
        for n in names:
            rows = [g.get(n, [0, 0, 0, 0]) for g in got]
            sys_, switches = median([x[1] for x in rows]), median([x[2] + x[3] for x in rows])
            if sys_ or switches:
                parts.append(f"{n} {sys_:.2f} s, {switches:,.0f}")
        return "; ".join(parts) or "n/a"

    def rest() -> str:
        """The CLI's CPU less its start's, round by round: what the merge adds to the command."""
        user = [r["cli"]["user"] - r["cli_plan"]["user"] for r in rounds]
        sys_ = [r["cli"]["sys"] - r["cli_plan"]["sys"] for r in rounds]
        share = median([s / max(1e-9, u + s) for u, s in zip(user, sys_, strict=True)])
        return f"user {median(user):.1f} s, sys {median(sys_):.2f} s ({100 * share:.0f}% kernel)"

    def kernel_floor() -> str:
        """The least system time the whole merge command takes here, round by round: its
        start's (``python -m dim3 plan``: the same interpreter, imports and plan), mapping the
        inputs in and out (the cheapest read of cached pages), and writing the output's bytes
        with ``O_DIRECT`` from one reused buffer (the direct floor's writing alone); and that as
        a share of the command's own CPU time."""
        least = [
            r["cli_plan"]["sys"] + r["mapping"]["sys"] + r["floor_direct"]["write"]["sys"]
            for r in rounds
        ]
        share = median(
            [
                s / max(1e-9, r["cli"]["user"] + r["cli"]["sys"])
                for s, r in zip(least, rounds, strict=True)
            ]
        )
        return (
            f"sys {median(least):.2f} s = {100 * share:.0f}% of the command's CPU time (its "
            "start's, mapping the inputs, the direct floor's writing: what this command cannot avoid)"
        )

    over = median([m["peak"] - m["imported"] for m in merges])
    cached = min(min(r[k]["cached"] for k in r) for r in rounds)
    rows = [
        (
            "machine",
            f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        ),
        ("shape / data / device / method", f"{shape} / {data} / {device} / {args.method}"),
        (
            "layout cache",
            "warm (filled before the rounds, as for every merge but a config's first)"
            if args.layout_cache == "warm"
            else "off (each merge derives the layout from transformers, as a config's first)",
        ),
        ("inputs read / output written", f"{read_b / gib:.2f} GiB / {written / gib:.2f} GiB"),
        (
            "rounds / load average",
            f"{len(rounds)} (medians below) / " + "; ".join(r["merge"]["load"] for r in rounds),
        ),
        (
            "page cache",
            "inputs resident before every run: "
            + (f"at least {100 * cached:.0f}%" if cached >= 0 else "unknown (no fincore)"),
        ),
        ("I/O floor, buffered write", f"{med('floor_buffered'):.2f} s; {cpu('floor_buffered')}"),
        ("I/O floor, O_DIRECT write", f"{med('floor_direct'):.2f} s; {cpu('floor_direct')}"),
        (
            "mapping the inputs",
            f"{med('mapping'):.2f} s; {cpu('mapping')} (every page mapped in and unmapped, "
            "as the merge reads them; system time mapping in "
            f"{median([r['mapping']['in']['sys'] for r in rounds]):.2f} s, unmapping "
            f"{median([r['mapping']['out']['sys'] for r in rounds]):.2f} s)",
        ),
        (
            "merge wall time",
            f"{med('merge'):.2f} s = {ratio('merge', 'floor_direct'):.2f}x the direct floor, "
            f"{ratio('merge', 'floor_buffered'):.2f}x the buffered floor (per-round ratios)",
        ),
        ("merge CPU", cpu("merge")),
        ("  of which the middle half", middle("merge")),
        ("  and the two ends", ends("merge")),
        ("  its system time, switches", by_thread("merge")),
        (
            "merge throughput",
            f"read {read_b / gib / med('merge'):.2f} GiB/s, "
            f"write {written / gib / med('merge'):.2f} GiB/s",
        ),
        ("slice buffers allocated", str(best.get("buffers"))),
        (
            "output written from its buffers",
            "n/a"
            if best.get("unstaged") is None
            else f"{100 * best['unstaged'] / written:.0f}% (not copied again to be written)",
        ),
        (
            "peak anonymous RSS (process)",
            f"{best['peak'] / gib:.2f} GiB ({best['imported'] / gib:.2f} once imported)",
        ),
        (
            "peak minus import (target <= 25%)",
            f"{over / gib:.2f} GiB = {100 * over / written:.0f}% of one output model "
            f"({written / gib:.2f} GiB)",
        ),
        (
            "peak mapped file pages over the start",
            f"{median([m['mapped'] for m in merges]) / gib:.2f} GiB (RssFile: the inputs' pages "
            f"as the merge maps them, of {read_b / gib:.2f} GiB read, and libraries it loads)",
        ),
        ("peak GPU memory", f"{best['gpu'] / gib:.2f} GiB" if best["gpu"] else "n/a"),
    ]
    if args.cli:
        rows += [
            (
                "CLI, whole process",
                f"{med('cli'):.2f} s = {ratio('cli', 'floor_direct'):.2f}x the direct floor "
                "(python -m dim3 merge: interpreter, imports, plan, merge, card)",
            ),
            ("CLI CPU", cpu("cli")),
            (
                "  its start (python -m dim3 plan)",
                f"{med('cli_plan'):.2f} s; {cpu('cli_plan')} (interpreter, imports, plan)",
            ),
            ("  the rest (merge, card, exit)", rest()),
            ("  its kernel floor", kernel_floor()),
            (
                "CLI peak resident size",
                f"{median([r['cli']['maxrss'] for r in rounds]) / gib:.2f} GiB (ru_maxrss, as "
                "/usr/bin/time -v prints it: the inputs' mapped pages and the libraries count)",
            ),
        ]
    if args.against:
        rows += [
            (
                "other engine (--against)",
                f"{med('old'):.2f} s = {ratio('old', 'floor_direct'):.2f}x the direct floor; "
                f"new/old wall {median([r['merge']['seconds'] / r['old']['seconds'] for r in rounds]):.2f}",
            ),
            ("other engine CPU", cpu("old")),
            ("  of which the middle half", middle("old")),
            ("  and the two ends", ends("old")),
            ("  its system time, switches", by_thread("old")),
            (
                "  its peak mapped file pages",
                f"{median([r['old'].get('mapped', 0) for r in rounds]) / gib:.2f} GiB "
                "over the start",
            ),
        ]
    if best["gpu"]:
        rows.append(("peak GPU / output model", f"{100 * best['gpu'] / written:.0f}%"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
