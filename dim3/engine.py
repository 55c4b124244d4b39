"""The merge engine: one streaming loop from checkpoints, through a rule, to a writer or a model.

:func:`iter_merged` is the only loop that moves tensors: for each planned tensor it reads the base,
multilingual and VLM tensors (the next entry's tensors are prefetched on a thread while the current one is
computed), applies the method on the chosen device in float32, and yields the result. Its two
consumers are :func:`merge_to_folder` (a sharded safetensors checkpoint with configs, tokenizer,
processor, model card and recipe, moved into place only when complete) and
:func:`merge_into_model` (an already loaded VLM, updated in place, so the app can chat with the
result without writing it to disk). Peak memory is a few tensors, whatever the model's size.
The engine knows no tokenization and no UI; progress goes to an optional callback.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from dim3.checkpoints import Checkpoint
from dim3.layout import layout_for
from dim3.methods import Method, get_method
from dim3.plan import Entry, MergePlan, PlanError, build_plan
from dim3.recipe import (
    RECIPE_FILE,
    Recipe,
    Source,
    model_card,
    multilingual_labels,
    write_recipe,
)
from dim3.writer import ShardedWriter, TensorSpec, check_destination

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Progress:
    """One step of a merge: ``done`` of ``total`` tensors, the last one ``key``."""

    done: int
    total: int
    key: str
    bytes_done: int
    bytes_total: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the bytes done so far (None before the first)."""
        if self.bytes_done <= 0:
            return None
        return self.elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: its plan, its output folder (None for in-memory) and its wall time."""

    plan: MergePlan
    out_dir: Path | None
    seconds: float


class Inputs:
    """The opened checkpoints of a recipe; a context manager that closes them.

    ``multilingual`` is a tuple of one or more checkpoints, in the recipe's order.
    """

    def __init__(
        self, base: Checkpoint, multilingual: Sequence[Checkpoint], multimodal: Checkpoint
    ):
        self.base, self.multilingual, self.multimodal = base, tuple(multilingual), multimodal

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


def open_inputs(
    recipe: Recipe,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> Inputs:
    """Resolve and open the recipe's checkpoints (downloading Hub ids as needed).

    If one fails to open, those already opened are closed before the error propagates.
    """
    opened: list[Checkpoint] = []

    def one(source: Source) -> Checkpoint:
        ckpt = Checkpoint.open(
            source.ref, source.revision, allowed_roots=allowed_roots, token=token
        )
        opened.append(ckpt)
        return ckpt

    try:
        base = one(recipe.base)
        mls = [one(s) for s in recipe.multilingual]
        return Inputs(base, mls, one(recipe.multimodal))
    except BaseException:
        for ckpt in opened:
            ckpt.close()
        raise


def plan(recipe: Recipe, **kwargs: Any) -> MergePlan:
    """Check a recipe and return its plan, writing nothing. ``kwargs`` go to :func:`open_inputs`."""
    with open_inputs(recipe, **kwargs) as inputs:
        return build_plan(inputs.base, inputs.multilingual, inputs.multimodal)


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
    if dtype == "auto" or not entry.dtype.is_floating_point:
        return entry.dtype
    return DTYPES[dtype]


def _read(entry: Entry, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The CPU tensors one entry needs: (vlm,) to copy, (vlm, base, *multilingual) to merge."""
    if entry.action == "copy" or entry.tied_to:
        return (inputs.multimodal.get(entry.key),) if entry.action == "copy" else ()
    return (
        inputs.multimodal.get(entry.key),
        inputs.base.get(entry.base_key),
        *(ml.get(k) for ml, k in zip(inputs.multilingual, entry.multilingual_keys, strict=True)),
    )


def _apply(
    entry: Entry,
    tensors: tuple[torch.Tensor, ...],
    method: Method,
    options: Any,
    device: torch.device,
) -> torch.Tensor:
    """Merge one entry's tensors on ``device`` in float32; returns the full VLM-shaped tensor."""
    vlm, base, *mls = (t.to(device).float() for t in tensors)
    rows = entry.rows if entry.rows is not None else vlm.shape[0]
    part = [t[:rows] for t in (base, vlm, *mls)]  # shared token rows only
    if entry.transpose:
        part = [t.T for t in part]  # (hidden, vocab): columns are tokens
    merged = method.fn(part[0], part[1:], options, name=entry.key)
    if entry.transpose:
        merged = merged.T
    if rows == vlm.shape[0]:
        return merged
    vlm[:rows] = merged  # rows only the VLM's tokenizer has stay the VLM's
    return vlm


