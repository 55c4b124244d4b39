"""PCB merging (Parameter Competition Balancing).

Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2410.02396, as its reference code (``pcb-merging.py``, ``PCB_merge``)
computes it, per tensor here instead of over the flattened model (as TIES is here). With N updates
``τ_i = tuned_i − base`` flattened to d entries:

1. Clip outliers: ``|τ_i|`` is clamped to its own order statistics at positions
   ``⌊d · 1e-4⌋`` and ``⌊d (1 − 1e-4) − 1⌋`` of the sorted magnitudes (the code's 0.01 %).
2. Intra-balancing: ``exp(N · norm(|τ_i|)²)``, with ``norm`` the min-max scaling over τ_i's
   entries (the paper's ``Softmax(N · Norm(τ_i ⊙ τ_i))``, whose denominator cancels in step 4).
3. Inter-balancing: ``tanh(τ_i ⊙ Σ_j τ_j)``, how much entry-wise τ_i agrees with all updates.
4. Balance ``β_i = intra ⊙ inter``. Drop: per model, ``β_i`` is clamped below at its order
   statistic at position ``⌊d (1 − ratio)⌋`` and min-max scaled, so the ``ratio`` share of entries
   with the highest balance get weights in (0, 1] and the rest 0.
5. Rescale: ``merged = base + λ · Σ_i β̂_i ⊙ clip(τ_i) / Σ_i β̂_i`` (0 where every β̂_i is 0).

Options: ``ratio`` (r, the share kept; the code's default 0.1) and ``scaling`` (λ; the paper
searches λ per model on validation data with an evolution strategy, none is available here, so
one λ, default 1). Guards where the code divides 0/0 (NaN): a constant ``|τ_i|`` gets intra-balance
``exp(0) = 1``; when the kept entries' balance all equal the threshold (ties, e.g. a constant or
tiny update) those entries get weight 1 if their balance is positive, else 0, so an all-zero
update takes no part. PCB never reduces to
``base + λ τ``: with N = 1 it keeps the one update's top-``ratio`` entries by balance.

Its structure is that of a selection: everything is elementwise across the models except
four per-tensor, per-model order statistics, found in two stages: the two clip bounds of
``|τ_i|`` (which are also the min and max of step 2's scaling), then the ``(1 − ratio)`` order
statistic and the maximum of ``β_i``, which depends on the first two. Registered as kind
"ranked" (:class:`dim3.methods._utils.RankParts`): a tensor larger than the engine's chunk is
read in row slices, twice per stage for exact radix selections, then merged slice by slice; a
smaller one goes through ``kthvalue`` whole. Both give the same numbers. Any shape (1-D tensors
included) is merged the same way. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._utils import RankParts, check_options, number, ranked_merge

NAME = "pcb"
CLIP = 1e-4  # the reference code's outlier share clipped at each end of |τ_i|


@dataclass(frozen=True)
class PcbOptions:
    """Options of PCB merging."""

    ratio: float = number(
        0.1, "r: share of each update's entries kept, those with the highest balance.", 0.01, 1.0
    )
    scaling: float = number(1.0, "λ: scale of the merged update.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, NAME)


def minmax_(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``(x − lo) / (hi − lo)`` per row, in place; 0 where ``hi == lo`` (instead of 0/0)."""
    span = hi - lo
    return x.sub_(lo).div_(torch.where(span > 0, span, 1.0)).mul_(span > 0)


def _indexes(options: PcbOptions, n: int) -> tuple[tuple[int, ...], ...]:
    """Stage 0: the clip bounds of |τ_i|; stage 1: the drop threshold of the balance β_i."""
    return ((int(n * CLIP), int(n * (1 - CLIP) - 1)), (int(n * (1 - options.ratio)),))


def _clipped_magnitude(tau: Tensor, found: list[Tensor]) -> Tensor:
    lo, hi = found[0][:, 0:1], found[0][:, 1:2]
    return torch.minimum(tau.abs().clamp_(min=lo), hi)


def _balance(tau: Tensor, found: list[Tensor]) -> Tensor:
    """β_i = exp(N · minmax(clip|τ_i|)²) · tanh(τ_i ⊙ Σ_j τ_j), (T, r); −0 made +0."""
    lo, hi = found[0][:, 0:1], found[0][:, 1:2]
    balance = minmax_(_clipped_magnitude(tau, found), lo, hi).square_().mul_(tau.shape[0]).exp_()
    return balance.mul_(torch.tanh(tau * tau.sum(dim=0, keepdim=True))).add_(0.0)


def _values(stage: int, tau: Tensor, found: list[Tensor], options: PcbOptions) -> Tensor:
    return tau.abs() if stage == 0 else _balance(tau, found)


def _apply(tau: Tensor, found: list[Tensor], options: PcbOptions) -> Tensor:
    """``λ Σ_i β̂_i clip(τ_i) / Σ_i β̂_i`` for one slice of flat updates (T, r) -> (r,)."""
    balance = _balance(tau, found)
    floor, top = found[1][:, 0:1], found[1][:, 1:2]
    # a top share tied with the threshold (floor == top): keep the tied entries whole, if positive
    tied = (top == floor) & (top > 0) & (balance == top)
    weights = minmax_(torch.maximum(balance, floor, out=balance), floor, top)
    weights.masked_fill_(tied, 1.0)
    clipped = _clipped_magnitude(tau, found).mul_(torch.sign(tau))
    merged = (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)
    return merged.mul_(options.scaling)


PARTS = RankParts(stages=2, indexes=_indexes, values=_values, apply=_apply)


def merge(base: Tensor, tuned: list[Tensor], options: PcbOptions, *, name: str = "") -> Tensor:
    """``base + λ Σ_i β̂_i clip(τ_i) / Σ_i β̂_i``.

    base (Tensor of any shape), tuned: N ≥ 1 tensors shaped like base. Returns float32 like base.
    """
    return ranked_merge(base, tuned, options, PARTS)
