"""Fisher-weighted merging: the rule against its definition, the streamed Fisher against a direct
per-example computation on tiny real models, and the CLI's Fisher folders and merge against an
independent computation from the files."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dim3 import engine
from dim3.cli import main
from dim3.evaluate import _batch_inputs
from dim3.fisher import (
    FISHER_FILE,
    FisherSpec,
    choose,
    estimate,
    language_parameters,
    load_model,
    source_items,
)
from dim3.fisher_files import FisherFolder
from dim3.layout import EMBED, LM_HEAD, layout_for
from dim3.methods import get_method
from dim3.probes import ProbeItem
from dim3.recipe import Recipe, Source
from tests.test_engine import load_all, recipe_of

TEXT = [
    ("The red circle is small.", "What colour is the shape?", "red", "en"),
    ("Der rote Kreis ist klein.", "Welche Farbe hat die Form?", "rot", "de"),
    ("El cuadrado azul es grande.", "¿De qué color es la forma?", "azul", "es"),
    ("Красный круг маленький.", "Какого цвета фигура?", "красный", "ru"),
    ("The blue square is large.", "What shape is it?", "square", "en"),
]


def text_items() -> list[ProbeItem]:
    return [ProbeItem(q, a, lang, context=c) for c, q, a, lang in TEXT]


def picture_items(folder: Path) -> list[ProbeItem]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (colour, answer) in enumerate([((200, 30, 30), "red"), ((30, 30, 200), "blue")] * 2):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        items.append(ProbeItem("What colour is the shape?", answer, "en", image=path))
    return items


def write_probe(path: Path, items: list[ProbeItem]) -> Path:
    rows = [
        {"question": it.question, "answer": it.answer, "language": it.language}
        | ({"context": it.context} if it.context else {})
        | ({"image": str(it.image)} if it.image else {})
        for it in items
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


# --------------------------------------------------------------------------- the rule


def direct_rule(base, tuned, fishers, weights, floor):
    """θ = Σ λ_i max(F_i, floor) θ_i / Σ λ_i max(F_i, floor), in float64 (models incl. base)."""
    models = [base, *tuned] if len(fishers) == len(tuned) + 1 else tuned
    num = sum(
        w * f.double().clamp_min(floor) * m.double()
        for w, f, m in zip(weights, fishers, models, strict=True)
    )
    den = sum(w * f.double().clamp_min(floor) for w, f in zip(weights, fishers, strict=True))
    return (num / den).float()


@pytest.mark.parametrize("shape", [(6, 5), (11,)])
@pytest.mark.parametrize("with_base", [False, True])
def test_rule_is_the_fisher_weighted_mean(shape, with_base):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    tuned = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(3)]  # VLM, 2 experts
    fishers = [torch.rand(shape, generator=g) ** 4 for _ in range(3 + with_base)]
    fishers[-1].view(-1)[:3] = 0.0  # no Fisher mass for some entries of one model
    opts = {"multimodal_weight": 0.7, "multilingual_weight": 1.3, "floor": 1e-3}
    weights = [0.7, 1.3, 1.3]
    if with_base:
        opts["base_weight"], weights = 0.4, [0.4, *weights]
    m = get_method("fisher")
    copies = [t.clone() for t in (base, *tuned, *fishers)]
    out = m.fn(base, tuned, m.make_options(opts), extra=fishers)
    want = direct_rule(base, tuned, fishers, weights, 1e-3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(copies, (base, *tuned, *fishers), strict=True))


def test_rule_where_no_model_has_fisher_mass_is_the_weighted_mean():
    base = torch.zeros(4)
    tuned = [torch.full((4,), 1.0), torch.full((4,), 4.0)]
    m = get_method("fisher")
    opts = m.make_options({"multimodal_weight": 3.0, "multilingual_weight": 1.0})
    out = m.fn(base, tuned, opts, extra=[torch.zeros(4), torch.zeros(4)])
    torch.testing.assert_close(out, torch.full((4,), (3 * 1 + 4) / 4))
    # a dominant Fisher pulls the value to its model
    out = m.fn(base, tuned, opts, extra=[torch.full((4,), 1e6), torch.full((4,), 1e-6)])
    torch.testing.assert_close(out, torch.full((4,), 1.0), rtol=1e-5, atol=1e-5)


def test_rule_refuses_a_wrong_number_of_fishers_and_base_weight_without_its_fisher():
    m = get_method("fisher")
    base, tuned = torch.zeros(3), [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match="one Fisher per model"):
        m.fn(base, tuned, m.make_options({}), extra=[torch.ones(3)])
    with pytest.raises(ValueError, match="base_weight > 0 needs the base"):
        m.fn(base, tuned, m.make_options({"base_weight": 1.0}), extra=[torch.ones(3)] * 2)
    with pytest.raises(ValueError, match="must not all be 0"):
        m.make_options({"multimodal_weight": 0, "multilingual_weight": 0})


# --------------------------------------------------------------------------- estimation


def direct_fisher(model, processor, items, answers):
    """1/N Σ_n (∇ log p(y_n|x_n))² over all language parameters, one autograd.grad per example,
    with the log-likelihood from the model's own loss (mean cross-entropy × answer tokens)."""
    params = language_parameters(model)
    names, tensors = list(params), list(params.values())
    total = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    for item, answer in zip(items, answers, strict=True):
        inputs = _batch_inputs(model, processor, [item])
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
        labels = torch.full_like(ids, -100)
        labels[0, -len(answer) :] = torch.tensor(answer)
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw)
        grads = torch.autograd.grad(-out.loss * len(answer), tensors, allow_unused=True)
        for acc, gr in zip(total, grads, strict=True):
            if gr is not None:
                acc.add_(gr.double() ** 2)
    return {n: (t / len(items)).float() for n, t in zip(names, total, strict=True)}


