"""Rows of safetensors tensors as zero-copy views of the shard files, mapped read-only.

The merge engine reads each input byte once: its float32 work buffers are filled by converting
straight from these views (the page cache's own pages), so reading allocates nothing and costs no
system call per slice. :meth:`MappedShards.prefetch`, called on the engine's read thread for the
next slice while the previous one is computed, asks the kernel to read a range ahead
(``MADV_WILLNEED``, skipped when the range is already cached) and maps its pages into the process
(``MADV_POPULATE_READ``, Linux 5.14+), so the threads that compute take no page faults on it;
:meth:`MappedShards.release` unmaps a range again once it has been merged. Views are read-only:
writing into one crashes the process, so callers copy from them and never write. The headers
were checked when the checkpoint was opened (:func:`dim3.checkpoints.read_header`);
this module only locates the bytes. It knows files and tensors, nothing of models or merging.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import json
import math
import mmap
import os
import struct
import sys
import warnings
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
# madvise(2) advice missing from Python 3.11's mmap module: fault a range's pages in, mapped
# (Linux 5.14+; EINVAL before, and then it is not asked again)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
# the blocks a file's pages are unmapped in (:meth:`MappedShards.release`): a PMD's worth, the
# largest page a file is mapped in (2 MiB with 4 KiB pages, on x86-64 and arm64)
HUGE = 2 << 20


def _libc(name: str, *argtypes, hold: bool = False):
    """A function of the C library (through ctypes, which lets other threads run Python while
    it runs: the mmap module's ``madvise`` holds the interpreter's lock), or None where there is
    none. ``hold``: keep the interpreter's lock meanwhile, for a call that never waits (one
    that lets go of it takes it back after, and waits for it whenever another thread took it:
    two context switches, where the call itself takes a microsecond)."""
    if sys.platform != "linux":
        return None
    try:
        fn = getattr((ctypes.PyDLL if hold else ctypes.CDLL)(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


# one page's residency: the page tables and the page cache looked up, nothing read
_MINCORE = _libc("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, hold=True)
_MADVISE = _libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class MappedShards:
    """Each shard file mapped once (read-only), with its tensors' byte offsets."""

    populate = True  # whether MADV_POPULATE_READ is asked for (off once a kernel refused it)

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, torch.Tensor, dict[str, int]]] = {}
        self._fds: dict[Path, int] = {}  # for page-cache probes
        # per file, the byte ranges released so far, merged: their starts and their ends
        self._released: dict[Path, tuple[list[int], list[int]]] = {}

    def _open(self, file: Path) -> tuple[mmap.mmap, torch.Tensor, dict[str, int]]:
        if file not in self._maps:
            with open(file, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            starts = {
                k: 8 + n + int(v["data_offsets"][0])
                for k, v in header.items()
                if k != "__metadata__"
            }
            with warnings.catch_warnings():  # torch warns that the buffer is not writable
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(m, dtype=torch.uint8) if len(m) else torch.empty(0)
            self._maps[file] = (m, data, starts)
        return self._maps[file]

    @staticmethod
    def _span(
        shape: tuple[int, ...], dtype: torch.dtype, start: int, stop: int
    ) -> tuple[int, int, tuple[int, ...]]:
        stop = max(start, stop)
        per_row = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        rows = (stop - start) if shape else 1
        return start * per_row, rows * per_row, ((stop - start, *shape[1:]) if shape else ())

    def rows(
        self,
        file: Path,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (of ``dtype`` and ``shape``) in ``file``, as a
        read-only CPU view of the mapped file (the whole tensor for a 0-d one)."""
        _, data, starts = self._open(file)
        offset, nbytes, out_shape = self._span(shape, dtype, start, stop)
        begin = starts[key] + offset
        if nbytes == 0:
            return torch.empty(out_shape, dtype=dtype)
        return data[begin : begin + nbytes].view(dtype).view(out_shape)

    def prefetch(
        self,
        file: Path,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        start: int,
        stop: int,
    ) -> None:
        """Make rows ``start:stop`` of ``key`` ready to read: ask the kernel to read what of them
        is not cached (asynchronously), then map their pages into this process, waiting for
        any still being read. A no-op where ``madvise`` is missing; the mapping step is skipped
        where the kernel lacks it. Run it on the thread that reads ahead: the threads that later
        convert the rows take no page fault on them."""
        m, data, starts = self._open(file)
        offset, nbytes, _ = self._span(shape, dtype, start, stop)
        begin = starts[key] + offset
        if nbytes == 0 or not hasattr(m, "madvise"):
            return
        lo = begin - begin % PAGE
        span = min(len(m), begin + nbytes) - lo
        if not self._cached(file, data, begin, nbytes):
            m.madvise(mmap.MADV_WILLNEED, lo, span)
        if MappedShards.populate and _MADVISE is not None and MADV_POPULATE_READ is not None:
            if _MADVISE(data.data_ptr() + lo, span, MADV_POPULATE_READ) != 0:
                # EINVAL: a kernel before 5.14 (the threads then fault the pages in as they read)
                MappedShards.populate = ctypes.get_errno() != errno.EINVAL

    def release(
        self,
        file: Path,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        start: int,
        stop: int,
    ) -> int:
        """Unmap from this process (``MADV_DONTNEED``; the page cache keeps them) the pages of
        rows ``start:stop`` of ``key`` once nothing reads them again, so that the inputs' mapped
        pages, which the process's resident size counts, stay a few slices' worth instead of
        growing to every input byte. A view read after it reads the same bytes: the mapping is
        shared and read-only, and its pages are mapped in again from the file.

        Only whole :data:`HUGE` blocks are unmapped: the kernel maps a file's 2 MiB folios
        whole, and unmapping part of one unmaps all of it, the rows around it too (which the
        threads reading them would then fault in again). So the bytes released of each file
        are kept as merged ranges (the header and what lies past the file's end count as
        released: nothing reads them through the mapping), and a call unmaps the blocks its
        rows touch that released ranges now cover whole: the block its rows share with rows
        released before, in any order, goes with them; one they share with rows not released
        yet, with those. Rows released again (read again since: another pass) unmap their
        blocks again. Returns the bytes unmapped (0 where ``madvise`` is missing)."""
        if _MADVISE is None or file not in self._maps:
            return 0
        m, data, starts = self._maps[file]
        offset, nbytes, _ = self._span(shape, dtype, start, stop)
        if nbytes == 0:
            return 0
        lo = starts[key] + offset
        hi = lo + nbytes
        if file not in self._released:  # the header, and the file's last block past its end
            head = min(starts.values(), default=len(m))
            self._released[file] = ([0, len(m)], [head, -(-len(m) // HUGE) * HUGE + HUGE])
        firsts, ends = self._released[file]
        # merge [lo, hi) with the ranges it touches or meets
        a = bisect.bisect_left(ends, lo)  # the first range ending at or past lo
        b = bisect.bisect_right(firsts, hi)  # past the last range starting at or before hi
        if a < b:
            lo_all, hi_all = min(lo, firsts[a]), max(hi, ends[b - 1])
        else:
            lo_all, hi_all = lo, hi
        firsts[a:b], ends[a:b] = [lo_all], [hi_all]
        # the whole blocks of the merged range that these rows touch (the last one up to the
        # file's end)
        first = max(-(-lo_all // HUGE), lo // HUGE) * HUGE
        last = min(hi_all // HUGE, -(-hi // HUGE)) * HUGE
        if last <= first:
            return 0
        size = min(last, len(m)) - first
        if _MADVISE(data.data_ptr() + first, size, MADV_DONTNEED) != 0:
            return 0
        return size

    def _cached(self, file: Path, data: torch.Tensor, begin: int, nbytes: int) -> bool:
        """Whether the range's first and last pages are in the page cache (``mincore``; where
        it is missing, a read that must not wait, ``RWF_NOWAIT``): then the kernel has nothing
        to read ahead, and asking it to look page by page costs more system time than it saves
        (about 1 s per 10 GiB)."""
        if _MINCORE is not None and data.numel():
            at = data.data_ptr()
            first, last = (at + begin) // PAGE * PAGE, (at + begin + nbytes - 1) // PAGE * PAGE
            vec = (ctypes.c_ubyte * 1)()
            for page in {first, last}:
                if _MINCORE(page, PAGE, vec) != 0 or not vec[0] & 1:
                    return False
            return True
        flag = getattr(os, "RWF_NOWAIT", None)
        if flag is None:
            return False
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        probe = bytearray(1)
        try:
            for at in (begin, begin + nbytes - 1):
                if os.preadv(self._fds[file], [probe], at, flag) != 1:
                    return False
        except OSError:  # EAGAIN: not cached; or the flag is unsupported here
            return False
        return True

    def close(self) -> None:
        """Drop the mappings (views still alive keep theirs until they are freed)."""
        self._maps.clear()
        self._released.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
