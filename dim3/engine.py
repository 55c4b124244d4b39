"""The merge engine: one streaming loop from checkpoints, through a rule, to a writer or a model.

:func:`iter_merged` is the only loop that moves tensors: for each planned tensor it reads the base,
multilingual and VLM rows, applies the method on the chosen device in float32, and yields the
result. Its two consumers are :func:`merge_to_folder` (a sharded safetensors checkpoint with
configs, tokenizer, processor, model card and recipe, moved into place only when complete) and
:func:`merge_into_model` (an already loaded VLM, updated in place, so the app can chat with the
result without writing it to disk). A tensor larger than the chunk budget (``chunk_size``, 32 MiB
of float32 by default; half of it for task arithmetic's compiled sum, :data:`LIGHT_SHARE`) is
read and merged in row slices, in as many passes as its method's kind needs (:data:`PASSES`:
DiM3 gathers column statistics first, TIES and Breadcrumbs find their exact magnitude
thresholds in two radix passes (or in one, counting the values below a range guessed from a
sample and keeping those inside it, where the guess holds; see :meth:`_Merger.guess`), PCB its
four order statistics in two stages of two passes), so peak memory is a few slices per model
whatever the vocabulary; "matrix" methods (SVD, optimisation) take each tensor whole.

A merge is bound by reading three models and writing one, so the loop does little else:

- **No allocation in the steady state.** Every slice-sized buffer (the float32 work rows, a rule's
  temporaries, the rows in the output dtype, pinned host and device staging for CUDA) is one of a
  merge's :class:`dim3.slices.Buffers`, made at its first use and reused for every later slice
  (``out=`` arguments, in-place ops, ``copy_`` for dtype changes); rules take their temporaries
  through :func:`dim3.methods._utils.scratch`. Inputs are converted straight from the mapped shard
  files (:mod:`dim3.mapped`, no read copy) and unmapped once merged (:data:`RELEASE_LAG`), so the
  process's resident size stays a few slices' worth; shards are written past the page cache
  (:class:`dim3.writer.ShardedWriter`, ``O_DIRECT`` where the file system allows it).
- **Reading, computing and writing overlap**: a read thread prepares the steps ahead (on the CPU
  :data:`AHEAD` staged as views, their pages mapped in :data:`MAPPED_AHEAD` steps ahead; pinned
  staging and a copy on a transfer stream for CUDA, :data:`SLOTS` steps in flight) and a write
  thread writes the previous ones (at most four queued, two for CUDA, :class:`_Pipe`), while
  torch computes on :func:`compute_threads` threads.

The engine knows no tokenization and no UI; progress goes to an optional callback.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from dim3 import compiled, fused, hubcache
from dim3.checkpoints import (
    DOWNLOADS,
    SAFETENSORS_DTYPES,
    Checkpoint,
    DownloadMeter,
    check_downloads,
    looks_local,
    resolve,
)
from dim3.layout import layout_for
from dim3.mapped import MappedShards
from dim3.methods import Method, get_method, plan_notes
from dim3.methods._utils import (
    current_buffers,
    deltas,
    listen_steps,
    rank_indexes,
    reuse_buffers,
    scratch,
)
from dim3.plan import Entry, MergePlan, PlanError, build_plan
from dim3.recipe import (
    RECIPE_FILE,
    Recipe,
    Source,
    card_metadata,
    model_card,
    multilingual_labels,
    write_recipe,
)
from dim3.sizes import parse_size
from dim3.slices import (
    Buffers,
    ExactSelect,
    FirstMask,
    key_value,
    magnitude_bits,
    order_keys,
    row_slices,
)
from dim3.writer import ALIGN, ShardedWriter, TensorSpec, check_destination

__all__ = [
    "Inputs",
    "MergeResult",
    "Progress",
    "Recipe",
    "Source",
    "iter_merged",
    "merge_into_model",
    "merge_to_folder",
    "open_inputs",
    "plan",
]

SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
SKIPPED_SIDE_FILES = {"model.safetensors.index.json", RECIPE_FILE}
# Tensors larger than this (in float32) are merged in row slices of at most this size: peak memory
# is then a few such slices per model, whatever the vocabulary.
DEFAULT_CHUNK = "32MiB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Progress:
    """One step of a merge: ``done`` of ``total`` tensors, the last one ``key``.

    While a slow rule works on one tensor (WUDI's Adam steps, the SVDs of TSV, Iso-CTS and
    OptMerge), ``key`` is that tensor and ``step`` of ``steps`` its inner steps are done;
    ``steps`` is 0 otherwise. ``elapsed``: seconds of merging so far, less what readying the
    compiled kernels took meanwhile (once a process, or once an install: see
    :func:`dim3.compiled.setup_seconds`).
    """

    done: int
    total: int
    key: str
    bytes_done: int
    bytes_total: int
    elapsed: float
    step: int = 0
    steps: int = 0
    # "download": the job's Hub downloads before it opens the checkpoints (:func:`fetch_inputs`):
    # ``key`` names them, ``bytes_done`` of ``bytes_total`` are downloaded, ``done`` and
    # ``total`` are 0, ``elapsed`` counts from the first download
    phase: str = "merge"

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the bytes done so far (None before the first)."""
        if self.bytes_done <= 0:
            return None
        return self.elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: its plan, its output folder (None for in-memory), its wall time, how
    many slice buffers it allocated and how many bytes it wrote from them as they were."""

    plan: MergePlan
    out_dir: Path | None
    seconds: float
    buffers: int = 0  # slice buffers the loop allocated (the same for any number of slices)
    unstaged: int = 0  # output bytes written from the merge's own buffers, not copied to write


class Inputs:
    """The opened checkpoints of a recipe; a context manager that closes them.

    ``multilingual`` is a tuple of one or more checkpoints, in the recipe's order.
    """

    def __init__(
        self, base: Checkpoint, multilingual: Sequence[Checkpoint], multimodal: Checkpoint
    ):
        self.base, self.multilingual, self.multimodal = base, tuple(multilingual), multimodal
        # the rule's extra per-tensor inputs (Fisher), if its method takes any: an object with
        # ``count``, ``rows(entry, start, stop) -> tuple of tensors`` and ``close()``
        self.extras: Any = None

    def roles(self) -> dict[str, Checkpoint]:
        """Every checkpoint by role label, as :meth:`Recipe.sources` names them."""
        labels = multilingual_labels(len(self.multilingual))
        ml = dict(zip(labels, self.multilingual, strict=True))
        return {"base": self.base, **ml, "multimodal": self.multimodal}

    def resolved(self) -> dict[str, str | None]:
        """Each role's Hub commit (None for local folders)."""
        return {role: ckpt.commit for role, ckpt in self.roles().items()}

    def __enter__(self) -> Inputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for ckpt in self.roles().values():
            ckpt.close()
        if self.extras is not None:
            self.extras.close()


def fetch_inputs(
    recipe: Recipe,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    progress: ProgressFn | None = None,
    output: Path | None = None,
) -> int:
    """Download ``recipe``'s Hub checkpoints that are not in the cache yet, once their downloads
    together are known to fit (:func:`check_recipe_downloads`), one job at a time in this
    process (:data:`dim3.checkpoints.DOWNLOADS`). ``progress`` hears the bytes (a
    :class:`Progress` of phase "download", a few a second); if it raises, the downloads stop
    and its exception propagates (what was downloaded stays in the cache, and a later download
    resumes from it). ``output``: the folder the merge will write, sized with the downloads
    (:func:`output_estimate`). Returns the bytes downloaded (0 when all are local or cached, or
    the Hub cannot be asked: the opening then uses the cache, or reports why not)."""
    sources = [recipe.base, *recipe.multilingual, recipe.multimodal]
    hub = [s for s in sources if s.ref.strip() and not looks_local(s.ref.strip())]
    if not hub:
        return 0
    if allowed_roots is not None:  # a server's heavy job: its checkpoints stay in the cache
        hubcache.job(s.ref.strip() for s in hub)
    with DOWNLOADS:
        total = check_recipe_downloads(
            recipe, allowed_roots=allowed_roots, token=token, output=output
        )
        if not total:
            return 0
        meter = None
        if progress is not None:
            started, names = time.monotonic(), ", ".join(dict.fromkeys(s.ref for s in hub))

            def report(done: int, of: int) -> None:
                elapsed = time.monotonic() - started
                progress(Progress(0, 0, names, done, of, elapsed, phase="download"))

            meter = DownloadMeter(total, report)
        for s in hub:
            resolve(
                s.ref,
                s.revision,
                allowed_roots=allowed_roots,
                token=token,
                sized=True,
                meter=meter,
            )
        return total


def open_inputs(
    recipe: Recipe,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    progress: ProgressFn | None = None,
    output: Path | None = None,
    headers_only: bool = False,
) -> Inputs:
    """Resolve and open the recipe's checkpoints, downloading Hub ids first where needed
    (:func:`fetch_inputs`, which ``progress`` hears and ``output`` goes to). ``headers_only``
    (a plan): a Hub id's weights are not downloaded, only its other files, which are sized
    first (:meth:`Checkpoint.headers`: its tensors read from the Hub).

    If one fails to open, those already opened are closed before the error propagates.
    """
    opened: list[Checkpoint] = []
    if headers_only:
        sources = [recipe.base, *recipe.multilingual, recipe.multimodal]
        refs = [(s.ref, s.revision) for s in sources]
        check_downloads(refs, token=token, server=allowed_roots is not None, weights=False)
    else:
        fetch_inputs(
            recipe, allowed_roots=allowed_roots, token=token, progress=progress, output=output
        )

    def one(source: Source) -> Checkpoint:
        if headers_only:
            ckpt = Checkpoint.headers(
                source.ref, source.revision, allowed_roots=allowed_roots, token=token
            )
        else:
            ckpt = Checkpoint.open(
                source.ref, source.revision, allowed_roots=allowed_roots, token=token, sized=True
            )
        opened.append(ckpt)
        return ckpt

    try:
        base = one(recipe.base)
        mls = [one(s) for s in recipe.multilingual]
        inputs = Inputs(base, mls, one(recipe.multimodal))
        if get_method(recipe.method).extra_inputs == "fisher":
            from dim3.fisher_files import open_fisher_inputs

            inputs.extras = open_fisher_inputs(recipe, inputs, allowed_roots=allowed_roots)
        return inputs
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise


def check_recipe_downloads(
    recipe: Recipe,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    output: Path | None = None,
) -> int:
    """Size the Hub downloads of ``recipe``'s checkpoints together, before the first begins, and
    refuse them where they do not fit (:func:`dim3.checkpoints.check_downloads`; a server, one
    given ``allowed_roots``, has a limit by default), with the merged checkpoint a merge will
    write to ``output`` (:func:`output_estimate`). Returns the bytes to download."""
    sources = [recipe.base, *recipe.multilingual, recipe.multimodal]

    def written() -> int | None:
        return output_estimate(recipe, allowed_roots=allowed_roots, token=token)

    return check_downloads(
        [(s.ref, s.revision) for s in sources],
        token=token,
        server=allowed_roots is not None,
        output=None if output is None else (output, written),
    )


def output_estimate(
    recipe: Recipe,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> int | None:
    """The bytes of ``recipe``'s merged checkpoint, before anything is downloaded: the VLM's
    tensors (every one is merged or copied, in its shape) in the output dtype, from its
    safetensors headers alone (a Hub id's read from the Hub: ``get_safetensors_metadata``, a
    few kB per shard). None where they cannot be had: the writer checks the room anyway."""
    from huggingface_hub import HfApi

    def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
        return math.prod(shape) * converted(dtype, recipe.dtype).itemsize

    src = recipe.multimodal
    try:
        if looks_local(src.ref.strip()):
            with Checkpoint.open(src.ref, allowed_roots=allowed_roots) as vlm:
                return sum(nbytes(vlm.dtype(k), vlm.shape(k)) for k in vlm.keys())
        meta = HfApi().get_safetensors_metadata(
            src.ref.strip(), revision=src.revision, token=token or os.environ.get("HF_TOKEN")
        )
        return sum(
            nbytes(SAFETENSORS_DTYPES[t.dtype], t.shape)
            for f in meta.files_metadata.values()
            for t in f.tensors.values()
        )
    except Exception:  # noqa: BLE001 - no estimate: the writer's own check still holds
        return None


def plan(recipe: Recipe, **kwargs: Any) -> MergePlan:
    """Check a recipe and return its plan, writing nothing and downloading no weights (a Hub
    id's are read from their headers on the Hub: :meth:`Checkpoint.headers`). ``kwargs`` go
    to :func:`open_inputs`. A server's Hub cache keeps the recipe's checkpoints meanwhile
    (:func:`dim3.hubcache.hold`: another visitor's job does not delete what it reads)."""
    refs = [s.ref.strip() for s in (recipe.base, *recipe.multilingual, recipe.multimodal)]
    with hubcache.hold(refs), open_inputs(recipe, headers_only=True, **kwargs) as inputs:
        return _plan(recipe, inputs)


def _plan(recipe: Recipe, inputs: Any) -> MergePlan:
    """The plan of ``recipe`` on its opened ``inputs``, with what its method's options change
    (an approximation asked for) among the notes."""
    merge_plan = build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
    merge_plan.notes.extend(plan_notes(recipe.method, recipe.method_options()))
    return merge_plan


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but no CUDA GPU is available; use auto or cpu"
        )
    return torch.device(name)


def output_dtype(entry: Entry, dtype: str) -> torch.dtype:
    """The VLM's own dtype (``auto``) or the override, for floating-point tensors only."""
    return converted(entry.dtype, dtype)


def converted(stored: torch.dtype, dtype: str) -> torch.dtype:
    """A tensor stored as ``stored`` in the output of a merge asked for ``dtype``: the override
    for floating-point tensors, as stored for the rest (and for ``auto``)."""
    if dtype == "auto" or not stored.is_floating_point:
        return stored
    return DTYPES[dtype]


