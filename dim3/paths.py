"""Paths the app shows and writes: save destinations that stay inside their folder, and paths
as visitors may see them.

This module knows the file system and the app's allowed folders. It does not know Gradio or
models. ``save_destination`` is the app's guard for "Save to folder": the engine's writer
(``dim3.writer``) resolves its destination, so a symbolic link would lead it out of the output
folder; the check is made here, on the unresolved path, before the writer runs.
``public_path`` and ``redact_paths`` keep absolute server paths out of what visitors read.

``allowed_file`` is the one check for files a visitor names, directly (a probe file typed into
the app) or inside a file they named (a probe's or a parallel set's pictures): the path is
resolved (symbolic links followed) and compared with the allowed folders *before* anything opens
it or tests whether it exists, and a refusal names no server path, so it tells nothing about
files outside those folders. ``roots=None`` is the command line's local user: no check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class DestinationError(ValueError):
    """A save destination that would leave the output folder; the message says what to do."""


class OutsideRootsError(ValueError):
    """A named file that lies outside the allowed folders; the message names no server path."""


def allowed_file(
    name: str | Path,
    roots: Sequence[str | Path] | None,
    *,
    relative_to: str | Path | None = None,
    what: str = "the file",
) -> Path:
    """``name`` as a path (relative names taken from ``relative_to``), checked against ``roots``.

    With ``roots`` (the app), the path is resolved, symbolic links included, and must lie under
    one of them (also resolved); nothing is opened or tested for existence before that, and the
    refusal is the same whether or not the file exists. Returns the resolved path. With
    ``roots=None`` (the command line) the path is returned as given, unresolved.
    """
    text = str(name)
    if "\0" in text:
        raise OutsideRootsError(f"{what} contains a NUL character; give a plain path")
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = Path(relative_to) / path
    if roots is None:
        return path
    real = Path(os.path.realpath(path.expanduser()))
    for root in roots:
        if real.is_relative_to(os.path.realpath(Path(root).expanduser())):
            return real
    where = (
        "beside the file that names it, with a path relative to that file's folder"
        if relative_to is not None
        else "in one of them"
    )
    raise OutsideRootsError(
        f"{what} lies outside the folders this server may read; keep it {where}"
    )


# folders of the output root that the server writes itself, which no save may take or overwrite
# (dim3.fisher.FISHER_ROOT: a test holds the two together)
RESERVED = {"fisher": "where it keeps the Fishers that fisher merges estimate"}


def save_destination(output_root: Path, name: str) -> Path:
    """``output_root / name`` if writing there cannot leave ``output_root``, else raise.

    name: a plain folder name (letters, digits, ``. _ -``), not a path, and not one the server
    keeps for itself (:data:`RESERVED`). Refused: a name that is a
    symbolic link, an output folder that is (or lies under) one, and an existing destination with
    a symbolic link anywhere inside it (Overwrite would delete or follow it).
    """
    if not FOLDER_NAME.match(name or ""):
        raise DestinationError(
            "the folder name must be a simple name (letters, digits, . _ -, at most 100 "
            "characters), not a path"
        )
    if name in RESERVED:
        raise DestinationError(
            f"the folder name {name!r} is the server's own ({RESERVED[name]}); choose another name"
        )
    root = Path(os.path.abspath(output_root))
    for parent in (root, *root.parents):
        if parent.is_symlink():
            raise DestinationError(
                "the output folder lies under a symbolic link; the app only writes to a real "
                "folder (set DIM3_OUTPUT_DIR to one)"
            )
    dest = root / name
    if dest.is_symlink():
        raise DestinationError(
            f"{name!r} in the output folder is a symbolic link; the app does not write through "
            "links: choose another name"
        )
    if dest.is_dir():
        link = _first_link(dest)
        if link is not None:
            raise DestinationError(
                f"the folder {name!r} contains a symbolic link ({link.relative_to(dest)}); the "
                "app will not overwrite it: remove the link or choose another name"
            )
    return dest


def _first_link(folder: Path) -> Path | None:
    for parent, dirs, files in os.walk(folder, followlinks=False):
        for entry in (*dirs, *files):
            path = Path(parent) / entry
            if path.is_symlink():
                return path
    return None


def public_path(path: str | Path, roots: Sequence[str | Path]) -> str:
    """A local path as a visitor may see it: relative to the working directory (``./x``) or to
    the allowed folder that holds it (``<folder name>/x``); otherwise just its last part."""
    real = Path(os.path.abspath(Path(path).expanduser()))
    cwd = Path.cwd()
    if real == cwd or real.is_relative_to(cwd):
        rel = real.relative_to(cwd).as_posix()
        return "./" + rel if rel != "." else "."
    for root in sorted((Path(os.path.abspath(r)) for r in roots), key=lambda r: -len(str(r))):
        if real.is_relative_to(root):
            rel = real.relative_to(root).as_posix()
            return f"{root.name}/{rel}" if rel != "." else root.name
    return f"…/{real.name}"


def redact_paths(text: str, roots: Sequence[str | Path]) -> str:
    """``text`` with the absolute paths of the allowed folders, the working directory, the
    Hub cache and the home folder replaced by short names (see :func:`public_path`)."""
    places: list[tuple[str, str]] = []
    for root in roots:
        real = os.path.abspath(root)
        places.append((real, public_path(real, roots)))
        resolved = os.path.realpath(root)
        if resolved != real:
            places.append((resolved, public_path(real, roots)))
    places.append((os.getcwd(), "."))
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    places.append((hub, "<hub cache>"))
    places.append((os.path.expanduser("~"), "~"))
    for real, short in sorted(places, key=lambda p: -len(p[0])):
        if len(real) > 1:
            text = text.replace(real, short)
    return text