def iter_merged(
    plan: MergePlan,
    inputs: Inputs,
    method: Method,
    options: Any,
    device: torch.device,
) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Yield ``(entry, tensor)`` for every planned tensor, in plan order.

    Copied tensors come back exactly as stored (CPU, their dtype); merged ones as float32 on
    ``device``. Reads of the next entry overlap the current computation (one prefetch thread).
    """
    tied: dict[str, torch.Tensor] = {}
    tied_sources = {e.tied_to for e in plan.entries if e.tied_to}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dim3-read") as pool:
        pending: Future | None = None
        for i, entry in enumerate(plan.entries):
            tensors = pending.result() if pending else _read(entry, inputs)
            nxt = plan.entries[i + 1] if i + 1 < len(plan.entries) else None
            pending = pool.submit(_read, nxt, inputs) if nxt else None
            if entry.action == "copy":
                yield entry, tensors[0]
            elif entry.tied_to:
                yield entry, tied[entry.tied_to]
            else:
                out = _apply(entry, tensors, method, options, device)
                if entry.key in tied_sources:
                    tied[entry.key] = out
                yield entry, out


def _run(
    plan: MergePlan,
    inputs: Inputs,
    recipe: Recipe,
    sink: Callable[[Entry, torch.Tensor], None],
    progress: ProgressFn | None,
) -> float:
    """Drive :func:`iter_merged` into ``sink``, reporting progress; returns seconds taken."""
    method, options = get_method(recipe.method), recipe.method_options()
    device = resolve_device(recipe.device)
    total_bytes = sum(e.nbytes for e in plan.entries)
    start, done_bytes = time.perf_counter(), 0
    for i, (entry, tensor) in enumerate(iter_merged(plan, inputs, method, options, device)):
        sink(entry, tensor)
        done_bytes += entry.nbytes
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(
                Progress(i + 1, len(plan.entries), entry.key, done_bytes, total_bytes, elapsed)
            )
    return time.perf_counter() - start


class _Pipe:
    """Run ``write(key, tensor)`` calls in order on one thread, at most ``depth`` queued.

    Writing the previous tensor then overlaps computing the next; a failed write is raised at
    the next ``put`` or at ``drain``.
    """

    def __init__(self, write: Callable[[str, torch.Tensor], None], depth: int = 2):
        self._write, self._depth = write, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dim3-write")
        self._pending: list[Future] = []

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self._pending.append(self._pool.submit(self._write, key, tensor))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def __enter__(self) -> _Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


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
) -> MergeResult:
    """Merge ``recipe`` into a new Hugging Face checkpoint folder ``out_dir``.

    The folder is assembled beside ``out_dir`` and moved into place only when complete; an
    existing non-empty ``out_dir`` is refused unless ``overwrite``. If ``progress`` raises, the
    merge stops and nothing is left behind.
    """
    out = Path(out_dir).expanduser().resolve()
    check_destination(out, overwrite)
    with open_inputs(recipe, allowed_roots=allowed_roots, token=token) as inputs:
        _check_not_an_input(out, inputs)
        merge_plan = build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        specs = [
            TensorSpec(e.key, output_dtype(e, recipe.dtype), e.shape) for e in merge_plan.entries
        ]
        dtypes = {s.name: s.dtype for s in specs}
        with (
            ShardedWriter(out, specs, shard_size=shard_size, overwrite=overwrite) as writer,
            _Pipe(writer.write) as pipe,
        ):

            def sink(entry: Entry, tensor: torch.Tensor) -> None:
                pipe.put(entry.key, tensor.to(dtypes[entry.key]))

            seconds = _run(merge_plan, inputs, recipe, sink, progress)
            pipe.drain()
            _copy_side_files(inputs.multimodal.path, writer.folder, recipe.dtype)
            resolved = inputs.resolved()
            write_recipe(writer.folder, recipe, resolved)
            card = model_card(recipe, merge_plan.summary(), resolved)
            (writer.folder / "README.md").write_text(card)
    return MergeResult(merge_plan, out, seconds)


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
) -> MergeResult:
    """Merge ``recipe`` into ``model``, a loaded VLM of ``recipe.multimodal``, in place.

    Only language-model parameters change (in their own dtype and device); vision encoder and
    projector stay as loaded. If ``progress`` raises, the merge stops and ``model`` is left
    partly merged: reload it before use.
    """
    targets = _model_tensors(model)
    with open_inputs(recipe, allowed_roots=allowed_roots, token=token) as inputs:
        merge_plan = build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        layout = layout_for(inputs.multimodal.config, inputs.multimodal.keys())
        _check_model_fits(merge_plan, layout, targets)

        @torch.no_grad()
        def sink(entry: Entry, tensor: torch.Tensor) -> None:
            if entry.action == "merge":
                targets[layout.classify(entry.key)[1]].copy_(tensor)

        seconds = _run(merge_plan, inputs, recipe, sink, progress)
    return MergeResult(merge_plan, None, seconds)


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
