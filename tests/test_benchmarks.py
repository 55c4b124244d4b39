"""Benchmarks as evaluation sources: the reference metrics on hand-worked predictions, seeded
streaming samples of local datasets in each set's real schema, and ``python -m dim3 eval
--benchmark`` on them with the demo trio, its JSON rescored independently."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dim3 import cli
from dim3.benchmarks import BENCHMARKS, Item, decode_image, get_benchmark, m3exam_options
from dim3.benchmarks import metrics as m
from dim3.benchmarks.sources import load_items, reservoir
from dim3.evaluate import score_items
from tests.benchmark_data import BUILDERS, COLOURS

# --- metrics, each case worked out by hand from the reference definition ---------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Red.", "red", True),  # lower-cased gold contained in the lower-cased prediction
        ("It is red", " Red ", True),
        ("reddish", "red", True),  # containment, not equality
        ("rot", "red", False),
        ("", "red", False),
    ],
)
def test_xgqa_exact_match_is_containment(prediction, answer, expected):
    assert m.xgqa_exact_match(prediction, answer) is expected


def test_maxm_exact_match_is_raw_equality_with_any_answer():
    assert m.maxm_exact_match("rouge", ["rouge", "red"])
    assert m.maxm_exact_match("red", ["rouge", "red"])
    assert not m.maxm_exact_match("Rouge", ["rouge"])  # no case folding
    assert not m.maxm_exact_match(" rouge", ["rouge"])  # no trimming


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # "['Rouge']" -> brackets to spaces -> "'rouge'" -> quotes stripped -> "rouge"
        ("Rouge.", ["rouge"], True),
        ("i see two cats", ["2 cats"], True),  # number words become digits ...
        ("two", ["2"], False),  # ... but not a first or last word, which keeps a quote: "'two'"
        ("red car", ["car"], True),  # ends with a gold answer
        ("car red", ["car"], True),  # starts with one
        ("yes", ["True"], True),  # gold true/false -> yes/no
        ("True", ["yes"], False),  # ... but the prediction is not mapped (it is a list there)
        ("Paris", ["Paris"], False),  # the prediction is lower-cased, the gold is not
        # the first word keeps the list's quote ("'the"), so its article is not dropped
        ("The red one", ["red"], False),
        # a contraction is restored inside the text: "dont" -> "don't"
        ("i dont know", ["don't know"], True),
        # a 1,000-style number: punctuation is deleted, not replaced by a space
        ("1,000 apples", ["1000 apples"], True),
        ("1,000", ["1 000"], False),
        ("x,y", ["x y"], True),  # a comma away from spaces and digits becomes a space
    ],
)
def test_maxm_relaxed_accuracy_follows_the_reference_pipeline(prediction, answers, expected):
    assert m.maxm_relaxed_accuracy(prediction, answers) is expected


def test_vqa_clean_by_hand():
    assert m.vqa_clean("The two dogs!") == "2 dogs"
    assert m.vqa_clean("a (big) cat") == "big cat"  # "(" next to a space: deleted
    assert m.vqa_clean("x(y)z") == "x y z"  # not next to a space: replaced by a space
    assert m.vqa_clean("3.5 m.") == "3.5 m"  # a period before a digit stays
    assert m.CONTRACTIONS["dont"] == "don't" and m.CONTRACTIONS["he'dve"] == "he'd've"
    assert m.CONTRACTIONS["somebody'd"] == "somebodyd" and "shes" not in m.CONTRACTIONS


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("Yes", "true", True),
        ("No.", "false", True),
        ("True", "true", True),
        ("false", "true", False),
        ("not sure", "true", False),  # "no" in "not": read as false
        ("I know it is true", "true", False),  # "no" in "know": read as false
    ],
)
def test_marvl_maps_yes_no_then_contains(prediction, label, expected):
    assert m.marvl_exact_match(prediction, label) is expected


def test_marvl_label_from_the_answer_turn():
    assert m.marvl_label({"from": "gpt", "value": "true"}) == "true"
    assert m.marvl_label({"from": "gpt", "value": "false"}) == "false"
    with pytest.raises(ValueError, match="no 'true' or 'false'"):
        m.marvl_label({"from": "gpt", "value": "True"})  # case-sensitive, as the fork


def test_m3exam_letter_parsing_and_gold_letters():
    opts = ["(A) red", "(B) blue", "(C) green"]
    assert m.parse_choice("B", opts) == "B"  # no delimiter after it: found by the 2nd search
    assert m.parse_choice("(C) green", opts) == "C"
    assert m.parse_choice("c. green", opts) == "C"
    assert m.parse_choice("answer: d", opts) == "A"  # the first a-d anywhere: the "a" of answer
    # no letter a-d at all: "green" vs "(C) green" has ratio 2*5/14 = 0.714 > 0.7
    assert m.parse_choice("green", opts) == "C"
    drawn = m.parse_choice("rouge", opts, seed="x")  # best ratio 2*2/12: a seeded random letter
    assert drawn in "ABCD" and drawn == m.parse_choice("rouge", opts, seed="x")
    assert drawn == random.Random("x").choice(["A", "B", "C", "D"])
    assert [m.standard_answer(a) for a in ("B", "2", "(3)", "E", "x")] == ["B", "B", "C", "E", "x"]
    assert m.m3exam_accuracy("(B)", "2", opts) and not m.m3exam_accuracy("(A)", "2", opts)
    assert m3exam_options(["A. red", "(2) blue", "green"]) == ["(A) red", "(B) blue", "(C) green"]


def test_score_items_is_per_language_means_plus_pooled_overall():
    bench = get_benchmark("maxm")
    items = [
        Item("1", "fr", "q", ("rouge",)),
        Item("2", "fr", "q", ("bleu",)),
        Item("3", "zh", "q", ("红色",)),
    ]
    scores = score_items(bench, items, ["Rouge", "vert", "红色"])
    assert list(scores) == ["relaxed_accuracy", "exact_match"]
    assert scores["relaxed_accuracy"] == {"fr": 0.5, "zh": 1.0, "overall": 2 / 3}
    assert scores["exact_match"] == {"fr": 0.0, "zh": 1.0, "overall": 1 / 3}


def test_unknown_benchmark_and_language_fail_clearly():
    with pytest.raises(ValueError, match="valid benchmarks: xgqa, maxm, marvl, m3exam, probe"):
        get_benchmark("gqa")
    with pytest.raises(ValueError, match="xGQA has no language fr; choose from bn, de"):
        get_benchmark("xgqa").check_languages(["fr"])


# --- sources --------------------------------------------------------------------------------------


def test_reservoir_is_seeded_ordered_and_uniform():
    rows = [Item(str(i), "en", "q", ("a",)) for i in range(10)]
    first = reservoir(iter(rows), 3, random.Random(1))
    assert [it.id for it in first] == [it.id for it in reservoir(iter(rows), 3, random.Random(1))]
    assert [int(it.id) for it in first] == sorted(int(it.id) for it in first)
    assert reservoir(iter(rows[:2]), 3, random.Random(1)) == rows[:2]
    counts = Counter(it.id for s in range(3000) for it in reservoir(rows, 3, random.Random(s)))
    assert all(abs(counts[str(i)] / 3000 - 0.3) < 0.04 for i in range(10)), counts


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_local_datasets_in_the_real_schema_load_as_seeded_samples(local_sets, name):
    bench = BENCHMARKS[name]
    items = load_items(name, str(local_sets[name]), (), limit=2, seed=0)
    languages = list(dict.fromkeys(it.language for it in items))
    assert len(languages) == 2 and set(languages) <= set(bench.languages)
    assert all(sum(it.language == lang for it in items) == 2 for lang in languages)
    again = load_items(name, str(local_sets[name]), (), limit=2, seed=0)
    assert [it.id for it in again] == [it.id for it in items]
    others = {
        tuple(it.id for it in load_items(name, str(local_sets[name]), (), 2, s)) for s in range(6)
    }
    assert len(others) > 1  # the seed changes the sample
    for item in items:
        assert not hasattr(item.image, "size")  # still encoded: decoded a batch at a time
        picture = decode_image(item.image)
        assert picture.mode == "RGB" and picture.getpixel((32, 32)) in COLOURS.values()
        assert item.max_new_tokens == {
            "xgqa": 4,
            "m3exam": 16 + 16 * (item.language == "chinese"),
        }.get(name, 16)


def test_prompts_are_the_reference_wording(local_sets):
    xgqa = load_items("xgqa", str(local_sets["xgqa"]), ["de"], limit=1)[0]
    assert xgqa.question == (
        "Welche Farbe hat die Form? Answer the question using a single word or phrase in English."
    )
    maxm = load_items("maxm", str(local_sets["maxm"]), ["fr"], limit=4)[0]
    assert maxm.question == (
        "Given the image and the question, provide a concise answer. De quelle couleur est la "
        "forme ?\nAnswer the question using a single word or phrase in French."
    )
    assert maxm.answers == ("rouge", "red") and maxm.id == "fr000"
    marvl = load_items("marvl", str(local_sets["marvl"]), ["id"], limit=4)
    assert marvl[0].question == "The shape is red. Answer with the option directly."
    assert [it.answer for it in marvl] == ["true", "false", "false", "true"]
    exam = load_items("m3exam", str(local_sets["m3exam"]), ["english"], limit=4)
    assert len(exam) == 3  # the question with two pictures is left out
    assert exam[0].question == (
        "The following is a multiple choice question about Natural Science. Please only respond "
        "with the letter (A, B, C, or D) corresponding to the correct answer, without any "
        "additional explanation.\n\n\nA picture of one shape.\nWhat colour is the shape? \n"
        "(A) red\n(B) blue\n(C) green\nAnswer:"
    )


def test_bad_sources_fail_with_the_problem_and_the_fix(local_sets, tmp_path):
    folder = str(local_sets["xgqa"])
    with pytest.raises(ValueError, match=r"has no split 'bn' \(xGQA keeps one split per language"):
        load_items("xgqa", folder, ["bn"])
    with pytest.raises(ValueError, match="has no field 'answers'; it is not in the MaXM schema"):
        load_items("maxm", folder, ["zh"])
    # a folder of another layout, whose splits datasets names itself (NamedSplit, not text)
    other = tmp_path / "other"
    other.mkdir()
    (other / "test.jsonl").write_text('{"question": "?", "answer": "red"}\n')
    with pytest.raises(ValueError, match=r"has no split 'en' .*; its splits: test$"):
        load_items("xgqa", str(other), ["en"])
    with pytest.raises(ValueError, match="lies outside the folders"):
        load_items("xgqa", folder, ["de"], allowed_roots=[tmp_path])
    with pytest.raises(ValueError, match="does not exist"):
        load_items("xgqa", str(tmp_path / "missing"), ["de"])
    with pytest.raises(ValueError, match="neither a local folder nor a Hub dataset id"):
        load_items("xgqa", "not a dataset", ["de"])
    with pytest.raises(ValueError, match="at least 1"):
        load_items("xgqa", folder, ["de"], limit=0)


def test_a_large_split_streams_past_without_being_held(tmp_path):
    """1,500 noise pictures (~10 MB encoded, row groups of 100 as on the Hub): sampling 5 of them
    holds a row group at a time, not the split; the sample keeps its pictures encoded."""
    import io
    import tracemalloc

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(out, "PNG")
        return out.getvalue()

    n = 1500
    pictures = [{"bytes": noise(), "path": None} for _ in range(n)]
    encoded = sum(len(p["bytes"]) for p in pictures)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(
        {"image": pictures, "question": ["q"] * n, "answer": ["a"] * n}, features=features
    ).to_parquet(str(tmp_path / "data" / "de-00000-of-00001.parquet"), batch_size=100)
    del pictures
    tracemalloc.start()
    try:
        items = load_items("xgqa", str(tmp_path), ["de"], limit=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(items) == 5 and all(isinstance(it.image, dict) for it in items)
    assert peak < encoded / 4, (peak, encoded)


def test_the_demo_probe_is_a_source_behind_the_same_interface():
    items = load_items("probe", "demo", ["de", "zh"], limit=5, seed=0)
    assert [it.language for it in items] == ["de"] * 5 + ["zh"] * 5
    assert all(it.image.is_file() for it in items)
    with pytest.raises(ValueError, match="the probe has no question in xx"):
        load_items("probe", "demo", ["xx"])


# --- the command line ------------------------------------------------------------------------------


def _run_eval(tmp_path, name, folder, *extra):
    out = tmp_path / f"{name}.json"
    argv = ["eval", "--benchmark", name, "--dataset", str(folder), "--limit", "2"]
    assert cli.main([*argv, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_cli_eval_on_local_xgqa_with_a_merge_writes_json_that_rescores(local_sets, tmp_path):
    record = _run_eval(
        tmp_path, "xgqa", local_sets["xgqa"], "--languages", "de,zh", "--methods", "dim3"
    )
    assert record["benchmark"] == "xgqa" and record["metric"] == "exact_match"
    assert record["questions"] == 4 and list(record["models"]) == ["original", "dim3"]
    for model, scores in record["models"].items():
        hits: dict[str, list[bool]] = {"de": [], "zh": []}
        for row in record["items"]:  # rescored here from the definition, not with dim3's code
            pred, gold = row["predictions"][model], row["gold"][0]
            hits[row["language"]].append(gold.strip().lower() in pred.strip().lower())
        for lang, marks in hits.items():
            assert scores[lang] == pytest.approx(sum(marks) / len(marks))
        assert scores["overall"] == pytest.approx(sum(sum(v) for v in hits.values()) / 4)
    assert {row["id"] for row in record["items"]} <= {
        f"{lang}-{i}" for lang in ("de", "zh") for i in range(6)
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maxm", "marvl", "m3exam"])
def test_cli_eval_on_each_local_benchmark(local_sets, tmp_path, name):
    record = _run_eval(tmp_path, name, local_sets[name], "--methods", "none")
    bench = BENCHMARKS[name]
    assert record["metric"] == bench.primary and list(record["metrics"]["original"]) == list(
        bench.metrics
    )
    items = [
        Item(
            r["id"],
            r["language"],
            r["question"],
            tuple(r["gold"]),
            options=tuple(r.get("options", ())),
        )
        for r in record["items"]
    ]
    preds = [r["predictions"]["original"] for r in record["items"]]
    assert score_items(bench, items, preds) == record["metrics"]["original"]
    assert all(len(r["predictions"]["original"]) < 400 for r in record["items"])


def test_the_gold_line_judges_both_answers_to_the_drawn_question_only():
    from dim3.ui.draw import drawn_record, judge_text

    question = (
        "Welche Farbe hat die Form? Answer the question using a single word or phrase in English."
    )
    drawn = drawn_record("xgqa", Item("de-1", "de", question, ("red",), max_new_tokens=4))
    asked = {"role": "user", "content": question}
    left = [asked, {"role": "assistant", "content": "Red."}]
    right = [asked, {"role": "assistant", "content": "blue"}]
    text = judge_text(drawn, left, right)
    assert "**Gold answer:** red" in text and "exact match" in text
    assert "**Original:** ✅ matches" in text and "**Merged:** ❌ does not match" in text
    assert judge_text(drawn, left, [asked]) == ""  # the merged pane has not answered yet
    other = {"role": "user", "content": "Something else?"}
    assert judge_text(drawn, [*left, other, left[1]], [*right, other, right[1]]) == ""
    assert judge_text(None, left, right) == ""
    exam = drawn_record("m3exam", Item("e-1", "english", "q", ("2",), options=("(A) x", "(B) y")))
    ask = {"role": "user", "content": "q"}
    line = judge_text(
        exam,
        [ask, {"role": "assistant", "content": "B"}],
        [ask, {"role": "assistant", "content": "(A)"}],
    )
    assert "**Original:** ✅" in line and "**Merged:** ❌" in line


# --- what a dataset's pictures and questions may be -------------------------------------------------


def _png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` × ``height`` (one row of data: Pillow reads the header
    alone when asked the size; decoding would fail)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(b"\0" + b"\0" * 3 * width))
        + chunk(b"IEND", b"")
    )


def test_pictures_are_sized_from_their_header_and_refused_past_the_limits():
    """A batch is cut by the pixels its pictures have (``picture_pixels``: from the header, in
    every form a dataset holds them; past Pillow's own bomb limit, more than it); a picture past
    that limit (900 MP in a header), past the 40 MP allowed, or more than 50 times as long as wide, is refused naming
    that, as a decoded image handed over directly is too."""
    import base64

    from PIL import Image

    from dim3.benchmarks import picture_pixels

    large = _png(9_000, 9_000)
    for form in (large, {"bytes": large, "path": None}, base64.b64encode(large).decode()):
        assert picture_pixels(form) == 81_000_000
    header = _png(30_000, 30_000)
    assert picture_pixels(header) == 2 * Image.MAX_IMAGE_PIXELS + 1  # Pillow's limit: not read
    assert picture_pixels(Image.new("RGB", (7, 3))) == 21
    assert picture_pixels(b"not a picture") == 0 and picture_pixels({"path": "/etc/passwd"}) == 0
    with pytest.raises(ValueError, match="far more pixels than the 40,000,000 allowed"):
        decode_image({"bytes": header, "path": None})
    with pytest.raises(ValueError, match=r"is 8000×6000 pixels, more than the 40,000,000"):
        decode_image(_png(8000, 6000))
    with pytest.raises(ValueError, match=r"8000×100 pixels, more than 50 times as long"):
        decode_image(Image.new("L", (8000, 100)))
    assert decode_image(Image.new("L", (5000, 100))).mode == "RGB"


def test_a_question_longer_than_the_limit_is_refused_where_the_row_is_read(tmp_path):
    """A dataset row whose prompt would pass MAX_QUESTION_CHARS is refused when the sample is
    read, before any model: the message says how long and the limit."""
    import datasets

    from dim3.limits import MAX_QUESTION_CHARS
    from tests.benchmark_data import picture

    with pytest.raises(ValueError, match="8,001 characters long .* the 8,000"):
        Item("x", "en", "q" * (MAX_QUESTION_CHARS + 1), ("a",))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    questions = ["What colour?", "q" * MAX_QUESTION_CHARS, "Which colour?"]
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": picture("red"), "path": None}] * 3,
            "question": questions,
            "answer": ["red"] * 3,
        },
        features=features,
    ).to_parquet(str(tmp_path / "data" / "de-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"8,0\d\d characters long"):
        load_items("xgqa", str(tmp_path), ["de"], limit=3)
