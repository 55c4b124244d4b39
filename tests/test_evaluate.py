"""``python -m dim3 eval``: scoring, argument checks, and runs on the demo trio with real merges."""

from __future__ import annotations

import json

import pytest

from dim3 import cli
from dim3.benchmarks.metrics import is_correct, normalise
from dim3.demo import DEMO_DIR, ProbeItem, demo_probe, demo_trio
from dim3.evaluate import (
    EvalSpec,
    accuracy,
    format_table,
    parse_methods,
    parse_options,
)
from dim3.methods import METHODS


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        (" Rot. ", "rot", True),
        ("红色。", "红色", True),
        ("«красный»", "красный", True),
        ("red", "rot", False),
        ("rote", "rot", False),
        ("", "rot", False),
        ("Kreis rot", "Kreis", False),
    ],
)
def test_exact_match_after_normalising(prediction, answer, expected):
    assert is_correct(prediction, answer) is expected


def test_normalise_composes_unicode():
    assert normalise("gru\u0308n") == normalise("grün") == "grün"


def test_accuracy_is_per_language_plus_overall():
    items = [
        ProbeItem("q", "red", "en"),
        ProbeItem("q", "blue", "en"),
        ProbeItem("q", "rot", "de"),
        ProbeItem("q", "blau", "de"),
    ]
    result = accuracy(items, ["red", "blue", "rot", "red"])
    assert result == {"en": 1.0, "de": 0.5, "overall": 0.75}
    assert list(result) == ["en", "de", "overall"]
    table = format_table({"original": result})
    assert table.splitlines()[0].split() == ["model", "en", "de", "overall"]
    assert "0.750" in table


def test_methods_and_options_parse_and_fail_clearly():
    data_free = tuple(m for m in METHODS if not METHODS[m].extra_inputs)
    assert parse_methods(None) == data_free == parse_methods("all")
    assert "fisher" not in data_free and parse_methods("fisher") == ("fisher",)
    assert parse_methods("none") == ()
    assert parse_methods("dim3, task_arithmetic") == ("dim3", "task_arithmetic")
    with pytest.raises(ValueError, match="valid methods"):
        parse_methods("dim3,nope")
    assert parse_options(["dim3.calibration=0.5"]) == {"dim3": {"calibration": 0.5}}
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_options(["calibration=0.5"])


def test_eval_spec_rejects_bad_input_before_loading_anything():
    item = (ProbeItem("q", "a", "en"),)
    with pytest.raises(ValueError, match="probe set is empty"):
        EvalSpec("b", "m", "v", items=(), methods=("dim3",))
    with pytest.raises(ValueError, match="methods not evaluated"):
        EvalSpec("b", "m", "v", items=item, methods=("dim3",), options={"ties": {}})
    with pytest.raises(ValueError, match="unknown option"):
        EvalSpec("b", "m", "v", items=item, methods=("dim3",), options={"dim3": {"bogus": 1}})


def test_eval_needs_all_three_checkpoints_or_none(capsys):
    rc = cli.main(["eval", "--base", str(demo_trio()[0]), "--methods", "none"])
    assert rc == 2
    assert "missing --multilingual, --multimodal" in capsys.readouterr().err


