"""Today's VLM families end to end on tiny real trios (tests/tiny_families.py).

For each family: the plan names the family and accounts for every VLM tensor; a merge to a folder
loads with ``AutoModelForImageTextToText`` with no missing, unexpected or mismatched keys and holds
``VLM + (multilingual - base)`` (Task Arithmetic, checked against the three models as transformers
loads them, not against dim3's names); a merge into the loaded VLM gives the same weights; and the
merged model answers a question about a picture through its real processor, streamed.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dim3 import engine
from dim3.chat import ChatError, GenerationParams, build_inputs, load_vlm, stream_reply
from dim3.plan import PlanError
from dim3.recipe import Recipe, Source
from tests.tiny_families import CROSS_LAYER, FAMILIES, STRETCH, build_stretch_trio, tied

pytestmark = pytest.mark.slow
TYPES = sorted(FAMILIES)
# processors that need torchvision (a video processor) in transformers 5
NEEDS_TORCHVISION = {"qwen3_vl", "llava_onevision"}


def _recipe(trio, method: str = "task_arithmetic") -> Recipe:
    return Recipe(
        Source(str(trio.base)),
        Source(str(trio.multilingual)),
        Source(str(trio.multimodal)),
        method=method,
        dtype="float32",
    )


def _keys(folder) -> list[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def merged(tiny_family_trios, tmp_path_factory):
    """model_type -> (trio, merge result), each merged once to a folder."""
    done = {}

    def get(model_type: str):
        if model_type not in done:
            trio = tiny_family_trios(model_type)
            out = tmp_path_factory.mktemp(model_type) / "merged"
            done[model_type] = trio, engine.merge_to_folder(_recipe(trio), out)
        return done[model_type]

    return get


@pytest.mark.parametrize("model_type", TYPES)
def test_plan_names_the_family_and_accounts_for_every_tensor(tiny_family_trios, model_type):
    trio = tiny_family_trios(model_type)
    plan = engine.plan(_recipe(trio))
    assert plan.family == model_type
    keys = _keys(trio.multimodal)
    assert sorted(e.key for e in plan.entries) == sorted(keys)  # nothing dropped
    text = plan.describe()
    assert f"Family: {model_type}" in text
    lm = [k for k in keys if k.startswith(("language_model.", "model.language_model.", "lm_head"))]
    merged = {e.key for e in plan.entries if e.action == "merge"}
    copied_lm = {e.key for e in plan.entries if e.action == "copy" and e.key in lm}
    assert merged | copied_lm == set(lm)
    if model_type == "mllama":  # the cross-attention layer is copied and named
        assert copied_lm == {k for k in lm if f"layers.{CROSS_LAYER}." in k}
        assert {e.role for e in plan.entries if e.key in copied_lm} == {"vlm-only layers"}
        assert "VLM-only decoder layers [1]" in text and "VLM 2 = LLM 1" in text
        assert f"{len(copied_lm)} vlm-only layers" in text
    else:
        assert not copied_lm
    assert any("layout derived from transformers'" in n for n in plan.notes)


def _auto(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )


@pytest.mark.parametrize("model_type", TYPES)
def test_merged_folder_loads_cleanly_and_holds_the_task_arithmetic_sum(merged, model_type):
    from transformers import AutoModelForCausalLM

    trio, result = merged(model_type)
    model, info = _auto(result.out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info.get("error_msgs")
    assert type(model).__name__ == _auto(trio.multimodal)[0].__class__.__name__
    vlm = _auto(trio.multimodal)[0]
    base = AutoModelForCausalLM.from_pretrained(str(trio.base), dtype=torch.float32)
    ml = AutoModelForCausalLM.from_pretrained(str(trio.multilingual), dtype=torch.float32)
    out_lm, vlm_lm = model.model.language_model, vlm.model.language_model
    for i, layer in enumerate(base.model.layers):
        j = i + (model_type == "mllama" and i >= CROSS_LAYER)
        for name, b in layer.state_dict().items():
            want = vlm_lm.layers[j].state_dict()[name] + ml.model.layers[i].state_dict()[name] - b
            torch.testing.assert_close(out_lm.layers[j].state_dict()[name], want)
    rows = base.model.embed_tokens.weight.shape[0]
    e_out, e_vlm = out_lm.embed_tokens.weight, vlm_lm.embed_tokens.weight
    want = e_vlm[:rows] + ml.model.embed_tokens.weight - base.model.embed_tokens.weight
    torch.testing.assert_close(e_out[:rows], want)
    torch.testing.assert_close(e_out[rows:], e_vlm[rows:])  # VLM-only rows (mllama: 8) kept
    if model_type == "mllama":  # the cross-attention layer is the VLM's
        for name, t in vlm_lm.layers[CROSS_LAYER].state_dict().items():
            torch.testing.assert_close(out_lm.layers[CROSS_LAYER].state_dict()[name], t)
    vision_out = {k: v for k, v in model.state_dict().items() if ".language_model." not in k}
    vision_vlm = vlm.state_dict()
    for k, v in vision_out.items():
        if not k.startswith("lm_head"):
            torch.testing.assert_close(v, vision_vlm[k])


@pytest.mark.parametrize("model_type", TYPES)
def test_merge_into_a_loaded_model_equals_the_folder(merged, model_type):
    trio, result = merged(model_type)
    model, _ = _auto(trio.multimodal)
    engine.merge_into_model(model, _recipe(trio))
    folder, _ = _auto(result.out_dir)
    want = folder.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=k)


@pytest.mark.parametrize("model_type", TYPES)
def test_merged_model_answers_a_picture_question_streamed(merged, model_type):
    if model_type in NEEDS_TORCHVISION:
        pytest.importorskip("torchvision", reason=f"{model_type}'s processor needs torchvision")
    _, result = merged(model_type)
    _answers_a_picture_question(result.out_dir)


def _answers_a_picture_question(folder) -> None:
    """The model in ``folder`` answers a question about a picture through its processor, the
    picture's placeholder in its prompt, streamed as ``generate`` answers."""
    model, processor = load_vlm(folder, dtype=torch.float32)
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    question = [{"role": "user", "content": "What colour is the shape?"}]
    inputs = build_inputs(model, processor, question, image)
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) >= 1  # the picture's placeholder
    params = GenerationParams(max_new_tokens=6)
    reply = stream_reply(model, processor, question, image, params, threading.Event())
    chunks = list(reply)
    assert reply.new_tokens >= 1
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "".join(chunks) == expected


