"""Task Arithmetic: add the scaled task vectors to the base.

Paper: Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089.
``merged = base + λ · Σ_t w_t · Δ_t`` with ``Δ_t = tuned_t − base``. The paper picks λ on held-out
validation data; with none available here the default is λ = 1 and w_t = 1, which is what
mergekit's ``task_arithmetic`` computes for weights of 1.0 (``lambda`` 1.0, no normalisation):
the plain sum of both updates. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3 import fused
from dim3.methods._utils import check_options, model_weights, number, scratch

NAME = "task_arithmetic"


@dataclass(frozen=True)
class TaskArithmeticOptions:
    """Options of Task Arithmetic."""

    scaling: float = number(
        1.0, "λ: scale of the summed task vectors (the paper tunes it on validation data).", 0, 10
    )
    multimodal_weight: float = number(1.0, "Weight of the multimodal (VLM) update.", 0, 10)
    multilingual_weight: float = number(1.0, "Weight of each multilingual update.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, NAME)


def merge(
    base: Tensor,
    tuned: list[Tensor],
    options: TaskArithmeticOptions,
    *,
    name: str = "",
    offset: int = 0,
) -> Tensor:
    """``base + λ (w_mm Δmm + w_ml Δml)``.

    base (Tensor of shape (out, in) or (n,)), tuned = [multimodal, multilingual_1, ...] shaped like base
    (each multilingual update gets ``multilingual_weight``).
    Returns a float32 tensor shaped like base. Two updates on the CPU with the multilingual
    weight 1: one compiled pass (:func:`dim3.fused.task_arithmetic`, the same bits).
    """
    weights = model_weights(tuned, options.multimodal_weight, options.multilingual_weight)
    if _compiled(base, tuned, weights):
        # two updates on the CPU: one compiled pass (dim3.fused.task_arithmetic, the same bits),
        # which also reads bfloat16 tensors as stored (the engine's tiles pass them unconverted)
        out = scratch("task_arithmetic.sum", base.shape, base, torch.float32)
        return fused.task_arithmetic(base, tuned, weights[0], options.scaling, out)
    if base.dtype != torch.float32 or any(t.dtype != torch.float32 for t in tuned):
        base, tuned = base.float(), [t.float() for t in tuned]  # as stored: widened here
    summed = scratch("task_arithmetic.sum", base.shape, base)
    delta = scratch("task_arithmetic.delta", base.shape, base)
    # Σ_t w_t Δ_t, one delta at a time; the first term is w_1 Δ_1 itself (0 + x is x) and a
    # factor of 1 is no pass at all: with the default weights four passes over the rows
    torch.sub(tuned[0], base, out=summed)
    if weights[0] != 1.0:
        summed.mul_(weights[0])
    for w, t in zip(weights[1:], tuned[1:], strict=True):
        summed.add_(torch.sub(t, base, out=delta), alpha=w)
    if options.scaling != 1.0:
        summed.mul_(options.scaling)
    return summed.add_(base)


def merge_into(
    base: Tensor, tuned: list[Tensor], options: TaskArithmeticOptions, out: Tensor
) -> bool:
    """:func:`merge` written into ``out`` in its own dtype, as ``out.copy_(merge(...))`` would
    write it, where one compiled pass does it (:func:`dim3.fused.task_arithmetic_into`: two
    updates on the CPU, the multilingual weight 1, ``out`` float32 or bfloat16 and contiguous,
    no NaN in a bfloat16 ``out``). False otherwise, ``out`` then holding nothing meaningful:
    use :func:`merge`."""
    weights = model_weights(tuned, options.multimodal_weight, options.multilingual_weight)
    if not (_compiled(base, tuned, weights) and fused.writes(out, base)):
        return False
    return fused.task_arithmetic_into(base, tuned, weights[0], options.scaling, out)


def _compiled(base: Tensor, tuned: list[Tensor], weights: list[float]) -> bool:
    """Whether one compiled pass computes these (:func:`dim3.fused.fits_sum`): two updates on
    the CPU, the second weighted 1 (torch's ``add_(…, alpha=w)`` may fuse its multiply-add for
    another weight)."""
    return len(tuned) == 2 and weights[1] == 1.0 and fused.fits_sum(base, tuned)