def given_answers(processor, items):
    tok = getattr(processor, "tokenizer", processor)
    return [
        tok(it.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items
    ]


@pytest.mark.parametrize("role", ["base", "multilingual"])
@pytest.mark.parametrize("trio_name", ["tiny_llava_trio", "tiny_qwen2vl_trio"])
def test_streamed_fisher_of_an_llm_equals_a_direct_computation(trio_name, role, request):
    trio = request.getfixturevalue(trio_name)
    model, tok = load_model(getattr(trio, role), torch.device("cpu"))
    items = text_items()
    got = estimate(model, tok, items, labels="given")
    want = direct_fisher(model, tok, items, given_answers(tok, items))
    assert set(got) == set(want) == {n for n, _ in model.named_parameters()}
    if model.config.tie_word_embeddings:  # one Fisher for the tied embedding, both uses in it
        assert EMBED in got and LM_HEAD not in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert sum(float(t.sum()) for t in got.values()) > 0


def test_streamed_fisher_of_a_vlm_covers_its_language_model_only(tiny_llava_trio, tmp_path):
    model, processor = load_model(tiny_llava_trio.multimodal, torch.device("cpu"))
    items = picture_items(tmp_path / "pictures")
    got = estimate(model, processor, items, labels="given")
    want = direct_fisher(model, processor, items, given_answers(processor, items))
    layout = layout_for(model.config.to_dict(), dict(model.named_parameters()))
    lm = {layout.classify(n)[1] for n, _ in model.named_parameters() if layout.classify(n)[1]}
    assert set(got) == lm and all(k.startswith(("model.layers.", "model.", "lm_head")) for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_sampled_fisher_is_seeded_and_differs_from_the_given_one(tiny_llava_trio):
    model, tok = load_model(tiny_llava_trio.multilingual, torch.device("cpu"))
    items = text_items()[:3]
    a = estimate(model, tok, items, labels="sampled", seed=3, max_new_tokens=4)
    b = estimate(model, tok, items, labels="sampled", seed=3, max_new_tokens=4)
    c = estimate(model, tok, items, labels="given")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.allclose(a[key], c[key])


def test_choose_and_sources_refuse_bad_requests(tmp_path):
    items = text_items()
    assert choose(items, 3, 1) == choose(items, 3, 1) and len(choose(items, 5, 0)) == 5
    with pytest.raises(ValueError, match="N = 6 examples asked for but the data source has 5"):
        choose(items, 6, 0)
    probe = write_probe(tmp_path / "pics.jsonl", picture_items(tmp_path / "p"))
    with pytest.raises(ValueError, match="has pictures but the model is a text-only LLM"):
        source_items(str(probe), vlm=False)
    with pytest.raises(ValueError, match="labels 'true' is not one of given, sampled"):
        FisherSpec(Source("m"), labels="true")
    with pytest.raises(ValueError, match="Fisher n must be an integer"):
        FisherSpec(Source("m"), n=0)


# --------------------------------------------------------------------------- CLI, end to end


@pytest.fixture(scope="module")
def fishers(tiny_llava_trio, tmp_path_factory):
    """Fisher folders of the tiny LLaVA trio's three models, written by the CLI."""
    root = tmp_path_factory.mktemp("fishers")
    text = write_probe(root / "text.jsonl", text_items())
    pics = write_probe(root / "pics.jsonl", picture_items(root / "pictures"))
    out = {}
    for role, data, labels in [
        ("base", text, "given"),
        ("multilingual", text, "sampled"),
        ("multimodal", pics, "given"),
    ]:
        out[role] = root / role
        argv = ["fisher", "--model", str(getattr(tiny_llava_trio, role)), "--data", str(data)]
        argv += ["--n", "4", "--seed", "2", "--labels", labels, "--out", str(out[role])]
        assert main(argv) == 0
    return out


def test_cli_fisher_folder_holds_the_estimate_and_its_recipe(tiny_llava_trio, fishers):
    meta = json.loads((fishers["base"] / FISHER_FILE).read_text())
    assert meta["n"] == 4 and meta["seed"] == 2 and meta["labels"] == "given"
    assert meta["data"].endswith("text.jsonl") and meta["data_examples"] == len(TEXT)
    model, tok = load_model(tiny_llava_trio.base, torch.device("cpu"))
    items = choose(text_items(), 4, 2)
    want = direct_fisher(model, tok, items, given_answers(tok, items))
    got = load_file(fishers["base"] / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-12)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in got.values()))
    assert meta["norm"] == pytest.approx(norm, rel=1e-6)


