"""dim3.mapped and the engine's own memory: zero-copy rows of mapped shard files, read ahead
and mapped in by the read thread; large buffers in private huge pages.

Real safetensors files on the test's own disk; the page cache's state is the kernel's (a file just
written and synced is cached; ``POSIX_FADV_DONTNEED`` drops it where the file system allows)."""

from __future__ import annotations

import mmap
import os
import resource
import sys

import pytest
import torch
from safetensors.torch import save_file

from dim3 import mapped
from dim3.mapped import MappedShards

ROWS, COLS = 4096, 4096  # 32 MiB of bfloat16: a step's rows of a 2B model's matrix


@pytest.fixture
def shard(tmp_path):
    """A synced safetensors file of one 32 MiB bfloat16 matrix (and a small tensor before it)."""
    path = tmp_path / "model.safetensors"
    weight = torch.randn(ROWS, COLS).to(torch.bfloat16)
    save_file({"a.norm": torch.ones(7), "b.weight": weight}, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return path, weight


def _faults() -> int:
    """This process's minor page faults so far (torch's copy may run on several threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _where(path):
    return (path, "b.weight", torch.bfloat16, (ROWS, COLS))


def test_rows_are_the_stored_values(shard):
    path, weight = shard
    maps = MappedShards()
    rows = maps.rows(*_where(path), 100, 300)
    assert rows.shape == (200, COLS) and torch.equal(rows, weight[100:300])
    assert torch.equal(maps.rows(path, "a.norm", torch.float32, (7,), 0, 7), torch.ones(7))
    maps.close()


@pytest.mark.skipif(
    sys.platform != "linux" or mapped.MADV_POPULATE_READ is None, reason="Linux's madvise"
)
def test_prefetched_rows_are_read_without_a_page_fault(shard):
    """The read thread's prefetch maps the rows' pages (``MADV_POPULATE_READ``): the thread that
    converts them then takes no fault, where reading the same rows through a fresh mapping
    takes one per 2 MiB at the very least (one per 64 KiB unless the page cache holds the file
    in huge folios)."""
    path, weight = shard
    out = torch.empty(ROWS, COLS, dtype=torch.float32)
    out.fill_(0)  # its own pages faulted in before counting

    cold = MappedShards()
    before = _faults()
    out.copy_(cold.rows(*_where(path), 0, ROWS))
    unprefetched = _faults() - before
    cold.close()
    assert unprefetched >= ROWS * COLS * 2 // 2**22  # 8: half its 2 MiB pages, at the least

    warm = MappedShards()
    warm.prefetch(*_where(path), 0, ROWS)
    if not MappedShards.populate:
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14+)")
    before = _faults()
    out.copy_(warm.rows(*_where(path), 0, ROWS))
    prefetched = _faults() - before
    warm.close()
    assert prefetched <= 2, (prefetched, unprefetched)
    assert torch.equal(out, weight.float())


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise")
def test_cached_tells_a_cached_range_from_a_dropped_one_and_prefetch_reads_it_back(shard):
    path, weight = shard
    maps = MappedShards()
    m, data, starts = maps._open(path)
    begin, nbytes = starts["b.weight"], ROWS * COLS * 2
    assert maps._cached(path, data, begin, nbytes)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if maps._cached(path, data, begin, nbytes):
        pytest.skip("this file system keeps the pages (tmpfs)")
    maps.prefetch(*_where(path), 0, ROWS)  # read ahead, then (Linux 5.14+) mapped in
    if MappedShards.populate:
        assert maps._cached(path, data, begin, nbytes)
    assert torch.equal(maps.rows(*_where(path), 0, ROWS), weight)
    maps.close()


def test_a_mapping_refused_once_is_not_asked_for_again(shard, monkeypatch):
    """On a kernel without ``MADV_POPULATE_READ`` (EINVAL) prefetch still reads ahead, and stops
    asking for the mapping; the rows read the same."""
    path, weight = shard
    if mapped._MADVISE is None:
        pytest.skip("no C library madvise here")
    monkeypatch.setattr(mapped, "MADV_POPULATE_READ", 0x7FFF)  # advice no kernel knows: EINVAL
    monkeypatch.setattr(MappedShards, "populate", True)
    maps = MappedShards()
    maps.prefetch(*_where(path), 0, 64)
    assert MappedShards.populate is False
    maps.prefetch(*_where(path), 64, 128)
    assert torch.equal(maps.rows(*_where(path), 0, 128), weight[:128])
    maps.close()


def _resident_kib(path) -> int:
    """The resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping: "start-end perms ... path"
                inside = line.rstrip().endswith(str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(sys.platform != "linux" or mapped._MADVISE is None, reason="Linux's madvise")
def test_released_rows_leave_the_process_in_whole_blocks_and_read_the_same_after(shard):
    """``release`` unmaps from the process the whole 2 MiB blocks that the rows released so far
    cover, in any order (the resident size of the file's mapping falls by exactly what it
    says): a block shared with rows not released yet stays until they are, and goes with
    them; rows read again and released again unmap their blocks again; once every byte of
    the file has been released, nothing of it is left mapped. The bytes stay as they were:
    the rows read the stored values again."""
    path, weight = shard
    maps = MappedShards()
    maps.prefetch(*_where(path), 0, ROWS)
    maps.prefetch(path, "a.norm", torch.float32, (7,), 0, 7)
    if not MappedShards.populate:
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14+)")
    _, _, starts = maps._open(path)
    at = starts["b.weight"]
    row = COLS * 2
    huge = mapped.HUGE

    def blocks(lo: int, hi: int) -> int:  # the bytes of the whole blocks inside rows lo:hi
        first, last = -(-(at + lo * row) // huge), (at + hi * row) // huge
        return max(0, last - first) * huge

    mapped_in = _resident_kib(path)
    assert mapped_in >= ROWS * COLS * 2 // 1024  # the whole matrix is mapped in
    freed = maps.release(*_where(path), 2000, 4000)
    assert freed == blocks(2000, 4000) > 0
    assert _resident_kib(path) == mapped_in - freed // 1024
    # rows before those (a tensor released out of the file's order)
    assert maps.release(*_where(path), 100, 300) == 0  # 400 KiB: inside one block
    more = maps.release(*_where(path), 300, 1700)  # rows 100:1700 have whole blocks now
    assert more == blocks(100, 1700) > 0
    assert _resident_kib(path) == mapped_in - (freed + more) // 1024
    # the rows between: the blocks they share with both sides are covered now, and go
    joined = maps.release(*_where(path), 1700, 2000)
    assert joined == blocks(100, 4000) - freed - more == 2 * huge
    assert _resident_kib(path) == mapped_in - (freed + more + joined) // 1024
    # the same rows read again (another pass: mapped in again), then released again
    maps.prefetch(*_where(path), 100, 1700)
    assert _resident_kib(path) > mapped_in - (freed + more + joined) // 1024
    again = maps.release(*_where(path), 100, 1700)
    assert again >= more
    assert _resident_kib(path) == mapped_in - (freed + more + joined) // 1024
    assert maps.release(*_where(path), 5, 5) == 0  # no rows
    # the small tensor shares its block with rows not released yet
    assert maps.release(path, "a.norm", torch.float32, (7,), 0, 7) == 0
    # the rest: the file's first block (its header too) and its last (its end too) go
    rest = maps.release(*_where(path), 0, 100) + maps.release(*_where(path), 4000, ROWS)
    assert rest > 0
    assert _resident_kib(path) == 0
    assert torch.equal(maps.rows(*_where(path), 0, ROWS), weight)
    maps.close()


def test_huge_page_buffers_are_private_anonymous_memory():
    """The engine's large buffers and the writer's staging: private anonymous mappings (counted
    as the process's anonymous memory, huge pages where the kernel offers them), not Python's
    default shared mapping (shmem: no huge pages by default, counted apart as RssShmem). Huge
    pages only over the whole 2 MiB pages the buffer fills: its last few bytes cost 4 KiB pages,
    not a fresh 2 MiB page of which they use a few bytes."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages here")
    from dim3.slices import HUGE, huge_pages

    n = 3 * HUGE + 5
    buf = huge_pages(n)
    assert buf.numel() == n and buf.dtype == torch.uint8
    buf.fill_(7)
    at = buf.data_ptr()
    assert at % HUGE == 0
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    areas = []  # (permissions, fields) of each mapping that holds part of the buffer
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" not in span or ":" in span:
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo < at + n and at < hi:
            fields = {}
            for more in lines[i + 1 : i + 30]:
                parts = more.split()
                if not parts or ("-" in parts[0] and ":" not in parts[0]):
                    break
                fields[parts[0].rstrip(":")] = parts[1]
            areas.append((line.split()[1], fields))
    if not areas:
        pytest.fail("the buffer's mapping is not in /proc/self/smaps")
    assert all(perms.endswith("p") for perms, _ in areas), areas  # private, not shared (/dev/zero)
    anonymous = sum(int(f["Anonymous"]) * 1024 for _, f in areas)
    assert anonymous >= n - 5
    # the 5 bytes past 6 MiB: one 4 KiB page present, not a 2 MiB one (pagemap's bit 63, per
    # page; the mapping's rest may share its area with a neighbour, whose pages count there)
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(at // page * 8)
        entries = f.read(HUGE * 4 // page * 8)
    present = [
        int.from_bytes(entries[i : i + 8], "little") >> 63 for i in range(0, len(entries), 8)
    ]
    assert all(present[: 3 * HUGE // page])
    assert present[3 * HUGE // page :] == [1] + [0] * (HUGE // page - 1)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" not in thp:
        assert sum(int(f["AnonHugePages"]) for _, f in areas) >= 2048, areas
