"""A server's Hub cache, kept within bounds: the least recently used checkpoints make room.

Every visitor of a server shares its Hub cache, and each job's downloads stay in it. Without
eviction they add up until the disk refuses the next visitor's download (``hf cache rm`` by the
server's owner). Where ``$DIM3_MAX_HUB_CACHE`` is set (a size, ``100GB``), a server keeps the
cache within it: before a job downloads, the cached repositories used least recently are deleted
until the job's downloads fit, both under that size and in the free space of the cache's disk
(:func:`policy`).

Partial downloads (``*.incomplete``, what a stopped job leaves) count and go in the same order,
by when they were last written. Only model repositories are deleted (not datasets). Never deleted: the job's own repositories
(what it downloads and what it already has cached), the current heavy job's (:func:`job`) and
those :func:`hold` marks as in use (a download or a model load running on another thread). Use is
when this process last resolved a repository, or else the newest access time of its files (what
``huggingface_hub.scan_cache_dir`` reports; a disk mounted ``noatime`` keeps only the download's).
Deleting goes through ``huggingface_hub``'s own cache manager (``delete_revisions``), which removes
a repository's snapshots, references and blobs. A file another thread has open or mapped stays
readable until it is closed (POSIX unlink), so a model already loaded keeps working.

Unset, a server on a Hugging Face Space (``$SPACE_ID``), whose cache is its own, deletes only when
its disk is short; anywhere else nothing is ever deleted: on a user's own machine the cache is
shared with their other tools. ``0``: nothing, anywhere. Only a server (the app) deletes; the
command line never does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dim3.sizes import human_size, size_from_env

ENV_MAX_HUB_CACHE = "DIM3_MAX_HUB_CACHE"

log = logging.getLogger(__name__)

_LOCK = threading.Lock()  # one eviction at a time, and the tables below
_EVICTING = threading.Lock()
_USED: dict[str, float] = {}  # repository id -> when this process last used it (time.time)
MAX_TRACKED = 4096  # the most repositories _USED remembers (the most recently used)
_HELD: Counter[str] = Counter()  # repository id -> how many holds are open on it
_JOB: set[str] = set()  # the repositories of the server's current heavy job (see job())


class CacheFull(ValueError):
    """A job's downloads cannot be made to fit the Hub cache; says why and what to do."""


@dataclass(frozen=True)
class Evicted:
    """A repository, or a partial download of one, deleted from the cache to make room: its id,
    its bytes on disk, and the time (``time.time``) it was last used (a partial download: last
    written)."""

    repo_id: str
    nbytes: int
    last_used: float
    partial: bool = False  # a partial download of it, not the repository


@dataclass(frozen=True)
class Policy:
    """What a server may delete from its Hub cache: ``limit`` (bytes the cache may hold in
    all; None: no bound but its disk)."""

    limit: int | None


def policy() -> Policy | None:
    """A server's policy for its Hub cache, from ``$DIM3_MAX_HUB_CACHE``: a size (``100GB``)
    keeps the cache under it and its downloads in the disk's free space; ``0``: nothing is
    deleted. Unset: on a Hugging Face Space (``$SPACE_ID``, which Spaces set), whose cache is its
    own, the least recently used make room only when the disk is short; elsewhere (a user's
    own machine, whose cache other tools share) nothing is deleted. None: nothing is."""
    import os

    raw = os.environ.get(ENV_MAX_HUB_CACHE, "").strip()
    if not raw:
        return Policy(None) if os.environ.get("SPACE_ID") else None
    limit = size_from_env(ENV_MAX_HUB_CACHE, None)
    return None if limit is None else Policy(limit)


def _touch(ids: Iterable[str]) -> None:
    """Record (``_LOCK`` held) that ``ids`` were used now. Visitors name any string, so the
    table keeps the ``MAX_TRACKED`` most recent; one forgotten is ordered by its files' times."""
    now = time.time()
    for r in ids:
        _USED.pop(r, None)  # re-inserted last: the dict stays in order of use
        _USED[r] = now
    while len(_USED) > MAX_TRACKED:
        del _USED[next(iter(_USED))]


@contextmanager
def hold(repo_ids: Iterable[str]) -> Iterator[None]:
    """While inside, none of ``repo_ids`` is deleted to make room for another job."""
    ids = [r for r in dict.fromkeys(repo_ids) if r]
    with _LOCK:
        _HELD.update(ids)
        _touch(ids)
    try:
        yield
    finally:
        with _LOCK:
            _HELD.subtract(ids)
            for r in ids:
                if _HELD[r] <= 0:
                    del _HELD[r]
            _touch(ids)


def job(repo_ids: Iterable[str]) -> None:
    """Mark ``repo_ids`` as the current heavy job's, in place of the last job's. A server runs
    one heavy job (merge, save, evaluation, sweep, diagnosis) at a time, and each downloads its
    checkpoints first: from then until the next job's download they are not deleted, whoever
    needs room (a chat's model on another thread), so a job reading its inputs for an hour
    keeps them."""
    ids = {r for r in repo_ids if r}
    with _LOCK:
        _JOB.clear()
        _JOB.update(ids)
        _touch(ids)


