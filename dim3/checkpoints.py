"""Checkpoints: a Hub id or local folder, resolved to a folder, read lazily tensor by tensor.

This module knows files: where a checkpoint lives, which safetensors shard holds which tensor,
each tensor's shape and dtype (read from the headers, no data loaded), and how to load one tensor.
It knows nothing of model families or merging (it only asks ``dim3.layout`` whether a config names
a layout transformers cannot load). It reads safetensors only: pickle (``.bin``) checkpoints are
refused, and no remote code is ever run.

Damaged downloads are caught when a checkpoint is opened, from the headers and file sizes alone
(cheap: one header read and one ``os.stat`` per shard): a truncated or corrupt shard, a header whose
sizes do not add up, an index naming a missing shard or a tensor its shard lacks, a shard in
another dtype than the rest. Each is one line naming the file and the likely cause; errors the
safetensors library raises later, while reading, are translated the same way.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dim3 import hubcache
from dim3.layout import unconverted_layout
from dim3.sizes import human_size, size_from_env

# The files a merge needs from a Hub repository: weights, their index, configs, tokenizer,
# processor and chat template, and the model card (its license and languages go into the merge's
# card). Never ``*.bin``, ``*.py`` or anything else.
HUB_PATTERNS = [
    "README.md",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]
# What a plan fetches of a Hub repository (:meth:`Checkpoint.headers`): all of the above but the
# weights, whose names, shapes and dtypes it reads from their headers on the Hub instead.
SIDE_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ENV_ROOTS = "DIM3_ALLOWED_ROOTS"
ENV_MAX_DOWNLOAD = "DIM3_MAX_DOWNLOAD"
# What a server (the app, whose local folders are limited to allowed roots) downloads from the Hub
# for one job at most, unless $DIM3_MAX_DOWNLOAD says otherwise: the built-in presets' 7B-11B
# trios (41-53 GB of safetensors) fit; a 24B or 27B trio (about 150 GB), which a Space could
# neither keep on its disk nor merge in its memory, does not. A command run by its user has no
# limit unless the variable sets one.
SERVER_MAX_DOWNLOAD = 60 * 10**9

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on a header's size
REDOWNLOAD = "likely an interrupted or mixed-up download; re-download it"
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or trusted; the message says why and what to do."""


def default_allowed_roots() -> list[Path]:
    """The bundled assets folder and the current working directory."""
    return [Path(__file__).resolve().parent.parent / "assets", Path.cwd()]


def allowed_roots_from_env() -> list[Path]:
    """Local roots the app may read: ``$DIM3_ALLOWED_ROOTS`` (os.pathsep-separated) or defaults."""
    value = os.environ.get(ENV_ROOTS, "").strip()
    if not value:
        return default_allowed_roots()
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def looks_local(ref: str) -> bool:
    """A reference is a local path if it exists or is written like one (absolute, ./, ~)."""
    return (
        ref.startswith(("/", "./", "../", "~", "."))
        or os.path.isdir(os.path.expanduser(ref))
        or not HUB_ID.match(ref)
    )


def check_under_roots(path: Path, roots: Sequence[str | Path]) -> Path:
    """Return ``path`` resolved (symlinks followed) if it lies under one of ``roots``."""
    real = path.expanduser().resolve()
    for root in roots:
        if real.is_relative_to(Path(root).expanduser().resolve()):
            return real
    shown = ", ".join(str(r) for r in roots) or "(none)"
    raise CheckpointError(
        f"local path {str(path)!r} is outside the allowed folders ({shown}); move the checkpoint "
        f"under one of them or add its folder to ${ENV_ROOTS}"
    )


MAX_FOLDER_ENTRIES = 10_000  # a checkpoint folder's files and folders a server checks (links)


def check_links(folder: Path, roots: Sequence[Path], ref: str) -> None:
    """Refuse a checkpoint ``folder`` that holds a symbolic link leading outside ``roots``: a server's allowed folders for a local folder, the repository's
    own folder of the Hub cache for a download (whose files link to its ``blobs``). transformers
    and the engine read what a folder holds by name (configs, tokenizer, processor, templates,
    shards), so every entry is checked, and those of its subfolders (hidden folders are not
    entered), before any is opened. The message names the entry, not where it leads."""
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    seen = 0
    for top, dirs, files in os.walk(folder):
        names = (*dirs, *files)  # each checked, hidden ones too
        # hidden folders (.git, .cache) are not entered: nothing reads what they hold, and an
        # index names only files of its own folder (shard_name_problem)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                raise CheckpointError(
                    f"{ref!r} holds more than {MAX_FOLDER_ENTRIES:,} files and folders; a server "
                    "reads a checkpoint from its own folder: give that folder"
                )
            entry = Path(top) / name
            real = entry.resolve()
            if not any(real.is_relative_to(r) for r in real_roots):
                inside = entry.relative_to(folder)
                raise CheckpointError(
                    f"{ref!r} holds {str(inside)!r}, a link to a file outside the folders this "
                    "server may read; copy the file itself into the checkpoint's folder"
                )


