"""DARE (Drop And REscale) on top of Task Arithmetic and of TIES.

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch", https://arxiv.org/abs/2311.03099. Each task vector loses a random fraction ``p`` of
its entries and the survivors are scaled by ``1 / (1 − p)``, then the sparse task vectors are
merged:

- ``dare_task_arithmetic``: ``base + λ Σ_t DARE(Δ_t)``.
- ``dare_ties``: TIES' sign election and disjoint mean over the DARE'd vectors (no magnitude trim:
  the random drop replaces it, as in mergekit's ``dare_ties``), ``base + λ · disjoint_mean``.

Default ``p = 0.9``: the paper's headline finding that 90 % of SFT delta parameters can be dropped
without loss; λ = 1. The mask is reproducible: it depends only on (seed, tensor name, tuned index),
is drawn on the CPU so CPU and CUDA merges agree bit for bit, and does not depend on the order in
which tensors are merged nor on how the engine slices them (it is drawn in fixed blocks of rows). This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3 import fused
from dim3.methods import _utils
from dim3.methods._utils import check_options, deltas, disjoint_mean_, number, scratch


@dataclass(frozen=True)
class DareOptions:
    """Options of DARE (both variants)."""

    drop_rate: float = number(
        0.9,
        "p: fraction of each update's entries dropped at random (survivors × 1/(1−p)).",
        0.0,
        0.99,
    )
    scaling: float = number(1.0, "λ: scale of the merged task vector.", 0, 10)
    seed: int = number(0, "Seed of the random drop (with the tensor name and model).", 0, 2**32 - 1)

    def __post_init__(self) -> None:
        check_options(self, "dare")


def dropped(
    base: Tensor, tuned: list[Tensor], options: DareOptions, name: str, offset: int = 0
) -> Tensor:
    """The DARE'd task vectors: (T, *base.shape); model t's mask is seeded by (seed, name, t).

    ``base`` may be rows ``offset:`` of a larger tensor: the mask is the same as the whole's.
    """
    d = deltas(base, tuned)  # (T, *shape), dropped and rescaled in place
    for i, x in enumerate(d):
        _utils.dare_(x, options.drop_rate, options.seed, name, i, offset)
    return d


def merge_task_arithmetic(
    base: Tensor, tuned: list[Tensor], options: DareOptions, *, name: str = "", offset: int = 0
) -> Tensor:
    """``base + λ Σ_t DARE(Δ_t)``. base (out, in) or (n,), tuned: T like base -> like base."""
    d = dropped(base, tuned, options, name, offset)
    out = scratch("dare.sum", base.shape, base)  # the engine's reused buffer in its loop
    return _utils.sum_models(d, out).mul_(options.scaling).add_(base)


def merge_ties(
    base: Tensor, tuned: list[Tensor], options: DareOptions, *, name: str = "", offset: int = 0
) -> Tensor:
    """``base + λ · disjoint_mean(DARE(Δ_t))``. base (out, in) or (n,) -> like base.

    Two updates on the CPU: one compiled pass over the keep masks (:func:`dim3.fused.dare_ties`,
    the same bits), which also reads bfloat16 tensors as stored (the engine's tiles pass them
    unconverted); returns float32 either way."""
    if fused.fits_dare(base, tuned, options.drop_rate):
        words = [
            _utils._dare_keep_bits(base.shape, options.drop_rate, options.seed, name, i, offset)
            for i in range(len(tuned))
        ]  # each update's own buffers: both alive at once
        out = scratch("dare.merged", base.shape, base, torch.float32)
        return fused.dare_ties(base, tuned, words, options.drop_rate, options.scaling, out)
    if base.dtype != torch.float32 or any(t.dtype != torch.float32 for t in tuned):
        base, tuned = base.float(), [t.float() for t in tuned]  # as stored: widened here
    d = dropped(base, tuned, options, name, offset)
    return disjoint_mean_(d).mul_(options.scaling).add_(base)
