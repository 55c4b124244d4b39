"""A streaming, sharded safetensors writer that moves its folder into place only on success.

Because the plan fixes every output tensor's name, dtype and shape before the first write, each
shard's header is written first and tensors are then streamed into it one at a time: memory holds
one tensor, never a shard. The files follow the safetensors format (8-byte little-endian header
length, JSON header padded to 8 bytes, then the raw little-endian data) and the Hugging Face
sharding convention (``model-00001-of-00002.safetensors`` plus ``model.safetensors.index.json``;
a single shard is ``model.safetensors``). Temporary folders are named ``.NAME.dim3-tmp-PID-XXXXXXXX``
beside the destination ``NAME``; those a killed merge left behind are removed when the next merge
to ``NAME`` starts (:func:`remove_stale_temporaries`; :func:`remove_stale_in_folder` for a whole
output folder, which the app runs at start-up). The ``safetensors`` library's own writer needs all
of a shard's tensors in memory at once, hence this one. Shards are written with ``O_DIRECT`` where
the file system allows it (:class:`_StreamFile`): a merged model is written once, and through the
page cache its gigabytes would cost the kernel a copy per page and evict the inputs being read.
This module knows nothing of models or merging.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: no O_DIRECT either
    fcntl = None  # type: ignore[assignment]

import torch

from dim3.sizes import human_size, parse_size
from dim3.slices import huge_pages

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TMP_TAG, OLD_TAG = ".dim3-tmp-", ".dim3-old-"
# what follows ``.NAME`` + tag in our folders: the owner's pid (absent before it was recorded)
# and mkdtemp's or uuid's 8 characters
_OURS = re.compile(r"^(?:(\d+)-)?[a-z0-9_]{8}$")
_ANY_OURS = re.compile(r"^\.(?P<name>.+?)(?P<tag>\.dim3-tmp-|\.dim3-old-)(?P<rest>[^/]+)$")


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: name, dtype and shape, known before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def split_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-keeping split into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (a view when it is already CPU-contiguous)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


ALIGN = 4096  # O_DIRECT needs addresses, lengths and offsets aligned to the device's blocks
# bytes gathered before one direct write. Since the merged rows go to disk from the engine's
# own buffers, staging carries the copied tensors (the vision tower) and the rows' unaligned
# ends; 16 MiB before 2026-12-01: its two buffers, touched once a merge, were 32 MiB of fresh
# memory that the kernel zeroes (on the development VM up to 1.3 ms a MiB, when the host has
# taken freed memory back: benchmarks/first_touch.py). 8 MiB, paired by hand on the 2B trio (6
# pairs of task arithmetic): 0.07 s less system time a merge, the same wall time; DiM3 and TIES
# the same wall time (3 pairs each).
STAGING = 8 * 2**20
# a piece this large whose memory is laid out as its place in the file (the same address modulo
# ALIGN: see ShardedWriter.offset) goes to disk from where it is, not through the staging buffers
DIRECT_MIN = 2**20


class _StreamFile:
    """A file written front to back, bypassing the page cache (``O_DIRECT``) where the file
    system allows it: bytes gather in an aligned staging buffer and go to disk in large aligned
    writes, the unaligned tail at :meth:`close` through the page cache. A merged model is written
    once and not read back soon; through the page cache its gigabytes would cost the kernel a copy
    and a page each and evict the inputs the merge is reading. Elsewhere (tmpfs, macOS, Windows)
    it is an ordinary buffered file.

    With two staging buffers and a ``flusher`` thread, a full buffer is written on that thread
    while the next one fills: gathering the bytes overlaps the disk's work instead of waiting
    for it (a direct write returns only once the device has the data). A piece of at least
    ``DIRECT_MIN`` bytes whose address is its file offset modulo ``ALIGN`` skips the copy: its
    aligned middle is written from the caller's memory, with the few staged bytes before it, on
    the calling thread, before :meth:`write` returns (the engine computes merged rows into
    buffers laid out so); its error is raised there. Every write names its offset; one of the
    flusher's that failed is raised by the next switch of buffers or by :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        staging: Sequence[torch.Tensor] = (),
        flusher: ThreadPoolExecutor | None = None,
    ):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.fd, self.direct = -1, False
        if staging and hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o666), True
            except OSError:  # the file system refuses O_DIRECT (tmpfs, some FUSE)
                pass
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)
        self._staged = self.direct  # bytes go through the staging buffers (decided once)
        self._stages = list(staging)
        self._pending: list[Future | None] = [None] * len(self._stages)
        self._flusher = flusher if len(self._stages) > 1 else None
        self._k, self._fill = 0, 0
        self._at = 0  # the file offset of the staging buffer's first byte
        self._stage = self._stages[0] if self._stages else None
        self.unstaged = 0  # bytes written from the callers' memory, without a copy

    def write(self, data: torch.Tensor | bytes) -> None:
        """Append ``data`` (a flat uint8 CPU tensor, or bytes)."""
        flat = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if isinstance(data, bytes)
            else data
        )
        if not self._staged:
            self._write_all(memoryview(flat.numpy()) if flat.numel() else memoryview(b""))
            return
        n, end = flat.numel(), self._at + self._fill  # ``end``: the file offset of flat[0]
        if self.direct and n >= DIRECT_MIN and (flat.data_ptr() - end) % ALIGN == 0:
            head = -end % ALIGN  # bytes up to the next aligned offset, staged
            body = (n - head) // ALIGN * ALIGN
            self._stage_bytes(flat[:head])
            assert self._stage is not None
            # the staged bytes (now ending at an aligned offset) and the body: one write, now
            staged = memoryview(self._stage.numpy())[: self._fill]
            self._write_direct([staged, memoryview(flat[head : head + body].numpy())], self._at)
            self._fill, self._at = 0, self._at + self._fill + body
            self.unstaged += body
            flat = flat[head + body :]
        self._stage_bytes(flat)

    def _stage_bytes(self, flat: torch.Tensor) -> None:
        assert self._stage is not None
        pos, n, cap = 0, flat.numel(), self._stage.numel()
        while pos < n:
            k = min(n - pos, cap - self._fill)
            self._stage[self._fill : self._fill + k].copy_(flat[pos : pos + k])
            self._fill, pos = self._fill + k, pos + k
            if self._fill == cap:
                self._switch(cap)

    def _switch(self, nbytes: int) -> None:
        """Send the buffer's ``nbytes`` (all it holds, aligned) to disk (on the flusher, if any)
        and fill the next one."""
        assert self._stage is not None and nbytes == self._fill
        view, at = memoryview(self._stage.numpy())[:nbytes], self._at
        if self._flusher is None:
            self._write_direct(view, at)
        else:
            self._pending[self._k] = self._flusher.submit(self._write_direct, view, at)
            self._k = (self._k + 1) % len(self._stages)
            self._wait(self._k)  # its previous write is done before it is refilled
            self._stage = self._stages[self._k]
        self._fill, self._at = 0, at + nbytes

    def _wait(self, k: int) -> None:
        pending, self._pending[k] = self._pending[k], None
        if pending is not None:
            pending.result()

    def _write_direct(self, view: memoryview | list[memoryview], at: int) -> None:
        try:
            self._write_all(view, at)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self._buffered()  # opened with O_DIRECT but refused at write time: write normally
            self._write_all(view, at)

    def _flush(self, nbytes: int) -> None:
        """Write the first ``nbytes`` (aligned) of the staging buffer now and keep the rest."""
        assert self._stage is not None
        self._write_direct(memoryview(self._stage.numpy())[:nbytes], self._at)
        rest = self._fill - nbytes
        if rest:
            self._stage[:rest].copy_(self._stage[nbytes : self._fill].clone())
        self._fill, self._at = rest, self._at + nbytes

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _write_all(self, view: memoryview | list[memoryview], at: int | None = None) -> None:
        """Write all of ``view`` (or of several, one after another) at file offset ``at``
        (staged files, every write placed), or at the file's position (unstaged ones, written
        in order on one thread)."""
        views = [v for v in (view if isinstance(view, list) else [view]) if len(v)]
        while views:
            if at is None:
                done = os.write(self.fd, views[0])
            else:
                done = (
                    os.pwritev(self.fd, views, at)
                    if len(views) > 1
                    else os.pwrite(self.fd, views[0], at)
                )
                at += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if done:
                views[0] = views[0][done:]

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            for k in range(len(self._pending)):
                self._wait(k)  # every earlier buffer is on disk
            if self._staged and self._fill:
                aligned = self._fill - self._fill % ALIGN
                if aligned and self.direct:
                    self._flush(aligned)
                if self.direct:
                    self._buffered()  # the tail is not a whole block
                self._flush(self._fill)
        finally:
            for pending in self._pending:  # after a failure: let no write outlive the fd
                if pending is not None:
                    pending.cancel()
                    try:
                        pending.result()
                    except BaseException:  # noqa: BLE001 - the first error is being raised
                        pass
            os.close(self.fd)
            self.fd = -1


