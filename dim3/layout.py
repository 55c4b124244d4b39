"""Per-family key layouts: which VLM tensors are language model, vision encoder or projector.

A family that transformers knows is derived from transformers itself (:func:`derived_layout`):
the class that ``AutoModelForImageTextToText`` would load is built from the checkpoint's config on
the meta device (no memory), its conversion mapping renames on-disk names to the names it loads,
its decoder module (``get_decoder()``) is the language model and its output embedding the head.
A tensor the class would not load, or loads with another shape, is named as such (the plan refuses
it before anything is written). VLM-only decoder layers (mllama's cross-attention layers) are found
from their module class and the LLM's layers renumbered around them.

For model types transformers does not know, the hand tables below remain as a fallback: prefixes on disk (both the older ``language_model.model.*``
layout and the newer ``model.language_model.*`` one) mapped to the canonical LLM names that a
plain causal LM uses (``model.layers.*``, ``model.embed_tokens.weight``, ``lm_head.weight``).
Real checkpoints hold more than a family's weights, and those facts are data here too: buffers
stored beside the weights (:data:`BUFFERS`, left out of every match) and layouts that transformers
cannot load (:data:`UNCONVERTED`, refused with a pointer to a converted checkpoint).
This module knows key names and config fields only: no shapes, files or tensors.
"""

from __future__ import annotations

import re
from collections import OrderedDict
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


# Parts of a vision tower that project into the language model's width: reported as projector.
# transformers keeps them inside the vision module (Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# ``model.visual.merger.*``: models/qwen2_vl/modeling_qwen2_vl.py ``PatchMerger``); Qwen3-VL's
# ``deepstack_merger_list`` feeds the language model's early layers and stays vision.
PROJECTOR_IN_VISION = re.compile(r"(^|\.)merger\.")
# Decoder layers that only a VLM has (no counterpart in its base LLM), by module class: mllama's
# ``MllamaCrossAttentionDecoderLayer`` at ``text_config.cross_attention_layers`` (models/mllama/
# modeling_mllama.py ``MllamaTextModel.__init__``). The LLM's layers are renumbered around them.
VLM_ONLY_LAYER_CLASS = re.compile(r"CrossAttention")
VLM_ONLY = "vlm-only layers"  # role of such layers' tensors: copied from the VLM
NOT_LOADED = "not loaded"  # role of a tensor the VLM's transformers class would not load


class DerivedLayout:
    """A family's layout read from its transformers class (see the module docstring).

    ``classify`` gives ``(role, canonical LLM key or None)`` for an on-disk or in-memory key: role
    ``language`` (canonical name in the base LLM), ``vision``, ``projector``, ``vlm-only layers``
    (a VLM-only decoder layer, copied) or ``not loaded`` (the class has no such tensor).
    """

    def __init__(self, model_type: str, model: object):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        self.family = model_type
        self.model_types = (model_type,)
        self.class_name = type(model).__name__
        self.base_model_prefix = model.base_model_prefix
        state = model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        names = {id(m): n for n, m in model.named_modules()}
        self.decoder = names[id(model.get_decoder())] + "."
        head = model.get_output_embeddings()
        self.head = (names[id(head)] + ".") if head is not None else None
        self.vision = tuple(
            n + "."
            for n, m in model.named_modules()
            if n.count(".") <= 1
            and n
            and _is_pretrained(m)
            and n + "." != self.decoder
            and not self.decoder.startswith(n + ".")
        )
        self.tied = _tied_keys(model)
        # names the class itself lets a checkpoint lack (transformers does not report them)
        self.optional = tuple(
            re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
        )
        self.layer_map, self.vlm_only_layers = _layer_map(model, self.decoder)

    def to_memory(self, key: str) -> tuple[str, bool]:
        """The name transformers loads ``key`` as, and whether a converter (not a rename) fits."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(
            key, self._renamings, self._converters, self.base_model_prefix, self.shapes
        )
        return name, pattern is not None

    def classify(self, key: str) -> tuple[str, str | None] | None:
        name, converted = self.to_memory(key)
        if name not in self.shapes and not converted:
            return NOT_LOADED, None
        if name.startswith(self.decoder):
            rest = name[len(self.decoder) :]
            m = re.match(r"layers\.(\d+)\.", rest)
            if m and int(m.group(1)) in self.vlm_only_layers:
                return VLM_ONLY, None
            if m:
                rest = f"layers.{self.layer_map[int(m.group(1))]}." + rest[m.end() :]
            return LANGUAGE, "model." + rest
        if self.head and name.startswith(self.head):
            return LANGUAGE, "lm_head." + name[len(self.head) :]
        if name.startswith(self.vision) and not PROJECTOR_IN_VISION.search(name):
            return VISION, None
        return PROJECTOR, None

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Tensors the class needs (name -> shape), less tied copies that transformers fills and
        names the class marks optional (``_keys_to_ignore_on_load_missing``)."""
        return {
            k: v
            for k, v in self.shapes.items()
            if k not in self.tied and not any(p.search(k) for p in self.optional)
        }

    def describe_layers(self) -> str | None:
        """A line naming the VLM-only layers and the LLM layer renumbering, if any."""
        if not self.vlm_only_layers:
            return None
        return (
            f"VLM-only decoder layers {sorted(self.vlm_only_layers)} (no counterpart in the base "
            f"LLM) are copied from the VLM; the other {len(self.layer_map)} layers are the LLM's "
            "layers 0.. in order (e.g. "
            + ", ".join(f"VLM {j} = LLM {i}" for j, i in list(self.layer_map.items())[-3:])
            + ")"
        )