def independent_merge(trio, fishers, weights: dict[str, float], normalize: bool, floor: float):
    """The merged VLM's tensors from the files alone: Σ λ F θ / Σ λ F on the shared rows."""
    vlm, base, ml = (load_all(p) for p in (trio.multimodal, trio.base, trio.multilingual))
    f = {r: load_file(fishers[r] / "model.safetensors") for r in fishers}
    norms = {r: json.loads((fishers[r] / FISHER_FILE).read_text())["norm"] for r in fishers}
    from dim3.checkpoints import Checkpoint

    layout = layout_for(Checkpoint(trio.multimodal).config, vlm)
    out = {}
    for key, t in vlm.items():
        cls = layout.classify(key)
        if cls[0] != "language":
            out[key] = t
            continue
        c = cls[1]
        models = {"base": base[c], "multilingual": ml[c], "multimodal": t}
        rows = min(m.shape[0] for m in models.values())
        num = den = 0
        for role, w in weights.items():
            if w == 0:
                continue
            fi = f[role][c][:rows].double() / (norms[role] if normalize else 1.0)
            fi = fi.clamp_min(floor) * w
            num, den = num + fi * models[role][:rows].double(), den + fi
        merged = t.clone()
        merged[:rows] = (num / den).float()
        out[key] = merged
    return out


@pytest.mark.parametrize(
    "weights,normalize",
    [
        ({"multimodal": 1.0, "multilingual": 1.0}, 1),
        ({"base": 0.5, "multimodal": 2.0, "multilingual": 1.0}, 0),
    ],
)
def test_cli_fisher_merge_equals_an_independent_computation(
    tiny_llava_trio, fishers, tmp_path, weights, normalize
):
    trio = tiny_llava_trio
    argv = ["merge", "--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    argv += [
        "--multimodal",
        str(trio.multimodal),
        "--method",
        "fisher",
        "--out",
        str(tmp_path / "m"),
    ]
    argv += ["--fisher"] + [f"{r}={fishers[r]}" for r in weights]
    argv += [f"--option={r}_weight={w}" for r, w in weights.items()]
    argv += [f"--option=normalize={normalize}", "--option=floor=1e-9"]
    assert main(argv) == 0
    got = load_all(tmp_path / "m")
    want = independent_merge(trio, fishers, weights, bool(normalize), 1e-9)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    recipe = Recipe.load(tmp_path / "m" / "dim3_recipe.json")
    assert recipe.fisher == {r: str(fishers[r]) for r in weights}
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Fisher" in card and "given" in card