def test_eval_of_a_missing_probe_file_fails_with_one_line(tmp_path, capsys):
    rc = cli.main(["eval", "--probe", str(tmp_path / "nope.jsonl"), "--methods", "none"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_a_user_probe_file_with_real_merges_writes_json(tmp_path, capsys):
    """A user JSONL (relative image paths + one text-only line) over the demo trio, merged twice."""
    picked = [it for it in demo_probe() if it.language in ("en", "de")][:16]
    (tmp_path / "pics").mkdir()
    lines = []
    for i, item in enumerate(picked):
        (tmp_path / "pics" / f"{i}.png").write_bytes(item.image.read_bytes())
        row = {"image": f"pics/{i}.png", "question": item.question, "answer": item.answer}
        lines.append(json.dumps({**row, "language": item.language}, ensure_ascii=False))
    lines.append(
        json.dumps({"question": "What colour is the shape?", "answer": "red", "language": "en"})
    )
    probe = tmp_path / "mine.jsonl"
    probe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base, ml, mm = (str(p) for p in demo_trio())
    out = tmp_path / "out" / "results.json"
    argv = ["eval", "--probe", str(probe), "--base", base, "--multilingual", ml, "--multimodal", mm]
    rc = cli.main([*argv, "--methods", "dim3,task_arithmetic", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["questions"] == 17
    assert list(results["models"]) == ["original", "dim3", "task_arithmetic"]
    for accs in results["models"].values():
        assert set(accs) == {"en", "de", "overall"}
        assert all(0.0 <= v <= 1.0 for v in accs.values())
    # 8 English picture questions + 1 unanswerable text one: the demo VLM gets the pictures right
    assert results["models"]["original"]["en"] >= 7 / 9
    printed = capsys.readouterr().out
    assert "task_arithmetic" in printed and "overall" in printed


def _evaluate_tab(methods, probe="", per_language=8, source="probe", languages=(), fisher=None):
    import gradio as gr

    from dim3.ui.common import AppContext
    from dim3.ui.evaluate import build_evaluate_tab, evaluate_handler
    from dim3.ui.merge import build_merge_tab

    ctx = AppContext.from_env()
    with gr.Blocks():
        merge = build_merge_tab(ctx)
        tab = build_evaluate_tab(ctx, merge)
    values = {name: c.value for name, c in merge.form.kwargs().items()}
    roles = ("base", "multilingual", "multimodal")
    values |= {r: str(p) for r, p in zip(roles, demo_trio(), strict=True)}
    values |= {
        "method": "dim3",
        "methods": methods,
        "probe": probe,
        "questions_per_language": per_language,
        "source": source,
        "languages": list(languages),
    }
    values |= fisher or {}
    updates = list(evaluate_handler(ctx, merge, tab)(progress=lambda *a, **k: None, **values))
    return tab, updates[-1]


@pytest.mark.slow
def test_evaluate_tab_shows_a_per_language_table_and_a_bar_chart(monkeypatch):
    monkeypatch.setenv("DIM3_ALLOWED_ROOTS", str(DEMO_DIR))
    tab, out = _evaluate_tab(["dim3"])
    assert out[tab.status].startswith("✅ 64 questions, 2 models"), out[tab.status]
    frame = out[tab.table]
    assert list(frame["model"]) == ["original", "dim3"]
    assert list(frame.columns) == [
        "model",
        "en",
        "de",
        "es",
        "ru",
        "zh",
        "ar",
        "hi",
        "sw",
        "overall",
    ]
    assert (
        frame[frame.columns[1:]].to_numpy().min() >= 0
        and frame[frame.columns[1:]].to_numpy().max() <= 1
    )
    bars = out[tab.chart].axes[0].patches
    assert len(bars) == 2 * 9
    assert bars[0].get_height() == frame.loc[0, "en"]


@pytest.mark.slow
def test_evaluate_with_fisher_reads_its_questions_once(tmp_path, monkeypatch):
    """Fisher ticked: the form is checked before the Fishers are estimated and the run is made
    again with them; the dataset is read once, not at each step (a Hub split streamed twice)."""
    from dim3.ui import evaluate as ui_evaluate

    monkeypatch.setenv("DIM3_ALLOWED_ROOTS", str(DEMO_DIR))
    monkeypatch.setenv("DIM3_OUTPUT_DIR", str(tmp_path / "outputs"))
    reads = []
    real = ui_evaluate.load_items

    def counted(*args, **kwargs):
        reads.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ui_evaluate, "load_items", counted)
    tab, out = _evaluate_tab(["fisher"], per_language=1, fisher={"fisher_n": 2})
    assert out[tab.status].startswith("✅ 8 questions, 2 models"), out[tab.status]
    assert list(out[tab.table]["model"]) == ["original", "fisher"]
    assert len(list((tmp_path / "outputs" / "fisher").iterdir())) == 2  # estimated here
    assert reads == [("probe", None)]


def test_evaluate_tab_refuses_a_probe_file_outside_the_allowed_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DIM3_ALLOWED_ROOTS", str(DEMO_DIR))
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"question": "q", "answer": "a", "language": "en"}\n')
    tab, out = _evaluate_tab(["dim3"], probe=str(probe))
    assert out[tab.status].startswith("❌") and "lies outside the folders" in out[tab.status]
    assert str(tmp_path) not in out[tab.status]  # no server path
    assert set(out) == {tab.status}


# --------------------------------------------------------------------------- what one batch holds


def test_batches_are_cut_by_size_pixels_and_padded_tokens_in_order():
    """Random costs, checked against the definition: the batches are the items in order; each
    holds at most its size (the first one ``first``), and within the budgets unless it is one
    item; and each ends only where the next item would pass one of them."""
    import random

    from dim3.evaluate import _chunks
    from dim3.limits import MAX_BATCH_PIXELS, MAX_BATCH_TOKENS

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 90)
        indices = sorted(rng.sample(range(200), n))
        big = trial % 3 == 0  # a third with costs near the limits, the rest small
        costs = {
            i: (
                rng.randint(1, MAX_BATCH_TOKENS if big else 600),
                rng.choice([0, rng.randint(1, 45_000_000 if big else 900_000)]),
            )
            for i in indices
        }
        size, first = rng.randint(1, 70), rng.choice([None, rng.randint(1, 9)])
        batches = _chunks(indices, size, first, costs)
        assert [i for b in batches for i in b] == indices and all(batches)

        def fits(batch, costs=costs):
            tokens = len(batch) * max(costs[i][0] for i in batch)
            pixels = sum(costs[i][1] for i in batch)
            return tokens <= MAX_BATCH_TOKENS and pixels <= MAX_BATCH_PIXELS

        for k, batch in enumerate(batches):
            limit = (first or size) if k == 0 else size
            assert len(batch) <= limit and (len(batch) == 1 or fits(batch))
            if k + 1 < len(batches):
                longer = batch + batches[k + 1][:1]
                assert len(batch) == limit or not fits(longer)
    # without costs: batches of ``size``, the first of ``first``
    assert _chunks(list(range(10)), 4, 2) == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]