def output_nbytes(recipe: Recipe, merge_plan: MergePlan) -> int:
    """The bytes of the merged checkpoint's tensors (in the output dtypes), known from the plan
    before any is merged."""
    return merge_plan.summary(recipe.dtype)["bytes"]


@dataclass(frozen=True)
class _Step:
    """One unit of the loop: rows ``start:stop`` of ``source`` read and handled for ``out``.

    stage: "copy" (copied rows), "whole" (the whole tensor merged at once), "stats0", "stats1",
    ... (a statistics pass over the merged rows; nothing written), "apply" (merged rows written).
    ``reread``: a pass after the first over the same rows, their pages mapped in already (unless
    unmapped since: :func:`_released`).
    ``out`` differs from ``source`` for a head tied to the embedding: it is computed again.
    """

    source: Entry
    out: Entry
    stage: str
    start: int
    stop: int
    last: bool  # the last step of its stage for this entry
    reread: bool = False  # its merged rows were read by the pass before, and are mapped in


PASSES = {
    "elementwise": 0,
    "columns": 1,
    "selection": 3,  # planned; one where the guess holds, two without one (_Merger.skips)
    "matrix": 0,
    "ranked": 2,
}  # ranked: per stage


def _passes(method: Method) -> int:
    """Statistics passes over a sliced tensor before its merged rows can be written."""
    stages = method.parts.stages if method.kind == "ranked" else 1
    return PASSES[method.kind] * stages


# the light rule's merged pieces are this many times smaller than the budget: its tiles need no
# float32 slice (they read the rows as stored), so the budget sizes only its write buffers (five
# pieces in the output dtype), memory each merge touches for the first time. Half the pieces:
# 40 MiB less of it on the Qwen2-VL-2B trio, the same wall time; the system time it saves is
# within a 2-core VM's noise (0.36 against 0.48 s in 5 paired rounds, 0.30 against 0.29 s in 3;
# docs/performance-log.md)
LIGHT_SHARE = 2


