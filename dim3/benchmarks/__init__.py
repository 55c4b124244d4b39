"""Evaluation benchmarks: what a question is, how it is asked and how its answer is scored.

A :class:`Benchmark` is data: its Hugging Face dataset id, its languages (the dataset's
splits), how a dataset row becomes an :class:`Item` (the prompt the model reads, the gold
answers, the picture) and its metrics (pure functions in :mod:`dim3.benchmarks.metrics`).
:data:`BENCHMARKS` lists them explicitly; :func:`get_benchmark` names the valid ones on a typo.
Prompts, generation lengths and metrics follow the DiM3 reference evaluation (an lmms-eval fork;
``lmms_eval/tasks/<task>/``):

============  ==============================  ========================================  ==========
benchmark     dataset (splits)                prompt ends with                          new tokens
============  ==============================  ========================================  ==========
``xgqa``      neulab/PangeaBench-xgqa         "Answer the question using a single word  4
              (bn de en id ko pt ru zh)       or phrase in English." (en: no "in ...")
``maxm``      neulab/PangeaBench-maxm         "...single word or phrase in French."     16
              (en fr hi iw ro th zh)          etc.
``marvl``     neulab/PangeaBench-marvl        ". Answer with the option directly."      16
              (id sw ta tr zh)
``m3exam``    neulab/PangeaBench-m3exam       the language's "Answer:" after a hint     32 (zh),
              (afrikaans chinese english      asking for the letter                     16
              italian portuguese thai
              vietnamese)
``probe``     the demo probe or a JSONL file  the question as written                   12
============  ==============================  ========================================  ==========

Rows the studio cannot ask (an M3Exam question with several pictures) are skipped by
``to_item`` returning None. The captioning set (XM3600) is not offered: its metric (CIDEr) is
computed by pycocoevalcap after a Java tokenizer, which the studio does not depend on.

This module knows rows and prompts; loading datasets is :mod:`dim3.benchmarks.sources`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dim3.benchmarks import metrics

PRIMARY = "score"  # the name under which every benchmark's headline metric is also reported


@dataclass(frozen=True)
class Item:
    """One question of a benchmark, ready to ask.

    ``question`` is the full prompt text (the benchmark's wording around the dataset's question);
    ``answers`` the gold answer(s); ``image`` a file path, encoded bytes (decoded only when the
    item's batch is asked) or None for text only; ``options`` the choices of a multiple-choice
    item; ``max_new_tokens`` the benchmark's generation length for this language.
    """

    id: str
    language: str
    question: str
    answers: tuple[str, ...]
    image: Any = None
    options: tuple[str, ...] = ()
    max_new_tokens: int = 12
    context: str = ""  # asked before the question (text-only probes); empty for benchmarks

    def __post_init__(self) -> None:
        from dim3.limits import MAX_QUESTION_CHARS

        length = len(self.question) + len(self.context)
        if length > MAX_QUESTION_CHARS:
            raise ValueError(
                f"its question is {length:,} characters long (with the benchmark's wording), "
                f"more than the {MAX_QUESTION_CHARS:,} a question may have"
            )

    @property
    def answer(self) -> str:
        """The first gold answer (what is shown as *the* answer)."""
        return self.answers[0] if self.answers else ""

    def record(self) -> dict[str, Any]:
        """What a results file keeps of the item: enough to rescore a prediction."""
        out: dict[str, Any] = {"id": self.id, "language": self.language, "gold": list(self.answers)}
        if self.options:
            out["options"] = list(self.options)
        out["question"] = self.question
        return out


Scorer = Callable[[str, Item], bool]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: dataset, languages, row -> item, metrics (name -> scorer; ``primary`` first)."""

    name: str
    title: str
    dataset: str
    languages: tuple[str, ...]
    to_item: Callable[[Mapping[str, Any], str, int], Item | None]
    metrics: dict[str, Scorer]
    primary: str
    source: str = ""  # the reference task folder
    image_field: str | None = "image"
    # the columns ``to_item`` reads (the rest of a row is never read: a dataset's other columns
    # may be of any size); empty: all
    fields: tuple[str, ...] = ()

    def score(self, prediction: str, item: Item) -> dict[str, float]:
        """Every metric of one prediction, 1.0 or 0.0, the primary one first."""
        return {name: float(fn(prediction, item)) for name, fn in self.metrics.items()}

    def check_languages(self, languages: Sequence[str]) -> tuple[str, ...]:
        """``languages`` (empty: all of the benchmark's); ``ValueError`` lists the valid ones."""
        langs = tuple(dict.fromkeys(lang.strip() for lang in languages if lang.strip()))
        unknown = [lang for lang in langs if lang not in self.languages]
        if unknown:
            raise ValueError(
                f"{self.title} has no language {', '.join(unknown)}; choose from "
                f"{', '.join(self.languages)}"
            )
        return langs or self.languages


def row_id(row: Mapping[str, Any], language: str, index: int, *keys: str) -> str:
    """The row's own id (first of ``keys`` present) or ``language-index`` in the split."""
    for key in keys:
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return f"{language}-{index}"


# --- xGQA -----------------------------------------------------------------------------------------


def _xgqa_item(row: Mapping[str, Any], language: str, index: int) -> Item:
    post = "Answer the question using a single word or phrase"
    post += "." if language == "en" else " in English."
    return Item(
        id=row_id(row, language, index, "question_id", "id"),
        language=language,
        question=f"{row['question'].strip()} {post}",
        answers=(str(row["answer"]),),
        image=row.get("image"),
        max_new_tokens=4,
    )


# --- MaXM -----------------------------------------------------------------------------------------

MAXM_LANGUAGES = {
    "en": "English",
    "fr": "French",
    "hi": "Hindi",
    "iw": "Hebrew",
    "ro": "Romanian",
    "th": "Thai",
    "zh": "Chinese",
}


def _maxm_item(row: Mapping[str, Any], language: str, index: int) -> Item:
    pre = "Given the image and the question, provide a concise answer. "
    post = f"\nAnswer the question using a single word or phrase in {MAXM_LANGUAGES[language]}."
    return Item(
        id=row_id(row, language, index, "question_id", "id", "image_id"),
        language=language,
        question=f"{pre}{row['question'].strip()}{post}",
        answers=tuple(str(a) for a in row["answers"]),
        image=row.get("image"),
        max_new_tokens=16,
    )


# --- MaRVL ----------------------------------------------------------------------------------------


def _marvl_item(row: Mapping[str, Any], language: str, index: int) -> Item:
    turns = row["conversations"]
    query = turns[0]["value"].replace("<image>\n", "").strip()
    return Item(
        id=row_id(row, language, index, "id"),
        language=language,
        question=f"{query}. Answer with the option directly.",
        answers=(metrics.marvl_label(turns[1]),),
        image=row.get("image"),
        max_new_tokens=16,
    )


# --- M3Exam ---------------------------------------------------------------------------------------

M3EXAM_ANSWER = {
    "english": "Answer:",
    "chinese": "答案：",
    "vietnamese": "Câu trả lời:",
    "thai": "คำตอบ:",
    "italian": "La risposta:",
    "afrikaans": "Antwoord:",
    "portuguese": "Responder:",
}
# subject category -> its name in the language (language, math, social-science, natural-science)
M3EXAM_SUBJECTS = {
    "english": ("English", "Math", "Social Science", "Natural Science"),
    "chinese": ("语文", "数学", "社会科学", "自然科学"),
    "thai": ("ภาษาไทย", "คณิตศาสตร์", "สังคมศึกษา", "วิทยาศาสตร์"),
    "vietnamese": ("Tiếng Việt", "Toán", "Khoa học xã hội", "Khoa học tự nhiên"),
    "italian": ("Italiano", "Matematica", "Scienze sociali", "Scienze naturali"),
    "afrikaans": ("Afrikaans Huistaal", "Wiskunde", "Sosiale Wetenskappe", "Natuurwetenskap"),
    "portuguese": ("Linguagens", "Matemática", "Ciências Humanas", "Ciências da Natureza"),
}
M3EXAM_HINT = {
    "english": "The following is a multiple choice question about {s}. Please only respond with "
    "the letter (A, B, C, or D) corresponding to the correct answer, without any additional "
    "explanation.",
    "chinese": "以下是关于{s}的单项选择题。 请仅给出正确选项对应的选项序号（A, B, C, 或 D） 而非其他细节。",
    "thai": "ต่อไปนี้เป็นคำถามแบบปรนัย วิชา{s} โปรดตอบเพียงตัวอักษร (A, B, C หรือ D) "
    "ที่ตรงกับคำตอบที่ถูกต้อง โดยไม่ต้องมีคำอธิบายเพิ่มเติม",
    "vietnamese": "Sau đây là câu hỏi trắc nghiệm về {s}. Vui lòng chỉ trả lời bằng chữ cái "
    "(A, B, C hoặc D) tương ứng với câu trả lời đúng, không cần giải thích thêm.",
    "italian": "La seguente è una domanda a scelta multipla su {s}. Si prega di rispondere solo "
    "con la lettera (A, B, C o D) corrispondente alla risposta corretta, senza alcuna "
    "spiegazione aggiuntiva.",
    "afrikaans": "Die volgende is 'n meervoudige keuse vraag oor {s}. Antwoord asseblief slegs "
    "met die letter (A, B, C of D) wat ooreenstem met die korrekte antwoord, sonder enige "
    "bykomende verduideliking.",
    "portuguese": "A seguir está uma questão de múltipla escolha sobre {s}. Por favor, responda "
    "apenas com a letra (A, B, C ou D) correspondente à resposta correta, sem qualquer "
    "explicação adicional.",
}
_CATEGORIES = ("language", "math", "social-science", "natural-science")
_IMAGE_REF = re.compile(r"\(image\)\[[^\]]+\]")
M3EXAM_IMAGE_FIELDS = tuple(f"image_{i}" for i in range(10))


def m3exam_options(options: Sequence[str]) -> list[str]:
    """Options relabelled ``(A) text``, ``(B) text``, ... (any ``A.``/``(1)`` prefix removed)."""
    cleaned = (re.sub(r"^[\(（]?[A-Da-d\d][\)）\.\s]+\s*", "", o).strip() for o in options)
    return [f"({chr(65 + i)}) {text}" for i, text in enumerate(cleaned)]


def m3exam_prompt(row: Mapping[str, Any], language: str) -> str:
    """The fork's M3Exam prompt, without its ``<image>`` marker (the chat template places the
    picture before the text)."""
    subject = M3EXAM_SUBJECTS[language][_CATEGORIES.index(row["subject_category"])]
    hint = M3EXAM_HINT[language].format(s=subject)
    question = _IMAGE_REF.sub("", row["question_text"])
    options = m3exam_options(row["options"])
    options_text = "" if _IMAGE_REF.search(" ".join(options)) else "\n".join(options)
    background = row.get("background_description") or []
    background_text = "\n" + "\n".join(background) if background else ""
    body = f"{background_text}\n{question}\n{options_text}\n{M3EXAM_ANSWER[language]}"
    return f"{hint}\n\n{body}"


def _m3exam_item(row: Mapping[str, Any], language: str, index: int) -> Item | None:
    pictures = [row[k] for k in M3EXAM_IMAGE_FIELDS if row.get(k) not in (None, "None", "")]
    if len(pictures) > 1:
        return None  # several pictures: the studio asks about one
    return Item(
        id=row_id(row, language, index, "question_id", "id"),
        language=language,
        question=m3exam_prompt(row, language),
        answers=(str(row["answer_text"]),),
        image=pictures[0] if pictures else None,
        options=tuple(str(o) for o in row["options"]),
        max_new_tokens=32 if language == "chinese" else 16,
    )


# --- registry -------------------------------------------------------------------------------------

TASKS = "https://github.com/wzj1718/DiM3/tree/main/evaluation/lmms-eval/lmms_eval/tasks/"

BENCHMARKS: dict[str, Benchmark] = {
    "xgqa": Benchmark(
        "xgqa",
        "xGQA",
        "neulab/PangeaBench-xgqa",
        ("bn", "de", "en", "id", "ko", "pt", "ru", "zh"),
        _xgqa_item,
        {"exact_match": lambda p, it: metrics.xgqa_exact_match(p, it.answer)},
        "exact_match",
        TASKS + "xgqa",
        fields=("question_id", "id", "question", "answer", "image"),
    ),
    "maxm": Benchmark(
        "maxm",
        "MaXM",
        "neulab/PangeaBench-maxm",
        tuple(MAXM_LANGUAGES),
        _maxm_item,
        {
            "relaxed_accuracy": lambda p, it: metrics.maxm_relaxed_accuracy(p, it.answers),
            "exact_match": lambda p, it: metrics.maxm_exact_match(p, it.answers),
        },
        "relaxed_accuracy",
        TASKS + "maxm",
        fields=("question_id", "id", "image_id", "question", "answers", "image"),
    ),
    "marvl": Benchmark(
        "marvl",
        "MaRVL",
        "neulab/PangeaBench-marvl",
        ("id", "sw", "ta", "tr", "zh"),
        _marvl_item,
        {"exact_match": lambda p, it: metrics.marvl_exact_match(p, it.answer)},
        "exact_match",
        TASKS + "marvl",
        fields=("id", "conversations", "image"),
    ),
    "m3exam": Benchmark(
        "m3exam",
        "M3Exam",
        "neulab/PangeaBench-m3exam",
        ("afrikaans", "chinese", "english", "italian", "portuguese", "thai", "vietnamese"),
        _m3exam_item,
        {
            "accuracy": lambda p, it: metrics.m3exam_accuracy(
                p, it.answer, it.options, seed=f"{it.language}:{it.id}"
            )
        },
        "accuracy",
        TASKS + "m3exam",
        image_field=None,  # pictures are base64 text in image_0 .. image_9
        fields=(
            "question_id",
            "id",
            "subject_category",
            "question_text",
            "options",
            "background_description",
            "answer_text",
            *M3EXAM_IMAGE_FIELDS,
        ),
    ),
}

PROBE = Benchmark(
    "probe",
    "probe file",
    "demo",
    (),
    lambda row, lang, i: None,  # probes are read by dim3.probes, not from rows
    {"exact_match": lambda p, it: metrics.probe_exact_match(p, it.answer)},
    "exact_match",
)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (``probe`` included); ``ValueError`` lists the valid names."""
    if name == PROBE.name:
        return PROBE
    try:
        return BENCHMARKS[name]
    except KeyError:
        valid = ", ".join([*BENCHMARKS, PROBE.name])
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {valid}") from None


# --- pictures -------------------------------------------------------------------------------------


def _encoded(value: Any) -> Any:
    """What a picture field holds, as a path, encoded bytes or an image: a ``{"bytes", "path"}``
    dict's bytes, base64 text decoded. ``ValueError`` for anything else."""
    from PIL import Image

    if isinstance(value, (Path, Image.Image)):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            raise ValueError(
                "the dataset refers to its pictures by path only; give a dataset that stores them"
            )
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("a picture field holds text that is not base64 image data") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"cannot read a picture from a {type(value).__name__}")
    return value


