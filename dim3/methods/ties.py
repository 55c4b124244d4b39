"""TIES-merging: trim, elect sign, disjoint merge.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708. For each tensor:

1. Trim: keep the ``density`` fraction of each task vector's entries with the largest magnitude
   (``round(density · n)``, at least one), zero the rest.
2. Elect: per entry, the sign of the sum of the trimmed updates (the sign with more total mass;
   a zero sum elects +).
3. Disjoint merge: the mean of the trimmed updates that carry the elected sign.

``merged = base + λ · disjoint_mean``. Defaults are the paper's setting for when no validation data
is available: keep the top 20 % (k = 20) and λ = 1. Unlike the paper, which trims over the whole
flattened model, trimming is per tensor (as in mergekit and peft), so that the merge can stream.
This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dim3.methods._utils import (
    SelectionParts,
    check_options,
    disjoint_mean_,
    keep_count,
    number,
    selection_merge,
)

NAME = "ties"


@dataclass(frozen=True)
class TiesOptions:
    """Options of TIES-merging."""

    density: float = number(
        0.2,
        "Fraction of each update's entries kept (largest magnitudes); the rest are reset.",
        0.01,
        1.0,
    )
    scaling: float = number(1.0, "λ: scale of the merged task vector.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, NAME)


def _ks(options: TiesOptions, n: int) -> tuple[int, ...]:
    return (n - keep_count(options.density, n),)  # the entries below the kept top


def _keep(firsts: list[Tensor]) -> Tensor:
    # in place: the mask is the caller's to reuse; bitwise, so that it serves bool masks and
    # the engine's int32 words (-1 / 0) alike
    return firsts[0].bitwise_not_()


def _combine(masked: Tensor, options: TiesOptions) -> Tensor:
    return disjoint_mean_(masked).mul_(options.scaling)


PARTS = SelectionParts(_ks, _keep, _combine)


def merge(
    base: Tensor, tuned: list[Tensor], options: TiesOptions, *, name: str = "", offset: int = 0
) -> Tensor:
    """``base + λ · disjoint_mean(trim(Δ_t))``.

    base (Tensor of shape (out, in) or (n,)), tuned: T tensors shaped like base.
    Returns a float32 tensor shaped like base.
    """
    return selection_merge(base, tuned, options, PARTS)
