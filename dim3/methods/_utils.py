"""Shared pieces of the baseline merge rules: option checks, magnitude masks, sign election,
disjoint mean and DARE's seeded drop-and-rescale.

Everything here works on one tensor at a time, in float32, on whatever device the tensor is on,
except the DARE mask, which is always drawn on the CPU so that it is the same on every device. It
knows nothing about files, models or layouts. The pieces follow the papers' definitions:
TIES-merging (https://arxiv.org/abs/2306.01708), DARE (https://arxiv.org/abs/2311.03099) and
Model Breadcrumbs (https://arxiv.org/abs/2312.06795); ``prune``/``disjoint_merge`` mirror the
shape of peft's ``merge_utils``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dim3 import compiled
from dim3.slices import SORT_MAX, ExactSelect, FirstMask, magnitude_bits, select_by_sort


def _shown(value: object) -> str:
    """A refused value as a message shows it: a huge integer (``int(1e308)`` from a number
    field, 309 digits) in scientific notation (or by its count of digits), anything else by its ``repr`` cut to 40
    characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        try:
            return f"{float(value):.3g}"
        except OverflowError:
            return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def check_options(options: object, method: str) -> None:
    """Check every field of a frozen options dataclass against its metadata ``min``/``max``
    (or, for a field made by :func:`choice`, against its ``choices``).

    A field whose default is an ``int`` must be an int; any other numeric field accepts int or
    float. Raises ``ValueError`` naming the method, the option and the allowed range.
    """
    for f in dataclasses.fields(options):  # type: ignore[arg-type]
        value = getattr(options, f.name)
        choices = f.metadata.get("choices")
        if choices is not None:
            if value not in choices:
                raise ValueError(
                    f"{method} option {f.name} must be one of {', '.join(map(repr, choices))}, "
                    f"got {value!r}"
                )
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        integral = isinstance(f.default, int) and not isinstance(f.default, bool)
        kinds = (int,) if integral else (int, float)
        kind = "an integer" if integral else "a number"
        if not isinstance(value, kinds) or isinstance(value, bool) or value != value:
            raise ValueError(
                f"{method} option {f.name} must be {kind} in [{lo}, {hi}], got {_shown(value)}"
            )
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(
                f"{method} option {f.name} must lie in [{lo}, {hi}], got {_shown(value)}"
            )


_STEP_LISTENER: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "dim3_step_listener", default=None
)


def report_step(done: int, total: int) -> None:
    """Inside a rule: ``done`` of ``total`` inner steps of the current tensor are finished (WUDI's
    Adam steps; the SVDs of TSV, Iso-CTS and OptMerge). A no-op unless someone listens through
    :func:`listen_steps`; the listener may raise to stop the rule (a cancelled merge)."""
    listener = _STEP_LISTENER.get()
    if listener is not None:
        listener(done, total)