def test_costs_count_the_prompt_tokens_and_the_picture_pixels_from_the_header():
    """What a batch is cut by, on the demo VLM's real processor: the prompt's tokens as the
    processor's tokenizer counts the chat template's text, and the pixels of a picture that is
    not decoded (a 6,300 × 6,300 PNG of 15 KB)."""
    import io

    from PIL import Image
    from transformers import AutoProcessor

    from dim3.benchmarks import Item
    from dim3.evaluate import _costs, _prompt

    processor = AutoProcessor.from_pretrained(str(demo_trio()[2]))
    buf = io.BytesIO()
    Image.new("1", (6300, 6300), 1).save(buf, "PNG")
    picture = {"bytes": buf.getvalue(), "path": None}
    short = Item("a", "en", "What colour is it?", ("red",), image=picture)
    long = Item("b", "en", "What colour is it? " * 300, ("red",))
    tokens, pixels = _costs(processor, short)
    assert pixels == 6300 * 6300 and len(buf.getvalue()) < 100_000
    assert tokens == len(processor.tokenizer(_prompt(processor, short))["input_ids"])
    assert _costs(processor, long)[0] > 20 * tokens and _costs(processor, long)[1] == 0


def test_large_pictures_are_asked_a_few_at_a_time():
    """Eight 40 MP pictures (15 KB each as PNG) in one batch of 64 took 2.4 GB over the loaded
    demo VLM; cut by the pixels they decode, the evaluation stays within 1 GiB, and answers as
    one picture at a time does. Measured in a fresh process (its peak resident size)."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import io, json, resource, sys
import torch
from PIL import Image
from dim3.benchmarks import Item
from dim3.chat import load_vlm
from dim3.demo import demo_trio
from dim3.evaluate import generate_answers

buf = io.BytesIO()
Image.new("1", (6300, 6300), 1).save(buf, "PNG")
items = [
    Item(str(i), "en", "What colour is the shape?", ("red",), image={"bytes": buf.getvalue()})
    for i in range(8)
]
model, processor = load_vlm(demo_trio()[2], dtype=torch.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
answers = generate_answers(model, processor, items, batch_size=64)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
alone = [generate_answers(model, processor, [it], batch_size=1)[0] for it in items[:2]]
print(json.dumps({"peak_kib": peak, "answers": answers, "alone": alone}))
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["peak_kib"] < 2**20, out["peak_kib"]  # KiB: under 1 GiB
    assert out["answers"][:2] == out["alone"] and len(set(out["answers"])) == 1


def test_the_time_per_question_is_taken_after_the_first_batch():
    """The first batch carries the first generation's set-up: the estimate is the pace of the
    batches after it, or the first batch's when it was all."""
    from dim3.evaluate import steady_seconds

    marks = {"model": 100.0}
    assert steady_seconds(marks, 103.0, 8, 200) is None  # 8 answered in 3 s: set-up
    assert steady_seconds(marks, 104.0, 72, 200) == 1 / 64  # then 64 in 1 s
    assert steady_seconds({"model": 5.0}, 7.0, 8, 8) == 0.25
