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

import functools
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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
        self._names: dict[str, tuple[str, bool]] = {}  # to_memory's answers so far
        self._unsaved = False  # answers not yet in the disk cache
        self._rebuild = None  # a stored layout: builds the class when a new name comes

    @classmethod
    def from_record(cls, record: dict, rebuild) -> DerivedLayout:
        """A layout from the disk cache (:func:`_record`): everything the class gave, and the names
        it gave for the keys seen before. ``rebuild()`` derives the class's layout again, for a
        key the record does not hold (its renamings are transformers objects, not stored)."""
        self = cls.__new__(cls)
        self.family = record["family"]
        self.model_types = (self.family,)
        self.class_name = record["class_name"]
        self.base_model_prefix = record["base_model_prefix"]
        self.shapes = {k: tuple(v) for k, v in record["shapes"].items()}
        self._renamings = self._converters = None
        self.decoder, self.head = record["decoder"], record["head"]
        self.vision = tuple(record["vision"])
        self.tied = set(record["tied"])
        self.optional = tuple(re.compile(p) for p in record["optional"])
        self.layer_map = {int(j): int(i) for j, i in record["layer_map"]}
        self.vlm_only_layers = set(record["vlm_only_layers"])
        self._names = {k: (str(n), bool(c)) for k, (n, c) in record["names"].items()}
        self._unsaved, self._rebuild = False, rebuild
        return self

    def to_memory(self, key: str) -> tuple[str, bool]:
        """The name transformers loads ``key`` as, and whether a converter (not a rename) fits."""
        known = self._names.get(key)
        if known is not None:
            return known
        if self._renamings is None:  # from the disk cache, and a key it has not seen
            built = self._rebuild()
            if built is None:
                raise ValueError(f"transformers can no longer build the {self.class_name} class")
            self._renamings, self._converters = built._renamings, built._converters
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(
            key, self._renamings, self._converters, self.base_model_prefix, self.shapes
        )
        self._names[key] = (name, pattern is not None)
        self._unsaved = True
        return self._names[key]

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


def derived_layout(config: dict, keys: Iterable[str] = ()) -> DerivedLayout | None:
    """The layout of the class ``AutoModelForImageTextToText`` loads for ``config``, or None.

    None when transformers has no image-text-to-text class for the ``model_type`` or cannot build
    it from this config. Built once per distinct config, on the meta device: no weights allocated.
    ``keys`` (a checkpoint's tensor names) are renamed at once, in sorted order as transformers
    does (a guarded renaming group depends on it), and kept in the disk cache with the layout, so
    that the next process with the same config, keys and transformers need not build the class
    (importing the family's modeling code takes seconds; see :func:`layout_cache_dir`).
    """
    import json

    model_type = config.get("model_type", "")
    key = json.dumps(config, sort_keys=True, default=str)
    keys = sorted(keys)
    if key not in _DERIVED:
        stored = _load_record(key, keys)
        if stored is not None:
            _DERIVED[key] = DerivedLayout.from_record(stored, lambda: _derive(model_type, config))
        else:
            _DERIVED[key] = _derive(model_type, config)
        while len(_DERIVED) > _DERIVED_KEPT:
            _DERIVED.popitem(last=False)
    _DERIVED.move_to_end(key)
    layout = _DERIVED[key]
    if layout is not None:
        for k in keys:
            layout.to_memory(k)
        if layout._unsaved:
            _save_record(key, layout)
            layout._unsaved = False
    return layout


# The disk cache of derived layouts. A record is JSON (no pickle): what the class gave (names,
# shapes, decoder, head, vision modules, tied and optional names, layer numbering) and the
# in-memory name of every on-disk key seen. Its file name hashes the config, the transformers
# version and this module's source, so a new transformers or a changed derivation starts afresh;
# a record that cannot be read or does not fit is ignored (the class is built, as without cache).
ENV_CACHE = "DIM3_CACHE_DIR"
_RECORD_FORMAT = 1


