"""Header-true checkpoints of real Hub models, built from the key maps in ``../shared/realmaps``.

A key map (see that folder's NOTES.md and SOURCES.md) gives a real checkpoint's config, tensor
names, dtypes, shapes and shard split, read from real safetensors headers, indexes and configs; no
weights. :func:`build_checkpoint` writes a folder that looks exactly like the real download to a
reader of headers: the real ``config.json``, the real shard names and split, the index, and
safetensors files whose headers carry the real names, dtypes and shapes.

Data is either ``"sparse"`` (the default: the files are sized by ``truncate``, so unwritten tensors
are zeros that cost no disk and a 7B checkpoint takes a few MB) with a few real-valued tensors
where a check reads them (:data:`REAL_DEFAULT`: layer 0's attention and MLP matrices, one of
which the plan's relatedness check compares; only their first ``real_elements`` values are
written, the rest stays zero, which leaves a cosine between two models' tensors as telling as over
the whole tensor), or ``"random"`` (every tensor real-valued: costs the full size on disk; for
benchmarks, which must not merge zeros). Values are a seeded function of the
tensor's language-model name (``language_model.model.X`` and ``model.language_model.X`` count as
``model.X``), so a VLM or fine-tune built with ``noise > 0`` is the base plus a small residual and
cosines between them are ~1, as for real fine-tunes of one base.

``layers`` cuts the language model to a few layers, keeping the first ones, every layer the real
checkpoint splits across two shards and the last one (renumbered), so the real vocabulary, tied
embeddings and shard split pattern survive; ``vision_layers`` cuts the vision tower likewise.

``tokenizer=True`` writes a ``tokenizer.json`` where the map has the model's real special tokens
(``tokenizer_config.json``'s ``added_tokens_decoder`` or ``special_tokens_map.json``): a WordLevel
vocabulary of the real size (``tok<id>`` placeholders for the regular tokens, which the maps do not
hold) with the real special tokens at their real ids. It is NOT the real tokenizer; it lets the
plan's tokenizer comparison run on the real sizes and special tokens.

Importable from tests (``tests.realmaps``) and benchmarks (which put the repo root on sys.path).
Nothing here imports ``dim3``: the checkpoints are built independently of the code under test.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
REALMAPS = Path(os.environ.get("DIM3_REALMAPS", REPO_ROOT.parent / "shared" / "realmaps"))

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Tensors given real values in sparse checkpoints: what the plan's relatedness check may read.
REAL_DEFAULT = (
    r"layers\.0\.self_attn\.[qkvo]_proj\.weight$",
    r"layers\.0\.mlp\.(down|gate|up)_proj\.weight$",
)
# Reconstructed key maps have no config of their own: the real config they were derived from.
CONFIG_FROM = {
    "Qwen__Qwen2-7B__reconstructed": "SeaLLMs__SeaLLMs-v3-7B-Chat",
    "Qwen__Qwen2.5-7B__reconstructed": "SeaLLMs__SeaLLMs-v3-7B-Chat",
    "Qwen__Qwen2.5-7B-Instruct__reconstructed": "SeaLLMs__SeaLLMs-v3-7B-Chat",
    "SeaLLMs__SeaLLMs-v3-1.5B-Chat__reconstructed": "SeaLLMs__SeaLLMs-v3-1.5B-Chat",
    "Qwen__Qwen2-VL-2B-Instruct__reconstructed": "Qwen__Qwen2-VL-2B",
    "Qwen__Qwen2-VL-7B-Instruct__reconstructed": "allenai__olmOCR-7B-0225-preview",
}
# ... and no tokenizer files: the special tokens of a real model of the same tokenizer family.
# Qwen2 models keep Qwen2's tokenizer (SeaLLMs-v3 are Qwen2 fine-tunes that kept it); Qwen2.5's
# adds 19 special tokens (151646..151664), the same in its text and VL models.
TOKENS_FROM = {
    "Qwen__Qwen2-7B__reconstructed": "SeaLLMs__SeaLLMs-v3-7B-Chat",
    "Qwen__Qwen2-1.5B-Instruct__reconstructed": "SeaLLMs__SeaLLMs-v3-1.5B-Chat",
    "SeaLLMs__SeaLLMs-v3-1.5B-Chat__reconstructed": "SeaLLMs__SeaLLMs-v3-1.5B-Chat",
    "Qwen__Qwen2.5-7B__reconstructed": "Qwen__Qwen2.5-VL-7B-Instruct",
    "Qwen__Qwen2-VL-2B-Instruct__reconstructed": "Qwen__Qwen2-VL-2B",
    "Qwen__Qwen2-VL-7B-Instruct__reconstructed": "allenai__olmOCR-7B-0225-preview",
}
RECONSTRUCTED_SHARD_BYTES = 4 * 10**9  # shard split unknown: greedy, ~Qwen's real shard size
# language-model prefixes -> the plain LLM's, so a VLM's LM shares the base's values
_CANONICAL = (
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)
_LM_LAYER = re.compile(r"^((?:language_model\.)?model\.(?:language_model\.)?layers\.)(\d+)\.")
_VISION_LAYER = re.compile(
    r"^((?:model\.)?(?:visual\.blocks\.|vision_tower\.vision_model\.encoder\.layers\.))(\d+)\."
)


def available() -> bool:
    """Whether the key maps are present (tests skip without them)."""
    return (REALMAPS / "NOTES.md").is_file()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a real checkpoint: name, safetensors dtype, shape and shard file name."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    shard: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class KeyMap:
    """A real checkpoint without its weights: folder name, config and tensors in shard order."""

    name: str
    config: dict
    tensors: tuple[TensorInfo, ...]
    special_tokens: dict[int, str] | None  # id -> token, where the map has them

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(t.shard for t in self.tensors))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("x")) if text else ()


def _config(folder: Path) -> dict:
    for candidate in (
        folder / "config.json",
        folder / "config.from_mlc_preset.json",
        REALMAPS / CONFIG_FROM.get(folder.name, "-") / "config.json",
    ):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"no config for key map {folder.name}")


def _config_dtype(config: dict) -> str:
    text = config.get("text_config") or {}
    name = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
    return CONFIG_DTYPES.get(name or "bfloat16", "BF16")


def _from_headers(folder: Path) -> list[TensorInfo]:
    tensors = []
    for path in sorted(folder.glob("safetensors_header.*.json")):
        shard = path.name.removeprefix("safetensors_header.").removesuffix(".json")
        shard += "" if shard.endswith(".safetensors") else ".safetensors"
        header = json.loads(path.read_text(encoding="utf-8"))
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            tensors.append(TensorInfo(key, info["dtype"], tuple(info["shape"]), shard))
    return tensors


def _safetensors_name(shard: str) -> str:
    """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``."""
    if shard.endswith(".bin"):
        return shard.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"
    return shard


def _from_key_list(folder: Path, config: dict) -> list[TensorInfo]:
    dtype = _config_dtype(config)
    path = folder / "keys_derived_shapes.txt"
    if not path.is_file():
        path = folder / "keys.txt"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        key, shape = parts[0], _shape(parts[1])
        shard = _safetensors_name(parts[2]) if len(parts) > 2 else ""
        # float32 rotary buffers in fp16 checkpoints: the .bin indexes' total_size needs them
        kind = "F32" if key.endswith("rotary_emb.inv_freq") and shard else dtype
        rows.append(TensorInfo(key, kind, shape, shard))
    if rows and not rows[0].shard:
        rows = _greedy_shards(rows)
    by_shard: dict[str, list[TensorInfo]] = {}
    for row in rows:
        by_shard.setdefault(row.shard, []).append(row)
    return [t for shard in sorted(by_shard) for t in by_shard[shard]]


def _from_index(folder: Path, config: dict) -> list[TensorInfo]:
    """Names and shards from the real index; shapes from transformers' class of the real config.

    The class named by ``architectures`` is built from the real config on the meta device; each
    index key is renamed the way transformers loads it (its conversion mapping) to find its shape.
    The shapes are checked against the index's ``total_size``, which counts every byte of the real
    files: a wrong shape anywhere fails here, not later.
    """
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    data = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    transforms = get_model_conversion_mapping(model)
    renames = [t for t in transforms if not isinstance(t, WeightConverter)]
    dtype = _config_dtype(config)
    rows = []
    for key, shard in data["weight_map"].items():
        name, _ = rename_source_key(key, renames, [], model.base_model_prefix, shapes)
        rows.append(TensorInfo(key, dtype, shapes[name], shard))
    total = sum(t.nbytes for t in rows)
    if total != int(data["metadata"]["total_size"]):
        raise ValueError(
            f"{folder.name}: shapes add up to {total} bytes, the index says {data['metadata']['total_size']}"
        )
    order = {shard: i for i, shard in enumerate(sorted({t.shard for t in rows}))}
    return sorted(rows, key=lambda t: (order[t.shard], t.key))


# The text LLM inside a VLM, where the maps hold no file of the base LLM itself: the VLM's
# language-model tensors under the plain causal-LM names, the VLM's text config with the base's
# model type. Qwen3-VL-8B/4B's language models have Qwen3-8B/4B's shapes (36 layers, vocabulary
# 151,936; the 4B tied), Gemma-3-27B-it's that of the text Gemma-3-27B (Gemma3ForCausalLM).
TEXT_SUFFIX = "__text"
TEXT_MODELS = {
    "qwen3_vl_text": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3_text": ("gemma3_text", "Gemma3ForCausalLM"),
}


def text_keymap(vlm: KeyMap) -> KeyMap:
    """The base LLM of ``vlm`` reconstructed from its language model (see :data:`TEXT_MODELS`)."""
    text = dict(vlm.config["text_config"])
    model_type, arch = TEXT_MODELS[text["model_type"]]
    tied = vlm.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    config = {**text, "model_type": model_type, "architectures": [arch]}
    config["tie_word_embeddings"] = tied
    if model_type == "qwen3":  # Qwen3's own rope: the VL model's mrope sections do not apply
        config["rope_scaling"] = None
    rows = [
        replace(t, key=canonical(t.key))
        for t in vlm.tensors
        if canonical(t.key) != t.key or t.key.startswith("lm_head.")
    ]
    return KeyMap(vlm.name + TEXT_SUFFIX, config, tuple(_greedy_shards(rows)), vlm.special_tokens)


def _greedy_shards(rows: list[TensorInfo]) -> list[TensorInfo]:
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for row in rows:
        if groups[-1] and size + row.nbytes > RECONSTRUCTED_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(row)
        size += row.nbytes
    return [
        replace(row, shard=_shard_name(i, len(groups)))
        for i, group in enumerate(groups)
        for row in group
    ]


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _special_tokens(folder: Path) -> dict[int, str] | None:
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        added = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        if added:
            return {int(i): t["content"] for i, t in added.items()}
    stm = folder / "special_tokens_map.json"
    if stm.is_file():  # sentencepiece Llama: <unk>, <s>, </s> are ids 0, 1, 2
        data = json.loads(stm.read_text(encoding="utf-8"))
        names = [data.get(k) for k in ("unk_token", "bos_token", "eos_token")]
        names = [n["content"] if isinstance(n, dict) else n for n in names]
        if all(names):
            return dict(enumerate(names))
    return None


def load_keymap(name: str) -> KeyMap:
    """Read the key map of ``name`` (a folder of ``../shared/realmaps``, e.g. ``Qwen__Qwen2-VL-2B``)."""
    if name.endswith(TEXT_SUFFIX):
        return text_keymap(load_keymap(name.removesuffix(TEXT_SUFFIX)))
    folder = REALMAPS / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no key map {name!r} in {REALMAPS}")
    config = _config(folder)
    tensors = _from_headers(folder) or _from_key_list(folder, config) or _from_index(folder, config)
    tokens = _special_tokens(folder)
    if tokens is None and name in TOKENS_FROM:
        tokens = _special_tokens(REALMAPS / TOKENS_FROM[name])
    return KeyMap(name, config, tuple(tensors), tokens)


# ---------------------------------------------------------------- cutting to a few layers


def _layer_numbers(tensors: Iterable[TensorInfo], pattern: re.Pattern) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for t in tensors:
        m = pattern.match(t.key)
        if m:
            found.setdefault(int(m.group(2)), set()).add(t.shard)
    return found


def kept_layers(keymap: KeyMap, n: int, vision: bool = False) -> list[int]:
    """Which ``n`` (or a few more) layers a cut keeps: the first ones, every layer the real files
    split across shards, and the last. Pass the VLM's choice to all three models of a trio."""
    found = _layer_numbers(keymap.tensors, _VISION_LAYER if vision else _LM_LAYER)
    if not found:
        return []
    keep = {i for i, shards in found.items() if len(shards) > 1} | {max(found)}
    for i in sorted(found):
        if len(keep) >= n:
            break
        keep.add(i)
    return sorted(keep)


