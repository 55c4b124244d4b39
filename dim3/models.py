"""The loaded models of one app server: the original VLM and the merged VLM.

This module knows where a VLM goes (CPU or which GPUs, in which dtype), whether it fits before it
is loaded, and how to free it again. One ``ModelManager`` owns every loaded model; nothing else
keeps references to models between requests. It does not know Gradio, chat formatting (see
``dim3.chat``) or the merge rule (see ``dim3.engine``).

Placement rules: bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU. A model that fits on
one GPU goes there whole; one that fits only across several is spread by accelerate
(``device_map="auto"``); one that fits nowhere is refused with the sizes in the message, before
any weight is read.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dim3.chat import load_vlm
from dim3.checkpoints import Checkpoint, resolve

ORIGINAL, MERGED = "original", "merged"
SLOTS = (ORIGINAL, MERGED)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
GIB = 1024**3
OVERHEAD = 1.10  # activations, KV cache and allocator slack on top of the weights
RESERVE = 512 * 1024**2  # bytes kept free on every device


class ModelMemoryError(ValueError):
    """A model does not fit in the memory that is free; the message gives both sizes."""


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


@dataclass(frozen=True)
class Placement:
    """Where and how a model is loaded.

    device: "cpu" or "cuda". device_map: None (CPU), ``{"": "cuda:i"}`` (one GPU) or "auto"
    (spread by accelerate within ``max_memory``). needed: estimated bytes, weights + overhead.
    """

    device: str
    dtype: torch.dtype
    device_map: Any
    max_memory: dict | None
    needed: int

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.device_map is None:
            where = "CPU"
        elif self.device_map == "auto":
            where = f"{len(self.max_memory or {})} GPUs (accelerate device map)"
        else:
            where = self.device_map[""]
        return f"{where}, {dtype}, ~{_gib(self.needed)}"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other values are checked."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelMemoryError(
            "device 'cuda' was chosen but no GPU is visible; choose 'cpu' or 'auto'"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on GPU (fp16 if bf16 is unsupported), fp32 on CPU."""
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}") from None


def weight_count(path: str | Path) -> int:
    """Number of weight elements in a local checkpoint folder, from the safetensors headers."""
    with Checkpoint(Path(path)) as ckpt:
        total = 0
        for key in ckpt.keys():
            n = 1
            for d in ckpt.shape(key):
                n *= d
            total += n
        return total


def choose_placement(
    n_weights: int,
    dtype: torch.dtype,
    device: str,
    *,
    gpu_free: Sequence[int] = (),
    cpu_free: int | None = None,
) -> Placement:
    """Pick where a model of ``n_weights`` elements goes, or raise ``ModelMemoryError``.

    device: "cpu" or "cuda" (already resolved). gpu_free: free bytes per GPU. cpu_free: free RAM
    in bytes, or None when unknown (no check). Pure: reads no hardware.
    """
    needed = int(n_weights * dtype.itemsize * OVERHEAD)
    dname = str(dtype).removeprefix("torch.")
    if device == "cpu":
        if cpu_free is not None and needed + RESERVE > cpu_free:
            raise ModelMemoryError(
                f"the model needs ~{_gib(needed)} of RAM in {dname} but only {_gib(cpu_free)} "
                "is free; unload the other model, pick a smaller preset, or use a GPU"
            )
        return Placement("cpu", dtype, None, None, needed)
    usable = [max(0, f - RESERVE) for f in gpu_free]
    if not usable:
        raise ModelMemoryError("no GPU is visible; choose device 'cpu'")
    best = max(range(len(usable)), key=usable.__getitem__)
    if needed <= usable[best]:
        return Placement("cuda", dtype, {"": f"cuda:{best}"}, None, needed)
    if needed <= sum(usable):
        return Placement("cuda", dtype, "auto", dict(enumerate(usable)), needed)
    free = " + ".join(_gib(f) for f in gpu_free)
    raise ModelMemoryError(
        f"the model needs ~{_gib(needed)} of GPU memory in {dname} but the GPU(s) have "
        f"{free} free; unload the other model, pick a smaller preset, or choose float16/bfloat16"
    )


