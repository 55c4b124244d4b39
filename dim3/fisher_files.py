"""A Fisher folder (``python -m dim3 fisher``'s output): reading it back, beside a merge's weights.

A Fisher folder holds a model's language tensors under their canonical LLM names, in the model's
shapes, as sharded safetensors, and ``fisher.json`` (:data:`dim3.recipe.FISHER_FILE`) with what
was estimated how (:mod:`dim3.fisher` writes both). :class:`FisherFolder` opens one lazily;
:func:`check_fits` refuses one that is not the model's (names, shapes, and the fingerprint of the
weights it was estimated for); :class:`FisherInputs` (:func:`open_fisher_inputs`) is what the
merge engine reads row slice by row slice beside the weights and hands to the ``fisher`` rule.
This module reads files and headers only: it estimates nothing and loads no model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dim3.checkpoints import Checkpoint, CheckpointError, _resolve_local, _weight_files
from dim3.layout import EMBED, LANGUAGE, LM_HEAD, layout_for
from dim3.plan import Entry, weight_keys
from dim3.recipe import FISHER_FILE, Recipe, multilingual_labels

FORMAT = "dim3-fisher"


def is_vlm(config: dict) -> bool:
    return "vision_config" in config


class FisherFolder(Checkpoint):
    """Lazy access to a Fisher folder's tensors (canonical names) and its ``fisher.json``."""

    def __init__(self, path: Path, ref: str | None = None):
        self.path, self.ref, self.revision = Path(path), ref or str(path), None
        meta = self.path / FISHER_FILE
        if not meta.is_file():
            raise CheckpointError(
                f"{self.ref} has no {FISHER_FILE}: not a Fisher folder; make one with "
                "`python -m dim3 fisher --model M --data SOURCE --out F`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{meta} is not valid JSON ({exc}); estimate it again") from None
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta} is not a {FORMAT} file; estimate the Fisher again")
        self.config: dict = {}
        self._files, self._info = _weight_files(self.path, {})
        self._handles: dict[Path, object] = {}

    @classmethod
    def open_local(
        cls, ref: str, allowed_roots: Sequence[str | Path] | None = None
    ) -> FisherFolder:
        return cls(_resolve_local(ref, allowed_roots), ref)

    @property
    def norm(self) -> float:
        return float(self.meta.get("norm") or 0.0)

    def key_for(self, canonical: str) -> str:
        """The stored tensor for ``canonical`` (a tied head's Fisher is the embedding's)."""
        if canonical not in self and canonical == LM_HEAD and EMBED in self:
            return EMBED
        return canonical


def language_keys(ckpt: Checkpoint) -> dict[str, str]:
    """The checkpoint's language tensors: canonical name -> name on disk (headers only)."""
    keys = weight_keys(ckpt)
    if not is_vlm(ckpt.config):
        return {k: k for k in keys}
    layout = layout_for(ckpt.config, keys)
    out = {}
    for k in keys:
        cls = layout.classify(k)
        if cls and cls[0] == LANGUAGE and cls[1]:
            out[cls[1]] = k
    return out


def fingerprint(ckpt: Checkpoint) -> dict[str, str]:
    """Which weights a Fisher belongs to: a hash of the first row of one layer-0 matrix as stored
    (fine-tunes of one base share names and shapes, so shapes alone cannot tell them apart)."""
    import hashlib

    keys = language_keys(ckpt)
    two_d = sorted(k for k, disk in keys.items() if len(ckpt.shape(disk)) == 2)
    name = next((k for k in two_d if ".layers.0." in k), two_d[0] if two_d else None)
    if name is None:
        return {}
    row = ckpt.get_rows(keys[name], 0, 1).contiguous()
    data = row.view(torch.uint8).numpy().tobytes()
    return {"tensor": name, "sha256": hashlib.sha256(data).hexdigest()}


def check_fits(role: str, fisher: FisherFolder, ckpt: Checkpoint) -> None:
    """Refuse a Fisher whose tensors are not the model's language tensors, shape for shape, or
    that was estimated for other weights (its fingerprint)."""
    want = {name: ckpt.shape(disk) for name, disk in language_keys(ckpt).items()}
    problems = []
    mark = fisher.meta.get("fingerprint") or {}
    if mark and fingerprint(ckpt) != mark:
        problems.append(f"its weights differ (the first row of {mark.get('tensor')})")
    for name, shape in want.items():
        key = fisher.key_for(name)
        if key not in fisher:
            problems.append(f"{name} missing")
        elif fisher.shape(key) != shape and key == name:
            problems.append(f"{name}: Fisher {fisher.shape(key)}, model {shape}")
    extra = sorted(set(fisher.keys()) - set(want))
    problems += [f"{k} is not in the model" for k in extra]
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" * (len(problems) > 3))
        raise ValueError(
            f"the {role} Fisher {fisher.ref} does not fit the {role} model {ckpt.ref}: {shown}. "
            f"Likely cause: it was estimated for another model ({fisher.meta.get('model')}); "
            "estimate it for this one"
        )


class FisherInputs:
    """The Fisher folders of a merge, read beside the weights as the rule's extra inputs.

    ``rows(entry, start, stop)`` gives rows ``start:stop`` of each model's Fisher for one planned
    tensor, in the rule's order ``[base (if its weight > 0), multimodal, multilingual_1, ...]``,
    each divided by its L2 norm when the options say ``normalize``.
    """

    def __init__(self, folders: list[tuple[str, FisherFolder]], layout: Any, normalize: bool):
        self.folders, self.layout = folders, layout
        self.scales = [1.0 / f.norm if normalize and f.norm > 0 else 1.0 for _, f in folders]
        self.count = len(folders)

    def _key(self, role: str, entry: Entry) -> str:
        if role == "base":
            return entry.base_key or ""
        if role == "multimodal":
            return self.layout.classify(entry.key)[1]
        labels = multilingual_labels(len(entry.multilingual_keys))
        return entry.multilingual_keys[labels.index(role)]

    def rows(self, entry: Entry, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        out = []
        for (role, folder), scale in zip(self.folders, self.scales, strict=True):
            key = folder.key_for(self._key(role, entry))
            t = folder.get_rows(key, start, stop).float()
            out.append(t.mul_(scale) if scale != 1.0 else t)
        return tuple(out)

    def close(self) -> None:
        for _, folder in self.folders:
            folder.close()


def open_fisher_inputs(
    recipe: Recipe, inputs: Any, *, allowed_roots: Sequence[str | Path] | None = None
) -> FisherInputs:
    """Open and check the recipe's Fisher folders against the opened checkpoints ``inputs``."""
    options = recipe.method_options()
    roles = inputs.roles()
    order = [r for r in roles if r != "base"]
    order.remove("multimodal")
    order = (["base"] if options.base_weight > 0 else []) + ["multimodal", *order]
    folders: list[tuple[str, FisherFolder]] = []
    try:
        for role in order:
            folder = FisherFolder.open_local(recipe.fisher[role], allowed_roots)
            folders.append((role, folder))
            check_fits(role, folder, roles[role])
    except BaseException:
        for _, folder in folders:
            folder.close()
        raise
    mm = inputs.multimodal
    return FisherInputs(folders, layout_for(mm.config, mm.keys()), bool(options.normalize))