Cut = int | Sequence[int] | None  # a number of layers, or the original layer numbers to keep


def _renumber(keymap: KeyMap, pattern, vision: bool, n: Cut) -> tuple[list[TensorInfo], int | None]:
    found = _layer_numbers(keymap.tensors, pattern)
    keep = kept_layers(keymap, n, vision) if isinstance(n, int) else n
    if keep is None or not found or set(keep) >= set(found):
        return list(keymap.tensors), None
    new = {old: i for i, old in enumerate(sorted(keep))}
    out = []
    for t in keymap.tensors:
        m = pattern.match(t.key)
        if m is None:
            out.append(t)
        elif int(m.group(2)) in new:
            key = f"{m.group(1)}{new[int(m.group(2))]}." + t.key[m.end() :]
            out.append(replace(t, key=key))
    return out, len(new)


def cut(keymap: KeyMap, layers: Cut = None, vision_layers: Cut = None) -> KeyMap:
    """The key map with its language model (and vision tower) cut to a few layers; config too.

    layers / vision_layers: a number (see :func:`kept_layers`) or the layer numbers to keep.
    """
    tensors, n_lm = _renumber(keymap, _LM_LAYER, False, layers)
    km = KeyMap(keymap.name, keymap.config, tuple(tensors), keymap.special_tokens)
    tensors, n_vis = _renumber(km, _VISION_LAYER, True, vision_layers)
    config = json.loads(json.dumps(keymap.config))
    if n_lm is not None:
        text = config.get("text_config")
        target = text if isinstance(text, dict) and "model_type" in config else config
        target["num_hidden_layers"] = n_lm
        if isinstance(target.get("layer_types"), list):  # Gemma 3: one entry per layer
            keep = kept_layers(keymap, layers) if isinstance(layers, int) else sorted(layers)
            target["layer_types"] = [target["layer_types"][i] for i in keep]
        if "max_window_layers" in target:
            target["max_window_layers"] = min(target["max_window_layers"], n_lm)
    if n_vis is not None:
        vision = config.setdefault("vision_config", {})
        vision["depth" if "depth" in vision else "num_hidden_layers"] = n_vis
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [n_vis - 1]
    shards = list(dict.fromkeys(t.shard for t in tensors))  # drop emptied shards, renumber
    names = {s: _shard_name(i, len(shards)) for i, s in enumerate(shards)}
    tensors = [replace(t, shard=names[t.shard]) for t in tensors]
    return KeyMap(keymap.name, config, tuple(tensors), keymap.special_tokens)


