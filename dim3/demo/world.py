"""The demo's synthetic world: one coloured shape per picture, described in eight languages.

A scene is a shape (circle, square, ...) of one colour at one size and position on a grey canvas.
This module knows the world's vocabulary in every language, draws scenes as small RGB pictures,
and writes the sentences, questions and answers that the three demo models are trained on. It
knows nothing about tokenizers, models or training (see ``dim3.demo.build`` and
``dim3.demo.train``); everything here is pure Python + Pillow and deterministic given a seed.

Answers are single words in the question's language. Every answer word is unique across
languages (after case folding), so an exact match also checks that the answer is in the right
language.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

LANGUAGES: tuple[str, ...] = ("en", "de", "es", "ru", "zh", "ar", "hi", "sw")
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "de": "German",
    "es": "Spanish",
    "ru": "Russian",
    "zh": "Chinese",
    "ar": "Arabic",
    "hi": "Hindi",
    "sw": "Swahili",
}
# The languages' own names for themselves, used in translation sentences.
ENDONYMS: dict[str, str] = {
    "en": "English",
    "de": "Deutsch",
    "es": "español",
    "ru": "русский",
    "zh": "中文",
    "ar": "العربية",
    "hi": "हिन्दी",
    "sw": "Kiswahili",
}

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "black", "white", "brown", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "big")
QUESTION_KINDS: tuple[str, ...] = ("colour", "shape")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "brown": (125, 75, 30),
    "purple": (135, 45, 175),
}

# WORDS[language][concept] -> the word used in answers and descriptions.
WORDS: dict[str, dict[str, str]] = {
    "en": {
        "red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "black": "black",
        "white": "white", "brown": "brown", "purple": "purple",
        "circle": "circle", "square": "square", "triangle": "triangle", "star": "star",
        "cross": "cross", "diamond": "diamond", "small": "small", "big": "big",
    },
    "de": {
        "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "black": "schwarz",
        "white": "weiß", "brown": "braun", "purple": "lila",
        "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern",
        "cross": "Kreuz", "diamond": "Rhombus", "small": "klein", "big": "groß",
    },
    "es": {
        "red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "black": "negro",
        "white": "blanco", "brown": "marrón", "purple": "morado",
        "circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella",
        "cross": "cruz", "diamond": "rombo", "small": "pequeño", "big": "grande",
    },
    "ru": {
        "red": "красный", "green": "зелёный", "blue": "синий", "yellow": "жёлтый",
        "black": "чёрный", "white": "белый", "brown": "коричневый", "purple": "фиолетовый",
        "circle": "круг", "square": "квадрат", "triangle": "треугольник", "star": "звезда",
        "cross": "крест", "diamond": "ромб", "small": "маленький", "big": "большой",
    },
    "zh": {
        "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "black": "黑色",
        "white": "白色", "brown": "棕色", "purple": "紫色",
        "circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
        "cross": "十字形", "diamond": "菱形", "small": "小的", "big": "大的",
    },
    "ar": {
        "red": "أحمر", "green": "أخضر", "blue": "أزرق", "yellow": "أصفر", "black": "أسود",
        "white": "أبيض", "brown": "بني", "purple": "بنفسجي",
        "circle": "دائرة", "square": "مربع", "triangle": "مثلث", "star": "نجمة",
        "cross": "صليب", "diamond": "معين", "small": "صغير", "big": "كبير",
    },
    "hi": {
        "red": "लाल", "green": "हरा", "blue": "नीला", "yellow": "पीला", "black": "काला",
        "white": "सफ़ेद", "brown": "भूरा", "purple": "बैंगनी",
        "circle": "वृत्त", "square": "वर्ग", "triangle": "त्रिभुज", "star": "तारा",
        "cross": "क्रॉस", "diamond": "समचतुर्भुज", "small": "छोटा", "big": "बड़ा",
    },
    "sw": {
        "red": "nyekundu", "green": "kijani", "blue": "bluu", "yellow": "njano",
        "black": "nyeusi", "white": "nyeupe", "brown": "kahawia", "purple": "zambarau",
        "circle": "duara", "square": "mraba", "triangle": "pembetatu", "star": "nyota",
        "cross": "msalaba", "diamond": "almasi", "small": "ndogo", "big": "kubwa",
    },
}  # fmt: skip

# QUESTIONS[language][kind] -> the canonical question (used by the probe set); PARAPHRASES add
# variety to training text.
QUESTIONS: dict[str, dict[str, str]] = {
    "en": {"colour": "What colour is the shape?", "shape": "What shape is it?"},
    "de": {"colour": "Welche Farbe hat die Form?", "shape": "Welche Form ist das?"},
    "es": {"colour": "¿De qué color es la figura?", "shape": "¿Qué forma es?"},
    "ru": {"colour": "Какого цвета фигура?", "shape": "Какая это фигура?"},
    "zh": {"colour": "这个形状是什么颜色？", "shape": "这是什么形状？"},
    "ar": {"colour": "ما لون الشكل؟", "shape": "ما هذا الشكل؟"},
    "hi": {"colour": "आकृति का रंग क्या है?", "shape": "यह कौन सी आकृति है?"},
    "sw": {"colour": "Umbo lina rangi gani?", "shape": "Hili ni umbo gani?"},
}
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "colour": ("Which colour does the shape have?", "Tell me the colour of the shape."),
        "shape": ("Which shape is shown?", "Name the shape."),
    },
    "de": {
        "colour": ("Welche Farbe sieht man?", "Nenne die Farbe der Form."),
        "shape": ("Welche Form sieht man?", "Nenne die Form."),
    },
    "es": {
        "colour": ("¿Qué color tiene la figura?", "Di el color de la figura."),
        "shape": ("¿Qué figura se ve?", "Di el nombre de la figura."),
    },
    "ru": {
        "colour": ("Какой цвет у фигуры?", "Назови цвет фигуры."),
        "shape": ("Что это за фигура?", "Назови фигуру."),
    },
    "zh": {
        "colour": ("形状的颜色是什么？", "请说出形状的颜色。"),
        "shape": ("图中是什么形状？", "请说出形状的名字。"),
    },
    "ar": {
        "colour": ("ما هو لون الشكل؟", "اذكر لون الشكل."),
        "shape": ("ما نوع الشكل؟", "اذكر اسم الشكل."),
    },
    "hi": {
        "colour": ("आकृति किस रंग की है?", "आकृति का रंग बताइए।"),
        "shape": ("यह आकृति क्या है?", "आकृति का नाम बताइए।"),
    },
    "sw": {
        "colour": ("Rangi ya umbo ni ipi?", "Taja rangi ya umbo."),
        "shape": ("Umbo hili ni lipi?", "Taja jina la umbo."),
    },
}
# DESCRIBE[language] -> a description template with {shape}, {colour} and {size} slots, written so
# that no word has to agree with another (the world has no grammar beyond slot filling).
DESCRIBE: dict[str, tuple[str, ...]] = {
    "en": (
        "The shape is a {shape}. Its colour is {colour}. It is {size}.",
        "There is one {size} {colour} {shape} in the picture.",
    ),
    "de": (
        "Die Form ist ein {shape}. Die Farbe ist {colour}. Sie ist {size}.",
        "Im Bild ist ein {shape}, Farbe {colour}, Größe {size}.",
    ),
    "es": (
        "La figura es un {shape}. El color es {colour}. Es {size}.",
        "En la imagen hay un {shape} de color {colour}, tamaño {size}.",
    ),
    "ru": (
        "Фигура — {shape}. Цвет — {colour}. Размер — {size}.",
        "На картинке {shape}, цвет {colour}, размер {size}.",
    ),
    "zh": ("这个形状是{shape}。颜色是{colour}。它是{size}。", "图中有一个{size}{colour}{shape}。"),
    "ar": ("الشكل {shape}. اللون {colour}. الحجم {size}.", "في الصورة {shape} لونه {colour} وحجمه {size}."),
    "hi": (
        "आकृति {shape} है। रंग {colour} है। यह {size} है।",
        "चित्र में एक {size} {colour} {shape} है।",
    ),
    "sw": (
        "Umbo ni {shape}. Rangi ni {colour}. Ni {size}.",
        "Kwenye picha kuna {shape} ya rangi {colour}, ukubwa {size}.",
    ),
}  # fmt: skip
# TRANSLATE[language] -> a sentence saying that a word means another word in another language.
TRANSLATE: dict[str, str] = {
    "en": '"{src}" in {src_lang} is "{dst}" in {dst_lang}.',
    "de": '"{src}" auf {src_lang} heißt "{dst}" auf {dst_lang}.',
    "es": '"{src}" en {src_lang} es "{dst}" en {dst_lang}.',
    "ru": "«{src}» на языке {src_lang} — это «{dst}» на языке {dst_lang}.",
    "zh": "{src_lang}的“{src}”在{dst_lang}中是“{dst}”。",
    "ar": '"{src}" بلغة {src_lang} هي "{dst}" بلغة {dst_lang}.',
    "hi": '{src_lang} में "{src}" को {dst_lang} में "{dst}" कहते हैं।',
    "sw": '"{src}" kwa {src_lang} ni "{dst}" kwa {dst_lang}.',
}

IMAGE_SIZE = 32  # pixels per side of a scene picture
_SUPERSAMPLE = 4  # scenes are drawn 4x larger and downsampled, for smooth edges


@dataclass(frozen=True)
class Scene:
    """One picture's content: what is drawn, and where (centre and radius in pixels)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    background: int  # grey level of the canvas, 0..255

    def answer(self, kind: str, language: str) -> str:
        """The one-word answer to a question of ``kind`` ("colour" or "shape") in ``language``."""
        concept = self.colour if kind == "colour" else self.shape
        return WORDS[language][concept]

    def describe(self, language: str, template: int = 0) -> str:
        """A sentence describing the scene in ``language`` (template 0 or 1)."""
        words = WORDS[language]
        return DESCRIBE[language][template].format(
            shape=words[self.shape], colour=words[self.colour], size=words[self.size]
        )


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene uniformly over shapes, colours and sizes, with jittered position."""
    shape, colour, size = rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES)
    radius = rng.uniform(5.0, 7.5) if size == "small" else rng.uniform(10.0, 13.0)
    margin = radius + 1.5
    cx = rng.uniform(margin, IMAGE_SIZE - margin)
    cy = rng.uniform(margin, IMAGE_SIZE - margin)
    return Scene(shape, colour, size, cx, cy, radius, background=rng.randint(110, 160))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with circumradius ``r``."""
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        points = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.42 * r
            a = math.radians(-90 + 36 * i)
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"{shape!r} is not a polygon")


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB picture of IMAGE_SIZE x IMAGE_SIZE pixels."""
    s = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (scene.background,) * 3)
    draw = ImageDraw.Draw(big)
    cx, cy, r, fill = scene.cx * s, scene.cy * s, scene.radius * s, RGB[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = 0.75 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "cross":
        w = 0.3 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def question(language: str, kind: str, rng: random.Random | None = None) -> str:
    """The canonical question of ``kind`` in ``language``, or a random paraphrase given ``rng``."""
    if rng is None:
        return QUESTIONS[language][kind]
    return rng.choice((QUESTIONS[language][kind], *PARAPHRASES[language][kind]))


def translation_sentence(concept: str, src: str, dst: str, rng: random.Random) -> str:
    """A sentence, in a random one of the two languages, saying ``concept`` in ``src`` is ... in ``dst``."""
    frame = rng.choice((src, dst))
    return TRANSLATE[frame].format(
        src=WORDS[src][concept],
        dst=WORDS[dst][concept],
        src_lang=ENDONYMS[src],
        dst_lang=ENDONYMS[dst],
    )


def all_answer_words() -> dict[str, str]:
    """Map every answer word (case-folded) to its language; raises if two languages share one."""
    seen: dict[str, str] = {}
    for language in LANGUAGES:
        for concept in (*COLOURS, *SHAPES):
            word = WORDS[language][concept].casefold()
            if seen.get(word, language) != language:
                raise ValueError(f"answer word {word!r} is shared by {seen[word]} and {language}")
            seen[word] = language
    return seen