def free_memory() -> tuple[list[int], int | None]:
    """(free bytes per visible GPU, free RAM bytes or None when unknown)."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        cpu = int(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        cpu = None
    return gpus, cpu


@dataclass
class LoadedVLM:
    """A model in memory: what it is (label, source ref, folder) and where it lives."""

    model: Any
    processor: Any
    label: str
    ref: str
    path: Path
    placement: Placement


class ModelManager:
    """Owns the loaded original and merged VLMs of one server; thread-safe.

    allowed_roots: local folders models may come from (None: any). token: a Hub token for
    private or gated repos (never logged). default_vlm: what the "original" slot loads when a chat
    needs it before any merge.
    """

    def __init__(
        self,
        *,
        allowed_roots: Sequence[str | Path] | None = None,
        token: str | None = None,
        default_vlm: str | None = None,
    ) -> None:
        self.allowed_roots = allowed_roots
        self.token = token
        self.default_vlm = default_vlm
        self._slots: dict[str, LoadedVLM | None] = dict.fromkeys(SLOTS)
        self._lock = threading.RLock()

    def get(self, slot: str) -> LoadedVLM | None:
        """The model in ``slot`` (``ORIGINAL`` or ``MERGED``), or None."""
        self._check_slot(slot)
        return self._slots[slot]

    def status(self) -> dict[str, str]:
        """One line per slot for display: label and placement, or "not loaded"."""
        return {
            s: f"{m.label} ({m.placement.describe()})" if m else "not loaded"
            for s, m in self._slots.items()
        }

    def unload(self, slot: str) -> None:
        """Drop ``slot``'s model and give its memory back (CPU and GPU)."""
        self._check_slot(slot)
        with self._lock:
            self._slots[slot] = None
        _collect()

    def clear(self) -> None:
        for slot in SLOTS:
            self.unload(slot)

    def load(
        self,
        slot: str,
        ref: str,
        revision: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        label: str | None = None,
    ) -> LoadedVLM:
        """Load the VLM ``ref`` (Hub id or local folder) into ``slot``, replacing what was there.

        Reuses the loaded model when it is the same folder, device and dtype. The old model is
        freed before the new one is loaded, and the memory check runs before any weight is read.
        """
        self._check_slot(slot)
        with self._lock:
            path = resolve(ref, revision, allowed_roots=self.allowed_roots, token=self.token)
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, dev)
            current = self._slots[slot]
            if (
                current
                and current.path == path
                and current.placement.dtype == torch_dtype
                and current.placement.device == dev
            ):
                return current
            self.unload(slot)
            loaded = self._load_fresh(path, ref, dev, torch_dtype, label or ref)
            self._slots[slot] = loaded
            return loaded

    def ensure_original(self) -> LoadedVLM | None:
        """The original VLM, loading ``default_vlm`` first if nothing is loaded yet."""
        if self._slots[ORIGINAL] is not None:  # no lock: a running merge must not block chats
            return self._slots[ORIGINAL]
        with self._lock:
            if self._slots[ORIGINAL] is None and self.default_vlm:
                self.load(ORIGINAL, self.default_vlm, label=f"{self.default_vlm} (original)")
            return self._slots[ORIGINAL]

    def merge(self, recipe: Any, *, progress: Callable | None = None) -> tuple[LoadedVLM, Any]:
        """Merge ``recipe`` into a fresh copy of its VLM and keep it as the merged model.

        The original slot is (re)loaded with the recipe's VLM so both panes compare the same
        model; the previous merged model is freed first. Returns (merged model, MergeResult).
        A failed or aborted merge leaves the merged slot empty, never half-merged.
        """
        from dim3 import engine

        src = recipe.multimodal
        with self._lock:
            original = self.load(
                ORIGINAL,
                src.ref,
                src.revision,
                device=recipe.device,
                dtype=recipe.dtype,
                label=f"{src.ref} (original)",
            )
            self.unload(MERGED)
            place = original.placement
            copy = self._load_fresh(
                original.path,
                src.ref,
                place.device,
                place.dtype,
                f"{src.ref} + {recipe.method} merge",
            )
            try:
                result = engine.merge_into_model(
                    copy.model,
                    recipe,
                    progress=progress,
                    allowed_roots=self.allowed_roots,
                    token=self.token,
                )
            except BaseException:
                del copy
                _collect()
                raise
            self._slots[MERGED] = copy
            return copy, result

    def _load_fresh(
        self, path: Path, ref: str, device: str, dtype: torch.dtype, label: str
    ) -> LoadedVLM:
        gpu_free, cpu_free = free_memory()
        placement = choose_placement(
            weight_count(path), dtype, device, gpu_free=gpu_free, cpu_free=cpu_free
        )
        model, processor = load_vlm(
            path, dtype=dtype, device_map=placement.device_map, max_memory=placement.max_memory
        )
        return LoadedVLM(model, processor, label, ref, path, placement)

    @staticmethod
    def _check_slot(slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(f"unknown model slot {slot!r}; valid: {', '.join(SLOTS)}")


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