def shard_name_problem(name: object) -> str | None:
    """Why ``name``, a file a shard index names, is not a shard beside the index (None: it
    is): a file name of the index's own folder, as the Hub's indexes write them (a name with
    a folder in it could reach through a link in a folder no check enters)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return "not a file name"
    path = Path(name)
    if path.is_absolute() or name.startswith(("/", "\\", "~")) or "\\" in name:
        return "not a relative file name"
    if ".." in path.parts:
        return "a name that leads out of the checkpoint's folder"
    if len(path.parts) != 1 or name.startswith("."):
        return "not a file of the index's own folder"
    return None


def _resolve_local(ref: str, allowed_roots: Sequence[str | Path] | None) -> Path:
    path = Path(ref).expanduser()
    if allowed_roots is not None:
        path = check_under_roots(path, allowed_roots)
    if not path.exists():
        raise CheckpointError(f"local folder {ref!r} does not exist; check the path")
    if not path.is_dir():
        raise CheckpointError(f"{ref!r} is a file; give the checkpoint's folder instead")
    return path.resolve()


def _hub_error(ref: str, revision: str | None, exc: Exception) -> CheckpointError:
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, errors.GatedRepoError):
        return CheckpointError(
            f"{ref!r} is gated on the Hub: accept its licence on its page and set HF_TOKEN"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return CheckpointError(f"revision {revision!r} does not exist in {ref!r}; check its name")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"no model {ref!r} on the Hub (or it is private: set HF_TOKEN); check the id"
        )
    if isinstance(exc, errors.SafetensorsParsingError):
        return CheckpointError(
            f"{ref!r}{at} has a safetensors header that cannot be read on the Hub: its weights "
            "are damaged or not safetensors; pick another revision or model"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return CheckpointError(
            f"cannot download {ref!r}{at}: the Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE), and it is not in the local cache; connect, or give a local folder"
        )
    return CheckpointError(f"cannot fetch {ref!r}{at} from the Hub: {exc}")


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Hub could not be asked (offline mode, no connection), not
    what it answered: the Hub client's own errors, or its HTTP library's transport errors
    (``httpx``'s ``TransportError``, by name: the client's library is its own choice)."""
    from huggingface_hub import errors

    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, OSError)):
        return True
    return any(c.__name__ == "TransportError" for c in type(exc).__mro__)


def download_limit(server: bool) -> int | None:
    """The most bytes one job may download from the Hub: ``$DIM3_MAX_DOWNLOAD`` (``60GB``,
    ``500MB``; ``0``: no limit), else :data:`SERVER_MAX_DOWNLOAD` for a server and no limit for
    a command."""
    return size_from_env(ENV_MAX_DOWNLOAD, SERVER_MAX_DOWNLOAD if server else None)


_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")  # what git refuses in a ref name


def check_revision(revision: str | None) -> None:
    """Refuse a revision that is no branch, tag or commit name as git writes them: a name with
    ``..``, a leading or trailing ``/``, an empty or dotted part, a backslash, a space or
    ``~^:?*[``. Offline, ``huggingface_hub`` reads ``refs/<revision>`` of the cache and goes to
    the snapshot it names, both without normalising: ``../../x`` would lead a server to any
    folder whose path a file it can read holds."""
    if revision is None:
        return
    parts = revision.split("/")
    if (
        not revision
        or _REF_CHARS.search(revision)
        or "@{" in revision
        or any(not p or p.startswith(".") or p.endswith((".", ".lock")) for p in parts)
    ):
        raise CheckpointError(
            f"revision {revision[:80]!r} is not a branch, tag or commit name (no '..', leading or "
            "trailing '/', backslash, space or ~^:?*[); check it on the model's page"
        )


