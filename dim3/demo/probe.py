"""Probe sets: questions (with or without a picture) and their expected answers, per language.

A probe file is JSON Lines, one object per question::

    {"image": "images/0001.png", "question": "Welche Farbe hat die Form?", "answer": "rot",
     "language": "de"}

``image`` is a path relative to the file's folder (or absolute); it may be omitted or null for a
text-only question. Extra keys (``id``, ``kind``, ...) are kept but not needed. The demo probe
set (pictures of the synthetic world x both question kinds x every language, drawn with a seed
the training data never uses) is written by ``write_demo_probe`` and committed under
``assets/demo/probe``. This module knows the file format and the world, not the models.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dim3.demo import world
from dim3.demo.world import LANGUAGES, QUESTION_KINDS

PROBE_SEED = 1_000_003  # training draws from seeds 0..N+5; the probe's pictures never repeat them
PROBE_IMAGES = 120
REQUIRED_KEYS = ("question", "answer", "language")


class ProbeError(ValueError):
    """A probe file that cannot be read: names the file, the line and the fix."""


@dataclass(frozen=True)
class ProbeItem:
    """One probe question: ``image`` (a file, or None for text only), question, answer, language."""

    question: str
    answer: str
    language: str
    image: Path | None = None
    kind: str = ""
    context: str = ""  # text placed before the question (text-only probes of the LLMs)


def load_probe(path: str | Path) -> list[ProbeItem]:
    """Read a JSONL probe file; relative image paths are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"probe file {path} does not exist; give a JSONL file or --probe demo")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(line, path, number))
    if not items:
        raise ProbeError(f"probe file {path} has no questions; add one JSON object per line")
    return items


def _parse_line(line: str, path: Path, number: int) -> ProbeItem:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProbeError(
            f"{where}: not valid JSON ({exc.msg}); write one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise ProbeError(
            f"{where}: expected a JSON object with keys {list(REQUIRED_KEYS)} and image"
        )
    missing = [k for k in REQUIRED_KEYS if not isinstance(obj.get(k), str) or not obj[k].strip()]
    if missing:
        raise ProbeError(
            f"{where}: missing or empty {missing}; each line needs {list(REQUIRED_KEYS)}"
        )
    image = None
    if obj.get("image"):
        image = Path(obj["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ProbeError(
                f"{where}: image {image} does not exist; paths are relative to the probe file"
            )
    return ProbeItem(
        question=obj["question"],
        answer=obj["answer"],
        language=obj["language"],
        image=image,
        kind=str(obj.get("kind", "")),
        context=str(obj.get("context", "")),
    )


def demo_scenes(n: int = PROBE_IMAGES, seed: int = PROBE_SEED) -> list[world.Scene]:
    """The probe's scenes: every (shape, colour) pair in turn, sizes and positions drawn by ``seed``."""
    rng = random.Random(seed)
    scenes = []
    pairs = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    for i in range(n):
        shape, colour = pairs[i % len(pairs)]
        drawn = world.random_scene(rng)
        scenes.append(
            world.Scene(
                shape, colour, drawn.size, drawn.cx, drawn.cy, drawn.radius, drawn.background
            )
        )
    return scenes


def demo_items(scenes: list[world.Scene], image_paths: list[Path] | None) -> list[ProbeItem]:
    """Every scene x question kind x language; text-only (with a description) when no paths."""
    items = []
    for i, scene in enumerate(scenes):
        for language in LANGUAGES:
            for kind in QUESTION_KINDS:
                items.append(
                    ProbeItem(
                        question=world.question(language, kind),
                        answer=scene.answer(kind, language),
                        language=language,
                        image=image_paths[i] if image_paths else None,
                        kind=kind,
                        context="" if image_paths else scene.describe(language),
                    )
                )
    return items


def text_probe(n: int = PROBE_IMAGES, seed: int = PROBE_SEED) -> list[ProbeItem]:
    """The demo probe as text: each picture replaced by its description in the question's language."""
    return demo_items(demo_scenes(n, seed), None)


def write_demo_probe(folder: Path, n: int = PROBE_IMAGES, seed: int = PROBE_SEED) -> Path:
    """Draw the probe pictures into ``folder/images`` and write ``folder/probe.jsonl``."""
    scenes = demo_scenes(n, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(folder / "images" / f"{i:04d}_{scene.colour}_{scene.shape}.png")
        world.render(scene).save(paths[-1])
    out = folder / "probe.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for item in demo_items(scenes, paths):
            row = {
                "image": item.image.relative_to(folder).as_posix(),
                "question": item.question,
                "answer": item.answer,
                "language": item.language,
                "kind": item.kind,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