def make_room(
    cache: Path,
    needed: int,
    keep: Collection[str],
    *,
    free: int,
    limit: int | None,
) -> list[Evicted]:
    """Delete the least recently used model repositories of ``cache`` (not in ``keep``, not
    held, not the current job's) until ``needed`` more bytes fit: the cache then holds at most
    ``limit`` bytes (None: no bound) and its disk has ``needed`` bytes free (``free``: what it
    has now, less anything else the job will write there). Returns what was deleted, oldest
    first; nothing when it fits already. :class:`CacheFull` when it cannot fit, before anything
    is deleted."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import DeleteCacheStrategy

    if limit is not None and needed > limit:
        raise CacheFull(
            f"this job's downloads ({human_size(needed)}) are more than the server's Hub cache "
            f"may hold ({human_size(limit)}, ${ENV_MAX_HUB_CACHE}): choose smaller checkpoints, "
            "or run the merge on your own machine"
        )
    with _EVICTING:
        if not cache.is_dir():
            return []
        info = scan_cache_dir(cache)
        partial = info.incomplete_size_on_disk  # stopped downloads: not in size_on_disk
        held_now = info.size_on_disk + partial
        over = held_now + needed - limit if limit is not None else 0
        short = max(over, needed - free, 0)
        if short <= 0:
            return []
        with _LOCK:
            busy = set(keep) | {r for r, n in _HELD.items() if n > 0} | _JOB
            seen = dict(_USED)
        # A repository, or a partial download (a job stopped by its budget or its visitor left
        # it; only a later download of the same file resumes it), each when it was last used.
        candidates: list[tuple[float, str, Any]] = [
            (max(repo.last_accessed, repo.last_modified, seen.get(repo.repo_id, 0.0)), "", repo)
            for repo in info.repos
            if repo.repo_type == "model" and repo.repo_id not in busy
        ]
        for f in info.incomplete_files:
            repo_id = _repo_id(f.file_path)
            if repo_id is not None and repo_id not in busy:
                try:
                    when = f.file_path.stat().st_mtime
                except OSError:
                    continue  # finished or removed meanwhile
                candidates.append((max(when, seen.get(repo_id, 0.0)), repo_id, f))
        candidates.sort(key=lambda c: c[0])
        # One repository's deletion at a time: ``delete_revisions`` finds revisions by commit
        # hash in whichever repository it meets first, and two repositories can share commits
        # (a duplicate, a mirror). Its own figure of the bytes freed counts a blob another
        # repository shares only once it is freed.
        chosen: list[tuple[float, str, Any, DeleteCacheStrategy | None, int]] = []
        gone_repos: set[str] = set()
        freed = 0
        for when, of, item in candidates:
            if freed >= short:
                break
            if of:  # a partial download, unless its repository went already (with it)
                if of not in gone_repos:
                    chosen.append((when, of, item, None, item.size_on_disk))
                    freed += item.size_on_disk
                continue
            alone = replace(info, repos=frozenset({item}))
            strategy = alone.delete_revisions(*(r.commit_hash for r in item.revisions))
            chosen.append((when, item.repo_id, item, strategy, strategy.expected_freed_size))
            gone_repos.add(item.repo_id)
            freed += strategy.expected_freed_size
        if freed < short:
            movable = sum(c[2].size_on_disk for c in candidates)
            kept = max(held_now - movable, 0)
            bound = (
                f" of the {human_size(limit)} it may hold (${ENV_MAX_HUB_CACHE})"
                if limit is not None
                else ""
            )
            raise CacheFull(
                f"this job's downloads need {human_size(needed)}, and the server's Hub cache "
                f"cannot make room: it holds {human_size(held_now)} "
                f"({human_size(kept)} of it checkpoints in use now, this job's own included)"
                f"{bound}, with {human_size(max(free, 0))} free on its disk: try again later, "
                "choose smaller checkpoints, or run the merge on your own machine"
            )
        gone = []
        for when, repo_id, item, strategy, nbytes in chosen:
            if strategy is not None:
                strategy.execute()
            else:
                item.file_path.unlink(missing_ok=True)
            gone.append(Evicted(repo_id, nbytes, when, partial=strategy is None))
        with _LOCK:
            for e in gone:
                if not e.partial:
                    _USED.pop(e.repo_id, None)
        for e in gone:  # the server's log: which visitor's checkpoint was not said to another
            log.info(
                "Hub cache: deleted %s%s (%s, last used %s) to make room",
                "a partial download of " if e.partial else "",
                e.repo_id,
                human_size(e.nbytes),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
            )
        return gone


def _repo_id(blob: Path) -> str | None:
    """The model repository a file of the cache belongs to (``models--org--name/blobs/...``,
    as ``huggingface_hub`` names its folders), else None (a dataset's, a space's)."""
    folder = blob.parent.parent.name
    if not folder.startswith("models--"):
        return None
    return folder.removeprefix("models--").replace("--", "/")
