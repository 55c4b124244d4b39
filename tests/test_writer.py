"""The streaming safetensors writer, read back with the safetensors library itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dim3.sizes import parse_size
from dim3.slices import huge_pages
from dim3.writer import (
    ALIGN,
    DIRECT_MIN,
    STAGING,
    ShardedWriter,
    TensorSpec,
    split_shards,
)

TENSORS = {
    "a.weight": torch.randn(7, 5),
    "b.bias": torch.randn(3).to(torch.bfloat16),
    "c.mask": torch.tensor([True, False, True]),
    "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e.empty": torch.zeros(0, 4),
    "f.half": torch.randn(4, 4).to(torch.float16),
}


def specs():
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]


@pytest.mark.parametrize("shard_size", ["1GB", 100])
def test_round_trip_through_safetensors(tmp_path, shard_size):
    out = tmp_path / "out"
    with ShardedWriter(out, specs(), shard_size=shard_size) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    files = sorted(out.glob("*.safetensors"))
    read = {}
    for file in files:
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            read.update({k: f.get_tensor(k) for k in f.keys()})
    assert read.keys() == TENSORS.keys()
    for k, v in TENSORS.items():
        assert read[k].dtype == v.dtype and torch.equal(read[k], v), k
    if len(files) == 1:
        assert files[0].name == "model.safetensors"
        assert not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(TENSORS)
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in TENSORS.values()
        )
        assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"


def test_wrong_tensor_or_missing_tensor_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="expected"), ShardedWriter(out, specs()) as w:
        w.write("a.weight", torch.randn(5, 7))
    with (
        pytest.raises(RuntimeError, match="before writing 'b.bias'"),
        ShardedWriter(out, specs()) as w,
    ):
        w.write("a.weight", TENSORS["a.weight"])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_the_disk_has_no_room_for_is_refused_before_anything_is_written(tmp_path):
    """A checkpoint announced larger than the free space of the file system it goes on (here
    twice the free space of the test's own folder) is refused as the writer opens, with the
    sizes and the fix, before any folder is made (not even the missing parents) or any byte is
    written; one that fits opens there as usual."""
    import errno
    import shutil

    out = tmp_path / "missing" / "parent" / "out"
    n = shutil.disk_usage(tmp_path).free // 2 + 1  # float32 values: twice the free bytes
    huge = [TensorSpec("w", torch.float32, (n,))]
    writer = ShardedWriter(out, huge)
    assert writer.nbytes > 4 * n > shutil.disk_usage(tmp_path).free  # the header too
    with pytest.raises(OSError, match="free some space there or choose another output folder") as e:
        with writer:
            pytest.fail("the writer opened")
    assert e.value.errno == errno.ENOSPC
    assert f"the file system of {out.parent} has" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with ShardedWriter(out, specs()) as w:
        for name, tensor in TENSORS.items():
            w.write(name, tensor)
    assert (out / "model.safetensors").is_file()


def test_sizes_and_shards():
    assert (
        parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(10) == 10
    )
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_size("0MB")
    sizes = [TensorSpec(str(i), torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5])]
    shards = split_shards(sizes, 80)  # 40, 40, 120 (alone), 20 bytes
    assert [[s.name for s in shard] for shard in shards] == [["0", "1"], ["2"], ["3"]]


def _direct_supported(folder) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.remove(folder / "probe")
    return True


def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path):
    """Shards written past the page cache (O_DIRECT, aligned staging, buffered tail) hold the very
    bytes a buffered write gives: tensors of odd sizes, one larger than the staging buffer."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(STAGING // 4 + 1234, generator=g),  # more than one staging buffer
        "bigger": torch.randn(5 * STAGING // 4 + 77, generator=g),  # both buffers, reused
        "odd": torch.randn(3, 7, generator=g).to(torch.bfloat16),  # leaves the file unaligned
        "tail": torch.arange(5, dtype=torch.int16),
    }
    spec = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    for direct in (True, False):
        with ShardedWriter(tmp_path / str(direct), spec, shard_size="20MB", direct_io=direct) as w:
            for k, v in tensors.items():
                w.write(k, v)
            assert w._file is not None and w._file.direct == (
                direct and _direct_supported(tmp_path)
            )
    files = sorted(p.name for p in (tmp_path / "True").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "False").iterdir())
    assert len(files) == 4  # three shards and the index
    for name in files:
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()
    got = {}
    for shard in (tmp_path / "True").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k


def _placed(rows: torch.Tensor, offset: int, shift: int = 0) -> tuple[torch.Tensor, bool]:
    """A copy of ``rows`` in memory at ``offset`` (its file offset) modulo ALIGN, plus ``shift``
    bytes, as the engine's output buffers place merged rows, and whether it is there: not when
    that address is not a whole number of elements into the buffer (the rows then start at the
    element before it)."""
    nbytes, size = rows.numel() * rows.element_size(), rows.element_size()
    flat = huge_pages(nbytes + 2 * ALIGN)
    skip = (offset - flat.data_ptr()) % ALIGN + shift
    placed = flat[skip - skip % size : skip - skip % size + nbytes].view(rows.dtype)
    return placed.view(rows.shape).copy_(rows), skip % size == 0