def test_a_tensor_transformers_would_not_load_is_refused_before_writing(
    tiny_family_trios, tmp_path
):
    """An extra, a mis-shaped and a missing tensor in the VLM file (an edited checkpoint):
    refused before anything is written, each named."""
    import shutil

    from safetensors.torch import load_file, save_file

    trio = tiny_family_trios("gemma3")
    vlm = tmp_path / "vlm"
    shutil.copytree(trio.multimodal, vlm)
    tensors = load_file(vlm / "model.safetensors")
    tensors["multi_modal_projector.extra_gate"] = torch.zeros(3)
    key = next(k for k in tensors if "vision_tower" in k and k.endswith("fc1.weight"))
    tensors[key] = tensors[key][:-1].clone()
    gone = next(k for k in tensors if k.endswith("post_layernorm.bias"))
    del tensors[gone]
    save_file(tensors, vlm / "model.safetensors", metadata={"format": "pt"})
    recipe = Recipe(Source(str(trio.base)), Source(str(trio.multilingual)), Source(str(vlm)))
    out = tmp_path / "out"
    with pytest.raises(PlanError) as err:
        engine.merge_to_folder(recipe, out)
    msg = str(err.value)
    assert "transformers would not load 3 VLM tensor(s)" in msg
    assert (
        "multi_modal_projector.extra_gate (no such tensor in Gemma3ForConditionalGeneration)" in msg
    )
    assert f"{key} ((63, 32) on disk, (64, 32) in" in msg
    assert "(needed by Gemma3ForConditionalGeneration, absent from the VLM)" in msg
    assert not out.exists()


