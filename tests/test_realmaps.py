"""Real checkpoints at real scale: header-true copies of real Hub trios plan, and the smallest merges.

The checkpoints are built by ``tests/realmaps.py`` from the real configs, indexes and safetensors
headers in ``../shared/realmaps`` (skipped when that folder is absent): real names, dtypes, shapes,
shard splits and vocabularies, with sparse zero data except the layer-0 matrices the plan's
relatedness check reads. Expected counts are derived from the key maps, not written down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dim3 import engine
from dim3.checkpoints import CheckpointError
from dim3.cli import main
from dim3.plan import PlanError
from dim3.recipe import Recipe, Source
from tests import realmaps
from tests.realmaps import TRIOS, build_checkpoint, load_keymap

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not realmaps.available(), reason="../shared/realmaps is absent"),
]
LM = ("language_model.", "model.language_model.", "lm_head.")


class Models:
    """Each distinct model built once per module (sparse, so 7B costs ~150 MB of disk)."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def get(self, name: str, seed: int, **kwargs) -> Path:
        key = (name, seed, tuple(sorted(kwargs.items())))
        if key not in self.built:
            folder = self.root / f"{name}-{seed}-{len(self.built)}"
            noise = 0.05 if seed else 0.0
            self.built[key] = build_checkpoint(name, folder, seed=seed, noise=noise, **kwargs)
        return self.built[key]

    def trio(
        self,
        trio: str,
        layers: int | None = None,
        vision_layers: int | None = None,
        data: str = "sparse",
    ) -> Recipe:
        kwargs = {} if data == "sparse" else {"data": data}
        if layers:  # every model keeps the layers the VLM's cut keeps
            vlm = load_keymap(TRIOS[trio][2])
            kwargs["layers"] = tuple(realmaps.kept_layers(vlm, layers))
            kwargs["vision_layers"] = tuple(realmaps.kept_layers(vlm, vision_layers, vision=True))
        paths = [self.get(n, seed, **kwargs) for seed, n in enumerate(TRIOS[trio])]
        return Recipe(*(Source(str(p)) for p in paths))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("realmaps"))


def lm_keys(keymap) -> list[str]:
    """The VLM's language-model tensors by the on-disk layout of the real file."""
    qwen = keymap.config.get("model_type", "").startswith("qwen2")
    if qwen:
        return [t.key for t in keymap.tensors if not t.key.startswith("visual.")]
    return [t.key for t in keymap.tensors if t.key.startswith(LM)]


def token_count(name: str) -> int:
    """Ids the model's tokenizer uses: the regular vocabulary plus appended special tokens."""
    km = load_keymap(name)
    return realmaps.regular_vocab_size(km) + sum(1 for i in km.special_tokens if i >= 1000)


@pytest.mark.parametrize("trio", ["llava-1.5-7b", "qwen2-vl-7b", "qwen2-vl-2b"])
def test_real_trio_plans(models, trio):
    base_name, _, vlm_name = TRIOS[trio]
    vlm, base = load_keymap(vlm_name), load_keymap(base_name)
    plan = engine.plan(models.trio(trio))
    summary = plan.summary()
    assert summary["tensors"] == len(vlm.tensors)
    assert summary["merged"] == len(lm_keys(vlm))
    assert summary["bytes"] == vlm.nbytes  # the output is the VLM's size, real dtypes
    merged = {e.key for e in plan.entries if e.action == "merge"}
    assert merged == set(lm_keys(vlm))
    # vocabulary rows: those the base tokenizer has are merged, the VLM's own stay
    vocab_entries = [e for e in plan.entries if e.rows is not None]
    embed_rows = next(t.shape[0] for t in base.tensors if t.key == "model.embed_tokens.weight")
    shared = min(embed_rows, token_count(base_name))
    assert vocab_entries and all(e.rows == shared for e in vocab_entries)
    buffers = sum(t.key.endswith("rotary_emb.inv_freq") for t in base.tensors)
    ignored = [n for n in plan.notes if n.startswith("ignored:")]
    if buffers:
        assert ignored == [
            f"ignored: {buffers} rotary inv_freq buffers of the base, {buffers} of the "
            "multilingual model (buffers that transformers recomputes, not weights: never merged "
            "or written)"
        ]
    else:
        assert ignored == []
    assert not any("not compared" in n for n in plan.notes)  # tokenizers were compared


def test_llama2_llava_plan_from_the_cli_names_the_buffers_once(models, capsys):
    """The README's own example, on header-true copies: 32 float32 inv_freq in Llama-2-7b-hf."""
    recipe = models.trio("llava-1.5-7b")
    args = [f"--{r}={s.ref}" for r, s in recipe.sources().items()]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("inv_freq") == 1 and "ignored: 32 rotary inv_freq buffers of the base" in out
    assert "language_model.lm_head.weight: rows 0..31999 merged, 32000..32063 kept" in out