def layout_cache_dir(kind: str = "layouts") -> Path | None:
    """Where derived layouts are cached (with ``kind``, other derived records: ``tokenizers``,
    the plan's passed tokenizer comparisons): ``$DIM3_CACHE_DIR/<kind>`` (``off`` turns the
    cache off), else ``$XDG_CACHE_HOME/dim3/<kind>``, else ``~/.cache/dim3/<kind>``."""
    raw = os.environ.get(ENV_CACHE, "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return Path(raw).expanduser() / kind
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(xdg or Path.home() / ".cache").expanduser() / "dim3" / kind


def _record_path(config_key: str) -> Path | None:
    import hashlib
    from importlib import metadata

    where = layout_cache_dir()
    if where is None:
        return None
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    h = hashlib.sha256()
    for part in (str(_RECORD_FORMAT), version, _source_hash(), config_key):
        h.update(part.encode())
        h.update(b"\0")
    return where / f"{h.hexdigest()[:40]}.json"


@functools.cache
def _source_hash() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _load_record(config_key: str, keys: list[str]) -> dict | None:
    """The stored record for this config if it holds every one of ``keys``, else None."""
    import json

    path = _record_path(config_key)
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != _RECORD_FORMAT or record.get("config") != config_key:
            return None
        if any(k not in record["names"] for k in keys):
            return None  # new keys: built again, and the record extended
        _check_record(record)
        DerivedLayout.from_record(record, lambda: None)  # every field there, of the right kind
    except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error):
        return None
    return record


def _check_record(record: dict) -> None:
    """Raise TypeError unless every field of a stored record has the kind :func:`_save_record`
    writes (a damaged or edited file is then ignored, not trusted)."""

    def strings(x) -> bool:
        return isinstance(x, list) and all(isinstance(v, str) for v in x)

    def ints(x) -> bool:
        return isinstance(x, list) and all(isinstance(v, int) for v in x)

    fine = (
        all(isinstance(record[k], str) for k in ("family", "class_name", "decoder"))
        and isinstance(record["base_model_prefix"], str)
        and (record["head"] is None or isinstance(record["head"], str))
        and all(strings(record[k]) for k in ("vision", "tied", "optional"))
        and isinstance(record["shapes"], dict)
        and all(ints(v) for v in record["shapes"].values())
        and isinstance(record["layer_map"], list)
        and all(ints(v) and len(v) == 2 for v in record["layer_map"])
        and ints(record["vlm_only_layers"])
        and isinstance(record["names"], dict)
        and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], bool)
            for v in record["names"].values()
        )
    )
    if not fine:
        raise TypeError("a layout record with fields of the wrong kind")


def _save_record(config_key: str, layout: DerivedLayout) -> None:
    """Write (or extend) the record of ``layout`` atomically; a cache that cannot be written is
    no error (the next process builds the class again)."""
    path = _record_path(config_key)
    if path is None:
        return
    record = {
        "format": _RECORD_FORMAT,
        "config": config_key,
        "family": layout.family,
        "class_name": layout.class_name,
        "base_model_prefix": layout.base_model_prefix,
        "shapes": {k: list(v) for k, v in layout.shapes.items()},
        "decoder": layout.decoder,
        "head": layout.head,
        "vision": list(layout.vision),
        "tied": sorted(layout.tied),
        "optional": [p.pattern for p in layout.optional],
        "layer_map": sorted(layout.layer_map.items()),
        "vlm_only_layers": sorted(layout.vlm_only_layers),
        "names": {k: list(v) for k, v in layout._names.items()},
    }
    store_record(path, record)


def store_record(path: Path, record: object) -> None:
    """Write a cache record as JSON, atomically (a reader sees the old file or the new one); a
    cache that cannot be written is no error (the next process derives it again)."""
    import json
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".record-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


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
    derived = derived_layout(config, keys)
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
