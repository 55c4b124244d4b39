"""Several multilingual experts: one base, one VLM and N multilingual fine-tunes, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dim3 import engine
from dim3.cli import main
from dim3.plan import PlanError
from dim3.recipe import RECIPE_FILE, Recipe, Source
from tests.test_engine import base_name, load_all, ref_dim3, tokenizer_len
from tests.tiny_models import Trio, _perturb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_expert(tiny_llava_trio: Trio, tmp_path_factory) -> Path:
    """Another fine-tune of the trio's base (same tokenizer), with its own residual."""
    folder = tmp_path_factory.mktemp("expert2") / "ml2"
    shutil.copytree(tiny_llava_trio.base, folder)
    model = LlamaForCausalLM.from_pretrained(tiny_llava_trio.base)
    _perturb(model, 0.2, seed=41)
    model.save_pretrained(folder)
    return folder


def recipe(trio: Trio, experts: list[Path], **kw) -> Recipe:
    return Recipe(
        base=Source(str(trio.base)),
        multilingual=tuple(Source(str(p)) for p in experts),
        multimodal=Source(str(trio.multimodal)),
        **kw,
    )


def test_dim3_with_two_experts_matches_the_reference(tiny_llava_trio, second_expert, tmp_path):
    experts = [tiny_llava_trio.multilingual, second_expert]
    result = engine.merge_to_folder(recipe(tiny_llava_trio, experts), tmp_path / "out")
    out, vlm = load_all(tmp_path / "out"), load_all(tiny_llava_trio.multimodal)
    base = load_all(tiny_llava_trio.base)
    mls = [load_all(p) for p in experts]
    rows = tokenizer_len(tiny_llava_trio.base)
    checked = 0
    for key, tensor in out.items():
        name = base_name(key)
        if name is None:
            assert torch.equal(tensor, vlm[key]), key
            continue
        embed = "model.embed_tokens.weight"
        b, ms = (base.get(name, base[embed]), [m.get(name, m[embed]) for m in mls])
        if name in (embed, "lm_head.weight"):
            t = name == embed
            part = [x[:rows].T if t else x[:rows] for x in (b, vlm[key], *ms)]
            merged = ref_dim3(part[0], part[1:])
            want = vlm[key].clone()
            want[:rows] = merged.T if t else merged
        else:
            want = ref_dim3(b, [vlm[key], *ms])
        torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6, msg=key)
        checked += 1
    assert checked == result.plan.summary()["merged"]
    saved = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert [m["ref"] for m in saved["multilingual"]] == [str(p) for p in experts]
    assert set(saved["resolved"]) == {"base", "multilingual_1", "multilingual_2", "multimodal"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2 multilingual fine-tunes" in card and "multilingual_2" in card


@pytest.mark.parametrize("method", ["dim3", "task_arithmetic", "ties", "breadcrumbs", "linear"])
def test_expert_order_does_not_change_the_merge(method, tiny_llava_trio, second_expert, tmp_path):
    experts = [tiny_llava_trio.multilingual, second_expert]
    a = engine.merge_to_folder(recipe(tiny_llava_trio, experts, method=method), tmp_path / "a")
    b = engine.merge_to_folder(
        recipe(tiny_llava_trio, experts[::-1], method=method), tmp_path / "b"
    )
    out_a, out_b = load_all(a.out_dir), load_all(b.out_dir)
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_one_expert_list_equals_the_single_source_recipe(tiny_llava_trio, tmp_path):
    single = Recipe(
        Source(str(tiny_llava_trio.base)),
        Source(str(tiny_llava_trio.multilingual)),
        Source(str(tiny_llava_trio.multimodal)),
    )
    assert single == recipe(tiny_llava_trio, [tiny_llava_trio.multilingual])
    old = single.to_dict()
    old["multilingual"] = old["multilingual"][0]  # a recipe written before experts existed
    assert Recipe.from_dict(old) == single


def test_cli_takes_several_multilingual_models(tiny_llava_trio, second_expert, tmp_path, capsys):
    t = tiny_llava_trio
    args = ["--base", str(t.base), "--multimodal", str(t.multimodal)]
    args += ["--multilingual", str(t.multilingual), "--multilingual", str(second_expert)]
    assert main(["merge", *args, "--out", str(tmp_path / "out")]) == 0
    saved = Recipe.load(tmp_path / "out" / RECIPE_FILE)
    assert [s.ref for s in saved.multilingual] == [str(t.multilingual), str(second_expert)]
    # replaying the saved recipe gives the same tensors
    assert (
        main(
            [
                "merge",
                "--recipe",
                str(tmp_path / "out" / RECIPE_FILE),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    first, again = load_all(tmp_path / "out"), load_all(tmp_path / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)
    capsys.readouterr()
    bad = [*args, "--revision-multilingual", "a", "--revision-multilingual", "b"]
    bad += ["--revision-multilingual", "c"]
    assert main(["plan", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 --revision-multilingual for 2 --multilingual" in err


def test_an_expert_with_another_tokenizer_is_named(tiny_llava_trio, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_llava_trio.multilingual, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(data))
    r = recipe(tiny_llava_trio, [tiny_llava_trio.multilingual, other])
    with pytest.raises(PlanError, match="multilingual model 2's tokenizer differs"):
        engine.plan(r)
    assert not (tmp_path / "out").exists()


def test_diagnostics_give_one_row_per_expert(tiny_llava_trio, second_expert, tmp_path, capsys):
    from dim3 import diagnostics as dg
    from dim3.methods.dim3 import DiM3Options, dim3_weights

    experts = [tiny_llava_trio.multilingual, second_expert]
    rows = dg.diagnose(recipe(tiny_llava_trio, experts))
    assert dg.updates(rows) == ["multilingual_1", "multilingual_2"]
    by_update = {u: [r for r in rows if r.update == u] for u in dg.updates(rows)}
    assert len(by_update["multilingual_1"]) == len(by_update["multilingual_2"])
    # one layer tensor by hand: DiM3's weights over all three updates, as the merge sees them
    row = next(
        r for r in by_update["multilingual_2"] if r.key.endswith("layers.0.mlp.up_proj.weight")
    )
    base, vlm = load_all(tiny_llava_trio.base), load_all(tiny_llava_trio.multimodal)
    ml1, ml2 = load_all(experts[0]), load_all(experts[1])
    name = "model.layers.0.mlp.up_proj.weight"
    w = dim3_weights(base[name], [vlm[row.key], ml2[name], ml1[name]], DiM3Options()).weights
    assert row.dim3_ml_weight == pytest.approx(float(w[1].mean()), rel=1e-5)
    t = tiny_llava_trio
    args = ["--base", str(t.base), "--multimodal", str(t.multimodal), "--out", str(tmp_path / "d")]
    args += ["--multilingual", str(experts[0]), "--multilingual", str(experts[1])]
    assert main(["diagnose", *args]) == 0
    assert (tmp_path / "d" / "residual_norms_multilingual_2.png").stat().st_size > 1000
    assert "multilingual_2" in capsys.readouterr().out
