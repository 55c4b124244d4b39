"""Linear merge: a weighted average of the tuned models (a "model soup").

Reference: Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482, as mergekit's
``linear`` computes it with ``normalize: true`` (its default): ``Σ_t w_t tuned_t / Σ_t w_t``. The
base takes no part, except that the result equals it when both tuned tensors do. Default weights
are equal, i.e. the plain mean. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._utils import check_options, model_weights, number, scratch

NAME = "linear"


@dataclass(frozen=True)
class LinearOptions:
    """Options of the linear (weighted average) merge."""

    multimodal_weight: float = number(1.0, "Weight of the multimodal (VLM) model.", 0, 10)
    multilingual_weight: float = number(1.0, "Weight of each multilingual model.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, NAME)
        if self.multimodal_weight + self.multilingual_weight <= 0:
            raise ValueError(
                "linear options multimodal_weight and multilingual_weight must not both be 0 "
                "(they are normalised to sum to 1)"
            )


def merge(
    base: Tensor, tuned: list[Tensor], options: LinearOptions, *, name: str = "", offset: int = 0
) -> Tensor:
    """``Σ_t w_t · tuned_t / Σ_t w_t``, with ``w_mm`` for the multimodal model and ``w_ml`` for
    each multilingual one.

    base (Tensor of shape (out, in) or (n,)), tuned = [multimodal, multilingual_1, ...] shaped like
    base. Returns a float32 tensor shaped like base.
    """
    weights = model_weights(tuned, options.multimodal_weight, options.multilingual_weight)
    total = sum(weights)
    if total <= 0:
        raise ValueError("linear: the model weights sum to 0; give a positive weight")
    # base + the weighted mean of the deltas, so that equal inputs give back base exactly
    merged = scratch("linear.sum", base.shape, base).zero_()
    delta = scratch("linear.delta", base.shape, base)
    for w, t in zip(weights, tuned, strict=True):
        merged.add_(torch.sub(t, base, out=delta), alpha=w / total)
    return merged.add_(base)
