"""Saved merges belong to the browser session that saved them.

In open mode every visitor may save into the server's one output folder, so a folder name is a
shared thing. :class:`SaveOwners` records which session (Gradio's ``session_hash``) created each
folder in this server's run and what it wrote there (each file's size and modification time):

- a save to a name nobody holds claims it for the saving session; a save to a name another
  session holds, or to a folder that was there before this server started (its owner unknown),
  is refused, with or without Overwrite;
- a push uploads only the folder this session saved, and only while it is exactly what was
  saved (a folder changed behind its back is refused: save again).

Owners live in memory: after a restart, the earlier folders belong to nobody and are never
overwritten from the app. No layout here; ``dim3.ui.share`` calls it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

Fingerprint = tuple[tuple[str, int, int], ...]


class SaveRefused(ValueError):
    """A save or push that would touch another session's folder; says what to do instead."""


def fingerprint(folder: Path) -> Fingerprint:
    """(relative path, size, mtime in ns) of every file under ``folder``, sorted."""
    out = []
    for parent, _, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            st = path.lstat()
            out.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


class SaveOwners:
    """Which session created which output folder in this run, and what it saved there."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}
        self._saved: dict[str, Fingerprint] = {}
        self._lock = threading.Lock()

    def claim(self, name: str, session: str, exists: bool) -> None:
        """Let ``session`` write folder ``name`` or raise :class:`SaveRefused`; a new name is
        claimed for it."""
        with self._lock:
            owner = self._owners.get(name)
            if owner == session:
                return
            if owner is None and not exists:
                self._owners[name] = session
                return
        raise SaveRefused(
            f"a folder named {name!r} already exists in the output folder and was not saved from "
            "this browser session, so it cannot be overwritten from here; choose another name"
        )

    def release(self, name: str, session: str, folder: Path) -> None:
        """Give up a claim whose save failed before any folder was made."""
        with self._lock:
            if self._owners.get(name) == session and not folder.exists():
                del self._owners[name]
                self._saved.pop(name, None)

    def saved(self, name: str, session: str, folder: Path) -> None:
        """Record what ``session`` wrote to ``name`` (for :meth:`check_push`)."""
        print_ = fingerprint(folder)
        with self._lock:
            if self._owners.get(name) == session:
                self._saved[name] = print_

    def check_push(self, folder: Path, session: str) -> None:
        """Raise :class:`SaveRefused` unless ``folder`` is one ``session`` saved, unchanged."""
        name = folder.name
        with self._lock:
            owner, expected = self._owners.get(name), self._saved.get(name)
        if owner != session or expected is None:
            raise SaveRefused("nothing to push yet: save the merge to a folder first")
        if not folder.is_dir() or fingerprint(folder) != expected:
            raise SaveRefused(
                f"the folder {name!r} changed since this session saved it; save it again, then push"
            )
