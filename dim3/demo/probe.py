"""The demo world's probe set: its pictures, questions and answers, in every language.

The probe file format (and its reader, re-exported here) lives in :mod:`dim3.probes`. The demo
probe set (pictures of the synthetic world x both question kinds x every language, drawn with a seed
the training data never uses) is written by ``write_demo_probe`` and committed under
``assets/demo/probe``. This module knows the world, not the models.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dim3.demo import world
from dim3.demo.world import LANGUAGES, QUESTION_KINDS
from dim3.probes import ProbeError, ProbeItem, load_probe

__all__ = ["ProbeError", "ProbeItem", "load_probe", "demo_items", "text_probe", "write_demo_probe"]

PROBE_SEED = 1_000_003  # training draws from seeds 0..N+5; the probe's pictures never repeat them
PROBE_IMAGES = 120


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