def _umask() -> int:
    """The process's umask: from /proc on Linux (no change to the process), else by setting it
    and restoring it at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ShardedWriter:
    """Write tensors, in a fixed announced order, into a temporary folder beside ``out_dir``.

    Use as a context manager: on a clean exit the folder is moved to ``out_dir``; on any error
    (or a missing tensor) the temporary folder is removed and ``out_dir`` is left untouched.
    Extra files (config, tokenizer, card) go into :attr:`folder` before the context closes.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: Sequence[TensorSpec],
        *,
        shard_size: str | int = "5GB",
        overwrite: bool = False,
        direct_io: bool = True,
    ):
        self.out_dir = Path(out_dir).expanduser().resolve()
        check_destination(self.out_dir, overwrite)
        self.overwrite = overwrite
        self.shards = split_shards(list(specs), parse_size(shard_size))
        self._headers = [_header(shard, {"format": "pt"}) for shard in self.shards]
        # each tensor's first byte in its shard file, and its bytes per row (offset())
        self._places: dict[str, tuple[int, int]] = {}
        for shard, header in zip(self.shards, self._headers, strict=True):
            at = len(header)
            for spec in shard:
                rows = spec.shape[0] if spec.shape else 0
                self._places[spec.name] = (at, spec.nbytes // rows if rows else 0)
                at += spec.nbytes
        self.folder: Path = Path()
        self._order = [s for shard in self.shards for s in shard]
        # the shard files' bytes: headers and tensors (the side files a merge adds are small)
        self.nbytes = sum(map(len, self._headers)) + sum(s.nbytes for s in self._order)
        self._next = 0
        self._rows_done = 0  # rows of the current tensor written so far
        self._file: _StreamFile | None = None
        self._shard = -1
        self._unstaged = 0  # of the shards closed so far (unstaged)
        self._staging: list[torch.Tensor] = []
        self._flusher: ThreadPoolExecutor | None = None
        if direct_io and fcntl is not None and hasattr(os, "O_DIRECT"):
            # page-aligned (private anonymous mappings in huge pages), allocated once for every
            # shard: one fills while the other is written on the flusher thread
            self._staging = [huge_pages(STAGING) for _ in range(2)]
            self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dim3-flush")

    def shard_name(self, i: int) -> str:
        n = len(self.shards)
        return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def __enter__(self) -> ShardedWriter:
        check_room(self.out_dir, self.nbytes)  # before the parent folder is made
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        prefix = f".{self.out_dir.name}{TMP_TAG}{os.getpid()}-"
        self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out_dir.parent))
        # mkdtemp makes the folder private (0700); the finished checkpoint gets the umask's modes
        # like any folder the user creates.
        self.folder.chmod(0o777 & ~_umask())
        return self

    def offset(self, name: str, start: int) -> int:
        """Where row ``start`` of tensor ``name`` goes in its shard file: rows computed into
        memory at this address modulo ``ALIGN`` are written from there, without a copy
        (:class:`_StreamFile`)."""
        at, per_row = self._places[name]
        return at + start * per_row

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the one the plan announced, in dtype and shape."""
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Append rows ``start:start + len(rows)`` of the next tensor (dim 0 of a tensor of one
        or more dims). Rows come in order; the tensor is complete when its last row is written.
        Rows laid out in memory as in the file (:meth:`offset`) are written from where they
        are, without a copy, before this returns (:class:`_StreamFile`)."""
        if self._next >= len(self._order):
            raise RuntimeError(f"unexpected extra tensor {name!r}")
        spec = self._order[self._next]
        got = (name, rows.dtype, tuple(rows.shape[1:]) if rows.dim() else ())
        if got != (spec.name, spec.dtype, tuple(spec.shape[1:])) or start != self._rows_done:
            raise RuntimeError(f"writer expected {spec} from row {self._rows_done}, got {got}")
        if self._rows_done == 0 and (self._file is None or self._shard_done()):
            self._open_next_shard()
        self._file.write(_raw_bytes(rows))
        self._rows_done += rows.shape[0] if rows.dim() else 1
        if not spec.shape or self._rows_done >= spec.shape[0]:
            if spec.shape and self._rows_done != spec.shape[0]:
                raise RuntimeError(f"writer got {self._rows_done} rows for {spec}")
            self._next += 1
            self._rows_done = 0

    def _shard_done(self) -> bool:
        done = sum(len(s) for s in self.shards[: self._shard + 1])
        return self._next >= done

    @property
    def unstaged(self) -> int:
        """Bytes written from the callers' memory, not copied to be written (rows laid out as
        in the file: :meth:`offset`)."""
        return self._unstaged + (self._file.unstaged if self._file is not None else 0)

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._unstaged += self._file.unstaged
        self._shard += 1
        self._file = _StreamFile(
            self.folder / self.shard_name(self._shard), self._staging, self._flusher
        )
        self._file.write(self._headers[self._shard])

    def _write_index(self) -> None:
        if len(self.shards) == 1:
            return
        weight_map = {
            spec.name: self.shard_name(i) for i, shard in enumerate(self.shards) for spec in shard
        }
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self._order)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            try:
                if self._file is not None:
                    self._file.close()
            finally:
                if self._flusher is not None:
                    self._flusher.shutdown(wait=True)
            if exc_type is None:
                if self._next != len(self._order):
                    missing = self._order[self._next].name
                    raise RuntimeError(f"merge ended before writing {missing!r}")
                self._write_index()
                move_into_place(self.folder, self.out_dir)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty destination unless ``overwrite``; refuse a file there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; choose a folder for the merged model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; choose another folder or pass --overwrite"
        )