def _snapshot(
    ref: str, revision: str | None, token: str | None, patterns: list[str] = HUB_PATTERNS, **options
) -> Any:
    """``snapshot_download`` of the files a merge needs (:data:`HUB_PATTERNS`; a plan:
    :data:`SIDE_PATTERNS`), with the token given or ``$HF_TOKEN``: the repository's snapshot
    folder in the Hub cache, refused (:class:`CheckpointError`) if it resolves anywhere else."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    check_revision(revision)
    folder = snapshot_download(
        ref,
        revision=revision,
        allow_patterns=patterns,
        token=_token(token),
        **options,
    )
    if options.get("dry_run") or options.get("local_dir"):
        return folder
    cache = Path(options.get("cache_dir") or constants.HF_HUB_CACHE)
    snapshots = (cache / repo_folder_name(repo_id=ref, repo_type="model") / "snapshots").resolve()
    real = Path(folder).resolve()
    if real.parent != snapshots:
        raise CheckpointError(
            f"{ref!r}: the Hub cache's entry for it does not lead to one of its snapshots (a "
            "damaged or edited cache); delete the model from the cache (`hf cache delete`) and "
            "download it again"
        )
    return real


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def _quiet_tqdm() -> type:
    """A progress bar class that shows nothing: a dry run's "Fetching N files" is not news."""
    from tqdm import tqdm

    class Quiet(tqdm):  # not huggingface_hub's subclass: that one decides for itself
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def hub_download_size(
    ref: str, revision: str | None, token: str | None, *, weights: bool = True
) -> int | None:
    """The bytes that fetching the Hub id ``ref`` would download (the files of
    :data:`HUB_PATTERNS` not in the Hub cache yet; without ``weights``, those but the
    safetensors shards: what a plan fetches, :meth:`Checkpoint.headers`), asked of the Hub
    without downloading any (``snapshot_download``'s dry run: the file list and one ``HEAD``
    per missing file).

    What the Hub refuses (a missing, gated or private repo, a missing revision) and a repo
    without safetensors weights raise here, with the fix, before any other checkpoint of the
    job is downloaded. None where the Hub cannot say (offline, unreachable): the download then
    uses the cache or reports it as usual."""
    from huggingface_hub import constants, errors

    if constants.is_offline_mode():
        return None
    try:
        files = _snapshot(ref, revision, token, dry_run=True, tqdm_class=_quiet_tqdm())
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many types
        refused = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)  # gated too
        cause: BaseException | None = exc
        while cause is not None:  # a dry run wraps the Hub's answer (DryRunError from ...)
            if isinstance(cause, refused):
                raise _hub_error(ref, revision, cause) from None
            cause = cause.__cause__
        return None
    if not any(f.filename.endswith(".safetensors") and "/" not in f.filename for f in files):
        _refuse_pickle_repo(ref, revision, token)
    return sum(
        f.file_size or 0
        for f in files
        if f.will_download and (weights or not f.filename.endswith(".safetensors"))
    )


