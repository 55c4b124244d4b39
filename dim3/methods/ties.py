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

from dim3.methods._utils import check_options, deltas, disjoint_mean_, number, trim_mask

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


def merge(base: Tensor, tuned: list[Tensor], options: TiesOptions, *, name: str = "") -> Tensor:
    """``base + λ · disjoint_mean(trim(Δ_t))``.

    base (Tensor of shape (out, in) or (n,)), tuned: T tensors shaped like base.
    Returns a float32 tensor shaped like base.
    """
    d = deltas(base, tuned)  # (T, *shape), trimmed in place below
    for x in d:
        x.masked_fill_(~trim_mask(x, options.density), 0.0)
    return disjoint_mean_(d).mul_(options.scaling).add_(base)
