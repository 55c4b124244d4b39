"""Per-benchmark metrics: pure functions of (prediction, gold), written from each task's definition.

The definitions are those of the DiM3 reference evaluation (an lmms-eval fork, files
``lmms_eval/tasks/<task>/utils.py``), quirks included, so that a score computed here is the score
that code gives for the same prediction. Each function returns ``True`` when the prediction counts
as correct; a benchmark's score is the mean over its items. Predictions are the raw decoded text
(lmms-eval's LLaVA wrapper does not strip it either).

- xGQA ``exact_match``: the lower-cased, stripped gold answer is *contained* in the lower-cased,
  stripped prediction.
- MaXM ``exact_match``: the raw prediction equals one of the gold answers exactly.
- MaXM ``relaxed_accuracy``: the prediction, VQA-cleaned (LAVIS ``vqa_clean``: punctuation, number
  words, articles, contractions), starts or ends with one of the gold answers (stripped,
  true/false mapped to yes/no). The fork's per-language synonym table is defined but not used by
  its aggregation, so it is not used here either.
- MaRVL ``exact_match``: a prediction containing "yes" counts as "true", else one containing "no"
  as "false"; then the gold label must be contained in it.
- M3Exam ``accuracy``: the option letter parsed from the prediction equals the gold letter
  (numbers 1-8 mapped to A-H). Where the fork picks a random letter for an unparseable answer,
  this picks one with a ``random.Random`` seeded by the item id, so scores are reproducible.

Nothing here knows models, files or datasets.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence
from difflib import SequenceMatcher

# --- xGQA -----------------------------------------------------------------------------------------


def xgqa_exact_match(prediction: str, answer: str) -> bool:
    """xGQA: ``answer.strip().lower()`` is a substring of ``prediction.strip().lower()``."""
    return answer.strip().lower() in prediction.strip().lower()


# --- MaXM -----------------------------------------------------------------------------------------


def maxm_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """MaXM exact match: the raw prediction is one of the gold answers, character for character."""
    return prediction in list(answers)


# VQA answer cleaning (the VQA evaluation code, as LAVIS's ``vqa_clean`` has it).
_NUMBER_WORDS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_PUNCTUATION += ["@", "`", ",", "?", "!"]
_PERIOD = re.compile(
    r"(?!<=\d)(\.)(?!\d)"
)  # a period not followed by a digit (lookahead as written)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The contracted forms the VQA table restores. Its keys are each form with one apostrophe left out
# ("dont" -> "don't"; "hed've" and "he'dve" -> "he'd've"); "she's" and "let's" map only to
# themselves, and one entry goes the other way ("somebody'd" -> "somebodyd").
_CONTRACTED = (
    "'ow's'at 'twas I'd've I'm I've ain't aren't can't could've couldn't couldn't've didn't "
    "doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't "
    "it'd it'd've it'll ma'am might've mightn't mightn't've must've mustn't needn't not've "
    "o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've"
).split()


def _contractions() -> dict[str, str]:
    table = {"somebody'd": "somebodyd"}
    for form in _CONTRACTED:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1 :]] = form
    return table


CONTRACTIONS = _contractions()


def _strip_punctuation(text: str) -> str:
    out = text
    glued = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        # removed where it touches a space (or anywhere when the text has a 1,000-style number),
        # otherwise replaced by a space; the tests look at the original text
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)  # the fork passes re.UNICODE (32) as the count


def _digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_clean(text: str) -> str:
    """One answer cleaned as the VQA evaluation does (lower-cased, punctuation and articles gone,
    number words as digits, contractions restored, outer apostrophes stripped)."""
    text = text.replace("\n", "").replace("\t", "").strip()
    return _digits_and_articles(_strip_punctuation(text)).strip("'")


def _yes_no(answer: str) -> str:
    low = answer.lower()
    return "yes" if low == "true" else "no" if low == "false" else answer


def maxm_relaxed_accuracy(prediction: str, answers: Sequence[str]) -> bool:
    """MaXM relaxed accuracy (the fork's ``relaxed_acc_post_processed``).

    The fork passes each prediction as a one-element list: its trailing periods are stripped, the
    list is turned into text (``"['rot']"``; the true/false mapping sees a list and does nothing)
    and that text is VQA-cleaned, which removes the brackets and outer quotes again. Correct when
    the cleaned prediction starts or ends with a gold answer (stripped; "true"/"false" -> "yes"/"no";
    not lower-cased, so a capitalised gold answer never matches).
    """
    cleaned = vqa_clean(str([prediction.rstrip(".")]).strip())
    golds = [_yes_no(str(a).strip()) for a in answers]
    return any(cleaned.startswith(g) or cleaned.endswith(g) for g in golds)


# --- MaRVL ----------------------------------------------------------------------------------------


def marvl_label(turn: object) -> str:
    """The gold label of a MaRVL item from its answer turn: 'true' or 'false' (case-sensitive
    search in the turn's text, as the fork searches ``str(conversations[1])``)."""
    text = str(turn)
    if "true" in text:
        return "true"
    if "false" in text:
        return "false"
    raise ValueError(f"no 'true' or 'false' in the answer turn {text[:80]!r}")


def marvl_exact_match(prediction: str, label: str) -> bool:
    """MaRVL: 'yes' anywhere -> 'true', else 'no' anywhere -> 'false'; the label must be in it."""
    pred = prediction.strip().lower()
    if "yes" in pred:
        pred = "true"
    elif "no" in pred:
        pred = "false"
    return label.strip().lower() in pred


# --- M3Exam ---------------------------------------------------------------------------------------


def parse_choice(response: str, options: Sequence[str], seed: str = "") -> str:
    """The option letter (A-D) in a multiple-choice answer, as the fork parses it.

    In order: a letter A-D followed by ``)``, ``.``, ``:`` or white space; else any A-D anywhere
    (case-insensitive); else the option whose text (without an ``A.`` prefix) is most similar to
    the response, if the similarity ratio exceeds 0.7; else a letter drawn by
    ``random.Random(seed)``.
    """
    response = response.strip()
    found = re.search(r"\(?([A-D])[).:\s]", response, re.IGNORECASE)
    if found:
        return found.group(1).upper()
    found = re.search(r"[ABCD]", response, re.IGNORECASE)
    if found:
        return found.group(0).upper()
    best, best_ratio = None, 0.0
    for i, option in enumerate(options):
        content = re.sub(r"^[A-D]\.\s*", "", option).strip()
        ratio = SequenceMatcher(None, response, content).ratio()
        if ratio > best_ratio:
            best, best_ratio = chr(65 + i), ratio
    if best is not None and best_ratio > 0.7:
        return best
    return random.Random(seed).choice(["A", "B", "C", "D"])


def standard_answer(answer: str) -> str:
    """M3Exam's gold ``answer_text`` as a letter: letters kept, ``1``-``8`` or ``(1)`` -> A-H."""
    if answer in "ABCDEFGH":  # a substring test, as in the fork
        return answer
    if answer in "12345678":
        return chr(64 + int(answer))
    found = re.match(r"\(?(\d)\)?", answer)
    if found:
        return chr(64 + int(found.group(1)))
    return answer


def m3exam_accuracy(prediction: str, answer: str, options: Sequence[str], seed: str = "") -> bool:
    """M3Exam: the parsed letter of ``prediction`` equals the standardised gold letter."""
    return parse_choice(prediction, options, seed) == standard_answer(answer)


# --- the demo probe and user JSONL files ----------------------------------------------------------


END_PUNCTUATION = ".。!！?？,，;；:：\"'«»“”„()[]"


def normalise(text: str) -> str:
    """The form answers are compared in: NFC, trimmed of spaces and end punctuation, case-folded."""
    return unicodedata.normalize("NFC", text).strip().strip(END_PUNCTUATION).strip().casefold()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of ``prediction`` and ``answer`` after ``normalise``."""
    return normalise(prediction) == normalise(answer)


def probe_exact_match(prediction: str, answer: str) -> bool:
    """Probe files: exact match after NFC, trimming spaces and end punctuation, case folding."""
    return is_correct(prediction, answer)