def check_room(out_dir: Path, nbytes: int) -> None:
    """Refuse, before anything is written, a checkpoint of ``nbytes`` that the file system
    ``out_dir`` goes on (that of its nearest existing folder) has no room for: a merge would
    otherwise fail only when its writes do, minutes into a large one. An old output that
    ``--overwrite`` replaces is removed only once the new one is in place, so it frees nothing
    meanwhile. Another writer can still take the room while the merge runs. Free: what an
    unprivileged process may use (``statvfs``'s ``f_bavail``), the file system's reserve left out."""
    existing = next(p for p in out_dir.parents if p.is_dir())
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"the checkpoint needs {human_size(nbytes)} but the file system of "
            f"{out_dir.parent} has {human_size(free)} free: free some space there or choose "
            "another output folder",
        )


def move_into_place(folder: Path, out_dir: Path) -> None:
    """Atomically replace ``out_dir`` with ``folder`` (same filesystem), old copy removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    try:
        os.replace(folder, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner_alive(rest: str, dead_pids: frozenset[int] = frozenset()) -> bool:
    """Whether the process that made a temporary folder (pid in its name) still runs here;
    ``dead_pids`` are known not to be writing (the calling server at its start-up, whose pid a
    container may reuse from its previous run)."""
    match = _OURS.match(rest)
    if match is None or match.group(1) is None:
        return False
    if int(match.group(1)) in dead_pids:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep it
    return True


def _stale(
    entry: Path, out_dir: Path, tag: str, rest: str, dead_pids: frozenset[int] = frozenset()
) -> bool:
    if not _OURS.match(rest) or entry.is_symlink() or not entry.is_dir():
        return False
    if tag == OLD_TAG and not out_dir.exists():
        return False  # a merge died between the two renames: this is the previous output
    return not _owner_alive(rest, dead_pids)


def remove_stale_temporaries(
    out_dir: str | Path, *, dead_pids: frozenset[int] = frozenset()
) -> list[Path]:
    """Remove the folders a killed merge to ``out_dir`` left beside it; returns those removed.

    Only this tool's: ``.NAME.dim3-tmp-*`` (a partial output) and ``.NAME.dim3-old-*`` (a replaced
    output, removed only once ``NAME`` exists again), exactly as the writer names them, and only
    when the process that made them is no longer running. Nothing else is touched.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        for tag in (TMP_TAG, OLD_TAG):
            prefix = f".{out_dir.name}{tag}"
            if entry.name.startswith(prefix):
                rest = entry.name[len(prefix) :]
                if _stale(entry, out_dir, tag, rest, dead_pids):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


def remove_stale_in_folder(folder: str | Path, *, at_startup: bool = False) -> list[Path]:
    """:func:`remove_stale_temporaries` for every destination directly inside ``folder``.

    For an app's output folder: call it at start-up (``at_startup``: nothing of this process
    is being written yet, so folders carrying its own pid, left by an earlier run that had the
    same pid, are stale too) or before saving into ``folder``.
    """
    dead = frozenset({os.getpid()}) if at_startup else frozenset()
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        return []
    names = set()
    for entry in folder.iterdir():
        match = _ANY_OURS.match(entry.name)
        if match and _OURS.match(match.group("rest")):
            names.add(match.group("name"))
    return [
        p for name in sorted(names) for p in remove_stale_temporaries(folder / name, dead_pids=dead)
    ]
