"""Bundled chat examples: pictures of the demo world and questions in fifteen languages.

This module knows the example prompts (data below) and writes them, with their pictures, to
``assets/examples/`` (``python -m dim3.examples``). The app reads them back with
:func:`load_examples`. Pictures are drawn by the demo world's renderer (``dim3.demo.world``), so the
demo VLM sees the kind of image it was trained on; they are saved enlarged so that they look good
in the browser (the processor shrinks them again). Languages the demo world does not teach
(``demo=False``) are there for real models.

A model folder may declare the languages it was taught in ``dim3_languages.json``
(``{"languages": ["en", ...]}``); the demo VLM does (``python -m dim3.examples`` writes it from
the demo world's languages). :func:`examples_for` then offers only the examples in those
languages; a model that declares nothing (any Hub model) gets all of them. :func:`label` isolates
each part of a chip's text (Unicode FSI/PDI) so that right-to-left punctuation stays with its
sentence. It knows nothing about Gradio or models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
RTL_LANGUAGES = frozenset({"ar", "he", "fa", "ur"})
LANGUAGES_FILE = "dim3_languages.json"  # in a model folder: the languages it was taught
FSI, PDI = "\u2068", "\u2069"  # first-strong isolate and its end (Unicode bidi)
DISPLAY_SIZE = 256  # pixels per side of a saved example picture

# name -> (shape, colour, size, centre x, centre y, radius, background grey), in the world's
# 32-pixel coordinates.
SCENES: dict[str, tuple[str, str, str, float, float, float, int]] = {
    "red_circle": ("circle", "red", "big", 16.0, 16.0, 11.5, 140),
    "blue_square": ("square", "blue", "big", 15.0, 17.0, 12.0, 130),
    "green_triangle": ("triangle", "green", "big", 16.0, 17.0, 12.0, 150),
    "yellow_star": ("star", "yellow", "big", 16.0, 16.0, 12.5, 120),
    "purple_diamond": ("diamond", "purple", "small", 12.0, 20.0, 7.0, 155),
    "white_cross": ("cross", "white", "small", 20.0, 12.0, 7.0, 115),
}


@dataclass(frozen=True)
class Example:
    """One chat example: a picture (file name in the examples folder), a question, its language."""

    image: str
    language: str
    language_name: str
    text: str
    demo: bool  # the demo world teaches this language

    @property
    def rtl(self) -> bool:
        return self.language in RTL_LANGUAGES


EXAMPLES: tuple[Example, ...] = (
    Example("red_circle.png", "en", "English", "What colour is the shape?", True),
    Example("blue_square.png", "de", "Deutsch", "Welche Farbe hat die Form?", True),
    Example("green_triangle.png", "es", "Español", "¿Qué forma es?", True),
    Example("yellow_star.png", "ru", "Русский", "Какого цвета фигура?", True),
    Example("purple_diamond.png", "zh", "中文", "这个形状是什么颜色？", True),
    Example("red_circle.png", "ar", "العربية", "ما لون الشكل؟", True),
    Example("white_cross.png", "hi", "हिन्दी", "यह कौन सी आकृति है?", True),
    Example("blue_square.png", "sw", "Kiswahili", "Umbo lina rangi gani?", True),
    Example("green_triangle.png", "fr", "Français", "De quelle couleur est la forme ?", False),
    Example("yellow_star.png", "ja", "日本語", "この図形は何色ですか？", False),
    Example("purple_diamond.png", "ko", "한국어", "이 도형은 무슨 색인가요?", False),
    Example("white_cross.png", "he", "עברית", "מה צבע הצורה?", False),
    Example("red_circle.png", "tr", "Türkçe", "Bu şekil ne renk?", False),
    Example("blue_square.png", "vi", "Tiếng Việt", "Hình này màu gì?", False),
    Example("green_triangle.png", "th", "ไทย", "รูปทรงนี้สีอะไร", False),
)


def draw_scene(name: str):
    """The picture ``name`` of SCENES, drawn by the demo world's renderer and enlarged (RGB)."""
    from PIL import Image

    from dim3.demo.world import Scene, render

    shape, colour, size, cx, cy, radius, grey = SCENES[name]
    small = render(Scene(shape, colour, size, cx, cy, radius, background=grey))
    return small.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BICUBIC)


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Write every example picture and ``prompts.json`` into ``folder``; return the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCENES:
        path = folder / f"{name}.png"
        draw_scene(name).save(path, optimize=True)
        written.append(path)
    prompts = folder / "prompts.json"
    rows = [asdict(e) for e in EXAMPLES]
    prompts.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return [*written, prompts]


def load_examples(folder: Path = EXAMPLES_DIR) -> list[tuple[Example, Path]]:
    """The examples in ``folder/prompts.json`` with the absolute path of each picture.

    Examples whose picture is missing are left out (so a partial checkout still starts).
    """
    prompts = folder / "prompts.json"
    if not prompts.exists():
        return []
    rows = json.loads(prompts.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        example = Example(**row)
        image = (folder / example.image).resolve()
        if image.exists():
            out.append((example, image))
    return out


def declared_languages(folder: Path) -> tuple[str, ...] | None:
    """The languages ``folder``'s model declares in ``dim3_languages.json``; None when it
    declares none (no such file, or not a folder)."""
    path = Path(folder) / LANGUAGES_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    languages = data.get("languages") if isinstance(data, dict) else None
    if not isinstance(languages, list) or not all(isinstance(x, str) for x in languages):
        raise ValueError(f'{LANGUAGES_FILE} must hold {{"languages": [codes]}}; got {data!r}')
    return tuple(languages)


def write_languages(folder: Path, languages: Sequence[str]) -> Path:
    """Declare ``languages`` for the model in ``folder`` (``dim3_languages.json``)."""
    path = Path(folder) / LANGUAGES_FILE
    note = "the languages this model was taught; DiM3 Studio shows chat examples in these only"
    text = json.dumps({"languages": list(languages), "note": note}, ensure_ascii=False, indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def examples_for(vlm: str | Path | None, folder: Path = EXAMPLES_DIR) -> list[tuple[Example, Path]]:
    """The examples that fit the VLM ``vlm`` (a local folder or a Hub id): those in the
    languages it declares (:func:`declared_languages`), all of them when it declares none."""
    examples = load_examples(folder)
    path = Path(vlm).expanduser() if vlm else None
    languages = declared_languages(path) if path is not None and path.is_dir() else None
    if languages is None:
        return examples
    return [(e, p) for e, p in examples if e.language in languages]


def label(example: Example) -> str:
    """A chip's text, ``language · question``, each part isolated so that a right-to-left
    question keeps its punctuation at its own end (``العربية · ما لون الشكل؟``)."""
    return f"{FSI}{example.language_name}{PDI} · {FSI}{example.text}{PDI}"


if __name__ == "__main__":
    import argparse

    from dim3.demo import DEMO_DIR
    from dim3.demo.world import LANGUAGES

    argparse.ArgumentParser(
        prog="python -m dim3.examples",
        description="Write the chat's example pictures and questions (assets/examples) and the "
        "demo VLM's dim3_languages.json again, from the code. Takes no options.",
    ).parse_args()
    for p in write_examples():
        print(p)
    print(write_languages(DEMO_DIR / "multimodal", LANGUAGES))
