"""Key layouts: every family's tensors land in the right part, in both on-disk layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dim3 import layout as layout_module
from dim3.checkpoints import Checkpoint
from dim3.layout import (
    LANGUAGE,
    NOT_LOADED,
    PROJECTOR,
    VISION,
    VLM_ONLY,
    buffer_kind,
    layout_for,
    unconverted_layout,
)
from dim3.plan import weight_keys
from tests import realmaps

CASES = [
    (
        "llava",
        "language_model.model.layers.3.mlp.up_proj.weight",
        (LANGUAGE, "model.layers.3.mlp.up_proj.weight"),
    ),
    (
        "llava",
        "model.language_model.layers.3.mlp.up_proj.weight",
        (LANGUAGE, "model.layers.3.mlp.up_proj.weight"),
    ),
    ("llava", "language_model.lm_head.weight", (LANGUAGE, "lm_head.weight")),
    ("llava", "lm_head.weight", (LANGUAGE, "lm_head.weight")),
    ("llava", "vision_tower.vision_model.embeddings.patch_embedding.weight", (VISION, None)),
    ("llava", "model.multi_modal_projector.linear_1.weight", (PROJECTOR, None)),
    ("llava_next", "image_newline", (PROJECTOR, None)),
    ("llava_onevision", "model.image_newline", (PROJECTOR, None)),
    (
        "qwen2_vl",
        "model.layers.0.self_attn.q_proj.bias",
        (LANGUAGE, "model.layers.0.self_attn.q_proj.bias"),
    ),
    (
        "qwen2_5_vl",
        "model.language_model.embed_tokens.weight",
        (LANGUAGE, "model.embed_tokens.weight"),
    ),
    ("qwen2_vl", "visual.blocks.0.attn.qkv.weight", (VISION, None)),
    ("qwen2_5_vl", "model.visual.merger.mlp.0.weight", (PROJECTOR, None)),
    ("idefics3", "model.text_model.norm.weight", (LANGUAGE, "model.norm.weight")),
    ("smolvlm", "model.connector.modality_projection.proj.weight", (PROJECTOR, None)),
]


@pytest.mark.parametrize(("model_type", "key", "expected"), CASES)
def test_classify(model_type, key, expected):
    assert layout_for({"model_type": model_type}).classify(key) == expected


def test_unknown_family_is_inferred_from_keys_or_refused():
    keys = ["language_model.model.norm.weight", "vision_tower.x.weight", "multi_modal_projector.w"]
    assert layout_for({"model_type": "my_llava"}, keys).family == "llava"
    with pytest.raises(
        ValueError,
        match="unsupported VLM family 'blip'.*AutoModelForImageTextToText.*tested: .*llava",
    ):
        layout_for({"model_type": "blip"}, ["text_decoder.w", "vision_model.w"])


DERIVED_CASES = [
    # Gemma 3 in its original on-disk layout (google/medgemma-27b-it) and the newer one
    (
        "gemma3",
        "language_model.model.layers.2.mlp.up_proj.weight",
        (LANGUAGE, "model.layers.2.mlp.up_proj.weight"),
    ),
    ("gemma3", "model.language_model.norm.weight", (LANGUAGE, "model.norm.weight")),
    ("gemma3", "multi_modal_projector.mm_input_projection_weight", (PROJECTOR, None)),
    ("gemma3", "vision_tower.vision_model.post_layernorm.weight", (VISION, None)),
    # Qwen3-VL: q_norm/k_norm are language; deepstack mergers stay vision, the merger projects
    (
        "qwen3_vl",
        "model.language_model.layers.0.self_attn.q_norm.weight",
        (LANGUAGE, "model.layers.0.self_attn.q_norm.weight"),
    ),
    ("qwen3_vl", "model.visual.deepstack_merger_list.0.linear_fc1.weight", (VISION, None)),
    ("qwen3_vl", "model.visual.merger.linear_fc2.weight", (PROJECTOR, None)),
    ("qwen3_vl", "lm_head.weight", (LANGUAGE, "lm_head.weight")),
    # mllama (default config = Llama-3.2-11B-Vision: cross-attention at 3, 8, ..., 38 of 40)
    (
        "mllama",
        "language_model.model.layers.4.mlp.up_proj.weight",
        (LANGUAGE, "model.layers.3.mlp.up_proj.weight"),
    ),
    (
        "mllama",
        "language_model.model.layers.39.input_layernorm.weight",
        (LANGUAGE, "model.layers.31.input_layernorm.weight"),
    ),
    ("mllama", "language_model.model.layers.3.cross_attn.q_proj.weight", (VLM_ONLY, None)),
    ("mllama", "language_model.model.layers.38.cross_attn_attn_gate", (VLM_ONLY, None)),
    ("mllama", "language_model.lm_head.weight", (LANGUAGE, "lm_head.weight")),
    ("mllama", "vision_model.gated_positional_embedding.gate", (VISION, None)),
    ("mistral3", "multi_modal_projector.patch_merger.merging_layer.weight", (PROJECTOR, None)),
    ("llava_next", "image_newline", (PROJECTOR, None)),
    ("gemma3", "language_model.model.layers.0.self_attn.made_up.weight", (NOT_LOADED, None)),
]


@pytest.mark.parametrize(("model_type", "key", "expected"), DERIVED_CASES)
def test_layout_from_transformers_class(model_type, key, expected):
    """The family's own class (default config, built on the meta device) tells each key's part."""
    layout = layout_for({"model_type": model_type})
    assert layout.family == model_type
    assert layout.classify(key) == expected


def test_mllama_layer_map_is_derived_from_the_layer_classes():
    layout = layout_for({"model_type": "mllama"})
    assert sorted(layout.vlm_only_layers) == [3, 8, 13, 18, 23, 28, 33, 38]
    assert len(layout.layer_map) == 32 and layout.layer_map[39] == 31 and layout.layer_map[2] == 2
    assert "VLM-only decoder layers [3, 8, 13" in layout.describe_layers()


# ---------------------------------------------------------------- facts of real checkpoints

BUFFER_CASES = [
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "rotary inv_freq"),  # Llama-2-7b-hf
    ("language_model.model.layers.31.self_attn.rotary_emb.inv_freq", "rotary inv_freq"),
    ("vision_tower.vision_model.embeddings.position_ids", "position_ids"),  # old CLIP files
    ("model.layers.0.self_attn.q_proj.weight", None),
    ("vision_tower.vision_model.embeddings.position_embedding.weight", None),
    ("model.inv_freq_scale.weight", None),
]


@pytest.mark.parametrize(("key", "kind"), BUFFER_CASES)
def test_stored_buffers_are_told_from_weights(key, kind):
    assert buffer_kind(key) == kind


def test_original_llava_layout_is_named_by_architectures():
    flat = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": 32000}
    reason = unconverted_layout(flat)
    assert "LlavaLlamaForCausalLM" in reason and "llava-hf/llava-1.5-7b-hf" in reason
    assert "convert_llava_weights_to_hf" in reason
    hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}
    assert unconverted_layout(hf) is None and unconverted_layout({}) is None


@pytest.mark.skipif(not realmaps.available(), reason="../shared/realmaps is absent")
@pytest.mark.parametrize(
    "name",
    [
        "llava-hf__llava-1.5-7b-hf",
        "Qwen__Qwen2-VL-2B",
        "allenai__olmOCR-7B-0225-preview",
        "Qwen__Qwen2.5-VL-7B-Instruct",
        "Qwen__Qwen2.5-VL-3B-Instruct",
    ],
)
def test_every_tensor_of_real_vlms_has_a_role(name):
    """Every key of the real VLM files lands in the language model, vision tower or projector."""
    km = realmaps.load_keymap(name)
    keys = [t.key for t in km.tensors]
    layout = layout_for(km.config, keys)
    roles = {}
    for key in keys:
        cls = layout.classify(key)
        assert cls is not None, key
        roles[cls[0]] = roles.get(cls[0], 0) + 1
    assert roles[LANGUAGE] and roles[VISION] and roles[PROJECTOR]
    text = km.config.get("text_config") or km.config
    layers = text.get("num_hidden_layers", 32)  # llava-hf's partial text_config: Llama's default
    per_layer = sum(1 for k in keys if ".layers.0." in k and layout.classify(k)[0] == LANGUAGE)
    assert roles[LANGUAGE] == layers * per_layer + sum(
        1 for k in keys if layout.classify(k)[0] == LANGUAGE and ".layers." not in k
    )


@pytest.mark.slow
def test_a_vlms_own_buffers_are_not_written(tiny_llava_trio, tmp_path):
    """A VLM file that stores rotary buffers: left out of the plan and of the output."""
    from safetensors.torch import load_file, save_file

    from dim3 import engine
    from dim3.recipe import Recipe, Source

    vlm = tmp_path / "vlm"
    shutil.copytree(tiny_llava_trio.multimodal, vlm)
    tensors = load_file(vlm / "model.safetensors")
    for i in range(2):
        key = f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"
        tensors[key] = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    save_file(tensors, vlm / "model.safetensors", metadata={"format": "pt"})
    t = tiny_llava_trio
    recipe = Recipe(Source(str(t.base)), Source(str(t.multilingual)), Source(str(vlm)))
    result = engine.merge_to_folder(recipe, tmp_path / "out")
    assert "ignored: 2 rotary inv_freq buffers of the VLM" in result.plan.describe()
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        written = set(f.keys())
    assert written == {k for k in tensors if "inv_freq" not in k}


# ---------------------------------------------------------------- the disk cache of layouts

TRIO_FIXTURES = {"llava": "tiny_llava_trio", "qwen2_vl": "tiny_qwen2vl_new_layout_trio"}


def _trio(model_type: str, request):
    if model_type in TRIO_FIXTURES:
        return request.getfixturevalue(TRIO_FIXTURES[model_type])
    return request.getfixturevalue("tiny_family_trios")(model_type)


def _answers(layout, keys: list[str]) -> tuple:
    """Everything a merge asks a layout, for ``keys``."""
    return (
        layout.family,
        layout.class_name,
        layout.shapes,
        layout.expected(),
        layout.describe_layers(),
        [layout.to_memory(k) for k in keys],
        [layout.classify(k) for k in keys],
    )


@pytest.fixture
def layout_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, and a process that has derived no layout yet."""
    monkeypatch.setenv(layout_module.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(layout_module, "_DERIVED", OrderedDict())
    return tmp_path / "cache" / "layouts"


def _new_process(monkeypatch) -> None:
    """Forget this process's layouts (the disk cache stays): what a new process starts with."""
    monkeypatch.setattr(layout_module, "_DERIVED", OrderedDict())


@pytest.mark.parametrize(
    "model_type",
    ["llava", "qwen2_vl", "gemma3", "qwen3_vl", "mistral3", "llava_onevision", "mllama"],
)
def test_a_cached_layout_answers_as_the_class_does(model_type, request, layout_cache, monkeypatch):
    """Derived with the cache off, then stored, then read back in a 'new process' without
    building the class: the same family, shapes, expected tensors, names and roles for every
    key, and a key the record lacks is answered by building the class then."""
    ckpt = Checkpoint(_trio(model_type, request).multimodal)
    keys = weight_keys(ckpt)
    cache = os.environ[layout_module.ENV_CACHE]
    monkeypatch.setenv(layout_module.ENV_CACHE, "off")
    want = _answers(layout_module.derived_layout(ckpt.config, keys), keys)
    assert not layout_cache.exists()  # "off" writes nothing

    monkeypatch.setenv(layout_module.ENV_CACHE, cache)
    _new_process(monkeypatch)
    built = layout_module.derived_layout(ckpt.config, keys)
    assert built._renamings is not None and len(list(layout_cache.glob("*.json"))) == 1
    _new_process(monkeypatch)
    stored = layout_module.derived_layout(ckpt.config, keys)
    assert stored._renamings is None  # from the record: transformers' class was not built
    assert _answers(stored, keys) == want

    odd = keys[-1] + "_made_up"  # a name no record holds
    _new_process(monkeypatch)
    monkeypatch.setenv(layout_module.ENV_CACHE, "off")
    truth = layout_module.derived_layout(ckpt.config).classify(odd)
    assert stored.classify(odd) == truth and stored._renamings is not None


def test_layout_for_reads_the_record_when_every_key_is_in_it(
    tiny_qwen2vl_trio, layout_cache, monkeypatch
):
    ckpt = Checkpoint(tiny_qwen2vl_trio.multimodal)
    keys = weight_keys(ckpt)
    layout_for(ckpt.config, keys)
    _new_process(monkeypatch)
    assert layout_for(ckpt.config, keys)._renamings is None
    _new_process(monkeypatch)  # more keys than the record holds: built again, record extended
    more = [*keys, "model.visual.made_up.weight"]
    assert layout_for(ckpt.config, more)._renamings is not None
    _new_process(monkeypatch)
    assert layout_for(ckpt.config, more)._renamings is None


def _record_file(layout_cache: Path) -> Path:
    (path,) = layout_cache.glob("*.json")
    return path


@pytest.mark.parametrize(
    "damage", ["truncated", "not an object", "fields missing", "wrong types", "another config's"]
)
def test_a_damaged_or_foreign_record_is_ignored_and_replaced(
    damage, tiny_qwen2vl_trio, layout_cache, monkeypatch
):
    ckpt = Checkpoint(tiny_qwen2vl_trio.multimodal)
    keys = weight_keys(ckpt)
    want = _answers(layout_module.derived_layout(ckpt.config, keys), keys)
    path = _record_file(layout_cache)
    record = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[:1000])
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "fields missing":
        path.write_text(json.dumps({k: v for k, v in record.items() if k != "shapes"}))
    elif damage == "wrong types":
        names = {**record["names"], keys[0]: ["x", 1]}
        path.write_text(json.dumps({**record, "decoder": 5, "names": names}))
    else:  # a record made for another config, under this config's name
        other = {**ckpt.config, "vocab_size": ckpt.config.get("vocab_size", 0) + 1}
        record["config"] = json.dumps(other, sort_keys=True, default=str)
        path.write_text(json.dumps(record))
    _new_process(monkeypatch)
    layout = layout_module.derived_layout(ckpt.config, keys)
    assert layout._renamings is not None  # built from transformers again
    assert _answers(layout, keys) == want
    assert json.loads(path.read_text())["config"] == json.dumps(
        ckpt.config, sort_keys=True, default=str
    )  # and the record rewritten whole


