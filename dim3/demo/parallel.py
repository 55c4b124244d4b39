"""The demo world's parallel set, for ``python -m dim3 represent --probe demo|demo-text``.

Scenes are the demo probe's own (``dim3.demo.probe.demo_scenes``, the committed pictures under
``assets/demo/probe/images``), one per (shape, colour) pair taken in turn so that every shape and
colour appears. With ``pictures`` each item is a picture and the colour question in one of the
eight languages (the VLM's task); without, the scene's description in that language (text the
base, multilingual and VLM all read). One content group per scene. Deterministic: no randomness
beyond the probe's fixed seed.
"""

from __future__ import annotations

from dim3.demo import world
from dim3.demo.probe import demo_scenes
from dim3.probes import ParallelItem

PARALLEL_SCENES = 24


def demo_parallel(n: int = PARALLEL_SCENES, *, pictures: bool = True) -> list[ParallelItem]:
    """``n`` scenes x the eight languages, grouped by scene (ids ``"NN_colour_shape"``)."""
    from dim3.demo import demo_probe_path

    folder = demo_probe_path().parent / "images"
    scenes = demo_scenes()
    # every other scene of the probe: its scenes cycle through all 48 (shape, colour) pairs, so
    # this covers all 6 shapes and half of each shape's colours in the first 48 pictures
    chosen = list(range(0, len(scenes), 2))[:n]
    items = []
    for i in chosen:
        scene = scenes[i]
        group = f"{i:02d}_{scene.colour}_{scene.shape}"
        image = folder / f"{i:04d}_{scene.colour}_{scene.shape}.png"
        for language in world.LANGUAGES:
            if pictures:
                items.append(
                    ParallelItem(group, language, world.question(language, "colour"), image)
                )
            else:
                items.append(ParallelItem(group, language, scene.describe(language)))
    return items