def test_a_base_and_fine_tune_that_are_vlms_themselves(tiny_gemma3_multimodal_base_trio, tmp_path):
    """Gemma 3's base checkpoints of 4B and up are multimodal: their language models are merged
    (read through the family's layout), their vision towers left aside, and the plan says so."""
    from transformers import AutoModelForImageTextToText

    trio = tiny_gemma3_multimodal_base_trio
    result = engine.merge_to_folder(_recipe(trio), tmp_path / "out")
    notes = "\n".join(result.plan.notes)
    assert "the base is itself a VLM (gemma3): its language model is merged" in notes
    assert "the multilingual model is itself a VLM (gemma3)" in notes
    out, info = _auto(result.out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    base, ml, vlm = (
        AutoModelForImageTextToText.from_pretrained(str(p), dtype=torch.float32)
        for p in (trio.base, trio.multilingual, trio.multimodal)
    )
    parts = [m.model.language_model.state_dict() for m in (out, vlm, ml, base)]
    for name, got in parts[0].items():
        torch.testing.assert_close(got, parts[1][name] + parts[2][name] - parts[3][name])


def test_every_family_has_one_real_preset_marked_untested():
    """One real trio per tested family, with its size and GPU; none claims a real-weight test."""
    from dim3.presets import FAMILY_PRESETS, presets

    assert sorted(p.family for p in FAMILY_PRESETS) == TYPES
    table = presets()
    for p in FAMILY_PRESETS:
        assert table[p.key] is p and p.gigabytes > 0 and "GB" in p.title
        assert p.title.endswith(", untested)") and not p.tested
        for ref in (p.base, p.multilingual, p.multimodal):
            assert ref.count("/") == 1 and " " not in ref  # a Hub id, not a local path


@pytest.fixture(scope="module")
def stretch_merged(tmp_path_factory):
    """model_type -> (trio, merge result) of a stretch family, each built and merged once."""
    done = {}

    def get(model_type: str):
        if model_type not in done:
            root = tmp_path_factory.mktemp(model_type)
            trio = build_stretch_trio(model_type, root / "trio")
            done[model_type] = trio, engine.merge_to_folder(_recipe(trio), root / "merged")
        return done[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(STRETCH))
def test_stretch_families_plan_merge_and_load(stretch_merged, model_type):
    """InternVL (-hf), Aya Vision, PaliGemma, Idefics3, SmolVLM: the layout from transformers
    alone plans, merges and loads cleanly, VLM + (multilingual - base) in the language model, the
    VLM's own vocabulary rows (its image tokens; PaliGemma's location and segment tokens) kept."""
    from transformers import AutoModelForCausalLM

    trio, result = stretch_merged(model_type)
    assert result.plan.family == model_type
    assert sorted(e.key for e in result.plan.entries) == sorted(_keys(trio.multimodal))
    out, info = _auto(result.out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    vlm = _auto(trio.multimodal)[0]
    base, ml = (
        AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        for p in (trio.base, trio.multilingual)
    )
    got, own = out.get_decoder().state_dict(), vlm.get_decoder().state_dict()
    b, m = base.model.state_dict(), ml.model.state_dict()
    rows = base.config.vocab_size
    assert own["embed_tokens.weight"].shape[0] > rows  # the VLM appends its image tokens
    for name, tensor in got.items():
        n = b[name].shape[0] if b[name].dim() else None
        torch.testing.assert_close(tensor[:n], own[name][:n] + m[name] - b[name], msg=name)
        torch.testing.assert_close(tensor[n:], own[name][n:], msg=name)  # the VLM's own rows
    head = out.get_output_embeddings().weight
    assert tied(out) == tied(vlm) == tied(base)  # the VLM's head is as the base's
    if not tied(out):
        want = vlm.get_output_embeddings().weight[:rows] + ml.lm_head.weight - base.lm_head.weight
        torch.testing.assert_close(head[:rows], want)
    torch.testing.assert_close(head[rows:], vlm.get_output_embeddings().weight[rows:])


@pytest.mark.parametrize("model_type", sorted(STRETCH))
def test_stretch_merge_into_a_loaded_model_equals_the_folder(stretch_merged, model_type):
    trio, result = stretch_merged(model_type)
    model, _ = _auto(trio.multimodal)
    engine.merge_into_model(model, _recipe(trio))
    want = _auto(result.out_dir)[0].state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=k)


@pytest.mark.parametrize("model_type", sorted(set(STRETCH) - {"paligemma", "smolvlm"}))
def test_stretch_merged_model_answers_a_picture_question_streamed(stretch_merged, model_type):
    """The merged InternVL, Aya Vision and Idefics3 answer through their real processors and
    chat templates, streamed, with the text ``generate`` gives."""
    if model_type == "internvl":
        pytest.importorskip("torchvision", reason="InternVL's video processor needs torchvision")
    _, result = stretch_merged(model_type)
    _answers_a_picture_question(result.out_dir)


def test_smolvlm_answers_or_names_the_package_its_processor_needs(stretch_merged):
    """SmolVLM2's processor needs num2words, which requirements.txt does not install: loading
    the merged model for a chat names the package; where it is installed, the model answers."""
    _, result = stretch_merged("smolvlm")
    try:
        import num2words  # noqa: F401
    except ImportError:
        with pytest.raises(ChatError, match=r"processor of .*Package `num2words` is required"):
            load_vlm(result.out_dir, dtype=torch.float32)
    else:
        _answers_a_picture_question(result.out_dir)


def test_paligemma_without_a_chat_template_is_refused_with_the_reason(stretch_merged):
    """PaliGemma's processors carry no chat template: the chat says so instead of failing."""
    _, result = stretch_merged("paligemma")
    model, processor = load_vlm(result.out_dir, dtype=torch.float32)
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    question = [{"role": "user", "content": "caption en"}]
    with pytest.raises(ChatError, match="processor has no chat template"):
        build_inputs(model, processor, question, image)


@pytest.mark.parametrize("model_type", TYPES)
def test_cli_merges_each_family_with_dim3_and_transformers_runs_it(
    tiny_family_trios, model_type, tmp_path, capsys
):
    """``python -m dim3 plan`` names the family, ``merge`` (DiM3, the default) writes a folder
    that transformers loads cleanly and generates from, picture included."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dim3.cli import main

    trio = tiny_family_trios(model_type)
    args = [
        f"--base={trio.base}",
        f"--multilingual={trio.multilingual}",
        f"--multimodal={trio.multimodal}",
    ]
    assert main(["plan", *args]) == 0
    assert f"Family: {model_type}" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert main(["merge", *args, f"--out={out}"]) == 0
    model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    if model_type in NEEDS_TORCHVISION:
        pytest.importorskip("torchvision", reason=f"{model_type}'s processor needs torchvision")
    processor = AutoProcessor.from_pretrained(str(out))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Farbe?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > inputs["input_ids"].shape[1]  # new tokens after the prompt
