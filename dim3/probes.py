"""Probe files users evaluate and analyse models with: question sets and parallel sets.

Two JSON Lines formats, each read with clear, line-numbered errors:

- A **probe** (``python -m dim3 eval``, ``sweep``): one question per line, with its answer::

      {"image": "images/0001.png", "question": "Welche Farbe hat die Form?", "answer": "rot",
       "language": "de"}

  ``image`` is a path relative to the file's folder (or absolute); it may be omitted or null for
  a text-only question. Extra keys (``id``, ``kind``, ``context``) are kept but not needed.
- A **parallel set** (``python -m dim3 represent``): the same content in several languages, one
  line per (content, language)::

      {"id": "weather", "language": "de", "text": "Das Wetter ist heute schön.",
       "image": "optional/picture.png"}

  ``id`` names the content group (every language's version of one item shares it). With an
  image, ``text`` is the question asked about it.

:func:`split_units` fixes a seeded tuning/reporting split of a probe (by picture, so one picture
never lands in both halves). This module knows files and their validation; not models, not the
demo world (``dim3.demo`` only generates its own probe and parallel set in these formats).

``allowed_roots`` (the app): the file itself and every picture it names must lie under those
folders, checked by ``dim3.paths.allowed_file`` before anything is opened or tested for
existence. None (the command line, a local user): any readable path.

Bounds (what a visitor's file may make a shared server do): a file of at most
:data:`MAX_PROBE_BYTES`, a question with its context, or a text, of at most
``dim3.limits.MAX_QUESTION_CHARS`` characters.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dim3.limits import MAX_QUESTION_CHARS
from dim3.paths import OutsideRootsError, allowed_file

REQUIRED_KEYS = ("question", "answer", "language")
PARALLEL_KEYS = ("id", "language", "text")
SPLIT_SEED = 0
# A probe or parallel file is read whole: 64 MiB is some 100,000 questions of 600 characters
MAX_PROBE_BYTES = 64 * 2**20


class ProbeError(ValueError):
    """A probe or parallel file that cannot be used: names the file, the line and the fix."""


@dataclass(frozen=True)
class ProbeItem:
    """One probe question: ``image`` (a file, or None for text only), question, answer, language."""

    question: str
    answer: str
    language: str
    image: Path | None = None
    kind: str = ""
    context: str = ""  # text placed before the question (text-only probes of the LLMs)


@dataclass(frozen=True)
class ParallelItem:
    """One version of a parallel item: content ``group``, ``language``, ``text``, optional image."""

    group: str
    language: str
    text: str
    image: Path | None = None


def _checked(path: str | Path, roots: Sequence[str | Path] | None, what: str) -> Path:
    """The file a user named, checked against ``roots`` before anything reads it."""
    try:
        return allowed_file(path, roots, what=f"the {what} file")
    except OutsideRootsError as exc:
        raise ProbeError(str(exc)) from None


def _read_lines(path: Path, what: str, example: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(location, line number, object) for every non-empty line of a JSONL file."""
    nothing = "questions" if what == "probe" else "items"
    if path.is_dir():
        raise ProbeError(f"{what} file {path} is a folder; give a JSONL file (one {what} a line)")
    if not path.is_file():
        raise ProbeError(f"{what} file {path} does not exist; give a JSONL file or {example}")
    size = path.stat().st_size
    if size > MAX_PROBE_BYTES:
        raise ProbeError(
            f"{what} file {path} is {size / 2**20:,.0f} MiB; a {what} file may have at most "
            f"{MAX_PROBE_BYTES // 2**20} MiB (its pictures are files of their own): split it"
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeError(
                f"{where}: not valid JSON ({exc.msg}); write one JSON object per line"
            ) from None
        except RecursionError:  # [[[[...]]]] deeper than the parser goes
            raise ProbeError(
                f"{where}: nested too deeply to read; write one flat JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append((where, number, obj))
    if not rows:
        raise ProbeError(f"{what} file {path} has no {nothing}; add one JSON object per line")
    return rows


def _image(
    obj: dict[str, Any], path: Path, where: str, roots: Sequence[str | Path] | None
) -> Path | None:
    if not obj.get("image"):
        return None
    if not isinstance(obj["image"], str):
        raise ProbeError(f"{where}: image must be a path (a string), got {obj['image']!r:.80}")
    try:  # before anything stats or opens it: the check reveals nothing about outside files
        image = allowed_file(obj["image"], roots, relative_to=path.parent, what="the image")
    except OutsideRootsError as exc:
        raise ProbeError(f"{where}: {exc}") from None
    if not image.is_file():
        raise ProbeError(
            f"{where}: image {image} does not exist; paths are relative to the file's folder"
        )
    return image


def load_probe(
    path: str | Path, *, allowed_roots: Sequence[str | Path] | None = None
) -> list[ProbeItem]:
    """Read a JSONL probe file; relative image paths are taken from the file's folder.

    allowed_roots: folders the file and its pictures must lie in (the app); None: any."""
    path = _checked(path, allowed_roots, "probe")
    items = []
    for where, _, obj in _read_lines(
        path, "probe", "the built-in probe ('demo' on the command line, an empty field in the app)"
    ):
        missing = [
            k for k in REQUIRED_KEYS if not isinstance(obj.get(k), str) or not obj[k].strip()
        ]
        if missing:
            raise ProbeError(
                f"{where}: missing or empty {missing}; each line needs {list(REQUIRED_KEYS)}"
            )
        length = len(obj["question"]) + len(str(obj.get("context", "")))
        if length > MAX_QUESTION_CHARS:
            raise ProbeError(
                f"{where}: the question (with its context) is {length:,} characters long; a "
                f"question may have at most {MAX_QUESTION_CHARS:,}: shorten it"
            )
        items.append(
            ProbeItem(
                question=obj["question"],
                answer=obj["answer"],
                language=obj["language"],
                image=_image(obj, path, where, allowed_roots),
                kind=str(obj.get("kind", "")),
                context=str(obj.get("context", "")),
            )
        )
    return items


def load_parallel(
    path: str | Path, *, allowed_roots: Sequence[str | Path] | None = None
) -> list[ParallelItem]:
    """Read and check a JSONL parallel set (see the module docstring).

    allowed_roots: folders the file and its pictures must lie in (the app); None: any.

    Refused, with the line and the fix: a missing or empty ``id``/``language``/``text``, a
    repeated (id, language) pair, a missing picture, pictures on some lines only, fewer than two
    languages or two content groups, or a group present in one language only.
    """
    path = _checked(path, allowed_roots, "parallel")
    items: list[ParallelItem] = []
    seen: dict[tuple[str, str], str] = {}
    for where, _, obj in _read_lines(
        path, "parallel", "a built-in set (demo, demo-text or sentences)"
    ):
        bad = [
            k
            for k in PARALLEL_KEYS
            if not isinstance(obj.get(k), (str, int)) or isinstance(obj.get(k), bool)
        ]
        bad += [k for k in PARALLEL_KEYS if k not in bad and not str(obj[k]).strip()]
        if bad:
            raise ProbeError(
                f"{where}: missing or empty {bad}; each line needs "
                '{"id": group, "language": code, "text": ..., "image": optional path}'
            )
        group, language = str(obj["id"]).strip(), str(obj["language"]).strip()
        if (group, language) in seen:
            raise ProbeError(
                f"{where}: id {group!r} in language {language!r} was already given at "
                f"{seen[group, language]}; give each content once per language"
            )
        seen[group, language] = where
        if len(str(obj["text"])) > MAX_QUESTION_CHARS:
            raise ProbeError(
                f"{where}: the text is {len(str(obj['text'])):,} characters long; a text may "
                f"have at most {MAX_QUESTION_CHARS:,}: shorten it"
            )
        items.append(
            ParallelItem(group, language, str(obj["text"]), _image(obj, path, where, allowed_roots))
        )
    check_parallel(items, str(path))
    return items


def check_parallel(items: Sequence[ParallelItem], name: str = "the parallel set") -> None:
    """Raise ``ProbeError`` unless ``items`` can be compared across languages and contents."""
    with_image = sum(it.image is not None for it in items)
    if 0 < with_image < len(items):
        raise ProbeError(
            f"{name}: {with_image} of {len(items)} lines have an image; give every line a "
            "picture (multimodal inputs) or none (text only)"
        )
    languages = {it.language for it in items}
    groups: dict[str, set[str]] = {}
    for it in items:
        groups.setdefault(it.group, set()).add(it.language)
    if len(languages) < 2 or len(groups) < 2:
        raise ProbeError(
            f"{name}: {len(groups)} content id(s) in {len(languages)} language(s); give at least "
            "two ids, each in at least two languages"
        )
    lonely = sorted(g for g, langs in groups.items() if len(langs) < 2)
    if lonely:
        raise ProbeError(
            f"{name}: id(s) {lonely[:5]} appear in one language only; give each id in at least "
            "two languages (it has nothing to be aligned with otherwise)"
        )


def split_units(items: Sequence[ProbeItem], seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Indices of the tuning half and of the reporting half of a probe; fixed given ``seed``.

    The unit of the split is a picture (all questions about one picture, in every language, go
    to the same half) or, for text-only questions, the question's position among its language's
    questions (the n-th question of every language goes to the same half, as parallel probes
    ask the same thing in each language). Units are shuffled by ``random.Random(seed)`` in
    order of first appearance and cut in two, the tuning half taking the extra one.
    """
    counters: dict[str, int] = {}
    keys: list[str] = []
    for item in items:
        if item.image is not None:
            keys.append(f"image:{item.image}")
        else:
            n = counters[item.language] = counters.get(item.language, -1) + 1
            keys.append(f"text:{n}")
    units = list(dict.fromkeys(keys))
    if len(units) < 2:
        raise ProbeError(
            "the probe has fewer than two pictures or questions per language; a tuning half "
            "and a reporting half need at least two"
        )
    order = units[:]
    random.Random(seed).shuffle(order)
    tuning = set(order[: (len(order) + 1) // 2])
    tune = [i for i, k in enumerate(keys) if k in tuning]
    report = [i for i, k in enumerate(keys) if k not in tuning]
    return tune, report
