"""Per-family key layouts: which VLM tensors are language model, vision encoder or projector.

Layouts are data, one table per family: prefixes on disk (both the older ``language_model.model.*``
layout and the newer ``model.language_model.*`` one) mapped to the canonical LLM names that a
plain causal LM uses (``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight``).
Real checkpoints hold more than a family's weights, and those facts are data here too: buffers
stored beside the weights (:data:`BUFFERS`, left out of every match) and layouts that transformers
cannot load (:data:`UNCONVERTED`, refused with a pointer to a converted checkpoint).
This module knows key names and config fields only: no shapes, files or tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LANGUAGE, VISION, PROJECTOR = "language", "vision", "projector"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_KEYS = (EMBED, LM_HEAD)  # canonical tensors with one row per token

# Buffers some checkpoints store as if they were weights: (pattern, what they are). transformers 5
# computes them at load time and drops them from a checkpoint silently (``rotary_emb.inv_freq`` and
# ``position_ids``: PreTrainedModel._adjust_missing_and_unexpected_keys), so they are never merged,
# matched or written. Seen in real files: 32 ``model.layers.N.self_attn.rotary_emb.inv_freq``
# (shape [64]) in Llama-2-7b-hf (float32 in a float16 checkpoint), Llama-2-7b-chat-hf,
# vicuna-7b-v1.5 and liuhaotian/llava-v1.5-7b; llava-hf/llava-1.5-7b-hf has none. Old CLIP/BERT
# checkpoints store ``embeddings.position_ids`` the same way.
BUFFERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), "rotary inv_freq"),
    (re.compile(r"(^|\.)position_ids$"), "position_ids"),
)

# Architectures whose checkpoints transformers cannot load as a VLM, by ``architectures`` (their
# ``model_type`` may be "llava" too, with a flat Llama config): what they are, and what to use.
_ORIGINAL_LLAVA = (
    "the original LLaVA layout (haotian-liu/LLaVA: a Llama with model.mm_projector.* and no vision "
    "tower in the checkpoint), which transformers cannot load; use a transformers checkpoint of it "
    "(for LLaVA-1.5-7B: llava-hf/llava-1.5-7b-hf) or convert it with transformers' "
    "models/llava/convert_llava_weights_to_hf.py"
)
UNCONVERTED: dict[str, str] = {
    "LlavaLlamaForCausalLM": _ORIGINAL_LLAVA,
    "LlavaMistralForCausalLM": _ORIGINAL_LLAVA,
    "LlavaMptForCausalLM": _ORIGINAL_LLAVA,
}


def buffer_kind(key: str) -> str | None:
    """What stored buffer ``key`` is (e.g. "rotary inv_freq"), or None for a weight."""
    for pattern, kind in BUFFERS:
        if pattern.search(key):
            return kind
    return None


def unconverted_layout(config: dict) -> str | None:
    """Why a checkpoint with this ``config.json`` cannot be used and what to do, or None."""
    for arch in config.get("architectures") or ():
        if arch in UNCONVERTED:
            return f"its architecture {arch} is {UNCONVERTED[arch]}"
    return None


@dataclass(frozen=True)
class Layout:
    """Key patterns of one VLM family.

    ``rules`` are ``(on-disk prefix, role, canonical prefix)``; the first matching prefix wins, so
    more specific prefixes come first (``model.visual.`` before ``model.``). A canonical prefix is
    used for language tensors only.
    """

    family: str
    model_types: tuple[str, ...]
    rules: tuple[tuple[str, str, str], ...]

    def classify(self, key: str) -> tuple[str, str | None] | None:
        """``(role, canonical LLM key or None)`` for ``key``, or None if no rule matches."""
        for prefix, role, canonical in self.rules:
            if key == prefix.rstrip(".") or key.startswith(prefix):
                name = canonical + key[len(prefix) :] if role == LANGUAGE else None
                return role, name
        return None


def _llava_like(family: str, model_types: tuple[str, ...], extra: tuple = ()) -> Layout:
    return Layout(
        family,
        model_types,
        (
            ("model.vision_tower.", VISION, ""),
            ("vision_tower.", VISION, ""),
            ("model.multi_modal_projector.", PROJECTOR, ""),
            ("multi_modal_projector.", PROJECTOR, ""),
            *extra,
            ("model.language_model.", LANGUAGE, "model."),
            ("language_model.model.", LANGUAGE, "model."),
            ("language_model.lm_head.", LANGUAGE, "lm_head."),
            ("lm_head.", LANGUAGE, "lm_head."),
        ),
    )


_NEWLINE = (
    ("model.image_newline", PROJECTOR, ""),
    ("image_newline", PROJECTOR, ""),
)

LAYOUTS: tuple[Layout, ...] = (
    _llava_like("llava", ("llava", "mistral3")),
    _llava_like("llava_next", ("llava_next",), _NEWLINE),
    _llava_like("llava_onevision", ("llava_onevision",), _NEWLINE),
    Layout(
        "qwen2_vl",
        ("qwen2_vl", "qwen2_5_vl"),
        (
            ("model.visual.merger.", PROJECTOR, ""),
            ("visual.merger.", PROJECTOR, ""),
            ("model.visual.", VISION, ""),
            ("visual.", VISION, ""),
            ("model.language_model.", LANGUAGE, "model."),
            ("model.", LANGUAGE, "model."),
            ("lm_head.", LANGUAGE, "lm_head."),
        ),
    ),
    Layout(
        "idefics3",
        ("idefics3", "smolvlm"),
        (
            ("model.vision_model.", VISION, ""),
            ("model.connector.", PROJECTOR, ""),
            ("model.text_model.", LANGUAGE, "model."),
            ("lm_head.", LANGUAGE, "lm_head."),
        ),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(config: dict, keys: Iterable[str] = ()) -> Layout:
    """The layout of a VLM from its ``config.json``; unknown types fall back to key matching."""
    model_type = config.get("model_type", "")
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    keys = list(keys)
    for layout in LAYOUTS:
        classes = [layout.classify(k) for k in keys]
        if keys and all(classes) and {c[0] for c in classes if c} >= {LANGUAGE, VISION}:
            return layout
    raise ValueError(
        f"unsupported VLM family {model_type!r}: its tensor names match no known layout. "
        f"Supported model types: {', '.join(supported_model_types())}"
    )
