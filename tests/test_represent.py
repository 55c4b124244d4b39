"""``python -m dim3 represent``: metrics on hand-made points, pooling against transformers'
own hidden states, parallel-file validation, and a CLI run on the demo trio."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dim3 import cli
from dim3.chat import load_vlm
from dim3.demo import demo_trio
from dim3.demo.parallel import demo_parallel
from dim3.probes import ParallelItem, ProbeError, load_parallel
from dim3.represent import (
    SENTENCES,
    batch_inputs,
    layer_metrics,
    pooled_states,
    retrieval_accuracy,
    silhouette,
)


def test_retrieval_accuracy_matches_a_hand_computed_case():
    # en: g1=(1,0) g2=(0,1) g3=(1,1); de: g1=(1,.1) g2=(.1,1) g3=(-1,0)
    points = np.array([[1, 0], [0, 1], [1, 1], [1, 0.1], [0.1, 1], [-1, 0]], dtype=float)
    groups = ["g1", "g2", "g3"] * 2
    langs = ["en"] * 3 + ["de"] * 3
    # en->de: g1 ok, g2 ok, g3 ties between de g1 and g2 (cos 0.774), first wins: wrong -> 2/3
    # de->en: g1 ok, g2 ok, g3=(-1,0) is nearest to en g2 (cos 0 > -0.707 > -1): wrong -> 2/3
    assert retrieval_accuracy(points, groups, langs) == pytest.approx(2 / 3)
    # scaling a point changes nothing (cosine); perfect translations score 1
    assert retrieval_accuracy(np.vstack([points[:3], 5 * points[:3]]), groups, langs) == 1.0


def test_silhouette_is_sklearns_with_cosine_distance_on_known_clusters():
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0]) + 0.01 * rng.standard_normal((5, 3))
    b = np.array([0, 1.0, 0]) + 0.01 * rng.standard_normal((5, 3))
    points = np.vstack([a, b])
    right, mixed = ["a"] * 5 + ["b"] * 5, ["a", "b"] * 5
    assert silhouette(points, right) > 0.95
    assert silhouette(points, mixed) < 0
    # one point per cluster member by hand: distance 1 - cos, a = 0 within identical points
    exact = np.array([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    assert silhouette(exact, ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert math.isnan(silhouette(points, ["a"] * 10))


def test_layer_metrics_give_one_value_per_layer():
    items = [ParallelItem(g, lang, "t") for lang in ("en", "de") for g in ("x", "y", "z")]
    states = np.random.default_rng(1).standard_normal((3, 6, 4))
    metrics = layer_metrics(states, items)
    assert set(metrics) == {"silhouette_language", "silhouette_content", "retrieval"}
    assert all(len(v) == 3 for v in metrics.values())


@pytest.fixture(scope="module")
def demo_vlm():
    return load_vlm(demo_trio()[2], dtype=torch.float32)


def test_pooling_equals_the_masked_mean_of_transformers_hidden_states(demo_vlm):
    model, processor = demo_vlm
    items = demo_parallel(3)[:10]  # pictures + questions in several languages
    states = pooled_states(model, processor, items, batch_size=4)
    assert states.shape == (model.config.text_config.num_hidden_layers + 1, 10, 96)
    inputs, mask = batch_inputs(model, processor, items)
    tok = processor.tokenizer
    for row, item in enumerate(items):  # the mask covers exactly the question's tokens
        text = tok.decode(inputs["input_ids"][row][mask[row].bool()])
        assert text.strip() == item.text
        assert not (
            inputs["input_ids"][row][mask[row].bool()] == model.config.image_token_index
        ).any()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    for layer, h in enumerate(hidden):
        expected = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        np.testing.assert_allclose(states[layer], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_pooling_finds_the_text_after_qwen2vl_image_tokens(tiny_qwen2vl_trio, tmp_path):
    pytest.importorskip("torchvision")
    model, processor = load_vlm(tiny_qwen2vl_trio.multimodal, dtype=torch.float32)
    picture = tmp_path / "p.png"
    Image.new("RGB", (56, 56), (200, 30, 30)).save(picture)
    items = [
        ParallelItem("a", "en", "What colour is the shape?", picture),
        ParallelItem("a", "de", "Welche Farbe hat die Form?", picture),
    ]
    inputs, mask = batch_inputs(model, processor, items)
    for row, item in enumerate(items):
        ids = inputs["input_ids"][row][mask[row].bool()]
        assert processor.tokenizer.decode(ids).strip() == item.text
    assert pooled_states(model, processor, items).shape[1] == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "language": "en"}'], "missing or empty ['text']"),
        (['{"id": "a", "language": "en", "text": "  "}'], "missing or empty ['text']"),
        (['{"id": true, "language": "en", "text": "x"}'], "missing or empty ['id']"),
        (['{"id": "a", "language": "en", "text": "x"}'] * 2, "already given at"),
        (['{"id": "a", "language": "en", "text": "x", "image": "no.png"}'], "does not exist"),
        (['{"id": "a", "language": "en", "text": "x"}', "[1]"], "expected a JSON object"),
        (
            [
                '{"id": "a", "language": "en", "text": "x"}',
                '{"id": "b", "language": "en", "text": "y"}',
            ],
            "at least two ids, each in at least two languages",
        ),
        (
            [
                '{"id": "a", "language": "en", "text": "x"}',
                '{"id": "a", "language": "de", "text": "x"}',
                '{"id": "b", "language": "en", "text": "y"}',
            ],
            "appear in one language only",
        ),
    ],
)
def test_bad_parallel_files_say_what_and_where(tmp_path, lines, message):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ProbeError) as info:
        load_parallel(path)
    assert message in str(info.value)


def test_pictures_on_some_lines_only_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    rows = [
        {"id": g, "language": lang, "text": "t", **({"image": "p.png"} if g == "a" else {})}
        for g in ("a", "b")
        for lang in ("en", "de")
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ProbeError, match="2 of 4 lines have an image"):
        load_parallel(path)


def test_bundled_sentences_are_parallel_in_twelve_languages():
    items = load_parallel(SENTENCES)
    languages = {it.language for it in items}
    assert {"ar", "he", "hi", "zh", "sw", "en"} <= languages and len(languages) >= 12
    groups = {it.group for it in items}
    assert 20 <= len(groups) <= 30
    assert len(items) == len(groups) * len(languages)  # every sentence in every language
    assert len({it.text for it in items}) == len(items)


def test_demo_parallel_set_is_fixed_and_covers_every_shape():
    first, again = demo_parallel(), demo_parallel()
    assert first == again
    assert len({it.group for it in first}) == 24 and len({it.language for it in first}) == 8
    assert len({it.group.split("_")[2] for it in first}) == 6  # all six shapes
    assert all(it.image.is_file() for it in first)


def test_cli_writes_csv_json_and_images(tmp_path):
    # a small text-only set (3 descriptions x 3 languages) so the LLMs take part too
    items = [it for it in demo_parallel(3, pictures=False) if it.language in ("en", "de", "zh")]
    probe = tmp_path / "set.jsonl"
    probe.write_text(
        "\n".join(
            json.dumps(
                {"id": it.group, "language": it.language, "text": it.text}, ensure_ascii=False
            )
            for it in items
        ),
        encoding="utf-8",
    )
    out, extra = tmp_path / "out", tmp_path / "copy.json"
    rc = cli.main(
        ["represent", "--probe", str(probe), "--llms", "--out", str(out), "--json", str(extra),
         "--map", "pca", "--layer", "1", "--method", "ties", "--option", "density=0.5"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "represent.json").read_text())
    assert json.loads(extra.read_text()) == data
    assert data["layers"] == [0, 1, 2, 3, 4]  # embeddings + 4 layers of the demo models
    assert list(data["models"]) == ["base", "multilingual", "original", "ties"]
    for figures in data["models"].values():
        assert set(figures) == {"silhouette_language", "silhouette_content", "retrieval"}
        assert all(len(v) == 5 for v in figures.values())
        assert all(0 <= r <= 1 for r in figures["retrieval"])
    # the embedding layer of the base and of the VLM differ: the VLM's LM was tuned
    assert data["models"]["ties"] != data["models"]["original"]
    rows = list(csv.DictReader((out / "represent.csv").open()))
    assert len(rows) == 4 * 5 and rows[0]["model"] == "base" and rows[0]["layer"] == "0"
    for png in ("represent_curves.png", "represent_map_1.png"):
        with Image.open(out / png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 400


def test_cli_refuses_a_bad_probe_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "language": "en"}\n')
    assert cli.main(["represent", "--probe", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0] and "text" in err[0]
    assert not (tmp_path / "o").exists()


def test_the_app_takes_a_parallel_set_of_bounded_size(app_server, tmp_path):
    """Attack round 5: a 1.4 MB file of 24,000 items ran the app's representation analysis 272 s
    past its budget (retrieval compares every pair, the map places every item): over
    ``MAX_ITEMS`` the app refuses the set with the count, before any model runs; at the limit it
    is analysed."""
    gradio_client = pytest.importorskip("gradio_client")
    from dim3.ui.represent import MAX_ITEMS

    url, _ = app_server
    client = gradio_client.Client(url, verbose=False)
    over = tmp_path / "over.jsonl"
    rows = [
        {"id": str(i // 2), "language": "en de".split()[i % 2], "text": f"t{i}"}
        for i in range(MAX_ITEMS + 2)
    ]
    over.write_text("\n".join(json.dumps(r) for r in rows))
    status, *_ = client.predict("file", str(over), "pca", api_name="/represent")
    assert status.startswith("❌") and f"{MAX_ITEMS + 2:,} items" in status, status
    assert f"at most {MAX_ITEMS:,}" in status, status
    at = tmp_path / "at.jsonl"
    at.write_text("\n".join(json.dumps(r) for r in rows[:MAX_ITEMS]))
    status, *_ = client.predict("file", str(at), "pca", api_name="/represent")
    assert status.startswith(f"✅ {MAX_ITEMS} items (2 languages)"), status