def _is_pretrained(module: object) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _tied_keys(model: object) -> set[str]:
    """In-memory names that transformers fills from another tensor (a tied output embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", {})
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not (
        getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    ):
        return set()
    return set(tied) if isinstance(tied, dict) else set(tied or ())


def _layer_map(model: object, decoder: str) -> tuple[dict[int, int], set[int]]:
    """VLM decoder layer -> LLM layer, and the VLM-only layers (by module class)."""
    layers = model.get_submodule(decoder.rstrip(".")).get_submodule("layers")
    only = {i for i, m in enumerate(layers) if VLM_ONLY_LAYER_CLASS.search(type(m).__name__)}
    kept = [i for i in range(len(layers)) if i not in only]
    return {j: i for i, j in enumerate(kept)}, only


_DERIVED: OrderedDict[str, DerivedLayout | None] = OrderedDict()  # the last few configs' layouts
_DERIVED_KEPT = 16
DERIVE_ERRORS: dict[str, str] = {}  # model_type -> why transformers could not build its class
# Families tested end to end on tiny real models (tests/test_families.py, tests/test_engine.py);
# others that transformers loads are derived the same way, untested (docs/families.md).
TESTED_FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "mistral3",
    "gemma3",
    "mllama",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
)


def derived_layout(config: dict) -> DerivedLayout | None:
    """The layout of the class ``AutoModelForImageTextToText`` loads for ``config``, or None.

    None when transformers has no image-text-to-text class for the ``model_type`` or cannot build
    it from this config. Built once per distinct config, on the meta device: no weights allocated.
    """
    import json

    model_type = config.get("model_type", "")
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _DERIVED:
        _DERIVED[key] = _derive(model_type, config)
        while len(_DERIVED) > _DERIVED_KEPT:
            _DERIVED.popitem(last=False)
    _DERIVED.move_to_end(key)
    return _DERIVED[key]


def _derive(model_type: str, config: dict) -> DerivedLayout | None:
    import torch
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if not name or model_type not in CONFIG_MAPPING or unconverted_layout(config):
        return None
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(
            {k: v for k, v in config.items() if k not in ("auto_map",)}
        )
        with torch.device("meta"):
            model = getattr(transformers, name)(cfg)
        return DerivedLayout(model_type, model)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build: hand tables
        DERIVE_ERRORS[model_type] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return None


def supported_model_types() -> list[str]:
    """Model types tested here and those of the hand tables (any type transformers' image-text-to-
    text auto class loads is derived too)."""
    return sorted({t for layout in LAYOUTS for t in layout.model_types} | set(TESTED_FAMILIES))


def layout_for(config: dict, keys: Iterable[str] = ()) -> Layout | DerivedLayout:
    """The layout of a VLM from its ``config.json`` (and tensor names, when given).

    A model type transformers knows is derived from its class, unless none of ``keys`` is a
    language-model tensor of it; else the hand tables, by model type, then by key matching.
    """
    keys = list(keys)
    model_type = config.get("model_type", "")
    derived = derived_layout(config)
    if derived is not None and (not keys or any(derived.classify(k)[0] == LANGUAGE for k in keys)):
        return derived
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    for layout in LAYOUTS:
        classes = [layout.classify(k) for k in keys]
        if keys and all(classes) and {c[0] for c in classes if c} >= {LANGUAGE, VISION}:
            return layout
    raise ValueError(
        f"unsupported VLM family {model_type!r}: its tensor names match no known layout"
        + (
            f" (transformers could not build it: {DERIVE_ERRORS[model_type]})"
            if model_type in DERIVE_ERRORS
            else ""
        )
        + ". Supported: any model type transformers' AutoModelForImageTextToText loads; tested: "
        + ", ".join(supported_model_types())
    )