def picture_pixels(value: Any) -> int:
    """How many pixels the picture ``value`` (as :func:`decode_image` takes it) has, from its
    header: nothing is decoded; past Pillow's own bomb limit, which refuses to open it, one more
    than twice that limit. 0 where it cannot be told (:func:`decode_image` then says why). So
    that batches can be cut by the pixels they decode before any is."""
    from PIL import Image

    try:
        data = _encoded(value)
        if isinstance(data, Image.Image):
            return data.width * data.height
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            return img.width * img.height
    except Image.DecompressionBombError:
        return 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
    except Exception:  # noqa: BLE001 - decode_image names the problem when the batch is read
        return 0


def decode_image(value: Any, max_pixels: int | None = None):
    """A picture as an RGB ``PIL.Image``, from what datasets and probe files hold: a path, a
    ``{"bytes", "path"}`` dict, raw bytes, base64 text or an image. ``ValueError`` otherwise,
    naming what is wrong (too many pixels or too elongated: :func:`dim3.limits.image_size_problem`,
    checked from the header before anything is decoded)."""
    from PIL import Image

    from dim3.chat import MAX_IMAGE_PIXELS, load_image
    from dim3.limits import image_size_problem

    limit = max_pixels or MAX_IMAGE_PIXELS
    value = _encoded(value)
    if isinstance(value, Path):
        return load_image(value, max_pixels=limit)
    if isinstance(value, Image.Image):
        problem = image_size_problem("in the dataset", *value.size, limit)
        if problem:
            raise ValueError(problem)
        return value.convert("RGB")
    try:
        with Image.open(io.BytesIO(value)) as img:
            problem = image_size_problem("in the dataset", *img.size, limit)
            if problem:
                raise ValueError(problem)
            return img.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's own limit, met in its header check
        raise ValueError(
            f"a picture in the dataset has far more pixels than the {limit:,} allowed; "
            "give a dataset with smaller pictures"
        ) from None
    except OSError as exc:
        raise ValueError(f"a picture could not be decoded ({exc})") from None


__all__ = [
    "BENCHMARKS",
    "PRIMARY",
    "PROBE",
    "Benchmark",
    "Item",
    "decode_image",
    "get_benchmark",
    "picture_pixels",
]
