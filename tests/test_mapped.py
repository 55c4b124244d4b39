"""dim3.mapped and the engine's own memory: zero-copy rows of mapped shard files, read ahead
and mapped in by the read thread; large buffers in private huge pages.

Real safetensors files on the test's own disk; the page cache's state is the kernel's (a file just
written and synced is cached; ``POSIX_FADV_DONTNEED`` drops it where the file system allows)."""

from __future__ import annotations

import mmap

import pytest
import torch


def test_huge_page_buffers_are_private_anonymous_memory():
    """The engine's large buffers and the writer's staging: private anonymous mappings (counted
    as the process's anonymous memory, huge pages where the kernel offers them), not Python's
    default shared mapping (shmem: no huge pages by default, counted apart as RssShmem)."""
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
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and int(span.split("-")[0], 16) <= at < int(span.split("-")[1], 16):
            perms, fields = line.split()[1], {}
            for more in lines[i + 1 : i + 30]:
                parts = more.split()
                if not parts or "-" in parts[0]:
                    break
                fields[parts[0].rstrip(":")] = parts[1]
            break
    else:
        pytest.fail("the buffer's mapping is not in /proc/self/smaps")
    assert perms.endswith("p"), line  # private, not shared ("s", /dev/zero)
    assert int(fields["Anonymous"]) * 1024 >= n - 5
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" not in thp:
        assert int(fields["AnonHugePages"]) >= 2048, fields
