"""Key layouts: every family's tensors land in the right part, in both on-disk layouts."""

from __future__ import annotations

import pytest

from dim3.layout import LANGUAGE, PROJECTOR, VISION, layout_for

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
        ValueError, match="unsupported VLM family 'blip'.*Supported model types: .*llava"
    ):
        layout_for({"model_type": "blip"}, ["text_decoder.w", "vision_model.w"])
