"""The merge plan: every VLM tensor matched, classified and checked before anything is written.

Given three opened checkpoints, :func:`build_plan` decides for each tensor of the VLM whether it is
merged (a language-model tensor, matched by canonical name to a base tensor and a tensor of each
multilingual model, of the same shape) or copied (vision encoder, projector, rows only the VLM's tokenizer has). Every
problem is collected and raised at once as a :class:`PlanError` that names the first few tensors
and the likely cause. This module reads headers, tokenizer files and one tensor pair per model
(to check that the three share a base); it merges nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dim3.checkpoints import Checkpoint
from dim3.layout import (
    DERIVE_ERRORS,
    EMBED,
    LANGUAGE,
    LM_HEAD,
    NOT_LOADED,
    VOCAB_KEYS,
    DerivedLayout,
    buffer_kind,
    derived_layout,
    layout_cache_dir,
    layout_for,
    store_record,
)
from dim3.sizes import human_size

SHOWN = 4  # tensors named per problem in an error message
RELATED_MIN_COSINE = 0.5  # below this, a "fine-tune" does not descend from the base


class PlanError(ValueError):
    """The three checkpoints cannot be merged as given; the message says why and how to fix."""


@dataclass(frozen=True)
class Entry:
    """What happens to one tensor of the VLM.

    key: its name in the VLM (and in the output). action: "merge" or "copy".
    role: "language", "vision" or "projector". base_key / multilingual_keys: the matched tensors
    (one per multilingual model, in the recipe's order).
    shape, dtype: the VLM tensor's. rows: for vocabulary tensors, the leading rows (tokens) that
    all three share and that are merged; later rows stay the VLM's. transpose: token embeddings are
    transposed for the rule, so that its columns are tokens. tied_to: an output embedding stored
    beside the input embedding it is tied to; it receives that merged tensor.
    """

    key: str
    action: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base_key: str | None = None
    multilingual_keys: tuple[str, ...] = ()
    rows: int | None = None
    transpose: bool = False
    tied_to: str | None = None

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize

    def nbytes_as(self, dtype: str) -> int:
        """Its bytes in the output of a merge asked for ``dtype`` (a recipe's: ``auto`` keeps the
        VLM's; an override converts floating-point tensors only)."""
        if dtype == "auto" or not self.dtype.is_floating_point:
            return self.nbytes
        return int(torch.Size(self.shape).numel()) * getattr(torch, dtype).itemsize

    @property
    def padded(self) -> bool:
        return self.rows is not None and self.rows < self.shape[0]


@dataclass
class MergePlan:
    """The ordered plan of a merge: one :class:`Entry` per VLM tensor, plus notes."""

    family: str
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)
    multilingual: int = 1  # how many multilingual models are merged

    def summary(self, dtype: str = "auto") -> dict[str, int]:
        """Counts of the plan's tensors, and the output's bytes when written in ``dtype``."""
        merged = [e for e in self.entries if e.action == "merge"]
        return {
            "tensors": len(self.entries),
            "merged": len(merged),
            "copied": len(self.entries) - len(merged),
            "padded": sum(e.padded for e in merged),
            "bytes": sum(e.nbytes_as(dtype) for e in self.entries),
        }

    def describe(self, dtype: str = "auto") -> str:
        """A short human-readable account of the plan, its output's size in ``dtype`` (the
        recipe's output dtype)."""
        s = self.summary(dtype)
        roles: dict[str, int] = {}
        for e in self.entries:
            if e.action == "copy":
                roles[e.role] = roles.get(e.role, 0) + 1
        copied = ", ".join(f"{n} {role}" for role, n in sorted(roles.items())) or "none"
        lines = [
            f"Family: {self.family}",
            f"Merged: {s['merged']} language-model tensors",
            *(
                [f"Multilingual models: {self.multilingual} (their updates in the order given)"]
                if self.multilingual > 1
                else []
            ),
            f"Copied unchanged: {s['copied']} tensors ({copied})",
            f"Vocabulary tensors with VLM-only rows kept: {s['padded']}",
            f"Output size: {human_size(s['bytes'])} in {s['tensors']} tensors"
            + (f" ({dtype})" if dtype != "auto" else ""),
        ]
        for e in self.entries:
            if e.padded:
                lines.append(
                    f"  {e.key}: rows 0..{e.rows - 1} merged, {e.rows}..{e.shape[0] - 1} kept"
                )
        return "\n".join(lines + [f"Note: {n}" for n in self.notes])


def _shown(items: list[str]) -> str:
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _ties(ckpt: Checkpoint) -> bool:
    cfg = ckpt.config
    text = cfg.get("text_config") or {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def llm_names(ckpt: Checkpoint) -> dict[str, str]:
    """Canonical LLM name -> the checkpoint's own key, for its language-model tensors.

    A plain LLM's keys are canonical already. A base or multilingual model that is itself a VLM
    (Gemma 3's 4B-27B "base" checkpoints, Mistral-Small-3.1-Base) holds its language model under
    its family's names: those are read through the family's layout, and its vision tower and
    projector are left aside.
    """
    if ckpt in _LLM_NAMES:
        return _LLM_NAMES[ckpt]
    keys = weight_keys(ckpt)
    layout = derived_layout(ckpt.config, keys) if _is_vlm_config(ckpt.config) else None
    if layout is None:
        names = {k: k for k in keys}
    else:
        names = {}
        for key in keys:
            role, canonical = layout.classify(key)
            if role == LANGUAGE and canonical:
                names[canonical] = key
    _LLM_NAMES[ckpt] = names
    return names


_LLM_NAMES: weakref.WeakKeyDictionary[Checkpoint, dict[str, str]] = weakref.WeakKeyDictionary()


def _is_vlm_config(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


def _llm_key(ckpt: Checkpoint, canonical: str) -> str | None:
    """The tensor of an LLM that plays ``canonical``'s part (tied heads use the embedding)."""
    names = llm_names(ckpt)
    if canonical in names:
        return names[canonical]
    if canonical == LM_HEAD and EMBED in names and _ties(ckpt):
        return names[EMBED]
    return None


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    """Token -> id from ``tokenizer.json`` (model vocabulary plus added tokens), if present."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    vocab = dict(vocab or {})
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    return vocab


def _tokenizer_rows(
    base: Checkpoint, mls: Sequence[Checkpoint], vlm: Checkpoint, notes: list[str]
) -> int | None:
    """How many leading token rows all share; refuses a multilingual tokenizer change.

    Parsing and comparing the tokenizer.json files (megabytes of JSON each for a 150,000-token
    vocabulary) was most of a plan's time; a comparison that passed is kept on disk under the
    files' content digests (``layout_cache_dir("tokenizers")``), so the next plan of the same
    files only reads and hashes them. Changed files have other digests: compared afresh."""
    record = _compared_record(base, mls, vlm)
    if record is not None:
        try:
            rows = json.loads(record.read_text(encoding="utf-8"))
            if type(rows) is int and rows > 0:  # else damaged or edited: compared afresh
                return rows
        except (OSError, ValueError):
            pass
    rows = _compare_tokenizers(base, mls, vlm, notes)
    if record is not None and rows is not None:
        store_record(record, rows)
    return rows


def _compared_record(base: Checkpoint, mls: Sequence[Checkpoint], vlm: Checkpoint) -> Path | None:
    """The cache file of a passed comparison of these tokenizers (None: the cache is off, or a
    model has no tokenizer.json)."""
    where = layout_cache_dir("tokenizers")
    files = [c.path / "tokenizer.json" for c in (base, *mls, vlm)]
    if where is None or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256(_source_digest().encode())
    try:
        for i, f in enumerate(files):
            h.update(f"\0{i}\0{'vlm' if i == len(files) - 1 else 'llm'}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    except OSError:
        return None
    return where / f"{h.hexdigest()[:40]}.json"


@functools.cache
def _source_digest() -> str:
    """This module's source: a record made by other comparison code is not trusted."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _compare_tokenizers(
    base: Checkpoint, mls: Sequence[Checkpoint], vlm: Checkpoint, notes: list[str]
) -> int | None:
    vb, vv = tokenizer_vocab(base.path), tokenizer_vocab(vlm.path)
    vms = [tokenizer_vocab(c.path) for c in mls]
    if vb is None or any(vm is None for vm in vms):
        notes.append(
            "tokenizers not compared (no tokenizer.json in the base or a multilingual model)"
        )
        return None
    for i, vm in enumerate(vms):
        if vb != vm:
            diff = sorted(set(vb.items()) ^ set(vm.items()), key=lambda kv: kv[1])
            raise PlanError(
                f"the {_ml_name(i, len(mls))}'s tokenizer differs from the base's ({len(vb)} vs "
                f"{len(vm)} tokens; first differences: {_shown([repr(t) for t, _ in diff])}). "
                "DiM3 merges embedding rows token by token, so a multilingual model must keep "
                "the base tokenizer; a vocabulary-extended model cannot be merged this way"
            )
    n = max(vb.values()) + 1
    if vv is not None:
        mismatched = [t for t, i in vb.items() if vv.get(t) != i]
        if mismatched:
            raise PlanError(
                f"the VLM's tokenizer does not extend the base's: {len(mismatched)} base tokens "
                f"have other ids in the VLM (e.g. {_shown([repr(t) for t in mismatched])}). "
                "Likely cause: these three models do not share a base"
            )
    return n


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float(a @ b / (a.norm() * b.norm() + 1e-12))


def _ml_name(i: int, n: int) -> str:
    """``multilingual model`` alone, else ``multilingual model i`` (1-based), for messages."""
    return "multilingual model" if n == 1 else f"multilingual model {i + 1}"


def _check_related(
    entries: list[Entry], base: Checkpoint, mls: Sequence[Checkpoint], vlm: Checkpoint
) -> None:
    """Refuse models that share shapes but not weights, comparing the first layer's smallest
    merged matrix (an attention projection: 0.4 million weights at Qwen2-VL-2B's shape, where
    the first one listed, an MLP matrix of 13.8 million, took 0.18 s of every plan)."""
    candidates = [
        e for e in entries if e.action == "merge" and len(e.shape) == 2 and "layers.0." in e.key
    ]
    if not candidates:
        return
    probe = min(candidates, key=lambda e: math.prod(e.shape))
    b = base.get(probe.base_key)
    others = [("VLM", vlm, probe.key)] + [
        (_ml_name(i, len(mls)), ml, key)
        for i, (ml, key) in enumerate(zip(mls, probe.multilingual_keys, strict=True))
    ]
    for name, ckpt, key in others:
        cos = _cosine(b, ckpt.get(key))
        if cos < RELATED_MIN_COSINE:
            raise PlanError(
                f"the {name} model's {key} is unrelated to the base's {probe.base_key} "
                f"(cosine {cos:.2f}; fine-tunes of one base are near 1). "
                "Likely cause: these three models do not share a base"
            )


def build_plan(
    base: Checkpoint, multilingual: Checkpoint | Sequence[Checkpoint], multimodal: Checkpoint
) -> MergePlan:
    """Match every tensor of ``multimodal`` and check all models fit; raise PlanError if not.

    ``multilingual`` is one checkpoint or a sequence of them (several language experts).
    """
    mls = [multilingual] if isinstance(multilingual, Checkpoint) else list(multilingual)
    if not mls:
        raise PlanError("give at least one multilingual model")
    notes: list[str] = []
    notes.extend(_ignored_buffers(base, mls, multimodal))
    keys = weight_keys(multimodal)
    try:
        layout = layout_for(multimodal.config, keys)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    shared_rows = _tokenizer_rows(base, mls, multimodal, notes)
    entries: list[Entry] = []
    unknown, unmatched, mismatched, used = [], [], [], set()
    unloadable = _unloadable(layout, multimodal, keys)
    for key in keys:
        cls = layout.classify(key)
        shape, dtype = multimodal.shape(key), multimodal.dtype(key)
        if cls is None:
            unknown.append(key)
            continue
        if cls[0] == NOT_LOADED:
            continue  # counted by _unloadable
        role, canonical = cls
        if role != LANGUAGE:
            entries.append(Entry(key, "copy", role, shape, dtype))
            continue
        if not dtype.is_floating_point:
            notes.append(f"{key} is not floating point ({dtype}); copied from the VLM")
            entries.append(Entry(key, "copy", role, shape, dtype))
            continue
        bkey = _llm_key(base, canonical)
        mkeys = [_llm_key(ml, canonical) for ml in mls]
        if bkey is None or None in mkeys:
            where = "base" if bkey is None else _ml_name(mkeys.index(None), len(mls))
            unmatched.append(f"{key} (as {canonical}, not in the {where})")
            continue
        used.add(bkey)
        entry, problem = _match(key, canonical, shape, dtype, bkey, mkeys, base, mls, shared_rows)
        if problem:
            mismatched.append(problem)
        else:
            entries.append(entry)
    _tie_heads(entries, multimodal)
    missing_in_vlm = sorted(
        c
        for c, k in llm_names(base).items()
        if k not in used and not (c == LM_HEAD and _ties(multimodal))
    )
    for i, ckpt in enumerate([base, *mls]):
        if _is_vlm_config(ckpt.config):
            role = "base" if i == 0 else _ml_name(i - 1, len(mls))
            left = len(weight_keys(ckpt)) - len(llm_names(ckpt))
            notes.append(
                f"the {role} is itself a VLM ({ckpt.config.get('model_type')}): its language "
                f"model is merged, its {left} vision and projector tensors are not used"
            )
    _raise_problems(unknown, unmatched, mismatched, missing_in_vlm, layout.family, unloadable)
    _check_related(entries, base, mls, multimodal)
    notes.extend(_layout_notes(layout, multimodal.config, entries))
    return MergePlan(layout.family, entries, notes, len(mls))


def _unloadable(layout, vlm: Checkpoint, keys: list[str]) -> list[str]:
    """What transformers' class of the VLM would not load as stored: unknown names, other shapes,
    and tensors it needs that the checkpoint lacks (it would leave them random)."""
    if not isinstance(layout, DerivedLayout):
        return []
    problems, seen = [], set()
    for key in keys:
        name, converted = layout.to_memory(key)
        seen.add(name)
        if converted:
            continue
        if name not in layout.shapes:
            problems.append(f"{key} (no such tensor in {layout.class_name})")
        elif layout.shapes[name] != tuple(vlm.shape(key)):
            problems.append(
                f"{key} ({tuple(vlm.shape(key))} on disk, {layout.shapes[name]} in "
                f"{layout.class_name} built from its config.json)"
            )
    missing = [k for k in layout.expected() if k not in seen]
    problems += [f"{k} (needed by {layout.class_name}, absent from the VLM)" for k in missing]
    return problems


# Config fields of the VLM's own placeholder tokens (image, video, begin/end of image).
_MEDIA_TOKEN_FIELDS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "boi_token_index",
    "eoi_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
)


def _layout_notes(layout, config: dict, entries: list[Entry]) -> list[str]:
    """Where the layout came from, VLM-only layers, and media tokens inside the merged rows."""
    notes = []
    if isinstance(layout, DerivedLayout):
        notes.append(f"layout derived from transformers' {layout.class_name}")
        if layout.describe_layers():
            notes.append(layout.describe_layers())
    else:
        why = DERIVE_ERRORS.get(config.get("model_type", ""))
        notes.append(
            f"layout from dim3's table for {layout.family}"
            + (f" (transformers could not build the class: {why})" if why else "")
            + "; transformers' own key check was not run"
        )
    embed = next((e for e in entries if e.transpose and e.rows is not None), None)
    ids = {f: config.get(f) for f in _MEDIA_TOKEN_FIELDS if isinstance(config.get(f), int)}
    inside = {f: i for f, i in ids.items() if embed is not None and i < embed.rows}
    if inside:
        shown = ", ".join(f"{i} ({f})" for f, i in sorted(inside.items(), key=lambda kv: kv[1]))
        notes.append(
            f"media tokens inside the base vocabulary: {shown}; their rows are merged like any "
            "token (the base and multilingual tokenizers hold them too), so a fine-tune that "
            "never saw them leaves the VLM's rows unchanged"
        )
    return notes


def weight_keys(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensors less stored buffers (rotary inv_freq...), in reading order."""
    return [k for k in ckpt.keys() if buffer_kind(k) is None]


def _ignored_buffers(base: Checkpoint, mls: Sequence[Checkpoint], vlm: Checkpoint) -> list[str]:
    """One note per kind of stored buffer left out of the merge, naming the models that hold them."""
    found: dict[str, list[str]] = {}
    models = [("the base", base)]
    models += [(f"the {_ml_name(i, len(mls))}", ml) for i, ml in enumerate(mls)]
    for role, ckpt in [*models, ("the VLM", vlm)]:
        kinds = [kind for kind in map(buffer_kind, ckpt.keys()) if kind]
        for kind in dict.fromkeys(kinds):
            found.setdefault(kind, []).append(f"{kinds.count(kind)} of {role}")
    return [
        f"ignored: {parts[0].replace(' of ', f' {kind} buffers of ', 1)}"
        + "".join(f", {p}" for p in parts[1:])
        + " (buffers that transformers recomputes, not weights: never merged or written)"
        for kind, parts in found.items()
    ]


def _match(key, canonical, shape, dtype, bkey, mkeys, base, mls, shared_rows):
    """One language tensor's entry, or a mismatch message naming all the shapes."""
    bshape = base.shape(bkey)
    mshapes = [ml.shape(k) for ml, k in zip(mls, mkeys, strict=True)]
    mkeys = tuple(mkeys)
    same_width = all(s[1:] == bshape[1:] == tuple(shape[1:]) for s in mshapes)
    same_rows = all(s[0] == bshape[0] for s in mshapes)
    if canonical in VOCAB_KEYS and same_width and (same_rows or shared_rows):
        # rows beyond the shared tokenizer (or beyond any model's table) stay the VLM's
        rows = min(bshape[0], *(s[0] for s in mshapes), shape[0], shared_rows or shape[0])
        transpose = canonical == EMBED
        return Entry(key, "merge", LANGUAGE, shape, dtype, bkey, mkeys, rows, transpose), None
    if canonical not in VOCAB_KEYS and all(s == bshape == tuple(shape) for s in mshapes):
        return Entry(key, "merge", LANGUAGE, shape, dtype, bkey, mkeys), None
    mls_text = ", ".join(
        f"{_ml_name(i, len(mls)).replace(' model', '')} {tuple(s)} ({k})"
        for i, (s, k) in enumerate(zip(mshapes, mkeys, strict=True))
    )
    return None, f"{key}: VLM {tuple(shape)}, base {tuple(bshape)} ({bkey}), {mls_text}"


def _tie_heads(entries: list[Entry], vlm: Checkpoint) -> None:
    """If the VLM ties its embeddings yet stores both, the head takes the merged embedding."""
    if not _ties(vlm):
        return
    embed = next((e for e in entries if e.action == "merge" and e.transpose), None)
    for i, e in enumerate(entries):
        if embed and e.action == "merge" and e.rows is not None and not e.transpose:
            entries[i] = Entry(e.key, "merge", e.role, e.shape, e.dtype, tied_to=embed.key)
    if embed:  # the embedding must be computed before any tensor tied to it
        entries.sort(key=lambda e: e.tied_to is not None)


def _raise_problems(unknown, unmatched, mismatched, missing_in_vlm, family, unloadable) -> None:
    problems = []
    if unloadable:
        problems.append(
            f"transformers would not load {len(unloadable)} VLM tensor(s) as stored: "
            f"{_shown(unloadable)}. Likely cause: a damaged, edited or other-version checkpoint; "
            "nothing was written"
        )
    if unknown:
        problems.append(
            f"{len(unknown)} VLM tensor(s) fit no part of the {family} layout: {_shown(unknown)}. "
            "Likely cause: an unsupported architecture variant"
        )
    if unmatched:
        problems.append(
            f"{len(unmatched)} language-model tensor(s) have no counterpart: {_shown(unmatched)}. "
            "Likely cause: these three models do not share a base (different architecture)"
        )
    if mismatched:
        problems.append(
            f"tensor size mismatch for {len(mismatched)} tensor(s): {_shown(mismatched)}. "
            "Likely cause: these three models do not share a base"
        )
    if missing_in_vlm:
        problems.append(
            f"{len(missing_in_vlm)} base tensor(s) are missing from the VLM's language model: "
            f"{_shown(missing_in_vlm)}. Likely cause: these three models do not share a base"
        )
    if problems:
        raise PlanError("cannot merge these checkpoints: " + "; ".join(problems))