# ---------------------------------------------------------------- writing


def canonical(key: str) -> str:
    """A VLM's language-model name as the plain LLM's (other names unchanged)."""
    for pattern, repl in _CANONICAL:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def _blocks(t: TensorInfo, seed: int, noise: float, chunk: int) -> Iterable[torch.Tensor]:
    """The tensor's values, row block by row block: base(seed of the name) + noise x residual."""
    rows = t.shape[0] if t.shape else 1
    cols = math.prod(t.shape[1:]) if len(t.shape) > 1 else max(1, math.prod(t.shape))
    if len(t.shape) <= 1:
        rows, cols = 1, max(1, math.prod(t.shape))
    step = max(1, chunk // cols)
    name = zlib.crc32(canonical(t.key).encode())
    for b, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        g = torch.Generator().manual_seed(name * 1000 + b)
        block = torch.randn(n, cols, generator=g).mul_(0.02)
        if len(t.shape) == 1 and t.key.endswith("norm.weight"):
            block.add_(1.0)  # norms sit around 1, as real ones do
        if noise:
            g = torch.Generator().manual_seed((name * 1000 + b) ^ (seed * 7919 + 1))
            block.add_(torch.randn(n, cols, generator=g).mul_(0.02 * noise))
        yield block.to(TORCH_DTYPES[t.dtype])


def _header(tensors: Sequence[TensorInfo]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(
    path: Path,
    tensors: Sequence[TensorInfo],
    real: list[re.Pattern] | None,
    seed: int,
    noise: float,
    chunk: int,
    real_elements: int | None,
) -> None:
    head = _header(tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(t.nbytes for t in tensors))  # sparse: holes read as zeros
        offset = len(head)
        for t in tensors:
            numeric = t.dtype in TORCH_DTYPES and not t.key.endswith("inv_freq")
            if numeric and (real is None or any(p.search(t.key) for p in real)):
                f.seek(offset)
                left = real_elements if real is not None and real_elements else t.nbytes
                for block in _blocks(t, seed, noise, min(chunk, left)):
                    f.write(block.contiguous().view(torch.uint8).numpy().tobytes())
                    left -= block.numel()
                    if left <= 0:
                        break
            elif t.key.endswith("inv_freq"):
                f.seek(offset)
                f.write(_inv_freq(t).numpy().tobytes())
            offset += t.nbytes


def _inv_freq(t: TensorInfo) -> torch.Tensor:
    """Llama's rotary buffer as stored: 1 / 10000^(2i/head_dim), i < head_dim / 2."""
    n = t.shape[0]
    return (1.0 / 10000 ** (torch.arange(0, 2 * n, 2).float() / (2 * n))).to(TORCH_DTYPES[t.dtype])


def write_tokenizer(folder: Path, special: dict[int, str], size: int) -> None:
    """A WordLevel ``tokenizer.json`` of ``size`` ids with ``special`` at their real ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"tok{i}": i for i in range(size) if i not in special}
    vocab.update({tok: i for i, tok in special.items() if i < size})
    unk = special.get(0) if special.get(0) == "<unk>" else None
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or "tok0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(dict(sorted(special.items())).values()))
    tok.save(str(folder / "tokenizer.json"))


def regular_vocab_size(keymap: KeyMap) -> int:
    """Ids before the tokenizer's appended special tokens (Qwen 151643, Llama-2 32000)."""
    appended = [i for i in (keymap.special_tokens or {}) if i >= 1000]
    if appended:
        return min(appended)
    cfg = keymap.config
    return int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size"))


def build_checkpoint(
    keymap: KeyMap | str,
    out: str | Path,
    *,
    layers: Cut = None,
    vision_layers: Cut = None,
    data: str = "sparse",
    real: Sequence[str] = REAL_DEFAULT,
    seed: int = 0,
    noise: float = 0.0,
    tokenizer: bool = True,
    chunk: int = 2**24,
    real_elements: int | None = 2**20,
) -> Path:
    """Write ``keymap`` (a KeyMap or a realmaps folder name) as a checkpoint folder ``out``.

    data: "sparse" (zeros that cost no disk, plus real values for the tensors matching ``real``)
    or "random" (every tensor real-valued; costs the model's full size on disk). seed / noise:
    this model's residual, ``noise`` relative to the base values (0: the base itself).
    chunk: elements generated at a time (memory bound while writing random data).
    real_elements: in sparse data, how many leading values of each ``real`` tensor are written
    (None: all of them).
    """
    if data not in ("sparse", "random"):
        raise ValueError(f"data must be 'sparse' or 'random', not {data!r}")
    km = load_keymap(keymap) if isinstance(keymap, str) else keymap
    km = cut(km, layers, vision_layers)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    patterns = None if data == "random" else [re.compile(p) for p in real]
    by_shard: dict[str, list[TensorInfo]] = {}
    for t in km.tensors:
        by_shard.setdefault(t.shard, []).append(t)
    for shard, tensors in by_shard.items():
        _write_shard(folder / shard, tensors, patterns, seed, noise, chunk, real_elements)
    if len(by_shard) > 1:
        index = {
            "metadata": {"total_size": km.nbytes},
            "weight_map": {t.key: t.shard for t in sorted(km.tensors, key=lambda t: t.key)},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(km.config, indent=2) + "\n")
    if tokenizer and km.special_tokens:
        size = regular_vocab_size(km) + sum(1 for i in km.special_tokens if i >= 1000)
        write_tokenizer(folder, km.special_tokens, max(size, max(km.special_tokens) + 1))
    return folder


# ---------------------------------------------------------------- the realistic trios

ROLES = ("base", "multilingual", "multimodal")
# name -> (base, multilingual, VLM) key maps. The multilingual stand-ins are real fine-tunes of the
# base where the maps have one; see SOURCES.md for what each reconstructed map assumes.
TRIOS: dict[str, tuple[str, str, str]] = {
    "llava-1.5-7b": (
        "meta-llama__Llama-2-7b-hf",
        "meta-llama__Llama-2-7b-chat-hf",  # stand-in for a multilingual Llama-2-7b fine-tune
        "llava-hf__llava-1.5-7b-hf",
    ),
    "qwen2-vl-7b": (
        "Qwen__Qwen2-7B__reconstructed",
        "SeaLLMs__SeaLLMs-v3-7B-Chat",
        "allenai__olmOCR-7B-0225-preview",  # a Qwen2-VL-7B-Instruct fine-tune, real index
    ),
    "qwen2.5-vl-7b": (
        "Qwen__Qwen2.5-7B__reconstructed",
        "SeaLLMs__SeaLLMs-v3-7B-Chat",
        "Qwen__Qwen2.5-VL-7B-Instruct",
    ),
    "qwen2-vl-2b": (
        "Qwen__Qwen2-1.5B-Instruct__reconstructed",  # Qwen2-1.5B base: not in the maps
        "SeaLLMs__SeaLLMs-v3-1.5B-Chat__reconstructed",
        "Qwen__Qwen2-VL-2B",
    ),
    # Today's VLMs whose base LLM the maps lack: the base is the VLM's own language model under
    # the LLM's names (TEXT_SUFFIX), the multilingual model that base + noise (a seed of its own)
    "qwen3-vl-8b": (
        "Qwen__Qwen3-VL-8B-Instruct__text",  # Qwen3-8B's shapes
        "Qwen__Qwen3-VL-8B-Instruct__text",
        "Qwen__Qwen3-VL-8B-Instruct",
    ),
    "qwen3-vl-4b": (
        "Qwen__Qwen3-VL-4B-Instruct__text",  # Qwen3-4B's shapes, tied
        "Qwen__Qwen3-VL-4B-Instruct__text",
        "Qwen__Qwen3-VL-4B-Instruct",
    ),
    "gemma-3-27b": (
        "google__medgemma-27b-it__text",  # the text Gemma-3-27B's shapes (Gemma3ForCausalLM)
        "google__medgemma-27b-it__text",
        "google__medgemma-27b-it",  # a Gemma-3-27B-it fine-tune in the original layout
    ),
}


def build_trio(
    name: str,
    root: str | Path,
    *,
    data: str = "sparse",
    layers: int | None = None,
    vision_layers: int | None = None,
    **kwargs,
) -> tuple[Path, Path, Path]:
    """Build the trio ``name`` of :data:`TRIOS` under ``root``: base, multilingual (base + noise
    0.05, seed 1) and VLM (base + noise 0.05, seed 2), cut alike to the layers the VLM's cut
    keeps. ``kwargs`` go to :func:`build_checkpoint`."""
    root = Path(root)
    vlm = load_keymap(TRIOS[name][2])
    keep = kept_layers(vlm, layers) if layers else None
    keep_vision = kept_layers(vlm, vision_layers, vision=True) if vision_layers else None
    paths = []
    for role, keymap, seed in zip(ROLES, TRIOS[name], (0, 1, 2), strict=True):
        noise = 0.0 if role == "base" else 0.05
        folder = root / role
        paths.append(
            build_checkpoint(
                keymap,
                folder,
                data=data,
                seed=seed,
                noise=noise,
                layers=keep,
                vision_layers=keep_vision,
                **kwargs,
            )
        )
    return paths[0], paths[1], paths[2]
