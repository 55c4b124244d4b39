"""The loaded models of one app server: the original VLM and the merged VLM.

This module knows where a VLM goes (CPU or which GPUs, in which dtype), whether it fits before it
is loaded, and how to free it again. One ``ModelManager`` owns every loaded model; nothing else
keeps references to models between requests, and its policy says what one visitor's action may
change for the others (see ``ModelManager``). It does not know Gradio, chat formatting (see
``dim3.chat``) or the merge rule (see ``dim3.engine``).

Placement rules: bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU. A model that fits on
one GPU goes there whole; one that fits only across several is spread by accelerate
(``device_map="auto"``); one that fits nowhere is refused with the sizes in the message, before
any weight is read.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dim3 import hubcache
from dim3.chat import load_vlm
from dim3.checkpoints import Checkpoint, resolve

ORIGINAL, MERGED = "original", "merged"
MODES = ("open", "showcase")
SLOTS = (ORIGINAL, MERGED)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
GIB = 1024**3
OVERHEAD = 1.10  # activations, KV cache and allocator slack on top of the weights
RESERVE = 512 * 1024**2  # bytes kept free on every device
MERGE_WAIT = 120.0  # seconds a merge waits for a cancelled one to wind down


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


@dataclass(frozen=True)
class MergeInfo:
    """Which recipe made the merged model now served, and when (``version`` counts swaps)."""

    version: int
    label: str  # e.g. "dim3 merge of ./assets/demo/multimodal"
    merged_at: float  # time.time()
    recipe: Any = None  # dim3.recipe.Recipe
    summary: dict | None = None  # the plan's counts (merged, copied, padded), when merged here

    def when(self) -> str:
        return time.strftime("%H:%M:%S UTC", time.gmtime(self.merged_at))


@dataclass(frozen=True)
class Served:
    """One consistent view of the served models, as a chat answer uses them."""

    original: LoadedVLM | None
    merged: LoadedVLM | None
    info: MergeInfo | None

    @property
    def version(self) -> int:
        return self.info.version if self.info else 0


class ShowcaseError(ValueError):
    """A visitor tried to change the models of a showcase; the message says what they can do."""


class ModelManager:
    """Owns the loaded original and merged VLMs of one server; thread-safe.

    The sharing policy (what one visitor's action may change for the others) lives here:

    - ``mode="showcase"``: the models are fixed at start-up (:meth:`start_showcase`); every later
      :meth:`merge`, :meth:`load` or :meth:`unload` raises :class:`ShowcaseError`.
    - ``mode="open"``: anyone may merge, one merge at a time (a merge waits up to
      ``MERGE_WAIT`` seconds for one that is winding down after a cancel). A merge is built in a staging copy
      while the current models keep serving; only a complete merge replaces them (original and
      merged together), and :attr:`Served.info` then names the new recipe and time so that chats
      can tell their visitors. A failed or aborted merge changes nothing.

    Memory: two models are served (original + merged); a merge holds one more staging copy (two
    when it also changes the original VLM) until the swap. The staging copy is checked against
    free memory before any weight is read and refused with the sizes when it does not fit.

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
        mode: str = "open",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.allowed_roots = allowed_roots
        self.token = token
        self.default_vlm = default_vlm
        self.mode = mode
        self._slots: dict[str, LoadedVLM | None] = dict.fromkeys(SLOTS)
        self._info: MergeInfo | None = None
        self._version = 0
        self._lock = threading.RLock()  # guards the slots
        self._merging = threading.Lock()  # one merge at a time
        self._frozen = False

    # -- reading -----------------------------------------------------------------------------

    def get(self, slot: str) -> LoadedVLM | None:
        """The model in ``slot`` (``ORIGINAL`` or ``MERGED``), or None."""
        self._check_slot(slot)
        return self._slots[slot]

    def served(self) -> Served:
        """The original and merged models and the merge's info, read together."""
        with self._lock:
            return Served(self._slots[ORIGINAL], self._slots[MERGED], self._info)

    @property
    def frozen(self) -> bool:
        """True once a showcase has started: nobody may change the models."""
        return self._frozen

    def status(self) -> dict[str, str]:
        """One line per slot for display: label and placement, or "not loaded"."""
        return {
            s: f"{m.label} ({m.placement.describe()})" if m else "not loaded"
            for s, m in self._slots.items()
        }

    def memory_note(self) -> str:
        """What the served models cost and what a merge needs besides, in words."""
        sizes = [m.placement.needed for m in self._slots.values() if m]
        if not sizes:
            return "No model is loaded yet."
        served = _gib(sum(sizes))
        if self.mode == "showcase":
            return f"Served models: ~{served} (fixed by the owner)."
        return (
            f"Served models: ~{served}. A merge builds its result in a staging copy "
            f"(~{_gib(max(sizes))} more) while these keep answering, and is refused when memory "
            "does not allow both."
        )

    def display_ref(self, ref: str) -> str:
        """A source reference as visitors may see it (local folders without the server path)."""
        from dim3.checkpoints import looks_local
        from dim3.paths import public_path

        return public_path(ref, self.allowed_roots or []) if looks_local(ref) else ref

    # -- changing ----------------------------------------------------------------------------

    def unload(self, slot: str) -> None:
        """Drop ``slot``'s model and give its memory back (CPU and GPU)."""
        self._check_slot(slot)
        self._check_open("unload a model")
        with self._lock:
            self._slots[slot] = None
            if slot == MERGED:
                self._info = None
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
        self._check_open("load a model")
        with self._lock, hubcache.hold([ref.strip()]):  # not deleted for a job while it loads
            path = resolve(ref, revision, allowed_roots=self.allowed_roots, token=self.token)
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, dev)
            current = self._slots[slot]
            if _same(current, path, dev, torch_dtype):
                return current
            self.unload(slot)
            loaded = self._load_fresh(path, ref, dev, torch_dtype, label or self.display_ref(ref))
            self._slots[slot] = loaded
            return loaded

    def ensure_original(self) -> LoadedVLM | None:
        """The original VLM, loading ``default_vlm`` first if nothing is loaded yet."""
        if self._slots[ORIGINAL] is not None:  # no lock: a running merge must not block chats
            return self._slots[ORIGINAL]
        with self._lock, hubcache.hold([self.default_vlm or ""]):
            if self._slots[ORIGINAL] is None and self.default_vlm and not self._frozen:
                path = resolve(self.default_vlm, allowed_roots=self.allowed_roots)
                dev = resolve_device("auto")
                self._slots[ORIGINAL] = self._load_fresh(
                    path,
                    self.default_vlm,
                    dev,
                    resolve_dtype("auto", dev),
                    f"{self.display_ref(self.default_vlm)} (original)",
                )
            return self._slots[ORIGINAL]

    def merge(self, recipe: Any, *, progress: Callable | None = None) -> tuple[LoadedVLM, Any]:
        """Merge ``recipe`` into a staging copy of its VLM; serve it only once it is complete.

        The original slot gets the recipe's VLM too (both panes compare the same model), swapped
        in at the same moment. Until then the current models keep serving; if anything fails
        (bad input, memory, an aborted merge) they stay as they were. Returns (merged model,
        MergeResult). ``ShowcaseError`` in a showcase.
        """
        self._check_open("merge")
        # The app runs one merge at a time (its heavy queue slot), so a merge still holding the
        # lock here is one whose visitor left or was stopped: it ends at its next step. Wait
        # for it rather than refuse the visitor who queued behind it.
        if not self._merging.acquire(timeout=MERGE_WAIT):
            raise ModelMemoryError(
                "another merge is still running on this server; try again when it has finished"
            )
        try:
            return self._merge(recipe, progress)
        finally:
            self._merging.release()

    def start_showcase(self, source: str | Path) -> MergeInfo:
        """Fix the served models for good: merge a recipe file, or load a saved merged folder
        (with its ``dim3_recipe.json``). Only the owner calls this, at start-up."""
        from dim3.recipe import RECIPE_FILE, Recipe

        if self._frozen:
            raise ShowcaseError("the showcase has already started")
        path = Path(source).expanduser()
        if path.is_dir():
            recipe = Recipe.load(path / RECIPE_FILE)
            self._serve_saved(path, recipe)
        elif path.is_file():
            self._merge(Recipe.load(path), None)
        else:
            raise ValueError(
                f"DIM3_SHOWCASE={source!r} is neither a recipe file nor a merged folder"
            )
        self.mode, self._frozen = "showcase", True
        assert self._info is not None
        return self._info

    # -- inside ------------------------------------------------------------------------------

    def _merge(self, recipe: Any, progress: Callable | None) -> tuple[LoadedVLM, Any]:
        from dim3 import engine

        src = recipe.multimodal
        engine.fetch_inputs(  # sized together, under the lock, heard by progress
            recipe, allowed_roots=self.allowed_roots, token=self.token, progress=progress
        )
        path = resolve(
            src.ref, src.revision, allowed_roots=self.allowed_roots, token=self.token, sized=True
        )
        dev = resolve_device(recipe.device)
        torch_dtype = resolve_dtype(recipe.dtype, dev)
        shown = self.display_ref(src.ref)
        current = self._slots[ORIGINAL]
        original = current if _same(current, path, dev, torch_dtype) else None
        staged: list[LoadedVLM] = []
        copy = None
        try:
            if original is None:
                original = self._stage(path, src.ref, dev, torch_dtype, f"{shown} (original)")
                staged.append(original)
            copy = self._stage(path, src.ref, dev, torch_dtype, f"{recipe.method} merge of {shown}")
            staged.append(copy)
            result = engine.merge_into_model(
                copy.model,
                recipe,
                progress=progress,
                allowed_roots=self.allowed_roots,
                token=self.token,
            )
        except BaseException:
            original = copy = None  # the traceback keeps this frame: drop the staged models
            staged.clear()
            _collect()
            raise
        self._swap(original, copy, recipe, result.plan.summary())
        return copy, result

    def _serve_saved(self, folder: Path, recipe: Any) -> None:
        src = recipe.multimodal
        dev = resolve_device(recipe.device)
        torch_dtype = resolve_dtype(recipe.dtype, dev)
        path = resolve(src.ref, src.revision, allowed_roots=self.allowed_roots, token=self.token)
        shown = self.display_ref(src.ref)
        original = self._stage(path, src.ref, dev, torch_dtype, f"{shown} (original)")
        merged_path = resolve(str(folder), allowed_roots=self.allowed_roots)
        label = f"{recipe.method} merge of {shown} (saved as {self.display_ref(str(folder))})"
        merged = self._stage(merged_path, str(folder), dev, torch_dtype, label)
        self._swap(original, merged, recipe)

    def _swap(
        self, original: LoadedVLM, merged: LoadedVLM, recipe: Any, summary: dict | None = None
    ) -> None:
        with self._lock:
            self._version += 1
            self._slots[ORIGINAL], self._slots[MERGED] = original, merged
            self._info = MergeInfo(self._version, merged.label, time.time(), recipe, summary)
        _collect()  # the replaced models go once no chat holds them

    def _stage(
        self, path: Path, ref: str, device: str, dtype: torch.dtype, label: str
    ) -> LoadedVLM:
        """Load a model beside the served ones, or explain why memory does not allow it."""
        try:
            return self._load_fresh(path, ref, device, dtype, label)
        except ModelMemoryError as exc:
            raise ModelMemoryError(
                f"not enough memory to merge while the current models keep serving: {exc}. "
                "Try again later, choose a smaller preset, or (as the owner) give the server "
                "more memory"
            ) from None

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

    def _check_open(self, what: str) -> None:
        if self._frozen:
            raise ShowcaseError(
                f"this server is a showcase: its models are fixed by its owner, so visitors "
                f"cannot {what}; duplicate the Space to merge your own"
            )

    @staticmethod
    def _check_slot(slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(f"unknown model slot {slot!r}; valid: {', '.join(SLOTS)}")


def _same(current: LoadedVLM | None, path: Path, device: str, dtype: torch.dtype) -> bool:
    return bool(
        current
        and current.path == path
        and current.placement.dtype == dtype
        and current.placement.device == device
    )


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