@contextmanager
def listen_steps(listener: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``listener(done, total)`` for every :func:`report_step` of rules run in this context
    (this thread, or a generator resumed from it)."""
    token = _STEP_LISTENER.set(listener)
    try:
        yield
    finally:
        _STEP_LISTENER.reset(token)


_BUFFERS: ContextVar[Any] = ContextVar("dim3_buffers", default=None)


@contextmanager
def reuse_buffers(buffers: Any) -> Iterator[None]:
    """Rules run in this context take their slice-sized temporaries (:func:`scratch`) from
    ``buffers`` (the engine's :class:`dim3.slices.Buffers`), the same memory slice after slice,
    instead of new tensors. What a rule returns may then live in one of them: the caller uses it
    before the next rule call."""
    token = _BUFFERS.set(buffers)
    try:
        yield
    finally:
        _BUFFERS.reset(token)


def current_buffers() -> Any:
    """The buffers of the :func:`reuse_buffers` context this runs in (None outside one)."""
    return _BUFFERS.get()


def scratch(
    name: str, shape: Sequence[int] | torch.Size, like: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """An uninitialised buffer of ``shape`` on ``like``'s device (``dtype``, default ``like``'s)
    for a rule's temporary ``name``: the engine's reused one inside :func:`reuse_buffers`, a new
    tensor otherwise. Names are per call site: two buffers alive at once need two names."""
    dtype = dtype or like.dtype
    buffers = _BUFFERS.get()
    if buffers is None:
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)
    return buffers.take(f"rule.{name}", tuple(shape), dtype, like.device)


def scratch_kept(
    name: str,
    key: object,
    shape: Sequence[int] | torch.Size,
    like: Tensor,
    fill: Callable[[Tensor, Any], Any],
) -> Tensor:
    """:func:`scratch` filled by ``fill(buffer, held)``; inside the engine's loop the buffer keeps
    what it was filled with for ``key``, and a later call with the same key (and shape) passes
    ``fill`` what the last fill returned, to go on from there
    (:meth:`dim3.slices.Buffers.kept`). Outside it, a new tensor, ``fill(tensor, None)``."""
    buffers = _BUFFERS.get()
    if buffers is None:
        t = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
        fill(t, None)
        return t
    return buffers.kept(f"rule.{name}", key, tuple(shape), like.dtype, like.device, fill)


def scratch_like(name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`scratch` shaped like ``t``, laid out like it (a transposed matrix gets a transposed
    buffer, so elementwise work on the two walks memory in the same order)."""
    if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
        return scratch(name, t.T.shape, t, dtype).T
    return scratch(name, t.shape, t, dtype)


def number(default: float, help: str, lo: float, hi: float) -> dataclasses.Field:
    """A dataclass field with the registry's metadata (help, min, max)."""
    return dataclasses.field(default=default, metadata={"help": help, "min": lo, "max": hi})


def choice(default: str, help: str, choices: Sequence[str]) -> dataclasses.Field:
    """A dataclass field that takes one of a few names, with the registry's metadata (help,
    choices); the CLI takes it as ``--option KEY=NAME``, the app as a menu."""
    assert default in choices
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


def svd_choice(method: str) -> dataclasses.Field:
    """The ``svd`` option of the rules that keep a top share of singular directions."""
    return choice(
        "exact",
        f"How {method} finds each update's top singular directions: 'exact' (the rule as "
        "published, the same on every device) or 'randomized' (a fixed-seed sketch with 2 power "
        "iterations, faster on a CPU when the kept share is at most a quarter of the rank, but it "
        "approximates the directions and so changes the merged update; see docs/methods.md).",
        ("exact", "randomized"),
    )


OUTER_CHOICES = ("rule", "linear")


def outer_choice() -> dataclasses.Field:
    """The ``outer_tensors`` option of the DiM3 paper's baselines (NeuroMerging, STF)."""
    return choice(
        "rule",
        "Token embeddings, LM head and final norm: 'rule' merges them with this rule like every "
        "other tensor (all methods then merge the same tensors); 'linear' as the DiM3 reference "
        "code does: base + multimodal_weight · τ_VLM + multilingual_weight · Σ τ_multilingual.",
        OUTER_CHOICES,
    )


def is_outer_tensor(name: str) -> bool:
    """Is ``name`` (a merged tensor's key) one of the language model's outer tensors, which the
    DiM3 reference code merges linearly: the token embeddings, the LM head or the final norm
    (a ``norm.weight`` outside the decoder layers)?"""
    parts = name.split(".")
    if "layers" in parts:
        return False
    return name.endswith(("embed_tokens.weight", "lm_head.weight")) or parts[-2:] == [
        "norm",
        "weight",
    ]


def weighted_sum(
    base: Tensor, tuned: Sequence[Tensor], multimodal: float, multilingual: float
) -> Tensor:
    """``base + w_mm τ_multimodal + w_ml Σ_k τ_multilingual_k`` (engine order) as float32."""
    out = base.clone()
    for w, t in zip(model_weights(tuned, multimodal, multilingual), tuned, strict=True):
        out.add_(t - base, alpha=w)
    return out


def model_weights(tuned: Sequence[Tensor], multimodal: float, multilingual: float) -> list[float]:
    """Per-update weights for the engine's order ``[multimodal, multilingual_1, ...]``: the
    multimodal weight, then the multilingual weight for each multilingual model (experts alike)."""
    if not tuned:
        raise ValueError("a merge needs at least one tuned tensor")
    return [multimodal] + [multilingual] * (len(tuned) - 1)


def deltas(base: Tensor, tuned: Sequence[Tensor]) -> Tensor:
    """Task vectors ``Δ_t = tuned_t − base``, written into one buffer (no temporaries): a new
    one, or the engine's reused one inside :func:`reuse_buffers`.

    T × base.shape -> (T, *base.shape). The rules then work in place on this buffer, so a merge
    holds the inputs plus about T + 1 tensors.
    """
    out = scratch("deltas", (len(tuned), *base.shape), base)
    for i, t in enumerate(tuned):
        torch.sub(t, base, out=out[i])
    return out


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` entries a fraction keeps: round half up, at least 1 when fraction > 0."""
    if fraction <= 0.0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def first_by_magnitude(mag: Tensor, k: int) -> Tensor:
    """The ``k`` smallest entries of ``mag`` (flat magnitudes), ties going to the lower index:
    exactly the first ``k`` of a stable ascending sort, found by selection (``kthvalue``, about
    ten times faster than sorting on a CPU) instead of sorting.

    mag (Tensor of shape (n,)) -> bool mask (n,).
    """
    n = mag.numel()
    if k <= 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(mag, dtype=torch.bool)
    kth = torch.kthvalue(mag, k).values  # the k-th smallest magnitude
    mask = mag < kth
    need = k - int(torch.count_nonzero(mask))  # entries equal to kth still among the first k
    tied = torch.nonzero(mag == kth).reshape(-1)[:need]  # their positions, ascending
    mask[tied] = True
    return mask


def band_mask(delta: Tensor, drop_small: int, drop_large: int) -> Tensor:
    """Keep all but the ``drop_small`` smallest and ``drop_large`` largest magnitudes (order as
    in a stable ascending sort of ``|delta|``: on equal magnitudes the lower index is smaller).

    delta (any shape) -> bool mask of the same shape.
    """
    mag = delta.abs().reshape(-1)  # (n,)
    keep = first_by_magnitude(mag, mag.numel() - drop_large)
    keep &= ~first_by_magnitude(mag, drop_small)
    return keep.reshape(delta.shape)


def trim_mask(delta: Tensor, density: float) -> Tensor:
    """TIES trim: keep the ``keep_count(density, n)`` largest magnitudes of one task vector.

    delta (any shape) -> bool mask of the same shape.
    """
    n = delta.numel()
    return band_mask(delta, n - keep_count(density, n), 0)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest magnitudes and then as many of the smallest
    as needed to leave ``density`` of the entries (fewer large ones when gamma > 1 − density).

    delta (any shape) -> bool mask of the same shape.
    """
    n = delta.numel()
    keep = keep_count(density, n)  # = n when density is 1
    drop_large = min(math.floor(gamma * n + 0.5), n - keep)
    return band_mask(delta, n - keep - drop_large, drop_large)


@dataclass(frozen=True)
class SelectionParts:
    """A rule that keeps, per update, entries chosen by their rank in ``|Δ|`` over the whole
    tensor (TIES' trim, Breadcrumbs' band), in three pieces the engine can also drive slice by
    slice:

    - ``ks(options, n) -> tuple[int, ...]``: the ranks it needs; for each k, ``first_k`` marks the
      k smallest magnitudes (ties to the lower flat index, as :func:`first_by_magnitude`);
    - ``keep(firsts) -> Tensor``: the kept entries from those ``first_k`` masks (it may work in
      place on them, and the caller may overwrite what it returns: they are the engine's reused
      buffers), with bitwise operations only: the masks are bool tensors, or int32 words
      (-1 for true, 0 for false) that the engine's tiles AND into float32 bit patterns;
    - ``combine(masked, options) -> Tensor``: the merged update from the masked deltas (T, ...),
      elementwise across models.
    """

    ks: Callable[[Any, int], tuple[int, ...]]
    keep: Callable[[list[Tensor]], Tensor]
    combine: Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class RankParts:
    """A rule whose weights need, per update, order statistics of values derived from the whole
    tensor, found stage after stage (PCB: the clip bounds of ``|τ_i|``, then the drop threshold
    of its balance score, which depends on those bounds). Pieces the engine can also drive slice
    by slice, two exact selection passes per stage:

    - ``stages``: how many stages;
    - ``indexes(options, n) -> tuple[tuple[int, ...], ...]``: per stage, the 0-based positions in
      the ascending order of that stage's values (over the n entries of one update) it needs;
    - ``values(stage, tau, found, options) -> Tensor``: the stage's values (T, r) for the flat
      updates ``tau`` (T, r) of any slice, given ``found`` of the earlier stages;
    - ``apply(tau, found, options) -> Tensor``: the merged update (r,) of the slice.

    ``found[s]`` (T, len(indexes[s]) + 1) holds stage s's order statistics, then the maximum.
    """

    stages: int
    indexes: Callable[[Any, int], tuple[tuple[int, ...], ...]]
    values: Callable[[int, Tensor, list[Tensor], Any], Tensor]
    apply: Callable[[Tensor, list[Tensor], Any], Tensor]


def rank_indexes(parts: RankParts, options: Any, n: int) -> tuple[tuple[int, ...], ...]:
    """``parts.indexes`` clamped to the entries that exist, ``[0, n − 1]``."""
    top = max(0, n - 1)
    return tuple(tuple(min(max(i, 0), top) for i in stage) for stage in parts.indexes(options, n))


def ranked_merge(base: Tensor, tuned: Sequence[Tensor], options: Any, parts: RankParts) -> Tensor:
    """A whole tensor through a :class:`RankParts` rule: ``base + apply(τ, found)``, the order
    statistics found by ``kthvalue`` over each update's entries."""
    tau = deltas(base, tuned).reshape(len(tuned), -1)  # (T, n)
    indexes = rank_indexes(parts, options, tau.shape[1])
    found: list[Tensor] = []
    for stage in range(parts.stages):
        values = parts.values(stage, tau, found, options)
        stats = [torch.kthvalue(values, i + 1, dim=1, keepdim=True).values for i in indexes[stage]]
        stats.append(values.max(dim=1, keepdim=True).values)
        found.append(torch.cat(stats, dim=1))
        del values
    return parts.apply(tau, found, options).reshape(base.shape).add_(base)


def selection_merge(base: Tensor, tuned: Sequence[Tensor], options: Any, parts: SelectionParts):
    """A whole tensor through a :class:`SelectionParts` rule: ``base + combine(mask_t ⊙ Δ_t)``.

    The ranks are found as the engine finds them over slices (:class:`dim3.slices.ExactSelect`,
    two histogram passes over the magnitudes' bits; the same masks as
    :func:`first_by_magnitude`), here over the whole tensor at once, with every slice-sized
    temporary a :func:`scratch` buffer: inside the engine no tensor is allocated per call (a
    sort or ``kthvalue`` would copy the tensor each time)."""
    d = deltas(base, tuned)  # (T, *shape), masked in place below
    n = base.numel()
    ks = parts.ks(options, n)
    buffers = _BUFFERS.get()  # the engine's sliced selection uses the same names: never at once
    mag = (
        buffers.take("select.magnitude", (n,), torch.float32, base.device)
        if buffers is not None
        else torch.empty(n, dtype=torch.float32, device=base.device)
    )
    for x in d:
        bits = magnitude_bits(x, out=mag)
        if n <= SORT_MAX:  # a vector: a sort, not two 2**16-bin passes (the same numbers)
            found = select_by_sort(bits, ks)
        else:
            select = ExactSelect(ks, n, x.device, buffers)
            for _ in range(2):
                select.observe(bits)
                select.next_pass()
            found = select.result()
        firsts = [
            FirstMask(k, n, f, buffers, f"select.first{j}")
            for j, (k, f) in enumerate(zip(ks, found, strict=True))
        ]
        keep = parts.keep([first(bits) for first in firsts])
        x.masked_fill_(keep.logical_not_().reshape(x.shape), 0.0)
    return parts.combine(d, options).add_(base)


def sum_models(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Σ over the first (model) dimension: x (T, ...) -> (...), into ``out`` when given.

    Two models, the usual case, are one ``add``: on a CPU the reduction kernel over a leading
    dimension of 2 is some 2.5x slower than adding the two halves, and gives the same values
    (one rounding either way; at most the sign of a zero differs, which no rule here reads).
    """
    if x.dim() > 1 and x.shape[0] == 2:
        return torch.add(x[0], x[1], out=out) if out is not None else torch.add(x[0], x[1])
    return torch.sum(x, dim=0, out=out) if out is not None else torch.sum(x, dim=0)


def disjoint_mean_(masked: Tensor) -> Tensor:
    """TIES disjoint merge: mean of the non-zero updates that agree with the elected sign (the
    sign of the summed trimmed updates, i.e. the sign holding more total magnitude; a zero sum
    elects +); 0 where none agrees. Multiplies the disagreeing entries of
    ``masked`` by 0 in place; its temporaries are :func:`scratch` buffers.

    masked (T, ...) -> (...).

    Float arithmetic only (no bool masks: on a CPU, comparisons into bool tensors and
    ``masked_fill_`` are several times slower than float32 passes): the elected sign is
    sign(sign(Σ) + ½), +1 where the sum is ≥ 0 (−0 included), −1 below; an update agrees where
    sign(update · elected) is 1, so clamping that sign at 0 gives 1 for it and 0 for the others
    (zeros too). Multiplying by it keeps an agreeing update exactly and makes the others 0 (a
    NaN or infinite update either agrees or makes the sum NaN, so no ∞ · 0 is ever kept).
    """
    shape = masked.shape[1:]
    total = sum_models(masked, scratch("ties.sum", shape, masked))  # (...)
    elected = torch.sign(total, out=scratch("ties.elected", shape, masked)).add_(0.5).sign_()
    agree = torch.mul(masked, elected, out=scratch("ties.agree", masked.shape, masked))
    agree.sign_().clamp_(min=0.0)  # 1.0 where the update agrees, 0.0 elsewhere
    count = sum_models(agree, elected).clamp_(min=1)  # (...)
    return sum_models(masked.mul_(agree), total).div_(count)


def dare_seed(seed: int, name: str, index: int) -> int:
    """A stable 63-bit generator seed from (options seed, tensor name, tuned index).

    Stable across processes, platforms and devices (unlike ``hash()``), and independent of the
    order in which tensors are merged.
    """
    key = f"dim3-dare\0{seed}\0{index}\0{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


DARE_BLOCK = 2**20  # elements per random block of a DARE mask (rows of whole rows)


def dare_keep_mask(
    shape: torch.Size, drop_rate: float, seed: int, name: str, index: int, offset: int = 0
) -> Tensor:
    """DARE's Bernoulli keep mask (keep with probability 1 − p), drawn on the CPU.

    ``shape`` is a slice of rows ``offset:offset + shape[0]`` of the tensor (the whole tensor when
    ``offset`` is 0 and the shape is complete). The mask is drawn in fixed blocks of whole rows,
    each from its own generator seeded by (seed, name, index, block): an entry is kept where its
    uniform number in [0, 1) is at least p (as float32), so any slicing of the tensor gives the
    same mask as the whole. Returns a bool CPU tensor of ``shape``.
    """
    if len(shape) == 0:
        gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, f"{name}\0b0", index))
        return torch.rand((), generator=gen) >= drop_rate
    return _dare_keep_bits(shape, drop_rate, seed, name, index, offset) != 0


def _dare_keep_bits(
    shape: Sequence[int], drop_rate: float, seed: int, name: str, index: int, offset: int = 0
) -> Tensor:
    """:func:`dare_keep_mask` (of a tensor of at least one dimension) as int32 words: −1 (every
    bit set) where kept, 0 where dropped, to AND with float32 bit patterns: one integer pass
    over the entries, several times faster on a CPU than bool masks (``masked_fill_``,
    comparisons).
    May be a view of a kept buffer: use it before the next call for the same ``index``."""
    rows, row_shape = shape[0], tuple(shape[1:])
    per_row = max(1, math.prod(row_shape))
    block = max(1, DARE_BLOCK // per_row)  # rows per block
    cpu = torch.empty(0, dtype=torch.int32)
    # kept ⟺ r ≥ p ⟺ bits(r) ≥ bits(p) (non-negative float32s order as their bit patterns)
    # ⟺ bits(p) − 1 − bits(r) < 0: its sign bit, shifted over the word, is the mask
    p_bits = int(torch.tensor(drop_rate, dtype=torch.float32).view(torch.int32))
    blocks = range(offset // block, -(-(offset + rows) // block)) if rows else range(0)
    if not blocks:
        return torch.full(tuple(shape), -1, dtype=torch.int32)
    mask = None
    if len(blocks) > 1:
        mask = scratch(f"dare.keep{index}.rows", tuple(shape), cpu)  # apart from the others
    done = 0
    for b in blocks:
        lo, hi = max(offset, b * block) - b * block, min(offset + rows, (b + 1) * block) - b * block

        def draw(part: Tensor, held: Any, b: int = b, upto: int = hi) -> Any:
            # the block's rows [0, upto) drawn: its generator's stream goes on where the last
            # tile left it (torch.rand takes one 32-bit number per float32, in order), so a
            # block is drawn once, up to the rows asked for, not whole (a tensor's last block
            # is often short) nor again for each tile of rows inside it
            # (dim3.compiled.DareDraws: the same numbers, compiled, where numba runs)
            if held is None:
                seed_b = dare_seed(seed, f"{name}\0b{b}", index)
                gen = (
                    compiled.DareDraws(seed_b)
                    if compiled.available()
                    else torch.Generator(device="cpu").manual_seed(seed_b)
                )
                held = (gen, [0])
            gen, drawn = held
            if drawn[0] < upto:
                new = part[drawn[0] : upto]
                if isinstance(gen, compiled.DareDraws):
                    gen.words(drop_rate, new)
                else:
                    torch.rand(new.shape, generator=gen, out=new.view(torch.float32))
                    torch.sub(p_bits - 1, new, out=new).bitwise_right_shift_(31)
                drawn[0] = upto
            return held

        # kept per model: a tile masks every model
        key = (seed, name, index, b, p_bits)
        part = scratch_kept(f"dare.keep{index}", key, (block, *row_shape), cpu, draw)
        if mask is None:
            return part[lo:hi]
        mask[done : done + hi - lo] = part[lo:hi]
        done += hi - lo
    return mask


def dare_(
    delta: Tensor, drop_rate: float, seed: int, name: str, index: int, offset: int = 0
) -> Tensor:
    """DARE drop-and-rescale of one task vector, in place: zero a random fraction ``p`` of its
    entries and scale the rest by ``1 / (1 − p)``. delta (rows ``offset:`` of a tensor) -> delta."""
    if drop_rate == 0.0:
        return delta
    if delta.dim() == 0 or delta.device.type != "cpu" or delta.dtype != torch.float32:
        keep = dare_keep_mask(delta.shape, drop_rate, seed, name, index, offset).to(delta.device)
        dropped = torch.logical_not(keep, out=keep)  # keep is ours: a new or a scratch mask
        return delta.masked_fill_(dropped, 0.0).div_(1.0 - drop_rate)
    keep = _dare_keep_bits(delta.shape, drop_rate, seed, name, index, offset)
    delta.view(torch.int32).bitwise_and_(keep)  # dropped entries: every bit 0, i.e. +0.0
    return delta.div_(1.0 - drop_rate)


def dare(
    delta: Tensor, drop_rate: float, seed: int, name: str, index: int, offset: int = 0
) -> Tensor:
    """:func:`dare_` on a copy of ``delta``."""
    return dare_(delta.clone(), drop_rate, seed, name, index, offset)