def test_qwen25_vl_with_a_qwen2_finetune(models, tmp_path):
    """SeaLLMs-v3 is a Qwen2 fine-tune: Qwen2.5's 19 extra special tokens are missing from it.

    With tokenizers the plan refuses (in reality the weights differ too); at the level of names
    and shapes alone (no tokenizer.json in the fine-tune) the three fit.
    """
    recipe = models.trio("qwen2.5-vl-7b")
    with pytest.raises(PlanError, match="multilingual model's tokenizer differs"):
        engine.plan(recipe)
    bare = tmp_path / "seallms-no-tokenizer"
    bare.mkdir()
    for file in Path(recipe.multilingual[0].ref).iterdir():
        if file.name != "tokenizer.json":
            (bare / file.name).symlink_to(file)
    plan = engine.plan(Recipe(recipe.base, Source(str(bare)), recipe.multimodal))
    vlm = load_keymap(TRIOS["qwen2.5-vl-7b"][2])
    assert plan.summary()["merged"] == len(lm_keys(vlm))
    assert any("tokenizers not compared" in n for n in plan.notes)


def test_original_llava_is_refused_with_a_pointer(models, tmp_path, capsys):
    """liuhaotian/llava-v1.5-7b: model_type "llava" but a flat Llama config, mm_projector, no tower."""
    original = build_checkpoint("liuhaotian__llava-v1.5-7b", tmp_path / "orig", real=())
    llava = models.trio("llava-1.5-7b")
    args = [f"--base={llava.base.ref}", f"--multilingual={llava.multilingual[0].ref}"]
    code = main(["plan", *args, f"--multimodal={original}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    for needle in ("LlavaLlamaForCausalLM", "original LLaVA", "mm_projector", "llava-hf/llava-1.5"):
        assert needle in err, err
    assert "convert_llava_weights_to_hf" in err
    # its main branch has pickle weights only: the layout is named first, it says more
    pickled = tmp_path / "main"
    pickled.mkdir()
    (pickled / "config.json").write_text((original / "config.json").read_text())
    (pickled / "pytorch_model-00001-of-00002.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="original LLaVA layout"):
        engine.plan(Recipe(llava.base, llava.multilingual, Source(str(pickled))))


def test_qwen2_vl_2b_merges_and_loads_in_transformers(models, tmp_path):
    """Qwen2-VL-2B cut to 2 layers, merged with DiM3, then loaded by transformers.

    The cut keeps layer 23 (split across the two real shards) and 27, the real vocabulary of
    151,936 rows and tied embeddings (no lm_head.weight stored).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    recipe = models.trio("qwen2-vl-2b", layers=2, vision_layers=1)
    vlm = Path(recipe.multimodal.ref)
    with open(vlm / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) == 2  # the real split survives the cut
    out = tmp_path / "merged"
    result = engine.merge_to_folder(recipe, out, shard_size="1GB")
    assert result.plan.summary()["padded"] == 1  # embed_tokens only: tied, no lm_head stored

    keys = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(
                {
                    k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()
                }
            )
    expected = {}
    assert realmaps.kept_layers(load_keymap(TRIOS["qwen2-vl-2b"][2]), 2) == [23, 27]
    for t in realmaps.cut(load_keymap(TRIOS["qwen2-vl-2b"][2]), 2, 1).tensors:
        expected[t.key] = (t.dtype, t.shape)
    assert keys == expected and "lm_head.weight" not in keys

    assert AutoConfig.from_pretrained(out).tie_word_embeddings
    model, info = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.bfloat16, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # the merged layer-0 matrix is the base's plus residuals: the real values came through
    merged = model.model.language_model.layers[0].mlp.down_proj.weight.float().flatten()
    assert merged[: 2**20].abs().mean() > 0.01
    assert os.listdir(tmp_path) == ["merged"]


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "dim3", "dare_task_arithmetic", "ties", "dare_ties"]
)
def test_tiles_at_the_real_2b_shape_equal_the_untiled_loop(models, method, tmp_path, monkeypatch):
    """Qwen2-VL-2B cut to one layer, random data: the real vocabulary (151,936 x 1,536, 32 MiB
    steps of 32 tiles each, shared by the worker threads), the real MLP (8,960 x 1,536) and the
    1-D norms, each merged in tiles into the output dtype, hold exactly what the untiled loop
    computes, in the loop's pieces and in the folder merge_to_folder writes. TIES: its exact
    selection's histograms gathered over the tiles, and bfloat16 updates, whose thresholds are
    tied, so that the tiles take the tied values in flat order after counting them."""
    from dataclasses import replace

    from tests.test_slicing import assert_tiled_equals_untiled, second_passes

    recipe = replace(models.trio("qwen2-vl-2b", 1, 1, data="random"), method=method)
    assert 151936 * 1536 * 4 > 32 * engine.TILE_BYTES  # the embedding's steps hold many tiles
    counted = []  # steps whose tiles first counted their values tied with a threshold
    before_tiles = engine._Merger.before_tiles

    def spy(self, step, *args):
        before_tiles(self, step, *args)
        counted.append(self._lefts is not None)

    monkeypatch.setattr(engine._Merger, "before_tiles", spy)
    passes = second_passes(monkeypatch)
    out = engine.merge_to_folder(recipe, tmp_path / "out").out_dir
    assert assert_tiled_equals_untiled(recipe, folder=out) > 20
    if method == "ties":
        assert sum(counted) > 10  # the ordered path: tied thresholds, counted per tile
        assert passes and not any(passes.values())  # found in one pass, from a sample


# ---------------------------------------------------------------- today's VLMs at real shape

TODAY = ["qwen3-vl-8b", "qwen3-vl-4b", "gemma-3-27b"]


def tokenizer_rows(name: str) -> int:
    """Rows of the tokenizer build_checkpoint writes: the real ids, specials included."""
    km = load_keymap(name)
    return max(token_count(name), max(km.special_tokens) + 1)


@pytest.mark.parametrize("trio", TODAY)
def test_todays_real_vlms_plan(models, trio):
    """Qwen3-VL-8B (untied), -4B (tied) and Gemma-3-27B (medgemma, original layout, tied) at
    real shape: the family is named, every language-model tensor merged, the rest copied, and
    the image tokens that sit inside the base vocabulary are merged rows, said in a note."""
    base_name, _, vlm_name = TRIOS[trio]
    vlm = load_keymap(vlm_name)
    plan = engine.plan(models.trio(trio))
    assert plan.family == vlm.config["model_type"]
    summary = plan.summary()
    assert summary["tensors"] == len(vlm.tensors) and summary["bytes"] == vlm.nbytes
    lm = {t.key for t in vlm.tensors if realmaps.canonical(t.key) != t.key}
    lm |= {t.key for t in vlm.tensors if t.key.startswith("lm_head.")}
    assert {e.key for e in plan.entries if e.action == "merge"} == lm
    copied = {e.role for e in plan.entries if e.action == "copy"}
    assert copied == {"vision", "projector"}
    rows = min(vlm.config["text_config"]["vocab_size"], tokenizer_rows(base_name))
    vocab = [e for e in plan.entries if e.rows is not None]
    assert vocab and all(e.rows == rows for e in vocab)
    image = vlm.config.get("image_token_id", vlm.config.get("image_token_index"))
    assert image < rows  # the image token is inside the base vocabulary
    note = next(n for n in plan.notes if n.startswith("media tokens inside the base vocabulary"))
    assert f"{image} (" in note
    assert f"layout derived from transformers' {vlm.config['architectures'][0]}" in plan.notes


def test_gemma3_4b_text_model_does_not_fit_the_27b_vlm(models):
    """The maps' text-only Gemma-3-4B against the 27B VLM: refused, naming both shapes."""
    novision = models.get("gghfez__gemma-3-4b-novision", 0)
    vlm = models.get("google__medgemma-27b-it", 2)
    recipe = Recipe(Source(str(novision)), Source(str(novision)), Source(str(vlm)))
    with pytest.raises(PlanError) as err:
        engine.plan(recipe)
    msg = str(err.value)
    assert "do not share a base" in msg
    assert "(262208, 5376)" in msg and "(262208, 2560)" in msg


def test_qwen3_vl_4b_cut_merges_with_the_real_vocabulary_and_loads(models, tmp_path):
    """Qwen3-VL-4B cut to 2 text layers and 1 vision layer, merged, loaded by transformers:
    the real 151,936-row vocabulary, tied embeddings, the real two-shard split."""
    from transformers import AutoModelForImageTextToText

    recipe = models.trio("qwen3-vl-4b", layers=2, vision_layers=1)
    out = tmp_path / "merged"
    result = engine.merge_to_folder(recipe, out, shard_size="1GB")
    assert result.plan.family == "qwen3_vl"
    cut = realmaps.cut(
        load_keymap(TRIOS["qwen3-vl-4b"][2]),
        realmaps.kept_layers(load_keymap(TRIOS["qwen3-vl-4b"][2]), 2),
        realmaps.kept_layers(load_keymap(TRIOS["qwen3-vl-4b"][2]), 1, vision=True),
    )
    keys = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert keys == {t.key: t.shape for t in cut.tensors}
    assert keys["model.language_model.embed_tokens.weight"] == (151936, 2560)
    model, info = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.bfloat16, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize(
    "name",
    [
        "Qwen__Qwen3-VL-8B-Instruct",
        "Qwen__Qwen3-VL-4B-Instruct",
        "google__medgemma-27b-it",
        "gghfez__gemma-3-4b-novision",
        "mistralai__Mistral-7B-Instruct-v0.2",
    ],
)
def test_index_only_maps_get_shapes_that_add_up_to_the_real_size(name):
    """Maps with an index but no headers: shapes from transformers' class of the real config,
    byte for byte the index's total_size (load_keymap checks it; this says so)."""
    km = load_keymap(name)
    index = json.loads((realmaps.REALMAPS / name / "model.safetensors.index.json").read_text())
    assert km.nbytes == int(index["metadata"]["total_size"])
    assert {t.key for t in km.tensors} == set(index["weight_map"])
