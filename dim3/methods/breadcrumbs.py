"""Model Breadcrumbs: task arithmetic over task vectors stripped of outliers and of noise.

Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", https://arxiv.org/abs/2312.06795. Per tensor and per task vector, the ``gamma`` fraction of
entries with the largest magnitude is dropped, then the smallest ones, so that a ``density``
fraction remains (when ``gamma > 1 − density`` fewer large ones are dropped, so the density holds).
``merged = base + λ Σ_t mask_t ⊙ Δ_t``. Defaults are mergekit's ``breadcrumbs`` example values
(density 0.9, gamma 0.01, i.e. drop the top 1 % and the bottom 9 %) with λ = 1. This module knows
tensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from dim3.methods._utils import (
    SelectionParts,
    check_options,
    keep_count,
    number,
    selection_merge,
    sum_models,
)

NAME = "breadcrumbs"


@dataclass(frozen=True)
class BreadcrumbsOptions:
    """Options of Model Breadcrumbs."""

    density: float = number(
        0.9, "Fraction of each update's entries kept after dropping both ends.", 0.01, 1.0
    )
    gamma: float = number(
        0.01, "Fraction of each update's largest-magnitude entries dropped (outliers).", 0.0, 0.99
    )
    scaling: float = number(1.0, "λ: scale of the summed task vectors.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, NAME)


def _ks(options: BreadcrumbsOptions, n: int) -> tuple[int, ...]:
    keep = keep_count(options.density, n)  # = n when density is 1
    drop_large = min(math.floor(options.gamma * n + 0.5), n - keep)
    return (n - drop_large, n - keep - drop_large)  # below the dropped top; the dropped bottom


def _keep(firsts: list[Tensor]) -> Tensor:
    # in place: the masks are the caller's to reuse (no slice-sized temporaries); bitwise, so
    # that it serves bool masks and the engine's int32 words (-1 / 0) alike
    return firsts[0].bitwise_and_(firsts[1].bitwise_not_())


def _combine(masked: Tensor, options: BreadcrumbsOptions) -> Tensor:
    return sum_models(masked).mul_(options.scaling)


PARTS = SelectionParts(_ks, _keep, _combine)


def merge(
    base: Tensor,
    tuned: list[Tensor],
    options: BreadcrumbsOptions,
    *,
    name: str = "",
    offset: int = 0,
) -> Tensor:
    """``base + λ Σ_t mask_t ⊙ Δ_t``. base (out, in) or (n,), tuned: T like base -> like base."""
    return selection_merge(base, tuned, options, PARTS)