def test_sliced_fisher_merge_equals_whole(tiny_llava_trio, fishers, tmp_path):
    recipe = recipe_of(
        tiny_llava_trio,
        method="fisher",
        fisher={r: str(fishers[r]) for r in ("multimodal", "multilingual")},
    )
    whole = engine.merge_to_folder(recipe, tmp_path / "whole", chunk_size="1GiB")
    sliced = engine.merge_to_folder(recipe, tmp_path / "sliced", chunk_size="4KiB")
    a, b = load_all(whole.out_dir), load_all(sliced.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiled_fisher_steps_equal_the_untiled_loop(tiny_llava_trio, fishers, tmp_path, monkeypatch):
    """The Fisher rule in tiles of 4 rows (its Fisher rows cut with the weights'): what the
    untiled loop computes, bit for bit, in the loop's pieces and in the folder."""
    from tests.test_slicing import assert_tiled_equals_untiled

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    recipe = recipe_of(
        tiny_llava_trio,
        method="fisher",
        fisher={r: str(fishers[r]) for r in ("multimodal", "multilingual")},
    )
    out = engine.merge_to_folder(recipe, tmp_path / "out", chunk_size="4KiB").out_dir
    assert assert_tiled_equals_untiled(recipe, "4KiB", out) > 10


def test_a_fisher_recipe_replayed_without_its_fishers_names_the_command_that_makes_them(
    tiny_llava_trio, fishers, tmp_path, capsys
):
    """A fisher merge's recipe replayed where its Fisher folders are not: refused naming the
    missing one with the command that estimates it again, from the recipe's ``fisher_info``.
    That command, run as given, makes the replay work, and its merge is the same bytes."""
    import shlex
    import shutil

    trio, mine = tiny_llava_trio, {}
    for role in ("multilingual", "multimodal"):
        mine[role] = tmp_path / "fishers" / role
        shutil.copytree(fishers[role], mine[role])
    argv = ["merge", "--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    argv += ["--multimodal", str(trio.multimodal), "--method", "fisher"]
    argv += ["--fisher"] + [f"{r}={f}" for r, f in mine.items()] + ["--out", str(tmp_path / "m")]
    assert main(argv) == 0
    shutil.rmtree(mine["multimodal"])
    capsys.readouterr()
    recipe = str(tmp_path / "m" / "dim3_recipe.json")
    assert main(["merge", "--recipe", recipe, "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "the recipe's Fisher folders are not here" in err and "multilingual (" not in err
    command = re.search(r"multimodal \((.+?)\): `(python -m dim3 fisher .+?)`", err)
    assert command is not None and command.group(1) == str(mine["multimodal"]), err
    words = shlex.split(command.group(2))
    assert words[words.index("--n") + 1] == "4" and words[words.index("--seed") + 1] == "2"
    assert main(words[3:]) == 0  # as given, after "python -m dim3"
    assert main(["merge", "--recipe", recipe, "--out", str(tmp_path / "again")]) == 0
    first, again = load_all(tmp_path / "m"), load_all(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_fisher_merge_refuses_missing_foreign_and_fake_fishers(tiny_llava_trio, fishers, tmp_path):
    trio = tiny_llava_trio
    with pytest.raises(ValueError, match="needs a Fisher folder for multilingual"):
        recipe_of(trio, method="fisher", fisher={"multimodal": str(fishers["multimodal"])})
    with pytest.raises(ValueError, match="needs a Fisher folder for base"):
        recipe_of(
            trio,
            method="fisher",
            options={"base_weight": 1.0},
            fisher={r: str(fishers[r]) for r in ("multimodal", "multilingual")},
        )
    with pytest.raises(ValueError, match="unknown role"):
        recipe_of(trio, method="fisher", fisher={"vision": "x"})
    swapped = {"multimodal": str(fishers["multimodal"]), "multilingual": str(fishers["base"])}
    with pytest.raises(ValueError, match="multilingual Fisher .* does not fit .* weights differ"):
        engine.merge_to_folder(recipe_of(trio, method="fisher", fisher=swapped), tmp_path / "x")
    fake = {"multimodal": str(fishers["multimodal"]), "multilingual": str(trio.multilingual)}
    with pytest.raises(ValueError, match="not a Fisher folder"):
        engine.merge_to_folder(recipe_of(trio, method="fisher", fisher=fake), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    folder = FisherFolder(fishers["multimodal"])
    assert folder.key_for(LM_HEAD) == LM_HEAD  # untied LLaVA: its own head's Fisher


# --------------------------------------------------------------------------- the app


def test_app_merges_with_fisher_after_estimating_and_reuses_the_fishers(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    url, scratch = app_server
    c = gradio_client.Client(url, verbose=False)
    kw = {"method": "fisher", "fisher_data": "demo", "fisher_n": 4, "api_name": "/merge"}
    plan, log, status = c.predict(**kw)
    assert status.startswith("✅ Merged"), status
    assert "Fisher of multimodal: first example" in log and "Fisher of multilingual" in log
    folders = sorted((scratch / "outputs" / "fisher").iterdir())  # one per model, not per role
    assert len(folders) == 2
    meta = json.loads((folders[1] / FISHER_FILE).read_text())
    assert meta["n"] == 4 and meta["data"] == "demo" and meta["labels"] == "given"
    *_, status = c.predict(**kw)  # the same Fishers again: reused, not estimated
    assert status.startswith("✅ Merged") and len(list(folders[0].parent.iterdir())) == 2
    *_, status = c.predict(**(kw | {"fisher_data": "/etc/passwd"}))
    assert status.startswith("❌") and "outside the allowed folders" in status
    # saved as it was merged, with the same Fishers; what a visitor may push names no server path
    _, status, *_ = c.predict(**(kw | {"folder": "fisher-merge", "api_name": "/save"}))
    assert status.startswith("✅ Saved"), status
    assert len(list(folders[0].parent.iterdir())) == 2
    saved = scratch / "outputs" / "fisher-merge"
    recipe = json.loads((saved / "dim3_recipe.json").read_text())
    assert recipe["method"] == "fisher" and set(recipe["fisher"]) == {"multilingual", "multimodal"}
    assert recipe["fisher_info"]["multimodal"]["n"] == 4
    for name in ("dim3_recipe.json", "README.md"):
        text = (saved / name).read_text()
        assert str(scratch) not in text and str(Path.cwd()) not in text, name
    assert all(not Path(f).is_absolute() for f in recipe["fisher"].values())


def test_app_evaluates_and_sweeps_fisher_after_estimating_its_fishers(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    url, scratch = app_server
    c = gradio_client.Client(url, verbose=False)
    root = scratch / "outputs" / "fisher"
    before = set(root.iterdir()) if root.is_dir() else set()
    # fisher ticked while the Merge form holds another method: its Fisher inputs still count
    status, table, *_ = c.predict(
        methods=["fisher", "task_arithmetic"],
        method="dim3",
        fisher_data="demo",
        fisher_n=8,
        questions_per_language=1,
        probe="",
        api_name="/evaluate",
    )
    assert status.startswith("✅"), status
    assert [r[0] for r in table["data"]] == ["original", "fisher", "task_arithmetic"]
    new = sorted(set(root.iterdir()) - before)
    assert len(new) == 2
    assert all(json.loads((f / FISHER_FILE).read_text())["n"] == 8 for f in new)
    # the sweep reuses them (same models, data, N and labels) and merges each grid point
    sweep = functools.partial(
        c.predict,
        sweep_method="fisher",
        fisher_data="demo",
        fisher_n=8,
        per_language=8,
        references=False,
        probe="",
        api_name="/sweep",
    )
    status, _plot, table, *_ = sweep(grid="multimodal_weight=0.5,2")
    assert status.startswith("✅"), status
    assert sorted(set(root.iterdir()) - before) == new  # reused, not estimated again
    labels = [r[0] for r in table["data"]]
    assert len(labels) == 4 and any("multimodal_weight=2" in x for x in labels), labels
    # a base weight above 0 in the grid needs the base's Fisher too: estimated first
    status, *_ = sweep(grid="base_weight=0,0.5")
    assert status.startswith("✅"), status
    assert len(set(root.iterdir()) - before - set(new)) == 1  # the base's
    status, *_ = c.predict(
        methods=["fisher"], fisher_data="/etc/passwd", fisher_n=4, probe="", api_name="/evaluate"
    )
    assert status.startswith("❌") and "outside the allowed folders" in status, status


def test_eval_and_sweep_carry_the_fisher_folders(tiny_llava_trio, tmp_path):
    from dim3 import evaluate, sweep
    from dim3.cli import build_parser

    trio = tiny_llava_trio
    roles = ["--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    roles += ["--multimodal", str(trio.multimodal)]
    probe = write_probe(tmp_path / "p.jsonl", picture_items(tmp_path / "pics") * 4)
    folders = ["multimodal=F_mm", "multilingual=F_ml"]
    args = build_parser().parse_args(
        ["eval", "--probe", str(probe), *roles, "--methods", "ties,fisher", "--fisher", *folders]
    )
    spec = evaluate.spec_from_args(args)
    assert spec.recipe("fisher").fisher == {"multimodal": "F_mm", "multilingual": "F_ml"}
    args.fisher = ["multimodal=F_mm"]
    with pytest.raises(ValueError, match="needs a Fisher folder for multilingual"):
        evaluate.spec_from_args(args)
    args = build_parser().parse_args(
        ["sweep", "--probe", str(probe), *roles, "--method", "fisher", "--fisher", *folders]
        + ["--option", "multimodal_weight=0.5,2", "--option", "multilingual_weight=1,3"]
        + ["--json", str(tmp_path / "s.json"), "--references", "all"]
    )
    spec = sweep.spec_from_args(args)
    assert spec.recipe.fisher == {"multimodal": "F_mm", "multilingual": "F_ml"}
    assert len(spec.points) == 4 and "fisher" not in spec.references
