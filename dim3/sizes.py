"""Sizes in bytes as people write and read them: settings and options (``50GB``, ``500MB``,
``16MiB``) parsed with :func:`parse_size` and :func:`size_from_env`, and figures in messages
written with :func:`human_size`. This module imports nothing of dim3: every room that reads a
size setting or names a size in a message (the checkpoints' downloads, the Hub cache, the
writer, the plan, the limits, the app) takes it from here.
"""

from __future__ import annotations

import os

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as the Hub uses; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if text.endswith(u)), "")
        try:
            value = int(float(text[: len(text) - len(unit)]) * UNITS.get(unit, 1))
        except ValueError:
            raise ValueError(f"shard size {size!r} is not a size; use e.g. 5GB, 500MB") from None
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def size_from_env(name: str, default: int | None) -> int | None:
    """The size setting ``$name`` in bytes (``50GB``, ``500MB``): ``default`` when it is unset,
    None when it is 0 (no limit)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw == "0":
        return None
    try:
        return parse_size(raw)
    except ValueError:
        raise ValueError(
            f"${name}={raw!r} is not a size; use e.g. 50GB or 500MB (0: no limit)"
        ) from None


def human_size(n: int) -> str:
    """Bytes in the unit a person reads at a glance: ``512 B``, ``3.6 MB``, ``15.2 GB``
    (decimal units, like the merge log; three significant digits)."""
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("kB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12)):
        text = f"{n / scale:.3g}"
        if float(text) < 1000:
            return f"{text} {unit}"
    return f"{n / 10**12:.0f} TB"