def test_rows_laid_out_as_in_the_file_are_written_from_where_they_are(tmp_path):
    """Rows whose address is their file offset modulo ALIGN (ShardedWriter.offset) go to disk
    from their own memory before write_rows returns: the shards hold the very bytes a buffered
    writer gives, every such piece's aligned middle was not copied, and a piece placed 2 bytes
    off (or under DIRECT_MIN, or a float32 one whose file offset is not a multiple of 4 bytes)
    is copied as before."""
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    g = torch.Generator().manual_seed(1)
    tensors = {
        "odd": torch.randn(3, 7, generator=g).to(torch.bfloat16),  # unaligns what follows
        "a": torch.randn(3001, 701, generator=g).to(torch.bfloat16),
        "one": torch.ones(1, dtype=torch.bfloat16),  # float32 "b" is not 4 bytes into a block
        "b": torch.randn(1000, 1111, generator=g),
        "small": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "c": torch.randn(2500, 513, generator=g).to(torch.bfloat16),
        "tail": torch.arange(5, dtype=torch.int16),
    }
    pieces = {"a": [0, 1000, 1001, 3001], "b": [0, 333, 1000], "c": [0, 2500]}
    off = {("a", 1001)}  # this piece is placed 2 bytes away from its file offset
    spec = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardedWriter(tmp_path / "buffered", spec, shard_size="6MB", direct_io=False) as w:
        for k, v in tensors.items():
            w.write(k, v)
    want = 0
    with ShardedWriter(tmp_path / "placed", spec, shard_size="6MB") as w:
        for k, v in tensors.items():
            cuts = pieces.get(k, [0, v.shape[0]])
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                at, shifted = w.offset(k, a), (k, a) in off
                rows, there = _placed(v[a:b], at, 2 if shifted else 0)
                n = rows.numel() * rows.element_size()
                if n >= DIRECT_MIN and there and not shifted:
                    want += (n + at % -ALIGN) // ALIGN * ALIGN  # the whole blocks from ``at``
                w.write_rows(k, a, rows)
                rows.zero_()  # written (or copied) by the time write_rows returns
        assert w.unstaged == want and want > 2 * DIRECT_MIN  # a[:1000] and c
    files = sorted(p.name for p in (tmp_path / "placed").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "buffered").iterdir()) and len(files) > 2
    for name in files:
        assert (tmp_path / "placed" / name).read_bytes() == (
            tmp_path / "buffered" / name
        ).read_bytes(), name


FULL_DISK = """
import resource, signal, sys, torch
from pathlib import Path
from dim3.writer import STAGING, ShardedWriter, TensorSpec, _header
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (3 * STAGING, 3 * STAGING))
# a file of exactly 8 staging buffers: no unaligned tail for close() to write on this thread, so
# every refused write is one of the flusher thread's ("staged") or of write_rows ("placed")
n = 8 * STAGING
for _ in range(3):
    n = 8 * STAGING - len(_header([TensorSpec("t", torch.uint8, (n,))], {"format": "pt"}))
spec = TensorSpec("t", torch.uint8, (n,))
assert len(_header([spec], {"format": "pt"})) + n == 8 * STAGING
out = Path(sys.argv[1]) / "out"
try:
    with ShardedWriter(out, [spec], direct_io=True) as w:
        if sys.argv[2] == "staged":
            w.write("t", torch.ones(n, dtype=torch.uint8))
        else:  # pieces laid out as in the file, written from where they are
            from dim3.slices import huge_pages
            from dim3.writer import ALIGN
            cuts = [0, n // 3, n // 2, n]
            for a, b in zip(cuts[:-1], cuts[1:]):
                flat = huge_pages(b - a + ALIGN)
                skip = (w.offset("t", a) - flat.data_ptr()) % ALIGN
                w.write_rows("t", a, flat[skip : skip + b - a].fill_(1))
except OSError as exc:
    print("raised", exc.errno)
"""


@pytest.mark.parametrize("how", ["staged", "placed"])
def test_a_write_the_disk_refuses_mid_file_is_raised_and_leaves_nothing(tmp_path, how):
    """A file-size limit makes the disk refuse the writes past 48 MiB of a 128 MiB file whose
    bytes all go to disk in direct writes (no tail), copied into the staging buffers (written
    by the flusher thread) or written from the caller's memory (on its own thread): the error
    reaches the caller and neither the output nor the temporary folder remains."""
    import errno
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path), how],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["raised", str(errno.EFBIG)]
    assert list(tmp_path.iterdir()) == []