def check_downloads(
    sources: Sequence[tuple[str, str | None]],
    *,
    token: str | None = None,
    server: bool = False,
    output: tuple[Path, Callable[[], int | None]] | None = None,
    weights: bool = True,
) -> int:
    """Refuse, before anything is downloaded, the Hub checkpoints among ``sources`` (ref,
    revision) whose downloads together pass :func:`download_limit` or do not fit on the file
    system of the Hub cache: a merge from Hub ids would otherwise fail only when the disk
    fills, part-way into the second or third download, leaving partial files in the cache, and
    on a shared server after taking the disk from every other visitor. Returns the bytes to
    download (0 when all are local, cached, or the Hub cannot say). Room: what an unprivileged
    process may use (``statvfs``'s ``f_bavail``); another download can still take it meanwhile.

    ``output``: (the folder a merge will write, a function giving its bytes or None), asked
    only when something is to be downloaded. On the Hub cache's file system the two must fit
    together; elsewhere the output must fit where it goes (as the writer will check, hours of
    downloading later for a large model). Without ``weights``: the files but the weights, which
    a plan fetches (:func:`hub_download_size`).
    """
    refs = [((ref or "").strip(), rev) for ref, rev in sources]
    hub = [(ref, rev) for ref, rev in dict.fromkeys(refs) if ref and not looks_local(ref)]
    if not hub:  # local folders only: the Hub client is not even imported
        return 0
    from huggingface_hub import constants

    sizes = [
        (ref, n) for ref, rev in hub if (n := hub_download_size(ref, rev, token, weights=weights))
    ]
    total = sum(n for _, n in sizes)
    if not total:
        return 0
    what = ", ".join(f"{ref} ({human_size(n)})" for ref, n in sizes)
    limit = download_limit(server)
    if limit is not None and total > limit:
        raise CheckpointError(
            f"downloading {what} from the Hub would take {human_size(total)}, more than the "
            f"{human_size(limit)} one job may download here (${ENV_MAX_DOWNLOAD}): choose "
            "smaller checkpoints, or run the merge on your own machine"
        )
    cache = Path(constants.HF_HUB_CACHE).expanduser()
    existing = _existing(cache)
    free = shutil.disk_usage(existing).free
    written = output[1]() if output is not None else None
    same_disk = bool(
        output is not None
        and written
        and os.stat(_existing(Path(output[0]))).st_dev == os.stat(existing).st_dev
    )
    bounds = hubcache.policy() if server else None
    if bounds is not None:  # a server keeping its cache within bounds: the oldest make room
        try:
            gone = hubcache.make_room(
                cache,
                total,
                [ref for ref, _ in hub],
                free=free - ((written or 0) if same_disk else 0),
                limit=bounds.limit,
            )
        except hubcache.CacheFull as exc:
            raise CheckpointError(str(exc)) from None
        if gone:
            free = shutil.disk_usage(existing).free
    if total > free:
        raise CheckpointError(
            f"downloading {what} from the Hub needs {human_size(total)} but the file system of "
            f"the Hub cache ({cache}) has {human_size(free)} free: free some space there (`hf "
            "cache rm`), point HF_HUB_CACHE at a disk with room, or give local folders"
        )
    if output is not None and written:
        folder = Path(output[0])
        if not same_disk:
            from dim3.writer import check_room  # a module above this one's

            check_room(folder, written)
        elif total + written > free:
            raise CheckpointError(
                f"downloading {what} from the Hub needs {human_size(total)} and the merged "
                f"model {human_size(written)} more, {human_size(total + written)} in all, but "
                f"the file system of the Hub cache ({cache}) and of {folder.parent} has "
                f"{human_size(free)} free: free some space there, point HF_HUB_CACHE at another "
                "disk, or choose an output folder on another disk"
            )
    return total


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    return next(p for p in (path, *path.parents) if p.is_dir())


# One job's Hub downloads at a time in this process (an app's visitors): each is sized against
# the room its disk has once the one before it is done, and they do not split the link.
DOWNLOADS = threading.Lock()


class DownloadMeter:
    """The bytes a job's Hub downloads have written, told to ``report(done, total)`` at most
    ``per_second`` times a second (and at the end). An exception ``report`` raises (a closed
    browser tab, a spent time budget) stops every download of the job where it is, and
    :func:`resolve` raises it as it was. The bytes are read off ``snapshot_download``'s
    progress bar for the bytes written (its bar class, :meth:`bar`), which it updates from
    every download thread."""

    BAR = "huggingface_hub.snapshot_download"  # that bar's name; the others are not counted

    def __init__(self, total: int, report: Callable[[int, int], None], per_second: float = 5):
        self.total, self.report, self.every = total, report, 1 / per_second
        self.done = 0
        self.raised: BaseException | None = None
        self._lock = threading.Lock()
        self._shown = 0.0

    def add(self, n: int) -> None:
        if self.raised is not None:
            raise self.raised
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._shown < self.every and self.done < self.total:
                return
            self._shown = now
            done = max(0, min(self.done, self.total))
        try:
            self.report(done, self.total)
        except BaseException as exc:
            self.raised = exc
            raise

    def bar(self) -> type:
        """A ``tqdm_class`` for ``snapshot_download`` that shows nothing and counts."""
        from huggingface_hub.utils import tqdm as hub_tqdm

        meter = self

        class Counted(hub_tqdm):  # the Hub's subclass: it is handed each bar's name
            def __init__(self, *args, **kwargs):
                self.counted = kwargs.get("name") == DownloadMeter.BAR
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                if self.counted and n:
                    meter.add(int(n))
                return super().update(n)

        return Counted


def _resolve_hub(
    ref: str,
    revision: str | None,
    token: str | None,
    *,
    sized: bool,
    server: bool,
    meter: DownloadMeter | None = None,
) -> Path:
    if not sized:
        check_downloads([(ref, revision)], token=token, server=server)
    try:
        bars = {"tqdm_class": meter.bar()} if meter is not None else {}
        with hubcache.hold([ref]):  # not deleted for another job while it downloads
            folder = _snapshot(ref, revision, token, **bars)
    except Exception as exc:  # the Hub client raises many types; each is mapped to a message
        if meter is not None and meter.raised is not None:
            raise meter.raised from None  # the job was stopped: say why, not where
        raise _hub_error(ref, revision, exc) from exc
    folder = Path(folder)
    _refuse_unconverted(folder, ref)
    if not any(folder.glob("*.safetensors")):
        _refuse_pickle_repo(ref, revision, token)
    return folder