def test_an_unwritable_cache_is_no_error(tiny_qwen2vl_trio, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(layout_module.ENV_CACHE, str(blocker))
    monkeypatch.setattr(layout_module, "_DERIVED", OrderedDict())
    ckpt = Checkpoint(tiny_qwen2vl_trio.multimodal)
    layout = layout_for(ckpt.config, weight_keys(ckpt))
    assert layout.family == "qwen2_vl" and blocker.read_text() == "not a folder"
    assert list(tmp_path.iterdir()) == [blocker]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(layout_module.ENV_CACHE, str(tmp_path / "c"))
    assert layout_module.layout_cache_dir() == tmp_path / "c" / "layouts"
    monkeypatch.setenv(layout_module.ENV_CACHE, "off")
    assert layout_module.layout_cache_dir() is None
    monkeypatch.delenv(layout_module.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert layout_module.layout_cache_dir() == tmp_path / "x" / "dim3" / "layouts"


MODELING = (
    "import json, sys\n"
    "from dim3 import engine\n"
    "from dim3.recipe import Recipe, Source\n"
    "engine.merge_to_folder(Recipe(*(Source(p) for p in sys.argv[1:4])), sys.argv[4])\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.startswith('transformers.models.')"
    " and '.modeling_' in m)))\n"
)


@pytest.mark.slow
def test_a_second_process_merges_without_building_the_class(tiny_qwen2vl_trio, tmp_path):
    """Two merges in new processes with one cache: the first imports the family's modeling code
    to build the class, the second does not; both write the bytes a merge without cache writes."""
    t = tiny_qwen2vl_trio
    root = Path(__file__).resolve().parent.parent
    written, imported = [], []
    for i, cache in enumerate([tmp_path / "cache", tmp_path / "cache", "off"]):
        env = {**os.environ, layout_module.ENV_CACHE: str(cache), "PYTHONPATH": str(root)}
        out = tmp_path / f"out{i}"
        args = [str(t.base), str(t.multilingual), str(t.multimodal), str(out)]
        done = subprocess.run(
            [sys.executable, "-c", MODELING, *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        imported.append(json.loads(done.stdout.strip().splitlines()[-1]))
        written.append((out / "model.safetensors").read_bytes())
    assert "transformers.models.qwen2_vl.modeling_qwen2_vl" in imported[0]
    assert imported[1] == []
    assert written[0] == written[1] == written[2]