def _schedule(
    plan: MergePlan, method: Method, budget: int, tiled: bool = False, light: bool = False
) -> list[_Step]:
    """Every step of a merge, in order: what is read, when, and which pass it belongs to.

    ``light``: the rule is task arithmetic's compiled sum (:func:`_light`), which holds no
    float32 slice (its tiles read the rows as stored): its merged pieces are cut to a share of
    the budget (:data:`LIGHT_SHARE`), and so are the write buffers they fill.

    ``tiled``: the steps' tiles run on their own threads (:class:`_Tiles`, CPU). Column and
    selection rules then take their statistics and apply passes in tiles for a small matrix
    too (one step each), instead of merging it whole on the loop's thread while the tile
    threads wait: on the Qwen2-VL-2B trio the attention matrices, 12% of the merged weights,
    were merged that way."""
    by_key = {e.key: e for e in plan.entries}
    steps: list[_Step] = []

    merged = max(1, budget // LIGHT_SHARE) if light else budget

    def stage(src: Entry, out: Entry, name: str, rows: int, cut: int = merged) -> None:
        cuts = row_slices(src.shape, cut, rows)
        again = name not in ("copy", "stats0") and _passes(method) > 0
        steps.extend(
            _Step(src, out, name, a, b, i == len(cuts) - 1, again) for i, (a, b) in enumerate(cuts)
        )

    for entry in plan.entries:
        src = by_key[entry.tied_to] if entry.tied_to else entry
        if src.action == "copy":
            stage(src, entry, "copy", src.shape[0] if src.shape else 1, budget)
            continue
        rows = src.rows if src.rows is not None else src.shape[0]
        small = 4 * rows * math.prod(src.shape[1:]) <= merged
        if tiled and method.kind in ("columns", "selection") and len(src.shape) == 2:
            small = False  # in tiles: passes of one step each
        if small or method.kind == "matrix" or len(src.shape) < 2:
            steps.append(_Step(src, entry, "whole", 0, src.shape[0], True))
            continue
        for p in range(_passes(method)):
            stage(src, entry, f"stats{p}", rows)
        stage(src, entry, "apply", src.shape[0])
    return steps


SLOTS = 2  # input slices in flight: one computed while the next is read
# steps after which the loop unmaps the input rows, which no step reads again soon (_released),
# of a step whose piece is written from them: past the write pipe's queue (a copied slice's
# rows are written from the mapped files, and so are those a rule gives back as they are).
# Those of any other step are unmapped at the next step, once its tiles are done: nothing
# reads them after. So the process's mapped input pages stay a few slices' worth; what was
# read is unmapped at the end anyway
RELEASE_LAG = 8
# steps the read thread stages ahead of the one computed, on the CPU (views of the mapped files:
# no buffer each, so more than SLOTS - 1): a selection's guess of the next tensor is then made
# while this tensor's statistics pass computes, not after it
AHEAD = 12
# steps ahead of the one computed whose rows are mapped into the process (MappedShards.prefetch):
# a step staged further ahead is a view only until then, so that the mapped input pages, which
# the resident size counts, are MAPPED_AHEAD + 1 + RELEASE_LAG steps' worth, not AHEAD's more
MAPPED_AHEAD = 3
# steps between two reads of the same rows (passes over a long tensor) from which the rows are
# unmapped in between and mapped in again for the second read: past RELEASE_LAG and the read
# thread's MAPPED_AHEAD, so that no rows are unmapped once mapped in for the next read (a pass's
# cuts may differ by a step from the pass before: the padded vocabulary's rows). A guess's rows
# are mapped in as it is staged, AHEAD steps before: were a head tied to the embedding merged
# just before the embedding, rows of the embedding's first step could be unmapped after that,
# and its tiles would fault them in again (no plan of the families here orders them so)
FAR = RELEASE_LAG + MAPPED_AHEAD + 2


def _released(steps: list[_Step]) -> tuple[list[_Step], list[bool]]:
    """Per step, whether its input rows are unmapped once it is done: no later step reads them
    (a step of the last pass over its source's rows, writing or copying them), or the next
    pass over them reads them more than :data:`FAR` steps later (on the Qwen2-VL-2B trio, DiM3's
    and TIES' passes over the embedding, 28 steps each). And the steps, those of such a next
    pass no longer ``reread`` (their pages are mapped in again). A pass is a run of steps of
    one source, output and stage; a head tied to the embedding reads the embedding's rows
    again."""
    spans: list[tuple[int, int]] = []  # the passes, as [first step, past the last)
    for i, step in enumerate(steps):
        before = steps[i - 1] if i else None
        if before is None or (before.source.key, before.out.key, before.stage) != (
            step.source.key,
            step.out.key,
            step.stage,
        ):
            spans.append((i, i))
        spans[-1] = (spans[-1][0], i + 1)
    following: dict[str, tuple[int, int] | None] = {}  # per source, the pass after the current
    nexts: list[tuple[int, int] | None] = []
    for span in reversed(spans):
        nexts.append(following.get(steps[span[0]].source.key))
        following[steps[span[0]].source.key] = span
    nexts.reverse()
    out, release = list(steps), [False] * len(steps)
    for (a, b), after in zip(spans, nexts, strict=True):
        if after is None:  # the last pass over these rows
            for i in range(a, b):
                release[i] = steps[i].stage in ("copy", "whole", "apply")
            continue
        # the fewest steps from one of this pass's to the first of the next pass's that reads
        # its rows again (passes go through the rows in order)
        j, gap = after[0], len(steps)
        for i in range(a, b):
            while j < after[1] - 1 and steps[j].stop <= steps[i].start:
                j += 1
            gap = min(gap, j - i)
        if gap > FAR:
            release[a:b] = [True] * (b - a)
            out[after[0] : after[1]] = [replace(s, reread=False) for s in out[after[0] : after[1]]]
    return out, release


@dataclass
class _Staged:
    """One step's input rows: (vlm, base, *multilingual) rows to merge, (vlm,) to copy.

    CPU: read-only views of the mapped shards. CUDA (merged rows): device buffers of ``slot``,
    filled on the transfer stream; :attr:`_Source.ready` says when. ``guess``: a selection's
    guessed thresholds (:meth:`_Merger.guess`), made on the read thread too.
    """

    tensors: tuple[torch.Tensor, ...]
    slot: int | None = None
    guess: list[list[tuple[int, int] | None]] | None = None


class _Source:
    """Where a merge's input rows come from, one step ahead of the computation.

    On the CPU, steps are zero-copy views of the mapped shards (:class:`MappedShards`) whose pages
    the kernel is asked to read ahead; the computation converts them straight into its float32
    buffers. For CUDA, merged rows go through pinned host buffers to device buffers, copied
    without blocking on a transfer stream, in :data:`SLOTS` slots: a slot's pinned buffers are
    refilled once its last copy is done (:attr:`ready`), its device buffers once the compute
    stream has converted them (:attr:`consumed`).
    """

    def __init__(self, inputs: Inputs, device: torch.device, buffers: Buffers, streams: _Streams):
        self.inputs, self.device, self.buffers, self.streams = inputs, device, buffers, streams
        self.maps = MappedShards()
        if streams.cuda:
            self.ready = [torch.cuda.Event() for _ in range(SLOTS)]
            self.consumed = [torch.cuda.Event() for _ in range(SLOTS)]

    @staticmethod
    def _shared(step: _Step) -> int:
        """Where the rows ``step`` merges from every model end (the VLM's may go on: tokens
        the base lacks); ``step.start`` where it merges none."""
        e, a, b = step.source, step.start, step.stop
        return max(a, min(b, e.rows if e.rows is not None else e.shape[0]))

    def _reads(self, step: _Step) -> list[tuple[Checkpoint, str, int]]:
        """The mapped inputs ``step`` reads rows ``step.start:stop`` of, as (checkpoint, key,
        stop): the VLM's, then for merged rows the base's and each multilingual model's."""
        e, shared = step.source, self._shared(step)
        read = [(self.inputs.multimodal, e.key, step.stop)]
        if step.stage != "copy":
            read.append((self.inputs.base, e.base_key, shared))
            mls = zip(self.inputs.multilingual, e.multilingual_keys, strict=True)
            read += [(m, k, shared) for m, k in mls]
        return read

    def _where(self, ckpt: Checkpoint, key: str) -> tuple[Path, str, torch.dtype, tuple]:
        return ckpt.file_of(key), key, ckpt.dtype(key), tuple(ckpt.shape(key))

    def populate(self, step: _Step) -> None:
        """Ask the kernel to map ``step``'s rows in (:meth:`MappedShards.prefetch`), on the read
        thread. A pass after the first reads pages that the first mapped in: then only the
        VLM's own rows (tokens the base lacks), which the statistics passes do not read
        (MADV_POPULATE_READ walks the mapped pages again: 0.6 s of the read thread's time in a
        TIES merge of the Qwen2-VL-2B trio), unless they were unmapped since (_released)."""
        fresh = self._shared(step) if step.reread else step.start
        for ckpt, key, stop in self._reads(step):
            if fresh < stop:
                self.maps.prefetch(*self._where(ckpt, key), fresh, stop)

    def _views(self, step: _Step) -> tuple[torch.Tensor, ...]:
        a, shared = step.start, self._shared(step)
        read = tuple(
            self.maps.rows(*self._where(ckpt, key), a, stop)
            for ckpt, key, stop in self._reads(step)
        )
        if step.stage == "copy":
            return read
        extras = self.inputs.extras
        extra = extras.rows(step.source, a, shared) if extras is not None else ()
        return (*read, *extra)  # the rule's extra inputs last, rows a:shared like the base's

    def release(self, step: _Step) -> int:
        """Unmap the rows of the model files that ``step`` read (:meth:`MappedShards.release`):
        the caller knows that no step reads them again soon (:func:`_released`). Returns the
        bytes unmapped."""
        return sum(
            self.maps.release(*self._where(ckpt, key), step.start, stop)
            for ckpt, key, stop in self._reads(step)
        )

    def stage(self, step: _Step, slot: int, populate: bool = True) -> _Staged:
        """The rows ``step`` needs (runs on the read thread), their pages mapped in unless not
        ``populate`` (then :meth:`populate` does, later; CPU only)."""
        if populate or self.streams.cuda:
            self.populate(step)
        views = self._views(step)
        if not self.streams.cuda or step.stage == "copy":
            return _Staged(views)
        cpu, transfer = torch.device("cpu"), self.streams.transfer
        self.ready[slot].synchronize()  # the slot's pinned buffers are free again
        staged = []
        with torch.cuda.stream(transfer):
            transfer.wait_event(self.consumed[slot])  # and its device buffers
            for j, view in enumerate(views):
                host = self.buffers.take(f"pinned{slot}.{j}", view.shape, view.dtype, cpu, pin=True)
                host.copy_(view)
                dev = self.buffers.take(f"staged{slot}.{j}", view.shape, view.dtype, self.device)
                staged.append(dev.copy_(host, non_blocking=True))
            self.ready[slot].record(transfer)
        return _Staged(tuple(staged), slot)

    def to_work(self, staged: _Staged) -> list[torch.Tensor]:
        """The staged rows in the float32 work buffers (on the compute stream for CUDA)."""
        if staged.slot is not None:
            torch.cuda.current_stream().wait_event(self.ready[staged.slot])
        work = [
            self.buffers.take(f"in{j}", t.shape, torch.float32, self.device).copy_(t)
            for j, t in enumerate(staged.tensors)
        ]
        if staged.slot is not None:
            for t in staged.tensors:  # one too large for the buffers is freed once used here
                t.record_stream(torch.cuda.current_stream())
            self.consumed[staged.slot].record()
        return work

    def close(self) -> None:
        self.maps.close()


class _Streams:
    """A CUDA merge's two streams: ``transfer`` for host-device copies, ``compute`` for the rule
    (and the conversion to the output dtype). Nothing on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.transfer = torch.cuda.Stream(device)
            self.compute = torch.cuda.Stream(device)

    def computing(self):
        """Context in which the computation's kernels are queued (the compute stream)."""
        return torch.cuda.stream(self.compute) if self.cuda else nullcontext()

    def synchronize(self) -> None:
        if self.cuda:
            self.compute.synchronize()
            self.transfer.synchronize()


def _light(method: Method, options: Any, device: torch.device, tuned: int, extras: int) -> bool:
    """Whether the rule's tiles are task arithmetic's compiled sum of two updates on the CPU
    (when the second update's weight is 1; :func:`dim3.fused.task_arithmetic`): a few float
    operations per byte, at the speed memory is read (see :meth:`_Merger.light`)."""
    return (
        method.name == "task_arithmetic"
        and (tuned, extras, device.type) == (2, 0, "cpu")
        and options.multilingual_weight == 1.0
        and compiled.available()
    )


class _Merger:
    """Applies a method to the steps of one entry after another, holding what a sliced merge
    gathers between its passes (column statistics, exact selections)."""

    def __init__(
        self,
        method: Method,
        options: Any,
        device: torch.device,
        buffers: Buffers,
        on_step: Callable[[str, int, int], None] | None = None,
        extras: int = 0,
        tuned: int = 2,
    ):
        self.method, self.options, self.device = method, options, device
        self.buffers = buffers
        self.on_step = on_step
        self.extras = extras  # how many of a step's tensors are the rule's extra inputs (last)
        self.tuned = tuned  # the updates: the VLM's, then each multilingual model's
        self.state: Any = None
        # per apply tile (its first row), per update, per rank: (how many of the values tied
        # with the k-th one it takes, how many it holds); see before_tiles
        self._lefts: dict[int, list[list[tuple[int, int]]]] | None = None
        # a selection's values tied with each threshold in the first pass's tiles, when one
        # pass found the thresholds: per update, per rank, (tile first rows, counts before each)
        self._ties: list[list[tuple[list[int], list[int]]]] | None = None
        self._selected: str | None = None  # the selection whose thresholds are known
        # runs a function on another thread (a Future): the tile threads' pool, where there is one
        self.helper: Callable[[Callable[[], Any]], Future] | None = None
        # TIES' tiles of two updates on the CPU: compiled, one loop per pass (dim3/fused.py)
        # (numba is imported only for these, DiM3 and task arithmetic: its import and first
        # call take ~0.5 s)
        cpu2 = (
            method.name in ("ties", "dare_ties")
            and (tuned, extras, device.type) == (2, 0, "cpu")
            and compiled.available()
        )
        self._fused = method.name == "ties" and cpu2
        self._fused_dare = (  # DARE-TIES: dim3.methods.dare.merge_ties takes the kernel
            method.name == "dare_ties" and cpu2 and options.drop_rate > 0
        )
        # task arithmetic's tiles of two updates on the CPU: one compiled loop, when the
        # second update's weight is 1 (dim3.methods.task_arithmetic.merge takes the kernel)
        self._fused_sum = _light(method, options, device, tuned, extras)
        # DiM3's tiles of two updates on the CPU: compiled, one loop per pass (dim3/fused.py)
        self._fused_columns = (
            method.name == "dim3"
            and (tuned, extras, device.type) == (2, 0, "cpu")
            and fused.gives_dim3_bits()
        )

    def __call__(self, step: _Step, work: list[torch.Tensor]) -> torch.Tensor | None:
        """Merge one step's float32 rows ``work`` = [vlm, base, *multilingual, *extra] (the
        engine's buffers); returns the merged rows, in a buffer reused by the next call, or None."""
        models, kw = self._split(work)
        with reuse_buffers(self.buffers):
            return self._step(step, kw, *models)

    def _split(self, work: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """``work`` = [vlm, base, *multilingual, *extra] as ([vlm, base, *multilingual], the
        rule's keyword arguments: ``extra`` for elementwise rules that take some (Fisher))."""
        n = len(work) - self.extras
        return work[:n], ({"extra": list(work[n:])} if self.extras else {})

    def _step(self, step: _Step, kw: dict, vlm, base, *mls) -> torch.Tensor | None:
        if step.stage == "whole":
            return self._whole(step.source, vlm, base, mls, kw)
        r = base.shape[0]  # merged rows in this slice (the rest are the VLM's own rows)
        part = [base, vlm[:r], *(m[:r] for m in mls)]
        kind = self.method.kind
        if step.stage.startswith("stats"):
            if kind == "columns":
                self._column_stats(step, part)
            elif kind == "ranked":
                self._ranked_stats(step, part)
            else:
                self._selection_stats(step, part)
            return None
        if r == 0:
            return vlm
        if kind == "elementwise":
            merged = self.method.fn(
                part[0], part[1:], self.options, name=step.source.key, offset=step.start, **kw
            )
        elif kind == "columns":
            merged = self._column_apply(step, part)
        elif kind == "ranked":
            merged = self.method.parts.apply(_flat_updates(part), self.state.found, self.options)
            merged = merged.reshape(part[0].shape).add_(part[0])
        else:
            merged = self._selection_apply(step, part)
        vlm[:r] = merged
        return vlm

    def _whole(self, e: Entry, vlm, base, mls, kw: dict | None = None) -> torch.Tensor:
        """The whole tensor at once; elementwise and selection rules see the stored layout."""
        rows = e.rows if e.rows is not None else vlm.shape[0]
        part = [t[:rows] for t in (base, vlm, *mls)]  # shared token rows only
        transpose = e.transpose and self.method.kind in ("columns", "matrix")
        if transpose:
            part = [t.T for t in part]  # (hidden, vocab): columns are tokens
        steps = (
            listen_steps(functools.partial(self.on_step, e.key)) if self.on_step else nullcontext()
        )
        with steps:
            merged = self.method.fn(part[0], part[1:], self.options, name=e.key, **(kw or {}))
        if transpose:
            merged = merged.T
        if rows == vlm.shape[0]:
            return merged
        vlm[:rows] = merged  # rows only the VLM's tokenizer has stay the VLM's
        return vlm

    @property
    def light(self) -> bool:
        """Whether the rule's tiles do a few float operations per byte, at the speed memory
        is read: task arithmetic's compiled sum of two updates (:func:`tile_workers`)."""
        return self._fused_sum

    def by_rows(self, step: _Step) -> bool:
        """Whether any cut of ``step``'s rows gives what the whole step gives (:meth:`row_rule`)."""
        kind = self.method.kind
        return len(step.source.shape) > 0 and (
            (kind == "elementwise" and step.stage in ("whole", "apply"))
            or (kind in ("columns", "selection") and step.stage == "apply")
        )

    def row_rule(self, step: _Step) -> Callable[[list[torch.Tensor], int], torch.Tensor] | None:
        """The rule of ``step`` as a function of a few of its rows, when any cut of the rows
        gives what the whole step gives (elementwise rules, and the apply pass of column and
        selection rules, whose per-column weights or per-update thresholds are known by then):
        ``rule(work, first)`` merges float32 rows ``first:first + n`` of the step, ``work`` =
        [vlm, base, *multilingual, *extra] rows. A selection rule's tiles must first hear how
        many values tied with a threshold come before each (:meth:`before_tiles`). None for
        the other stages and kinds (ranked rules), which run on the whole step. The rule reads
        the state gathered for the step (column weights, thresholds, tied counts) as it is when
        this is called: call it after :meth:`before_tiles`."""
        if not self.by_rows(step):
            return None
        kind, key = self.method.kind, step.source.key
        # what the step's tiles read is bound now: they may still run while the loop goes on
        # to the next step, which gathers the next tensor's state (:func:`_pieces`)
        state, lefts_at = self.state, self._lefts
        weights = None  # DiM3's, as its kernel reads them, made once for the step's tiles

        def columns(work: list[torch.Tensor], first: int) -> torch.Tensor:
            (vlm, base, *mls), _ = self._split(work)
            shifted = _Step(step.source, step.out, step.stage, step.start + first, 0, False)
            part = [base, vlm, *mls]
            if columns.reads_stored:  # rows as stored (see below)
                if fused.fits_dim3(base, part[1:]):
                    return self._column_kernel(shifted, part, weights)
                part = [t.float() for t in part]
            return self._column_apply(shifted, part, state)

        def elementwise(work: list[torch.Tensor], first: int) -> torch.Tensor:
            (vlm, base, *mls), kw = self._split(work)
            start = step.start + first
            return self.method.fn(base, [vlm, *mls], self.options, name=key, offset=start, **kw)

        def selection(work: list[torch.Tensor], first: int) -> torch.Tensor:
            lefts = lefts_at[first] if lefts_at is not None else None
            return self._selection_tile(work, lefts, state)

        # the compiled kernels read bfloat16 rows as stored (:meth:`_Tiles._work`)
        selection.reads_stored = self._fused  # type: ignore[attr-defined]
        columns.reads_stored = (  # type: ignore[attr-defined]
            self._fused_columns and len(step.source.shape) >= 2
        )
        if kind == "columns" and columns.reads_stored:
            weights = fused.weight_rows(state)

            def columns_into(work: list[torch.Tensor], first: int, out: torch.Tensor) -> bool:
                (vlm, base, *mls), _ = self._split(work)
                if not (fused.fits_dim3(base, [vlm, *mls]) and fused.writes(out, base)):
                    return False
                shifted = _Step(step.source, step.out, step.stage, step.start + first, 0, False)
                return self._column_kernel(shifted, [base, vlm, *mls], weights, out)

            # DiM3's kernel writes the output dtype itself (_Tiles._work), as task arithmetic's
            columns.into = columns_into  # type: ignore[attr-defined]
        elementwise.reads_stored = self._fused_dare or self._fused_sum  # type: ignore[attr-defined]
        if self._fused_sum and self.method.into is not None:
            rule_into = self.method.into

            def into(work: list[torch.Tensor], first: int, out: torch.Tensor) -> bool:
                (vlm, base, *mls), _ = self._split(work)  # no extra inputs: see _light
                return rule_into(base, [vlm, *mls], self.options, out)

            # task arithmetic's compiled sum writes the output dtype itself (_Tiles._work)
            elementwise.into = into  # type: ignore[attr-defined]

        return {"columns": columns, "selection": selection}.get(kind, elementwise)

    def _tile_updates(
        self, work: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A tile's base rows, its updates (T, rows, ...) and a buffer for one update's
        magnitudes (:func:`magnitude_bits`), all in the tile thread's buffers."""
        (vlm, base, *mls), _ = self._split(work)
        return base, deltas(base, [vlm, *mls]), scratch("select.magnitude", base.shape, base)

    def skips(self, step: _Step) -> bool:
        """Whether ``step`` has nothing left to do: a later statistics pass of a selection whose
        thresholds are known. A selection plans three (:data:`PASSES`) and takes one where its
        guessed windows held (:meth:`ExactSelect.window`), two without a guess, all three
        where the guesses missed."""
        return (
            self.method.kind == "selection"
            and step.stage in ("stats1", "stats2")
            and self._selected == step.source.key
        )

    def before_tiles(
        self,
        step: _Step,
        map_tiles: Callable[[Callable], list],
        cuts: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Ready the tiles of ``step`` (``map_tiles(fn)``: ``fn`` of each, in row order; ``cuts``:
        their rows in the step): for a selection rule whose first k values of an update still
        hold some, but not all, of the values tied with the k-th one (in flat order), how many
        of those come before each tile: from the first statistics pass's tiles when it found
        the thresholds and cut the rows the same way, else counted in a pass over the tiles."""
        self._lefts = None
        if self.method.kind != "selection" or not any(f.ordered for fs in self.state for f in fs):
            return
        if self._ties is not None and cuts and self._tied_from_stats(step, cuts):
            return

        def count(work: list[torch.Tensor], first: int) -> tuple[int, list[list[int]]]:
            base, d, mag = self._tile_updates(work)
            temp = scratch("select.equal", (base.numel(),), base, torch.bool)
            counts = []
            for x, firsts in zip(d.unbind(0), self.state, strict=True):
                bits = magnitude_bits(x, out=mag)
                counts.append([f.count(bits, temp) if f.ordered else 0 for f in firsts])
            return first, counts

        before = [[0] * len(fs) for fs in self.state]  # tied values in the tiles so far
        self._lefts = {}
        for first, counts in map_tiles(count):
            self._lefts[first] = [
                [(max(0, f.left - b), c) for f, b, c in zip(fs, bs, cs, strict=True)]
                for fs, bs, cs in zip(self.state, before, counts, strict=True)
            ]
            for bs, cs in zip(before, counts, strict=True):
                bs[:] = [b + c for b, c in zip(bs, cs, strict=True)]
        for fs, bs in zip(self.state, before, strict=True):
            for f, b in zip(fs, bs, strict=True):
                f.took(b)

    def _tied_from_stats(self, step: _Step, cuts: Sequence[tuple[int, int]]) -> bool:
        """:meth:`before_tiles` from the tied values the first pass's tiles counted; False
        (nothing done) when a tile of ``step`` does not start where one of those did."""
        assert self._ties is not None
        firsts = [step.start + a for a, _ in cuts]
        end = step.start + cuts[-1][1]
        starts = next((set(keys) for per in self._ties for keys, _ in per if keys), set())
        if any(a not in starts for a in firsts):
            return False

        def before(t: int, j: int, row: int) -> int:  # tied values in the rows above ``row``
            keys, counts = self._ties[t][j]  # type: ignore[index]
            return counts[bisect.bisect_left(keys, row)]

        self._lefts = {}
        for (a, b), first in zip(cuts, firsts, strict=True):
            self._lefts[a] = [
                [
                    (
                        max(0, f.left - (before(t, j, first) - before(t, j, step.start))),
                        before(t, j, step.start + b) - before(t, j, first),
                    )
                    for j, f in enumerate(fs)
                ]
                for t, fs in enumerate(self.state)
            ]
        for t, fs in enumerate(self.state):
            for j, f in enumerate(fs):
                f.took(before(t, j, end) - before(t, j, step.start))
        return True

    def tile_stats(
        self, step: _Step, guess: list[list[tuple[int, int] | None]] | None = None
    ) -> tuple[Callable[[list[torch.Tensor], int], Any], Callable[[Any, Any], Any] | None] | None:
        """A statistics pass of ``step`` over a few of its rows (``fn(work, first)``), with how
        two tiles' statistics of one thread add up (``fold``; None: :meth:`add_stats` adds each
        tile's, in row order): column rules (DiM3) and selection rules (TIES, Breadcrumbs).
        None for other steps. A tensor's first call makes the state the pass gathers into,
        with a selection's ``guess`` of its thresholds (:meth:`guess`), if any."""
        e, kind = step.source, self.method.kind
        if not step.stage.startswith("stats") or len(e.shape) != 2:
            return None
        if kind == "columns":
            stats_fn = self.method.parts.stats

            def stats(work: list[torch.Tensor], first: int) -> Any:
                (vlm, base, *mls), _ = self._split(work)
                if stats.reads_stored:  # rows as stored (see below), in runs of sum tiles
                    run = _tile_rows(stats.tile_bytes, base.shape[1])
                    if fused.fits_dim3_stats(base, [vlm, *mls]):
                        acc = scratch("dim3.sums", (4, 5, base.shape[1]), base, torch.float32)
                        return fused.dim3_stats_runs(base, [vlm, *mls], run, acc)
                    vlm, base, *mls = (t.float() for t in (vlm, base, *mls))
                    return [
                        stats_fn(
                            base[a : a + run], [vlm[a : a + run], *(m[a : a + run] for m in mls)]
                        )
                        for a in range(0, base.shape[0], run)
                    ]
                if e.transpose:  # columns are the stored rows: a tile's are final
                    return stats_fn(base.T, [vlm.T, *(m.T for m in mls)])
                return stats_fn(base, [vlm, *mls])

            stats.tile_bytes = TILE_BYTES // SUM_TILES  # type: ignore[attr-defined]
            # the column sums of two updates in one compiled pass (dim3.fused.dim3_stats_runs),
            # where they give torch's bits: not for the transposed embedding (a row's sum)
            stats.reads_stored = (  # type: ignore[attr-defined]
                self._fused_columns
                and not e.transpose
                and e.shape[1] % fused.SUM_COLUMNS == 0
                and fused.sums_match()
            )
            # then a tile is SUM_TILES sum tiles, summed apart in one call and added in order
            # (:meth:`add_stats`): a quarter of the calls, each handing Python's lock over
            stats.runs = SUM_TILES if stats.reads_stored else 1  # type: ignore[attr-defined]
            return stats, None
        if kind != "selection":
            return None
        if step.start == 0 and step.stage == "stats0":
            self.adopt(self.selection_state(e, guess))
        return self._selection_counts(step, self.state[2])

    def selection_state(
        self, e: Entry, guess: list[list[tuple[int, int] | None]] | None = None
    ) -> tuple[int, list[int], list[ExactSelect]]:
        """A selection's state for tensor ``e``, before its first statistics step, with its
        ``guess`` (:meth:`guess`), not yet this merger's: the engine makes the next tensor's
        while this one's thresholds are found, and the merger takes it (:meth:`adopt`) when
        the loop reaches that step. Its statistics are :meth:`stats_of`."""
        n, ks = self._selection_ranks(e)
        selects = [
            ExactSelect(ks, n, self.device, self.buffers, slot=str(t)) for t in range(self.tuned)
        ]
        if guess is not None:
            for select, windows in zip(selects, guess, strict=True):
                select.window(windows)
        return n, ks, selects

    def adopt(self, state: tuple[int, list[int], list[ExactSelect]]) -> None:
        """Make ``state`` (:meth:`selection_state`) the tensor's whose steps come next."""
        self._ties, self._selected = None, None
        self.state = state

    def stats_of(
        self, step: _Step, state: tuple[int, list[int], list[ExactSelect]]
    ) -> tuple[Callable[[list[torch.Tensor], int], Any], Callable[[Any, Any], Any] | None]:
        """:meth:`tile_stats` of a selection's first statistics step over ``state``, not the
        merger's (:meth:`selection_state`)."""
        return self._selection_counts(step, state[2])

    def _selection_counts(
        self, step: _Step, selects: list[ExactSelect]
    ) -> tuple[Callable[[list[torch.Tensor], int], Any], Callable[[Any, Any], Any] | None]:

        def counts(work: list[torch.Tensor], first: int, so_far: Any = None) -> Any:
            # (per update: the counts to add up; per tile: its first row and per update the
            # values in the guessed windows, kept apart to count each tile's tied values)
            if reads_stored:  # the kernel counts into the thread's counts so far
                (vlm, base, ml), _ = self._split(work)
                kept = None
                if selects[0].windows is not None:
                    n = base.numel() + 1  # one more: see fused.counts
                    kept = (
                        *(scratch(f"fused.in{t}", (n,), base, torch.int32) for t in (0, 1)),
                        scratch("fused.flags", (n - 1,), base, torch.uint8),
                        scratch("fused.marked", ((base.numel() + 7) // 8,), base, torch.int32),
                    )
                into = None if so_far is None else [sums[0] for sums in so_far[0]]
                got = fused.counts(base, [vlm, ml], selects, kept, into)
            else:
                _, d, mag = self._tile_updates(work)
                buffers = current_buffers()
                got = [
                    select.partial(magnitude_bits(x, out=mag), buffers)
                    for x, select in zip(d.unbind(0), selects, strict=True)
                ]
            sums = [g[: s.summed] for g, s in zip(got, selects, strict=True)]
            kept = [g[s.summed :] for g, s in zip(got, selects, strict=True)]
            pieces = [(step.start + first, kept)] if any(kept) else []
            if so_far is not None:  # its histograms are the ones just counted into
                so_far[1].extend(pieces)
                return so_far
            return sums, pieces

        reads_stored = self._fused and fused.fits_counts(selects)  # fixed for the pass
        counts.reads_stored = reads_stored  # type: ignore[attr-defined]
        counts.folds = reads_stored  # type: ignore[attr-defined]  # (see _Tiles._work)

        def fold(a: Any, b: Any) -> Any:
            for xs, ys in zip(a[0], b[0], strict=True):
                for x, y in zip(xs, ys, strict=True):
                    x += y
            a[1].extend(b[1])
            return a

        return counts, fold

    def add_stats(self, step: _Step, partials: list[Any]) -> None:
        """Gather a step's per-tile statistics into the tensor's: column sums added in row
        order, a transposed tensor's column statistics put in row order, selection counts."""
        if self.method.kind == "selection":
            for sums, kept in partials:
                for t, (select, got) in enumerate(zip(self.state[2], sums, strict=True)):
                    select.add(got)
                    for key, values in kept:
                        select.keep(key, values[t])
            for select in self.state[2]:
                select.compact()
            if step.last:
                self._selection_end(step)
            return
        if step.source.transpose:
            self.state = partials if step.start == 0 else [*self.state, *partials]
            if step.last:
                self.state = type(partials[0]).concat(self.state)
        else:
            got = _chain_stats(partials)
            self.state = got if step.start == 0 else self.state.add(got)
        if step.last:
            self.state = self.method.parts.weights(self.state, self.options).weights

    # -- columns (DiM3): per-column sums over row slices, then weights, then apply per slice
    def _column_stats(self, step: _Step, part: list[torch.Tensor]) -> None:
        stats_fn = self.method.parts.stats
        if step.source.transpose:  # columns are the stored rows: each slice's stats are final
            got = stats_fn(part[0].T, [t.T for t in part[1:]])
            self.state = [got] if step.start == 0 else [*self.state, got]
            if step.last:
                self.state = type(got).concat(self.state)
        else:
            got = stats_fn(part[0], part[1:])
            self.state = got if step.start == 0 else self.state.add(got)
        if step.last:
            self.state = self.method.parts.weights(self.state, self.options).weights

    def _column_apply(
        self, step: _Step, part: list[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        apply = self.method.parts.apply
        weights = self.state if weights is None else weights
        if step.source.transpose:
            w = weights[:, step.start : step.start + part[0].shape[0]]
            return apply(part[0].T, [t.T for t in part[1:]], w).T
        return apply(part[0], part[1:], weights)

    def _column_kernel(
        self,
        step: _Step,
        part: list[torch.Tensor],
        weights: tuple[Any, Any],
        out: torch.Tensor | None = None,
    ) -> Any:
        """:meth:`_column_apply` of a tile by :func:`dim3.fused.dim3_apply` (the same bits),
        its rows read as stored; into the tile thread's float32 buffer (returned), or with
        ``out`` into it in its own dtype (:func:`dim3.fused.dim3_apply_into`: returns whether
        it did). ``weights``: the tensor's, as :func:`dim3.fused.weight_rows` gives them."""
        w, by_row = weights, False
        if step.source.transpose:
            a, b = step.start, step.start + part[0].shape[0]
            w, by_row = (weights[0][a:b], weights[1][a:b]), True
        if out is not None:
            return fused.dim3_apply_into(part[0], part[1:], w, by_row, out)
        out = scratch("dim3.fused", part[0].shape, part[0], torch.float32)
        return fused.dim3_apply(part[0], part[1:], w, by_row, out)

    # -- selection (TIES, Breadcrumbs): exact per-update ranks over slices, then masks
    def _selection_ranks(self, e: Entry) -> tuple[int, list[int]]:
        """A selection's n (the merged rows' values) and its ranks k."""
        rows = e.rows if e.rows is not None else e.shape[0]
        n = rows * math.prod(e.shape[1:])
        return n, self.method.parts.ks(self.options, n)

    def _selection_begin(self, e: Entry) -> None:
        self.adopt(self.selection_state(e))

    def guesses(self, step: _Step) -> bool:
        """Whether :meth:`guess` guesses ``step``'s thresholds: the first step of a selection's
        statistics over a matrix."""
        return (
            self.method.kind == "selection"
            and step.stage == "stats0"
            and step.start == 0
            and len(step.source.shape) == 2
        )

    def guess(
        self, step: _Step, views: Sequence[torch.Tensor]
    ) -> list[list[tuple[int, int] | None]] | None:
        """For the first step of a selection's statistics, a guess of each update's thresholds
        from a sample of the step's rows (``views``: [vlm, base, *multilingual, *extra]) so
        that one statistics pass finds them (:meth:`ExactSelect.window`): per update, per rank
        k of n, the sample's values within 4.5 standard deviations of its rank (more when the
        sample is small, or when its runs' values go together; :func:`guess_windows`). None
        for other steps, and when the values inside would be many (more than a quarter, or
        ``WINDOW_BYTES`` in all), as when an update is mostly one value.

        Reads only the step and the method: the engine runs it on the read thread, with the
        staging of the step, while the tiles compute the step before (the sample reads a run
        of values in about every page of the first step's rows, a good part of its time)."""
        if not self.guesses(step):
            return None
        n, ks = self._selection_ranks(step.source)
        (vlm, base, *mls), _ = self._split(list(views))
        return guess_windows(base, [vlm, *mls], n, ks, WINDOW_BYTES // self.tuned)

    def _selection_end(self, step: _Step) -> None:
        """A statistics pass over the tensor is over: ready the next, or the masks. Where the
        first pass kept values in guessed windows, each update's threshold is found from them
        on a thread of its own (:attr:`helper`: the tile threads, which wait meanwhile)."""
        selects = self.state[2]
        if self.helper is not None and len(selects) > 1 and selects[0].windows is not None:
            rest = [self.helper(select.next_pass) for select in selects[1:]]
            selects[0].next_pass()
            for future in rest:
                future.result()
        else:
            for select in selects:
                select.next_pass()
        known = step.stage == "stats0" and all(select.known for select in self.state[2])
        if known:  # the first pass found every threshold: the tied values are counted too
            self._ties = [
                [_prefix(ties) for ties in select.ties]  # type: ignore[union-attr]
                for select in self.state[2]
            ]
        if all(select.done for select in self.state[2]):
            self._selected = step.source.key  # the passes left are skipped
            n, ks, selects = self.state
            self.state = [
                [
                    FirstMask(k, n, found, self.buffers, f"select.first{j}")
                    for j, (k, found) in enumerate(zip(ks, s.result(), strict=True))
                ]
                for s in selects
            ]

    def _selection_stats(self, step: _Step, part: list[torch.Tensor]) -> None:
        if step.start == 0 and step.stage == "stats0":
            self._selection_begin(step.source)
        x = self.buffers.take("select.delta", part[0].shape, torch.float32, self.device)
        for t, select in zip(part[1:], self.state[2], strict=True):
            select.observe(magnitude_bits(torch.sub(t, part[0], out=x), out=x))
        if step.last:
            self._selection_end(step)

    def _selection_apply(self, step: _Step, part: list[torch.Tensor]) -> torch.Tensor:
        parts = self.method.parts
        d = deltas(part[0], part[1:])  # (T, r, ...), a reused buffer
        mag = self.buffers.take("select.magnitude", part[0].shape, torch.float32, self.device)
        for x, firsts in zip(d, self.state, strict=True):
            bits = magnitude_bits(x, out=mag)
            keep = parts.keep([first(bits) for first in firsts])  # in a first's buffer
            x.masked_fill_(keep.logical_not_().reshape(x.shape), 0.0)
        return parts.combine(d, self.options).add_(part[0])

    def _selection_tile(
        self, work: list[torch.Tensor], lefts: list[list[tuple[int, int]]] | None, state: list
    ) -> torch.Tensor:
        """One tile of a selection rule's apply pass (a tile thread, its own buffers): ``lefts``
        per update and rank, how many values tied with the k-th one it takes and how many it
        holds (None: none is ordered, see :meth:`before_tiles`); ``state``: the tensor's
        :class:`FirstMask` lists."""
        if self._fused:
            (vlm, base, ml), _ = self._split(work)
            firsts = [f for (f,) in state]  # TIES: one rank per update
            shares = [(0, 0), (0, 0)] if lefts is None else [share for (share,) in lefts]
            out = scratch("fused.out", base.shape, base, torch.float32)
            return fused.apply(base, [vlm, ml], firsts, shares, self.options.scaling, out)
        parts = self.method.parts
        base, d, mag = self._tile_updates(work)
        temp = scratch("select.equal", (base.numel(),), base, torch.bool)
        for t, (x, firsts) in enumerate(zip(d.unbind(0), state, strict=True)):
            bits = magnitude_bits(x, out=mag)
            words = [
                f.words(
                    bits,
                    lefts[t][j][0] if lefts is not None else 0,
                    scratch(f"select.first{j}", (bits.numel(),), base, torch.int32),
                    temp,
                )
                for j, f in enumerate(firsts)
            ]
            keep = parts.keep(words)  # -1 / 0 words, in one of the words' buffers
            x.view(torch.int32).bitwise_and_(keep.view(x.shape))  # dropped: +0.0, as masked_fill
        return parts.combine(d, self.options).add_(base)

    # -- ranked (PCB): per stage, exact order statistics of values over two passes, then apply
    def _ranked_stats(self, step: _Step, part: list[torch.Tensor]) -> None:
        parts, p = self.method.parts, int(step.stage[len("stats") :])
        stage, first = p // 2, step.start == 0
        if first and p == 0:
            e = step.source
            n = (e.rows if e.rows is not None else e.shape[0]) * math.prod(e.shape[1:])
            self.state = _RankState(n, rank_indexes(parts, self.options, n))
        st: _RankState = self.state
        if first and p % 2 == 0:  # a stage begins
            ks = [i + 1 for i in st.indexes[stage]]
            st.selects = [ExactSelect(ks, st.n, self.device, self.buffers) for _ in part[1:]]
            st.top = torch.full((len(part) - 1,), -math.inf, device=self.device)
        values = parts.values(stage, _flat_updates(part), st.found, self.options)
        for select, v in zip(st.selects, values, strict=True):
            select.observe(order_keys(v))
        if p % 2 == 0:
            torch.maximum(st.top, values.max(dim=1).values, out=st.top)
        if not step.last:
            return
        for select in st.selects:
            select.next_pass()
        if p % 2 == 1:  # the stage's statistics are known: (T, len(indexes) + 1)
            rows = []
            for select, top in zip(st.selects, st.top.tolist(), strict=True):
                stats = [top if r is None else key_value(r[0]) for r in select.result()]
                rows.append([*stats, top])
            st.found.append(torch.tensor(rows, dtype=torch.float32, device=self.device))


def _prefix(ties: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tiles' (first row, tied values) as (first rows, tied values in the tiles before each,
    and after the last)."""
    keys, before = [], [0]
    for key, count in ties:
        keys.append(key)
        before.append(before[-1] + count)
    return keys, before


SAMPLE = 1 << 16  # values of each update sampled to guess a selection's thresholds (or more)
RUN = 16  # of them adjacent in each run (guess_windows)
CLUSTERED = 4.0  # a design effect above which the sample is drawn again one value at a time


def guess_windows(
    base: torch.Tensor, tuned: Sequence[torch.Tensor], n: int, ks: Sequence[int], most: int
) -> list[list[tuple[int, int] | None]] | None:
    """Per update ``tuned_t − base`` (the rows of a tensor's first step), per rank k of the
    tensor's n values, the bit patterns ``[lo, hi)`` its k-th smallest magnitude is guessed to
    lie in (:meth:`SampleRanks.window`; None for a k of 0 or n); None for all where the values
    inside one window would be over a quarter of its sample or, over the tensor, over ``most``
    bytes as int32.

    The sample is runs of ``RUN`` adjacent values (a cache line of float32, half of one of
    bfloat16) spread evenly over the rows: one value at every stride-th place waited for memory
    at every value. Values of one run may go together (a row's updates larger than another's),
    which makes the sample's ranks vary more than those of as many values drawn one by one: the
    window is widened by that factor, measured on the sample (:meth:`SampleRanks.clustering`),
    and where it is over ``CLUSTERED`` for some update and rank, the sample is drawn again one
    value at a time (those windows are narrower than the runs' would be by its square root)."""
    rows = base.shape[0]
    per_row = max(1, math.prod(base.shape[1:]))
    total = rows * per_row
    if total == 0:
        return None
    # a larger tensor's larger sample: its window's share of the values (which the first pass
    # keeps) shrinks as the square root of the sample's size; up to 4 times as many
    wanted = min(4 * SAMPLE, max(SAMPLE, n >> 10) // RUN * RUN)
    run = RUN if total > wanted else 1  # a small step is taken whole
    ranked = _sampled(base, tuned, rows, per_row, min(total, wanted), run)
    size = ranked[0].bits.size
    centers = [min(size - 1, k * size // n) for k in ks if 0 < k < n]
    if run > 1 and any(at.clustering(c, run) > CLUSTERED for at in ranked for c in centers):
        run = 1  # drawn again, one value at a time
        ranked = _sampled(base, tuned, rows, per_row, min(total, wanted), run)
    guesses: list[list[tuple[int, int] | None]] = []
    for at in ranked:
        windows: list[tuple[int, int] | None] = []
        for k in ks:
            if k <= 0 or k >= n:
                windows.append(None)
                continue
            lo, hi = at.window(k / n, run)
            inside = at.count_below(hi) - at.count_below(lo)
            if inside * 4 > size or inside * n * 4 > most * size:
                return None  # too many values to keep: the two passes
            windows.append((lo, hi))
        guesses.append(windows)
    return guesses


def _sampled(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    rows: int,
    per_row: int,
    size: int,
    run: int,
) -> list[SampleRanks]:
    """Each update's sample for :func:`guess_windows`: ``size // run`` runs of ``run``
    adjacent values of the first ``rows`` rows, evenly spaced (by a stride that meets every
    column), a strided view of the mapped (read-only) input itself when it is float32, never
    written to (the updates are new tensors)."""
    runs = size // run
    stride = rows * per_row // runs
    while stride > run and math.gcd(stride, per_row) > run:  # every column met
        stride -= 1

    def sample(t: torch.Tensor) -> torch.Tensor:
        return t[:rows].reshape(-1)[: runs * stride].view(runs, stride)[:, :run].float()

    b = sample(base)
    return [
        SampleRanks(torch.sub(sample(t), b).abs_().view(torch.int32).numpy().reshape(-1))
        for t in tuned
    ]


class SampleRanks:
    """A selection's sample of one update (its values' bit patterns: non-negative int32, any
    order, a multiple of the runs' length): the r-th smallest for any r, from one count of
    their high 16 bits (a radix select; a partition of the whole sample for each set of ranks
    took 0.36 ms, this 0.07 ms a rank), and the window :func:`guess_windows` guesses."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.high = bits >> 16
        self.cum = np.cumsum(np.bincount(self.high, minlength=1 << 15))  # up to each bin
        self._clustering: dict[tuple[int, int], float] = {}

    def __getitem__(self, r: int) -> int:
        b = int(np.searchsorted(self.cum, r, side="right"))
        r -= int(self.cum[b - 1]) if b else 0
        return int(np.partition(self.bits[self.high == b], r)[r])

    def count_below(self, v: int) -> int:
        """How many of the values are below ``v``."""
        return int(np.count_nonzero(self.bits < v))

    def clustering(self, r: int, run: int) -> float:
        """How much more the count of values below the r-th varies over runs of ``run``
        adjacent values than it would over as many values drawn one by one (a design
        effect: 1 for independent values, up to ``run`` where a run's values go together)."""
        if run == 1:
            return 1.0
        if (r, run) not in self._clustering:
            below = (self.bits < self[r]).reshape(-1, run).sum(axis=1, dtype=np.int64)
            p = float(below.mean()) / run
            effect = float(below.var()) / (run * p * (1 - p)) if 0 < p < 1 else 1.0
            self._clustering[(r, run)] = min(float(run), max(1.0, effect))
        return self._clustering[(r, run)]

    def window(self, q: float, run: int) -> tuple[int, int]:
        """The bit patterns [lo, hi) that hold the sample's values within 4.5 standard
        deviations (and 8 values) of rank ``q`` (a share, 0 < q < 1) of the sample (the
        deviation of a binomial's count, times :meth:`clustering` there); a value tied at
        either end is left out where its ties all lie 3 deviations (and 8 values) away or
        more: a bfloat16 update's differences are tied in blocks of a few percent of its
        values each, and one block more costs the first pass time, or a tensor its guess."""
        size = self.bits.size
        center = q * size
        sd = math.sqrt(self.clustering(min(size - 1, int(center)), run) * size * q * (1 - q))
        wide, near = 4.5 * sd + 8, 3 * sd + 8
        lo, hi = 0, 1 << 31
        if center - wide >= 0:
            lo = self[math.floor(center - wide)]
            if self.count_below(lo + 1) <= center - near:  # its ties end far enough below
                lo += 1
        if center + wide < size:
            hi = self[math.ceil(center + wide)]
            if self.count_below(hi) - 1 < center + near:  # its ties begin too near: kept
                hi += 1
        return lo, hi


WINDOW_BYTES = 64 << 20  # at most this many bytes of values kept inside the guessed windows


def _flat_updates(part: list[torch.Tensor]) -> torch.Tensor:
    """The slice's updates ``tuned_t − base``, flattened: (T, r)."""
    return deltas(part[0], part[1:]).reshape(len(part) - 1, -1)


@dataclass
class _RankState:
    """What a ranked rule has gathered for one tensor so far."""

    n: int
    indexes: tuple[tuple[int, ...], ...]
    found: list[torch.Tensor] = field(default_factory=list)
    selects: list[ExactSelect] = field(default_factory=list)
    top: torch.Tensor | None = None


# float32 bytes of one input in a tile: with the other inputs, the rule's temporaries and the
# result, some 20 MiB per thread, within a server CPU's last-level cache; each tile also costs
# a dozen or more Python calls under the global lock. Timed by hand on the 2B trio, on the
# 2-core machine of docs/performance-log.md's 2026-11-30 early-afternoon figures (paired, 3
# rounds): DiM3 11.0-12.9 s with 4 MiB tiles, 12.4-14.0 s with 2 MiB, 13.5-14.3 s with 1 MiB (the
# benchmark's rounds then showed 0.94-0.98 of the 1 MiB engine's time); TIES (its compiled
# kernels) 10.1-10.8 s against 11.3-11.4 s with 1 MiB; task arithmetic the same with any. (An
# earlier machine had found 2 MiB at most slightly faster and 4 MiB slower than 1 MiB, for the
# engine of that day, in a few noisy runs.)
TILE_BYTES = 4 << 20
# DiM3's statistics pass takes tiles of TILE_BYTES // SUM_TILES: their float32 column sums are
# added tile after tile, so the tiles' size fixes the sums' last bits, and through the columns'
# ranks DiM3's weights; 1 MiB, the size they were taken in before TILE_BYTES grew, so that the
# merged bytes stay the same (4 MiB tiles changed 0.4% of the 2B trio's merged weights)
SUM_TILES = 4


class _Tiles:
    """Computes a step in tiles of rows on ``workers`` threads, converting each tile's inputs,
    merging them and writing the result in the output dtype while the tile is in the CPU's
    caches, instead of converting the whole step to float32, merging it in several passes over
    memory and converting it back (each a pass over 32 MiB buffers, far larger than any cache).

    Each thread runs torch with one intra-op thread (they set it when they start; torch keeps it
    per thread) and its own reused buffers, so that the rule's temporaries
    (:func:`dim3.methods._utils.scratch`) of two tiles never meet. Only rules that give the same
    numbers for any cut of the rows use it (:meth:`_Merger.row_rule`): the merged bytes do not
    depend on the tiling. Measured in docs/performance.md.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="dim3-tile",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._local = threading.local()  # each thread's own Buffers (_mine)

    def start(
        self,
        views: Sequence[torch.Tensor],
        rule: Callable[[list[torch.Tensor], int], torch.Tensor],
        out: torch.Tensor,
        block: int = 0,
    ) -> _Running:
        """Queue the step whose input rows are ``views`` = (vlm, base, *mls, *extra), to be
        merged into ``out`` (the step's rows, output dtype): rows below the base's count by
        ``rule``, the VLM's own rows after them (tokens only the VLM has) converted from the VLM,
        here. ``block``: the rule's random blocks (:attr:`dim3.methods.Method.row_blocks`), see
        :meth:`_groups`. ``out`` holds the merged rows once the returned :meth:`_Running.wait`
        returns. Steps started one after another are computed in that order; ``views`` and
        ``out`` must stay untouched until then, and ``rule`` must not read state that changes
        meanwhile."""
        vlm, merged = views[0], views[1].shape[0]
        running = _Running(self._start(views, rule, out, None, block=block))
        try:
            if merged < vlm.shape[0]:
                out[merged:].copy_(vlm[merged:])
        except BaseException:
            running.wait()  # no worker may still write into ``out`` once this raises
            raise
        return running

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on a tile thread, after the tiles queued before it."""
        return self._pool.submit(fn)

    def map(
        self,
        views: Sequence[torch.Tensor],
        fn: Callable[[list[torch.Tensor], int], Any],
        fold: Callable[[Any, Any], Any] | None = None,
    ) -> list:
        """``fn(work, first)`` of every tile of the step's merged rows, in row order (a
        statistics pass: per-tile sums for the caller to add in this order, whatever the number
        of threads and whichever thread computed which tile). With ``fold(a, b)``, each thread
        folds the results of the tiles it computed into one (in place into ``a``; for sums whose
        order does not matter, such as counts): one per thread that computed any. A ``fn``
        marked ``folds`` does that itself: called as ``fn(work, first, so_far)`` with the
        thread's result so far (None for its first tile), it returns it updated."""
        return self.begin(views, fn, fold).collect()

    def begin(
        self,
        views: Sequence[torch.Tensor],
        fn: Callable[[list[torch.Tensor], int], Any],
        fold: Callable[[Any, Any], Any] | None = None,
    ) -> _Mapping:
        """:meth:`map`, queued: its results once :meth:`_Mapping.collect` returns. Tiles queued
        after it (:meth:`start`, :meth:`begin`) are computed after its own."""
        results: dict[int, Any] = {}
        return _Mapping(self._start(views, fn, None, fold, results), results, fold is not None)

    def _start(self, views, fn, out, fold, results=None, block: int = 0) -> list[Future]:
        # a rule may fix its own tiles' size (fn.tile_bytes: DiM3's column sums)
        tile_bytes = getattr(fn, "tile_bytes", TILE_BYTES)
        if out is not None and self.workers == 1 and _whole(fn, views):
            tile_bytes = WHOLE  # one pass from the rows as stored: no tile to keep in cache
        share = _Share(self._groups(views, block, tile_bytes, getattr(fn, "runs", 1)))
        return [
            self._pool.submit(self._work, share, w, views, fn, out, fold, results)
            for w in range(share.workers)
        ]

    def _groups(
        self,
        views: Sequence[torch.Tensor],
        block: int = 0,
        tile_bytes: int | None = None,
        runs: int = 1,
    ) -> list[list[tuple[int, int]]]:
        """The tiles (row ranges) of the merged rows, in contiguous runs, one per thread.

        Tiles are of ``TILE_BYTES`` float32 bytes per input (the last of a run shorter), never
        more (the temporaries of an eager rule's tiles are buffers of the thread's own, sized
        to the tile); ``runs`` such tiles of ``tile_bytes`` each, with ``runs`` (a rule that
        cuts its tiles back into those itself: DiM3's column sums). With
        ``block`` (entries of whole rows that a rule draws at random as a unit: DARE's masks,
        the slowest part of a DARE merge), a step of at least as many blocks as threads is cut
        into runs at block boundaries, so that each block is drawn by one thread (which keeps it
        for the block's next tiles), not in part again by the thread whose run starts inside it;
        otherwise the runs are of about equal tiles."""
        merged = views[1].shape[0]
        if not merged:  # a step of the VLM's own rows only (tokens the base does not have)
            return []
        per_row = max(1, math.prod(views[0].shape[1:]))
        rows = _tile_rows(tile_bytes or TILE_BYTES, per_row) * runs
        block = max(1, block // per_row)  # rows, as _utils.dare_keep_mask cuts them
        blocks = -(-merged // block)
        if block > 1 and blocks >= self.workers:
            ends = [
                *(
                    min(merged, round(w * merged / self.workers / block) * block)
                    for w in range(1, self.workers)
                ),
                merged,
            ]
            spans = list(zip([0, *ends[:-1]], ends, strict=True))
        else:  # runs of about equal tiles
            tiles = -(-merged // rows)
            share = -(-tiles // self.workers) * rows
            spans = [(a, min(merged, a + share)) for a in range(0, merged, share)]
        runs = [[(a, min(b, a + rows)) for a in range(s, b, rows)] for s, b in spans]
        return [r for r in runs if r]

    def _mine(self) -> Buffers:
        """The calling tile thread's buffers: per thread, not per run of a step, since a thread
        done with its run of one step takes the next step's while the other is still busy."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = Buffers()
        return buffers

    def _work(self, share: _Share, w: int, views, fn, out, fold, results) -> list:
        cpu = torch.device("cpu")
        buffers = self._mine()
        got: list = []
        inputs = [(f"tile.in{j}", tuple(v.shape[1:]), v) for j, v in enumerate(views)]
        # a rule that reads its inputs as stored (dim3/fused.py's kernels) gets the rows as
        # they are, unconverted, when each is float32 or bfloat16
        raw = _raw(fn, views)
        into = getattr(fn, "into", None) if raw else None
        with torch.no_grad(), reuse_buffers(buffers):
            while (tile := share.next(w)) is not None:
                a, b = tile
                work = (
                    [v[a:b] for v in views]
                    if raw
                    else [
                        buffers.take(name, (b - a, *rest), torch.float32, cpu).copy_(v[a:b])
                        for name, rest, v in inputs
                    ]
                )
                if out is not None:
                    rows = out[a:b]
                    if into is None or not into(work, a, rows):
                        rows.copy_(fn(work, a))
                elif getattr(fn, "folds", False):  # fn(work, first, the tiles' so far)
                    got = [fn(work, a, got[0] if got else None)]
                elif fold is not None:
                    got = [fold(got[0], fn(work, a))] if got else [fn(work, a)]
                else:
                    results[a] = fn(work, a)
        return got

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# the tile size of a step computed as one tile (_Tiles._start): above any step's bytes
WHOLE = 1 << 62


def _tile_rows(tile_bytes: int, per_row: int) -> int:
    """Rows in a tile of ``tile_bytes`` float32 bytes per input, rows of ``per_row`` values."""
    return max(1, tile_bytes // (4 * per_row))


def _chain_stats(partials: list[Any]) -> Any:
    """A step's column sums from its tiles' (in row order), added one after another: all
    :func:`dim3.fused.dim3_stats_runs`' arrays, or each a ColumnStats or a list of them (a
    tile's sum tiles summed by torch). A step's tiles all take one way (the kernel takes a
    tile or not by the step's shape and dtypes)."""
    if isinstance(partials[0], np.ndarray):
        return fused.chain_sums(partials)
    flat = [s for p in partials for s in (p if isinstance(p, list) else [p])]
    got = flat[0]
    for p in flat[1:]:
        got.add(p)
    return got


def _raw(fn: Callable, views: Sequence[torch.Tensor]) -> bool:
    """Whether the tiles give ``fn`` its rows as stored (a rule that reads them so, the
    compiled kernels of dim3/fused.py, and float32 or bfloat16 contiguous rows)."""
    return getattr(fn, "reads_stored", False) and all(
        fused.widens(v) and v.is_contiguous() for v in views
    )


def _whole(fn: Callable, views: Sequence[torch.Tensor]) -> bool:
    """Whether a step of ``fn`` is best computed as one tile on a single tile thread: a rule
    that writes the output dtype itself from the rows as stored (``fn.into``: task
    arithmetic's compiled sum, DiM3's apply kernel) makes one pass over memory whatever the
    tile, and a tile more is only Python's work under its global lock. Only for a rule whose
    tiles read no state made for the usual cut: TIES' shares of its tied values are counted per
    usual tile (:meth:`_Merger.before_tiles`), so a TIES ``into`` would have to be kept out of
    this."""
    return getattr(fn, "into", None) is not None and _raw(fn, views)


class _Mapping:
    """A statistics pass's tiles, queued or computing (:meth:`_Tiles.begin`)."""

    def __init__(self, futures: list[Future], results: dict[int, Any], folded: bool):
        self._futures, self._results, self._folded = futures, results, folded

    def wait_until(self, other: Future) -> None:
        """Return once ``other`` is done, or every tile is."""
        rest = [f for f in self._futures if not f.done()]
        while rest and not other.done():
            wait([other, *rest], return_when=FIRST_COMPLETED)
            rest = [f for f in rest if not f.done()]

    def collect(self) -> list:
        """Once every tile is done, what :meth:`_Tiles.map` returns; raises a tile's error."""
        wait(self._futures)
        folded = [got for future in self._futures for got in future.result()]
        return folded if self._folded else [self._results[i] for i in sorted(self._results)]


def _running(tiles: _Running | None) -> bool:
    return tiles is not None and tiles.running()


def _shares(t: torch.Tensor, views: Sequence[torch.Tensor]) -> bool:
    """Whether ``t`` lies in the memory of one of ``views`` (a mapped file's, on the CPU)."""
    at = t.untyped_storage().data_ptr()
    return any(v.untyped_storage().data_ptr() == at for v in views)


class _Running:
    """A step's tiles, queued or computing (:meth:`_Tiles.start`)."""

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def running(self) -> bool:
        """Whether a tile is queued or computing still."""
        return not all(future.done() for future in self._futures)

    def wait(self) -> None:
        """Return once every tile is done; raise the first tile's error, if any."""
        wait(self._futures)
        for future in self._futures:
            future.result()


class _Share:
    """The tiles of one step among the threads: each takes its own run's tiles from the front
    (consecutive rows, so that what a rule keeps from one tile to the next, such as a DARE
    block, serves the next), and a thread done with its run takes the last tile of the longest
    run left: a thread slowed down (by the read and write threads, on a small machine) no longer
    keeps the step waiting for its half."""

    def __init__(self, groups: list[list[tuple[int, int]]]):
        self.workers = len(groups)
        self._runs = [deque(g) for g in groups]
        self._lock = threading.Lock()

    def next(self, w: int) -> tuple[int, int] | None:
        with self._lock:
            if self._runs[w]:
                return self._runs[w].popleft()
            longest = max(self._runs, key=len)
            return longest.pop() if longest else None


def tile_workers(device: torch.device, cores: int | None = None, *, light: bool = False) -> int:
    """Threads of :class:`_Tiles` for a CPU merge: one per core torch computes on
    (:func:`compute_threads`), at most 8 (the work is bound by memory bandwidth); 0 (no
    tiling) for other devices, and on the CPU with ``DIM3_TILES=0``: the loop then computes
    every step on its own thread, as it does for a GPU (the tests run that path on CPUs).

    ``light``: a rule whose tiles one thread computes as fast as the disk takes the output
    (:attr:`_Merger.light`, task arithmetic's compiled sum) gets one thread on up to 2 cores,
    the other core left to the loop, the read and the write threads. A second tile thread
    there only hands Python's lock about: task arithmetic on the 2B trio (2-core machine,
    paired by hand and in the throughput benchmark, docs/performance-log.md) took the same wall
    time with one tile thread, 40% fewer context switches and 0.04-0.1 s less system time."""
    if device.type != "cpu" or os.environ.get("DIM3_TILES", "1") == "0":
        return 0
    if light and (cores or os.cpu_count() or 1) <= 2:
        return 1
    return min(8, compute_threads(device, cores))


def _limit(plan: MergePlan, budget: int) -> int:
    """The largest buffer a sliced step asks for: T + 1 slices of the budget (a rule's (T, ...)
    updates plus one), or the largest tensor the plan merges whole if smaller. Requests above it
    (a "matrix" rule's whole tensor) get fresh memory that is not kept."""
    models = 2 + plan.multilingual  # vlm, base and each multilingual model
    largest = max((4 * math.prod(e.shape) for e in plan.entries), default=4)
    return min(budget, largest) * models


def iter_merged(
    plan: MergePlan,
    inputs: Inputs,
    method: Method,
    options: Any,
    device: torch.device,
    chunk_size: str | int = DEFAULT_CHUNK,
    on_step: Callable[[str, int, int], None] | None = None,
    *,
    buffers: Buffers | None = None,
    streams: _Streams | None = None,
    into: Callable[[Entry, int, tuple[int, ...]], torch.Tensor | None] | None = None,
) -> Iterator[tuple[Entry, int, torch.Tensor, bool]]:
    """Yield ``(entry, start_row, rows, done)`` pieces of every planned tensor, in plan order.

    A tensor of more than ``chunk_size`` bytes in float32 is read and merged in row slices, in
    one or more passes as its method's kind needs (see :data:`PASSES`); a smaller one (or any
    tensor of a "matrix" method) comes whole. Copied rows come back as stored (CPU, their dtype,
    a read-only view of the mapped file); merged ones as float32 on ``device``. ``done`` marks an
    entry's last piece. Each piece lives in a buffer the loop reuses (``buffers``, made once per
    merge): use or copy it before asking for the next. Reads of the next step overlap the current
    computation (one read thread, :data:`SLOTS` steps in flight). For CUDA, kernels are queued on
    ``streams.compute``: a consumer works on that stream too (:meth:`_Streams.computing`).
    ``on_step(key, done, total)`` hears the inner steps of slow rules
    (:func:`dim3.methods._utils.report_step`) and may raise to stop.

    ``into(entry, start_row, shape)`` may give the tensor (the consumer's, in its output dtype)
    that the rows of a step go to. On the CPU, steps whose rule any cut of rows leaves unchanged
    (:meth:`_Merger.row_rule`) are then computed straight into it, in tiles (:class:`_Tiles`),
    and that tensor is yielded; other steps yield float32 rows as above.
    """
    pieces = _pieces(
        plan,
        inputs,
        method,
        options,
        device,
        chunk_size,
        on_step,
        buffers=buffers,
        streams=streams,
        into=into,
    )
    with closing(pieces):
        for entry, start, rows, last, running in pieces:
            if running is not None:
                running.wait()
            yield entry, start, rows, last


def _pieces(
    plan: MergePlan,
    inputs: Inputs,
    method: Method,
    options: Any,
    device: torch.device,
    chunk_size: str | int = DEFAULT_CHUNK,
    on_step: Callable[[str, int, int], None] | None = None,
    *,
    buffers: Buffers | None = None,
    streams: _Streams | None = None,
    into: Callable[[Entry, int, tuple[int, ...]], torch.Tensor | None] | None = None,
) -> Iterator[tuple[Entry, int, torch.Tensor, bool, _Running | None]]:
    """:func:`iter_merged`'s pieces, each with the tiles still computing it, if any (a
    :class:`_Running`): a step computed in tiles straight into ``into``'s tensor is yielded as
    soon as its tiles are queued, and the loop goes on to the next step while they compute, so
    that the tile threads are not left waiting while the loop hands the piece on (a write
    queued, the next step's statistics gathered). The consumer waits for it before it reads
    the rows; the ``into`` tensors of the steps in flight must stay the consumer's meanwhile."""
    budget = parse_size(chunk_size)
    buffers = buffers if buffers is not None else Buffers(_limit(plan, budget))
    streams = streams if streams is not None else _Streams(device)
    source = _Source(inputs, device, buffers, streams)
    extras = inputs.extras.count if inputs.extras is not None else 0
    merger = _Merger(method, options, device, buffers, on_step, extras, 1 + plan.multilingual)
    workers = tile_workers(device, light=merger.light)
    steps, release = _released(
        _schedule(plan, method, budget, tiled=workers > 0, light=merger.light)
    )
    tied_sources = {e.tied_to for e in plan.entries if e.tied_to}
    whole: dict[str, torch.Tensor] = {}  # merged whole tensors that a tied head repeats
    tiles = _Tiles(workers) if workers else None
    if tiles is not None:
        merger.helper = tiles.submit

    def stage(i: int, populate: bool = True) -> _Staged:  # on the read thread, but step 0's
        staged = source.stage(steps[i], i % SLOTS, populate)
        if tiles is not None:
            staged.guess = merger.guess(steps[i], staged.tensors)
        return staged

    # a selection's next tensor: its first statistics pass, queued before this tensor's
    # thresholds are found (by step index: its state and tiles), see finish_stats
    early: dict[int, tuple[Any, _Mapping]] = {}
    pending: deque[Future] = deque()
    queued = 1  # the steps staged or queued for it so far

    def finish_stats(i: int, mapping: _Mapping) -> None:
        """Gather the statistics of step ``i`` (its tiles queued: ``mapping``) into the
        tensor's. Where they end a selection's pass, the next tensor's first pass is queued
        first, if its rows are staged: the tile threads compute it while this thread finds
        the thresholds (with no help from them, then), instead of waiting for them."""
        step, ahead = steps[i], False
        if tiles is not None and method.kind == "selection" and step.last:
            first = queued - len(pending)  # the step of pending[0]
            j = next((j for j in range(i + 1, queued) if steps[j].stage == "stats0"), queued)
            state = None
            # each of its first pass's steps staged (or this pass done first: then no more)
            while j < queued and j not in early and steps[j].stage == "stats0":
                nxt = steps[j]
                if (nxt.start == 0) == (state is not None):
                    break  # the first step after another tensor's
                mapping.wait_until(pending[j - first])
                if not pending[j - first].done():
                    break
                staged = pending[j - first].result()
                if state is None:
                    state = merger.selection_state(nxt.source, staged.guess)
                early[j] = (state, tiles.begin(staged.tensors, *merger.stats_of(nxt, state)))
                ahead = True
                if nxt.last:
                    break
                j += 1
        merger.helper = None if ahead or tiles is None else tiles.submit
        merger.add_stats(step, mapping.collect())

    pool = ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="dim3-read",
        initializer=torch.set_num_threads,  # its sample's sort: see loop_threads
        initargs=(1 if tiles is not None else torch.get_num_threads(),),
    )
    # (the step from which a step's rows are unmapped, the step, its tiles), in the order
    # computed; the rows wait for the tiles to be done: a selection's skipped passes are steps
    # too, and the loop may be many steps ahead while an apply's tiles still read its rows,
    # which they would then fault in again, to stay mapped (0.5 GiB of the 2B trio's for TIES).
    # Each step's are unmapped once its own wait is over: a copy's RELEASE_LAG steps hold back
    # none of the steps after it (until 2026-12-03 they did: the queue was first in, first out)
    done: list[tuple[int, int, _Running | None]] = []
    views_only: set[int] = set()  # steps staged with their pages not mapped in yet
    populating: deque[tuple[int, Future]] = deque()  # (step, its pages being mapped in)

    try:
        ahead = SLOTS - 1 if streams.cuda else AHEAD  # CUDA: a slot's buffers per step
        running: _Running | None = None
        for i, step in enumerate(steps):
            if any(due <= i for due, _, _ in done):  # each once its own wait is over
                waiting = []
                for entry in done:
                    if entry[0] <= i and not _running(entry[2]):
                        source.release(steps[entry[1]])
                    else:
                        waiting.append(entry)
                done = waiting
            staged = pending.popleft().result() if pending else stage(i)
            while populating and populating[0][0] <= i:  # before it computes, as if staged so
                populating.popleft()[1].result()
            while queued < len(steps) and len(pending) < ahead:
                # the rows of a step staged far ahead are mapped in MAPPED_AHEAD steps before
                # it, but a guess's (its sample reads them on the read thread now)
                now = queued - i <= MAPPED_AHEAD or merger.guesses(steps[queued])
                if not now:
                    views_only.add(queued)
                pending.append(pool.submit(stage, queued, now))
                queued += 1
            if (j := i + MAPPED_AHEAD) in views_only:
                views_only.remove(j)
                # but a later statistics pass that a selection skips (known once the first
                # ends: for its first MAPPED_AHEAD steps, not yet)
                if not merger.skips(steps[j]):
                    populating.append((j, pool.submit(source.populate, steps[j])))
            if step.stage == "copy":
                out = staged.tensors[0]
            elif step.stage == "whole" and step.source.key in whole:
                out = whole.pop(step.source.key)
            elif merger.skips(step):
                out = None
            elif tiles is not None and i in early:  # its statistics' tiles queued already
                state, mapping = early.pop(i)
                if step.start == 0:
                    merger.adopt(state)
                finish_stats(i, mapping)
                out = None
            elif tiles is not None and (stats := merger.tile_stats(step, staged.guess)) is not None:
                finish_stats(i, tiles.begin(staged.tensors, *stats))
                out = None
            elif (
                tiles is not None
                and into is not None
                and not (step.stage == "whole" and step.source.key in tied_sources)
                and merger.by_rows(step)
                and (out := into(step.out, step.start, tuple(staged.tensors[0].shape))) is not None
            ):
                block = method.row_blocks
                merger.before_tiles(
                    step,
                    functools.partial(tiles.map, staged.tensors),
                    [t for run in tiles._groups(staged.tensors, block) for t in run],
                )
                rule = merger.row_rule(step)
                assert rule is not None
                running = tiles.start(staged.tensors, rule, out, block)
            else:
                with streams.computing():
                    out = merger(step, source.to_work(staged))
                    if step.stage == "whole" and step.source.key in tied_sources:
                        whole[step.source.key] = out = out.clone()  # outlives its buffer
            # a piece written from the input rows (a copy's, or a rule's giving back its input)
            read = out is not None and running is None and _shares(out, staged.tensors)
            del staged
            if release[i]:
                done.append((i + (RELEASE_LAG if read else 1), i, running))
            if out is not None:
                yield step.out, step.start, out, step.last, running
            running = None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the steps staged ahead and not begun
        streams.synchronize()  # nothing queued may outlive the buffers it uses
        source.close()
        if tiles is not None:
            tiles.close()


# free memory an arena may keep at the top of its heap (glibc's M_TRIM_THRESHOLD)
TRIM_THRESHOLD = 16 << 20


@functools.cache
def _return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system (once per process).

    glibc raises its mmap threshold after the first large free (up to 32 MiB), so freed slices
    then stay in heap arenas (one per thread): before the loop reused its buffers, anonymous
    memory grew to ~2.5 GiB on the Qwen2-VL-2B shape. The loop's own buffers are now mappings of
    their own, made once (:class:`dim3.slices.Buffers`), which no threshold affects; what still
    goes through malloc per slice is the temporaries of rule code that does not take
    :func:`dim3.methods._utils.scratch` buffers (masks in TIES' selection, PCB's weights), each
    above 1 MiB in its own mapping, returned when freed. A higher threshold would let the heap
    recycle them (fewer page faults) at the risk of the arena growth above; that trade-off was
    not re-measured, so the fixed 1 MiB stays.

    Fixing the mmap threshold also fixes the trim threshold, at 128 KiB: an arena then hands
    back the top of its heap whenever that much is free, and the next temporary faults it in
    again. The selection rules' tiles make several such temporaries (histograms of 512 KiB
    from ``torch.bincount``, which takes no ``out``) per tile, and on the Qwen2-VL-2B shape
    that more than doubled TIES's page faults; :data:`TRIM_THRESHOLD` is left free at the top
    of each arena instead (main, read, writer and tile threads: a few of them). TIES's faults
    with it are in docs/performance-log.md. Other C libraries are left alone.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def compute_threads(device: torch.device, cores: int | None = None) -> int:
    """torch's intra-op threads for a merge on ``device``.

    Besides the computation a CPU merge runs a read thread (asking the kernel to read the next
    slice's pages ahead, when they are not cached) and a write thread (gathering converted rows
    into the aligned direct-write buffer, then waiting on the disk). Both spend nearly all their
    time asleep in system calls and need a few milliseconds when they wake, which the scheduler
    gives a waking thread promptly. On up to 2 cores the computation therefore keeps every core:
    holding one back for the I/O threads would halve the elementwise work's throughput to save
    them little. Above that one core is left to them and to the rest of the machine (the
    elementwise work is bound by memory bandwidth long before 16 threads). A CUDA merge leaves
    torch's setting.
    """
    cores = cores or os.cpu_count() or 1
    if device.type != "cpu":
        return torch.get_num_threads()
    return cores if cores <= 2 else cores - 1


def loop_threads(method: Method, device: torch.device, cores: int | None = None) -> int:
    """torch's intra-op threads on the merge loop's own thread.

    Where the tiles (:class:`_Tiles`) compute every merged matrix (elementwise, column and
    selection rules on the CPU), the loop's thread only does small work between them (a
    histogram's sum, the kept values of :meth:`ExactSelect.next_pass`, vectors merged
    whole) and runs it on one thread: on more, each such op that torch splits wakes OpenMP's
    other threads, which then spin for a while before they sleep (libgomp's default wait
    policy) on the cores the tile threads need (docs/performance.md). Other rules compute on
    the loop's thread: :func:`compute_threads`."""
    if method.kind in ("elementwise", "columns", "selection") and tile_workers(device, cores):
        return 1
    return compute_threads(device, cores)


def _run(
    plan: MergePlan,
    inputs: Inputs,
    recipe: Recipe,
    sink: Callable[[Entry, int, torch.Tensor, _Running | None], None],
    progress: ProgressFn | None,
    chunk_size: str | int = DEFAULT_CHUNK,
    *,
    buffers: Buffers,
    streams: _Streams,
    into: Callable[[Entry, int, tuple[int, ...]], torch.Tensor | None] | None = None,
) -> float:
    """Drive the merge's pieces into ``sink(entry, first_row, rows, running)``, reporting
    progress; returns seconds taken. ``running``: the tiles still computing ``rows`` (which
    are then ``into``'s tensor), or None (see :func:`_pieces`): the sink waits for them before
    it reads the rows, and all of them are done when this returns or raises."""
    _return_freed_memory()
    method, options = get_method(recipe.method), recipe.method_options()
    device = resolve_device(recipe.device)
    total_bytes = sum(e.nbytes for e in plan.entries)
    start, done_bytes, done = time.perf_counter(), 0, 0
    setup = compiled.setup_seconds()

    def working() -> float:
        """Seconds of merging so far: not the kernels' one-off compiling or loading
        (:func:`dim3.compiled.setup_seconds`), which a projection from the share done (the
        ETA, the app's time budget) would take for a part of the merge's cost."""
        return time.perf_counter() - start - (compiled.setup_seconds() - setup)

    def on_step(key: str, step: int, steps: int) -> None:
        if progress is not None:
            elapsed = working()
            progress(
                Progress(
                    done, len(plan.entries), key, done_bytes, total_bytes, elapsed, step, steps
                )
            )

    threads = torch.get_num_threads()
    torch.set_num_threads(loop_threads(method, device))
    pieces = None
    try:
        pieces = _pieces(
            plan,
            inputs,
            method,
            options,
            device,
            chunk_size,
            on_step,
            buffers=buffers,
            streams=streams,
            into=into,
        )
        for entry, first_row, tensor, last, running in pieces:
            with streams.computing():
                sink(entry, first_row, tensor, running)
            done_bytes += (
                entry.nbytes
                * (tensor.shape[0] if entry.shape else 1)
                // max(1, entry.shape[0] if entry.shape else 1)
            )
            done += last
            if progress is not None:
                elapsed = working()
                progress(
                    Progress(done, len(plan.entries), entry.key, done_bytes, total_bytes, elapsed)
                )
    finally:
        if pieces is not None:
            pieces.close()  # returns once the tile threads' queued work is done (_Tiles.close)
        torch.set_num_threads(threads)
    return time.perf_counter() - start


class _Pipe:
    """Write merged rows on one thread, in order, with at most ``depth`` writes queued.

    :meth:`put` converts the rows into the output dtype in one of ``depth + 1`` reused buffers
    (for CUDA: on the compute stream, then copied to pinned host memory on the transfer stream,
    the write thread waiting for that copy), so writing overlaps computing the next slice and a
    buffer is reused only once its write is done. A failed write is raised at the next ``put`` or
    at ``drain``. ``where(key, start)``: the rows' offset in the output file, when the writer
    writes rows laid out in memory as in the file (the same address modulo
    :data:`dim3.writer.ALIGN`) from where they are (:class:`dim3.writer._StreamFile`): on the
    CPU the buffers' rows are placed so, and the merged bytes are not copied again to be
    written; a buffer is then reused once its rows are on disk. (A CUDA merge's pinned buffers
    are copied by the writer as before: that path is measured on a GPU, not here.)
    """

    def __init__(
        self,
        write: Callable[[str, int, torch.Tensor], None],
        buffers: Buffers,
        streams: _Streams,
        depth: int | None = None,
        where: Callable[[str, int], int] | None = None,
    ):
        # on the CPU a buffer waits for the disk (its rows are written from it): two more
        # than the two a CUDA merge's pinned buffers need, whose rows the writer copies
        cpu = not streams.cuda
        self._depth = depth if depth is not None else 4 if cpu else 2
        self._write, self._where = write, where if cpu else None
        self._buffers, self._streams = buffers, streams
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dim3-write")
        self._pending: list[Future] = []
        self._n = 0
        if streams.cuda:
            self._copied = [torch.cuda.Event() for _ in range(self._depth + 1)]

    def prepare(self, nbytes: int) -> None:
        """Size the CPU buffers for the merge's largest piece of ``nbytes`` now, once: a
        buffer that grew with the pieces would be mapped and zeroed again each time."""
        if not nbytes or not self._places(nbytes):
            return
        for slot in range(self._depth + 1):
            self._buffers.reserve(f"out{slot}", nbytes + ALIGN, torch.device("cpu"))

    def reserve(
        self, key: str, start: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The CPU buffer the next :meth:`put` (of rows ``start:`` of ``key``) will write
        from (None for CUDA): rows computed straight into it are put without a copy. Free: the
        write that last used it is done."""
        if self._streams.cuda:
            return None
        return self._host(self._n % (self._depth + 1), key, start, shape, dtype, False)

    def _places(self, nbytes: int) -> bool:
        """Whether rows of ``nbytes`` are placed at their file offset (a CPU merge whose
        buffers, with ALIGN bytes to spare, stay under the buffers' limit)."""
        limit = self._buffers.limit
        return self._where is not None and (limit is None or nbytes + ALIGN <= limit)

    def _host(
        self, slot: int, key: str, start: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool
    ) -> torch.Tensor:
        """Slot ``slot``'s CPU buffer for rows ``start:`` of ``key``, at an address equal to
        their file offset modulo ALIGN where the writer tells it (``where``) and that is a
        whole number of elements into the buffer."""
        cpu, nbytes = torch.device("cpu"), math.prod(shape) * dtype.itemsize
        if not self._places(nbytes):
            return self._buffers.take(f"out{slot}", shape, dtype, cpu, pin=pin)
        flat = self._buffers.take(f"out{slot}", (nbytes + ALIGN,), torch.uint8, cpu, pin=pin)
        skip = (self._where(key, start) - flat.data_ptr()) % ALIGN
        if skip % dtype.itemsize:
            skip = 0  # no element starts there: the writer copies these rows
        return flat[skip : skip + nbytes].view(dtype).view(shape)

    def put(
        self,
        key: str,
        start: int,
        rows: torch.Tensor,
        dtype: torch.dtype,
        stable: bool = False,
        running: _Running | None = None,
    ) -> None:
        """Queue rows for writing. ``stable``: ``rows`` never change (a copied tensor's rows, a
        read-only view of a mapped input that keeps its mapping alive): already in ``dtype`` on
        the CPU, they are written as they are, with no copy into a buffer. ``running``: the
        tiles still computing ``rows`` (in the buffer :meth:`reserve` gave): the write thread
        waits for them, and a tile's error is raised like a failed write's."""
        if stable and rows.dtype == dtype and rows.device.type == "cpu":
            self._pending.append(self._pool.submit(self._write_when, None, key, start, rows))
            while len(self._pending) > self._depth:
                self._pending.pop(0).result()
            return
        slot = self._n % (self._depth + 1)
        self._n += 1
        pin = self._streams.cuda
        if rows.device.type == "cuda":
            dev = self._buffers.take(f"out.device{slot}", rows.shape, dtype, rows.device)
            host = self._host(slot, key, start, tuple(rows.shape), dtype, True)
            # the previous copy from this slot is done: its write (below) waited for it
            dev.copy_(rows)  # on the compute stream
            transfer, copied = self._streams.transfer, self._copied[slot]
            transfer.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(transfer):
                host.copy_(dev, non_blocking=True)
                copied.record(transfer)
            # a step larger than the buffers keep (a matrix method's whole embedding) gets a
            # fresh ``dev``, freed as this returns: without this, the allocator could hand its
            # memory to the compute stream's next tensors while the copy still reads it
            dev.record_stream(transfer)
            ready: torch.cuda.Event | None = copied
        else:
            host = self._host(slot, key, start, tuple(rows.shape), dtype, pin)
            if not (rows.dtype == dtype and rows.data_ptr() == host.data_ptr()):
                if running is not None:
                    running.wait()
                    running = None
                host.copy_(rows)  # else the rows were computed in it (reserve)
            ready = running
        self._pending.append(self._pool.submit(self._write_when, ready, key, start, host))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def _write_when(self, ready, key: str, start: int, rows: torch.Tensor) -> None:
        if isinstance(ready, _Running):
            ready.wait()
        elif ready is not None:
            ready.synchronize()
        self._write(key, start, rows)

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def __enter__(self) -> _Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


def _written_bytes(step: _Step, dtypes: dict[str, torch.dtype]) -> int:
    """Bytes of the rows ``step`` hands to the write pipe's buffers (merged rows; copied ones
    are written from the mapped inputs)."""
    if step.stage not in ("whole", "apply") or step.source.action == "copy":
        return 0
    rows = (step.stop - step.start) if step.out.shape else 1
    return rows * math.prod(step.out.shape[1:]) * dtypes[step.out.key].itemsize


def _check_not_an_input(out_dir: Path, inputs: Inputs) -> None:
    for role, ckpt in inputs.roles().items():
        src = ckpt.path.resolve()
        if out_dir == src or out_dir.is_relative_to(src) or src.is_relative_to(out_dir):
            raise ValueError(
                f"output folder {out_dir} overlaps the {role} checkpoint {src}; inputs are never "
                "modified: choose another output folder"
            )


def _copy_side_files(src: Path, dst: Path, dtype: str) -> None:
    """Copy config, generation config, tokenizer, processor and chat template files."""
    for pattern in SIDE_FILE_PATTERNS:
        for file in sorted(src.glob(pattern)):
            if file.name not in SKIPPED_SIDE_FILES and file.is_file():
                shutil.copyfile(file, dst / file.name)
    if dtype != "auto":
        config_path = dst / "config.json"
        config = json.loads(config_path.read_text())
        for cfg in (config, config.get("text_config") or {}):
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = dtype
        config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def merge_to_folder(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    shard_size: str | int = "5GB",
    progress: ProgressFn | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    chunk_size: str | int = DEFAULT_CHUNK,
) -> MergeResult:
    """Merge ``recipe`` into a new Hugging Face checkpoint folder ``out_dir``.

    The folder is assembled beside ``out_dir`` and moved into place only when complete; an
    existing non-empty ``out_dir`` is refused unless ``overwrite``. ``progress`` hears the Hub
    downloads first (:func:`fetch_inputs`), then each tensor; if it raises, the merge stops and
    nothing is left behind.
    """
    out = Path(out_dir).expanduser().resolve()
    check_destination(out, overwrite)
    with open_inputs(
        recipe, allowed_roots=allowed_roots, token=token, progress=progress, output=out
    ) as inputs:
        _check_not_an_input(out, inputs)
        merge_plan = _plan(recipe, inputs)
        specs = [
            TensorSpec(e.key, output_dtype(e, recipe.dtype), e.shape) for e in merge_plan.entries
        ]
        dtypes = {s.name: s.dtype for s in specs}
        buffers = Buffers(_limit(merge_plan, parse_size(chunk_size)))
        device = resolve_device(recipe.device)
        streams = _Streams(device)
        with (
            ShardedWriter(out, specs, shard_size=shard_size, overwrite=overwrite) as writer,
            _Pipe(writer.write_rows, buffers, streams, where=writer.offset) as pipe,
        ):
            budget = parse_size(chunk_size)
            tiled = tile_workers(device) > 0
            method, extras = get_method(recipe.method), inputs.extras
            light = _light(
                method,
                recipe.method_options(),
                device,
                1 + merge_plan.multilingual,
                extras.count if extras is not None else 0,
            )
            steps = _schedule(merge_plan, method, budget, tiled, light)
            pipe.prepare(max((_written_bytes(s, dtypes) for s in steps), default=0))

            def sink(
                entry: Entry, first_row: int, rows: torch.Tensor, running: _Running | None
            ) -> None:
                stable = entry.action == "copy"  # iter_merged: copied rows are mapped views
                pipe.put(entry.key, first_row, rows, dtypes[entry.key], stable, running)

            def into(entry: Entry, first_row: int, shape: tuple[int, ...]) -> torch.Tensor | None:
                return pipe.reserve(entry.key, first_row, shape, dtypes[entry.key])

            seconds = _run(
                merge_plan,
                inputs,
                recipe,
                sink,
                progress,
                chunk_size,
                buffers=buffers,
                streams=streams,
                into=into,
            )
            pipe.drain()
            _copy_side_files(inputs.multimodal.path, writer.folder, recipe.dtype)
            resolved = inputs.resolved()
            write_recipe(writer.folder, recipe, resolved, final_dir=out, roots=allowed_roots)
            written = sorted(
                {str(d).removeprefix("torch.") for d in dtypes.values() if d.is_floating_point}
            )
            cards = {role: card_metadata(c.path) for role, c in inputs.roles().items()}
            card = model_card(
                recipe, merge_plan.summary(), resolved, dtype=", ".join(written), source_cards=cards
            )
            if allowed_roots is not None:  # a server's: its paths as the app shows them
                from dim3.paths import redact_paths

                card = redact_paths(card, allowed_roots)
            (writer.folder / "README.md").write_text(card)
    return MergeResult(merge_plan, out, seconds, buffers.allocations, writer.unstaged)


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's language tensors by canonical LLM name (state_dict tensors share storage)."""
    config = model.config.to_dict()
    state = model.state_dict()
    layout = layout_for(config, state.keys())
    by_canonical = {}
    for name, tensor in state.items():
        cls = layout.classify(name)
        if cls and cls[1]:
            by_canonical[cls[1]] = tensor
    return by_canonical


def merge_into_model(
    model: torch.nn.Module,
    recipe: Recipe,
    *,
    progress: ProgressFn | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    chunk_size: str | int = DEFAULT_CHUNK,
) -> MergeResult:
    """Merge ``recipe`` into ``model``, a loaded VLM of ``recipe.multimodal``, in place.

    Only language-model parameters change (in their own dtype and device); vision encoder and
    projector stay as loaded. ``progress`` hears the Hub downloads first (:func:`fetch_inputs`),
    then each tensor. If it raises, the merge stops and ``model`` is left partly merged: reload
    it before use.
    """
    targets = _model_tensors(model)
    with open_inputs(recipe, allowed_roots=allowed_roots, token=token, progress=progress) as inputs:
        merge_plan = _plan(recipe, inputs)
        layout = layout_for(inputs.multimodal.config, inputs.multimodal.keys())
        _check_model_fits(merge_plan, layout, targets)

        def target_rows(entry: Entry, first_row: int, n: int) -> torch.Tensor:
            target = targets[layout.classify(entry.key)[1]]
            return target[first_row : first_row + n]

        running_tiles: deque[_Running] = deque()

        @torch.no_grad()
        def sink(
            entry: Entry, first_row: int, rows: torch.Tensor, running: _Running | None
        ) -> None:
            if running is not None:  # computed in place (into): waited for a step later
                running_tiles.append(running)
                while len(running_tiles) > 1:
                    running_tiles.popleft().wait()
                return
            if entry.action == "merge":
                target = target_rows(entry, first_row, rows.shape[0])
                if target.data_ptr() != rows.data_ptr():  # else computed in place (into)
                    target.copy_(rows)

        def into(entry: Entry, first_row: int, shape: tuple[int, ...]) -> torch.Tensor | None:
            """The model's own rows, when the tiles can write the merge straight into them."""
            if entry.action != "merge":
                return None
            target = target_rows(entry, first_row, shape[0])
            fits = target.device.type == "cpu" and target.is_contiguous()
            return target if fits and tuple(target.shape) == tuple(shape) else None

        buffers = Buffers(_limit(merge_plan, parse_size(chunk_size)))
        streams = _Streams(resolve_device(recipe.device))
        seconds = _run(
            merge_plan,
            inputs,
            recipe,
            sink,
            progress,
            chunk_size,
            buffers=buffers,
            streams=streams,
            into=into,
        )
        while running_tiles:  # done (see _run), but a tile's error is raised here
            running_tiles.popleft().wait()
    return MergeResult(merge_plan, None, seconds, buffers.allocations)


def _check_model_fits(merge_plan: MergePlan, layout, targets: dict[str, torch.Tensor]) -> None:
    for entry in merge_plan.entries:
        if entry.action != "merge":
            continue
        canonical = layout.classify(entry.key)[1]
        target = targets.get(canonical)
        if target is not None and target.device.type == "meta":
            raise PlanError(
                f"{entry.key} of the loaded model is offloaded (on the meta device); merging in "
                "memory needs every language-model weight loaded: load without disk offload, "
                "or merge to a folder instead"
            )
        if target is None or tuple(target.shape) != tuple(entry.shape):
            got = None if target is None else tuple(target.shape)
            raise PlanError(
                f"the loaded model does not match the VLM checkpoint: {entry.key} is "
                f"{tuple(entry.shape)} on disk but {got} in the model; load the model from "
                "the recipe's multimodal checkpoint"
            )