def _refuse_pickle_repo(ref: str, revision: str | None, token: str | None) -> None:
    """A Hub repo without safetensors: say so, naming its pickle files when the Hub answers."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(ref, revision=revision, token=token or None)
    except Exception:  # offline or unreachable: the generic message below still holds
        files = []
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    kind = (
        f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no safetensors weights"
    )
    raise CheckpointError(
        f"{ref!r} has {kind}; DiM3 reads safetensors only, since pickle can run code: pick a "
        "revision with safetensors (many repos have a refs/pr/N conversion) or convert it first"
    )


def resolve(
    ref: str,
    revision: str | None = None,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    sized: bool = False,
    meter: DownloadMeter | None = None,
) -> Path:
    """Resolve a Hub id (with optional revision) or a local folder to a local folder.

    Local folders must lie under ``allowed_roots`` when it is given (None allows any path, as
    the command line does). Hub downloads fetch only safetensors, configs, tokenizer, processor
    and chat template files, honour ``HF_TOKEN`` and offline mode, and never log the token.
    A download is sized first and refused if it does not fit (:func:`check_downloads`; a
    server, one given ``allowed_roots``, has a limit by default), unless ``sized``: the
    caller checked it with the job's other downloads. ``meter`` hears the bytes downloaded.
    """
    ref = (ref or "").strip()
    if not ref:
        raise CheckpointError("no checkpoint given: enter a Hub id (org/name) or a local folder")
    check_revision(revision)
    if looks_local(ref):
        if revision:
            raise CheckpointError(f"a revision ({revision!r}) applies to Hub ids, not {ref!r}")
        folder = _resolve_local(ref, allowed_roots)
        if allowed_roots is not None:
            check_links(folder, [Path(r) for r in allowed_roots], ref)
        return folder
    folder = _resolve_hub(
        ref, revision, token, sized=sized, server=allowed_roots is not None, meter=meter
    )
    if allowed_roots is not None and len(folder.parents) > 2:  # the repo's folder of the cache
        check_links(folder, [folder.parents[1]], ref)
    return folder


def _refuse_unconverted(folder: Path, ref: str) -> None:
    """Refuse, by its config's ``architectures``, a layout transformers cannot load."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # no or unreadable config: reported where the config is read
    reason = unconverted_layout(config) if isinstance(config, dict) else None
    if reason:
        raise CheckpointError(f"{ref}: {reason}")


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` from one shard's header, checked against the file's size.

    Raises CheckpointError naming the file and the likely cause when the file is truncated or
    longer than its header says, the header is not valid JSON, or its offsets and sizes disagree.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= MAX_HEADER else b""
    if n < 0 or n > MAX_HEADER:
        what = "is empty" if size == 0 else "does not start with a safetensors header"
        raise CheckpointError(f"{file} {what} (corrupt or truncated): {REDOWNLOAD}")
    if len(raw) < n:
        raise CheckpointError(
            f"{file} is truncated ({size} bytes, shorter than its own header): {REDOWNLOAD}"
        )
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        tensors, end = _check_offsets(entries)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{file} has a corrupt header ({exc}): {REDOWNLOAD}") from None
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(
            f"{file} is truncated ({size} bytes; its header describes {expected}): {REDOWNLOAD}"
        )
    if size > expected:
        raise CheckpointError(
            f"{file} is {size - expected} bytes longer than its header describes ({expected}): "
            f"corrupt; {REDOWNLOAD}"
        )
    return tensors


def _check_offsets(entries: dict) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """Each tensor's bytes match its dtype and shape; the data is covered without gap or overlap."""
    tensors, spans = {}, []
    for key, info in entries.items():
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {key!r} has unknown dtype {dtype}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValueError(
                f"tensor {key!r} is {dtype} {list(shape)} but its offsets span {end - begin} bytes"
            )
        tensors[key] = (dtype, shape)
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            raise ValueError(f"tensor {key!r} starts at byte {begin}, not {pos}")
        pos = end
    return tensors, pos


def _dominant_dtype(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """The floating-point dtype holding most of a shard's bytes."""
    weight: dict[str, int] = {}
    for dtype, shape in tensors.values():
        if dtype.startswith(("F", "BF")):
            weight[dtype] = weight.get(dtype, 0) + math.prod(shape) * DTYPE_BYTES[dtype]
    return max(weight, key=weight.__getitem__) if weight else None


def _check_shard_dtypes(
    headers: dict[Path, dict], total_size: int | None, declared: str | None
) -> None:
    """Refuse a shard whose dtype differs from the others' when the index's size disagrees too.

    Mixed dtypes alone are legitimate (Llama-2-7b-hf keeps its rotary buffers in float32); a shard
    replaced by a conversion in another dtype also changes the bytes the index announces.
    """
    dominant = {file: _dominant_dtype(tensors) for file, tensors in headers.items()}
    kinds = [d for d in dominant.values() if d]
    if len(set(kinds)) < 2:
        return
    stored = sum(
        math.prod(shape) * DTYPE_BYTES[dtype]
        for tensors in headers.values()
        for dtype, shape in tensors.values()
    )
    if total_size is not None and total_size == stored:
        return
    usual = declared if declared in kinds else max(set(kinds), key=kinds.count)
    odd = next(f for f, d in dominant.items() if d and d != usual)
    said = "" if total_size is None else f"; the index announces {total_size} bytes, not {stored}"
    raise CheckpointError(
        f"{odd} holds {dominant[odd]} tensors but the other shards hold {usual}{said}: it "
        "belongs to another download or conversion of the model; re-download it"
    )


def _declared_dtype(config: dict) -> str | None:
    """The safetensors dtype name ``config.json`` declares (``torch_dtype`` or ``dtype``), if any."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (config, text):
        for field in ("torch_dtype", "dtype"):
            name = cfg.get(field)
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            for key, value in SAFETENSORS_DTYPES.items():
                if value == dtype:
                    return key
    return None


def _read_index(index: Path) -> tuple[dict[str, str], int | None]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = dict(data["weight_map"].items())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({exc}): {REDOWNLOAD}") from None
    for key, name in weight_map.items():
        problem = shard_name_problem(name)
        if problem:
            shown = repr(name)[:80]
            raise CheckpointError(
                f"{index} places {str(key)[:80]!r} in {shown}, {problem}: an index names shards "
                "beside it; the index is damaged or was edited"
            )
    weight_map = {str(k): str(v) for k, v in weight_map.items()}
    meta = data.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    try:
        return weight_map, int(total) if total is not None else None
    except (TypeError, ValueError):
        return weight_map, None  # an unreadable size is no reason to refuse the weights


def _weight_files(
    path: Path, config: dict
) -> tuple[dict[str, Path], dict[str, tuple[str, tuple[int, ...]]]]:
    """Each tensor's shard and ``(dtype, shape)``, from the index if present, else the headers.

    Every shard's header is read and checked against its file size; the index must agree with
    the headers.
    """
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map, total_size = _read_index(index)
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{path / missing[0]} is missing (named by {index.name}"
                + (f", with {len(missing) - 1} more" if len(missing) > 1 else "")
                + f"): {REDOWNLOAD}"
            )
        files = sorted({path / f for f in weight_map.values()})
    else:
        weight_map, total_size = {}, None
        files = sorted(path.glob("*.safetensors"))
    if not files:
        _refuse_no_safetensors(path)
    headers = {file: read_header(file) for file in files}
    if index.exists():
        for key, name in weight_map.items():
            if key not in headers[path / name]:
                raise CheckpointError(
                    f"{path / name} does not hold {key!r}, which {index.name} places there: "
                    f"the shard and the index come from different versions; {REDOWNLOAD}"
                )
        _check_shard_dtypes(headers, total_size, _declared_dtype(config))
        mapping = {key: path / name for key, name in weight_map.items()}
    else:
        _check_shard_dtypes(headers, None, _declared_dtype(config))
        mapping = {}
        for file, tensors in headers.items():
            for key in tensors:
                if key in mapping:
                    raise CheckpointError(f"tensor {key!r} appears in two shards of {path}")
                mapping[key] = file
    info = {key: headers[file][key] for key, file in mapping.items()}
    return mapping, info


def _refuse_no_safetensors(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); DiM3 reads "
            "safetensors only, since pickle can run code: use a safetensors revision of "
            "the model (many Hub repos have one) or convert it yourself first"
        )
    raise CheckpointError(f"{path} has no *.safetensors weights; is it a model folder?")


def _read_error(file: Path, exc: Exception, key: str | None = None) -> CheckpointError:
    """A safetensors or OS error while reading ``file``, as one line with its likely cause."""
    what = f"reading {key!r} from {file}" if key else f"opening {file}"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"{what} failed: the file is gone ({detail}); re-download it")
    return CheckpointError(
        f"{what} failed ({detail}): the file is damaged or changed since it was opened; "
        f"{REDOWNLOAD}"
    )


class Checkpoint:
    """Lazy, read-only access to one checkpoint's tensors and config.

    Shapes and dtypes come from the safetensors headers; a tensor's data is read only by
    :meth:`get`. One ``safe_open`` handle per shard stays open until :meth:`close`.
    """

    def __init__(self, path: Path, ref: str | None = None, revision: str | None = None):
        self.path = Path(path)
        self.ref = ref or str(path)
        self.revision = revision
        config = self.path / "config.json"
        if not config.exists():
            raise CheckpointError(f"{self.path} has no config.json; is it a model folder?")
        try:
            self.config: dict = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{config} is not valid JSON ({exc}): {REDOWNLOAD}") from None
        _refuse_unconverted(self.path, self.ref)
        self._files, self._info = _weight_files(self.path, self.config)
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(
        cls,
        ref: str,
        revision: str | None = None,
        *,
        allowed_roots: Sequence[str | Path] | None = None,
        token: str | None = None,
        sized: bool = False,
    ) -> Checkpoint:
        """Resolve ``ref`` (Hub id or local folder) and open it lazily (``sized``: see
        :func:`resolve`)."""
        path = resolve(ref, revision, allowed_roots=allowed_roots, token=token, sized=sized)
        return cls(path, ref=ref, revision=revision)

    @classmethod
    def headers(
        cls,
        ref: str,
        revision: str | None = None,
        *,
        allowed_roots: Sequence[str | Path] | None = None,
        token: str | None = None,
    ) -> Checkpoint:
        """:meth:`open` for a plan, which reads the headers and one small tensor, not the
        weights: a Hub id whose weights the cache lacks is not downloaded whole. Its other files
        are (config, tokenizer, index: :data:`SIDE_PATTERNS`), its tensors' names, shapes and
        dtypes are read from the shards' headers on the Hub (``get_safetensors_metadata``, a
        few kB a shard), and :meth:`get` reads a tensor's bytes from the Hub (a range of its
        shard). A 70B trio's plan then reads tens of MB (headers, three 8192 x 1024 matrices),
        where it downloaded 400 GB.
        Local folders, a Hub id whose weights are all in the cache, and a Hub the client cannot
        ask (offline) open as :meth:`open` does. The caller sized the side files' downloads
        (:func:`check_downloads` without ``weights``)."""
        ref = (ref or "").strip()
        if not ref or looks_local(ref):  # (before the Hub client's import: a second or so)
            return cls.open(ref, revision, allowed_roots=allowed_roots, token=token, sized=True)
        from huggingface_hub import HfApi, constants, errors

        refused = (
            errors.RepositoryNotFoundError,  # gated and private too
            errors.RevisionNotFoundError,
            errors.SafetensorsParsingError,
        )
        try:
            if constants.is_offline_mode():
                raise errors.OfflineModeIsEnabled("offline")
            folder = Path(_snapshot(ref, revision, token, SIDE_PATTERNS))
            if _cached_weights(folder):  # read there, as a merge would: nothing more to ask
                return cls(folder, ref=ref, revision=revision)
            commit = folder.name if folder.parent.name == "snapshots" else revision
            meta = HfApi().get_safetensors_metadata(ref, revision=commit, token=_token(token))
        except errors.NotASafetensorsRepoError:
            _refuse_pickle_repo(ref, revision, token)
            raise  # (it raises)
        except refused as exc:
            raise _hub_error(ref, revision, exc) from exc
        except Exception as exc:  # noqa: BLE001 - the Hub client raises many types
            if not _unreachable(exc):
                raise _hub_error(ref, revision, exc) from exc
            # offline or unreachable: the cache, as a download would use it (or why not)
            return cls.open(ref, revision, allowed_roots=allowed_roots, token=token, sized=True)
        return _HubHeaders(folder, ref, revision, commit, meta, token)

    @property
    def commit(self) -> str | None:
        """The Hub commit hash of a downloaded snapshot, or None for a local folder."""
        parent = self.path.parent
        return self.path.name if parent.name == "snapshots" else None

    def _handle(self, key: str):
        try:
            file = self._files[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in {self.ref}") from None
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, "pt")
            except (SafetensorError, OSError) as exc:
                raise _read_error(file, exc) from None
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names, grouped by shard (the order that reads them fastest)."""
        return sorted(self._files, key=lambda k: (str(self._files[k]), k))

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def _entry(self, key: str) -> tuple[str, tuple[int, ...]]:
        try:
            return self._info[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in {self.ref}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        name = self._entry(key)[0]
        try:
            return SAFETENSORS_DTYPES[name]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} has unsupported dtype {name}") from None

    def nbytes(self, key: str) -> int:
        numel = 1
        for n in self.shape(key):
            numel *= n
        return numel * self.dtype(key).itemsize

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU, its stored dtype)."""
        handle = self._handle(key)
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise _read_error(self._files[key], exc, key) from None

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (CPU, stored dtype), read without loading the rest."""
        return self._handle(key).get_slice(key)[start:stop]

    def file_of(self, key: str) -> Path:
        return self._files[key]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self._files)} tensors)"


def _cached_weights(folder: Path) -> bool:
    """Whether the snapshot ``folder`` holds every shard its index names (or, without an
    index, a ``model.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return (folder / "model.safetensors").is_file()
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False  # the metadata's reading says what is wrong with it
    if not shards or any(shard_name_problem(n) for n in shards):
        return False  # the metadata's reading says what is wrong with it
    return all((folder / n).is_file() for n in shards)


class _HubHeaders(Checkpoint):
    """A Hub checkpoint whose weights are not downloaded (:meth:`Checkpoint.headers`): its
    side files in ``path`` (a snapshot of the Hub cache), its tensors from ``meta`` (a
    ``SafetensorsRepoMetadata``), a tensor's bytes from the Hub as a range of its shard."""

    def __init__(
        self, path: Path, ref: str, revision: str | None, commit: str | None, meta: Any, token
    ):
        self.path, self.ref, self.revision = Path(path), ref, revision
        config = self.path / "config.json"
        try:
            self.config = json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{ref} has no config.json; is it a model repository?") from None
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{ref}'s config.json is not valid JSON ({exc})") from None
        _refuse_unconverted(self.path, self.ref)
        self._commit, self._token = commit, token
        self._shard: dict[str, str] = {}  # tensor -> its shard's file name in the repo
        self._offsets: dict[str, tuple[int, int]] = {}
        headers: dict[Path, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for name, file in sorted(meta.files_metadata.items()):
            tensors = headers.setdefault(self.path / name, {})
            for key, t in file.tensors.items():
                if key in self._shard:
                    raise CheckpointError(f"tensor {key!r} appears in two shards of {ref}")
                tensors[key] = (t.dtype, tuple(int(n) for n in t.shape))
                self._shard[key], self._offsets[key] = name, tuple(t.data_offsets)
        if not self._shard:
            raise CheckpointError(f"{ref} has no tensors in its safetensors headers")
        total = (meta.metadata or {}).get("total_size") if meta.sharded else None
        try:
            total = int(total) if total is not None else None
        except (TypeError, ValueError):
            total = None
        _check_shard_dtypes(headers, total, _declared_dtype(self.config))
        self._files = {key: self.path / name for key, name in self._shard.items()}
        self._info = {key: headers[self._files[key]][key] for key in self._shard}
        self._handles = {}
        self._starts: dict[str, int] = {}  # shard -> where its data begins (8 + header)

    @property
    def commit(self) -> str | None:
        return self._commit

    def _range(self, name: str, first: int, last: int) -> bytes:
        """Bytes ``first..last`` (inclusive) of shard ``name`` on the Hub."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.ref, name, revision=self._commit or self.revision)
        headers = {**build_hf_headers(token=_token(self._token)), "range": f"bytes={first}-{last}"}
        try:
            response = get_session().get(url, headers=headers, timeout=60)
            hf_raise_for_status(response)
        except Exception as exc:  # noqa: BLE001 - the Hub client raises many types
            raise _hub_error(self.ref, self.revision, exc) from exc
        data = response.content
        if len(data) != last - first + 1:
            raise CheckpointError(
                f"the Hub sent {len(data)} bytes of {self.ref}'s {name} where {last - first + 1} "
                "were asked for: the file changed on the Hub, or the link was cut; try again"
            )
        return data

    def get(self, key: str) -> torch.Tensor:
        """One tensor (CPU, its stored dtype): from the cache if its shard is there, else its
        bytes from the Hub."""
        dtype = self.dtype(key)
        if self._files[key].is_file():
            return super().get(key)
        name = self._shard[key]
        if name not in self._starts:
            (n,) = struct.unpack("<Q", self._range(name, 0, 7))
            self._starts[name] = 8 + n
        begin, end = self._offsets[key]
        shape = self.shape(key)
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.ref}'s {name} gives {key!r} a size that its shape denies")
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        data = self._range(name, self._starts[name] + begin, self._starts[name] + end - 1)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.get(key)[start:stop]
