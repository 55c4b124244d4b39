"""Fisher-weighted averaging: each parameter the models' values weighted by their Fisher information.

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
https://arxiv.org/abs/2111.09832. With ``F_i`` the diagonal Fisher information of model ``i``
(estimated by :mod:`dim3.fisher`) and ``λ_i`` the per-model scaling factors, every parameter is

    θ = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i                                  (elementwise)

As in the authors' reference code (``fisher_floor``), each ``F_i`` is first raised to a small floor,
so that where no model has Fisher mass the result is the λ-weighted mean, never 0/0. It is computed
as ``base + Σ_i λ_i F_i Δ_i / Σ_i λ_i F_i`` (``Δ_i = θ_i − base``, the same value), so equal inputs
give back the base exactly. The models are the base (optional: ``base_weight`` > 0 and its Fisher
given), the VLM's language model and each multilingual model. Dividing each Fisher by its L2 norm
over the whole model (the reference code's ``normalize_fishers``) happens where the Fishers are
read (:class:`dim3.fisher_files.FisherInputs`), not here. This module knows tensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._utils import check_options, model_weights, number, scratch_like

NAME = "fisher"


@dataclass(frozen=True)
class FisherOptions:
    """Options of Fisher-weighted averaging (the λ_i of the paper, the floor, the normalisation)."""

    multimodal_weight: float = number(1.0, "λ of the VLM's language model.", 0, 10)
    multilingual_weight: float = number(1.0, "λ of each multilingual model.", 0, 10)
    base_weight: float = number(
        0.0, "λ of the base model (needs the base's Fisher when above 0).", 0, 10
    )
    floor: float = number(1e-6, "Each Fisher is raised to at least this (0/0 guard).", 1e-30, 1)
    normalize: int = number(
        1, "1: divide each model's Fisher by its L2 norm over all its parameters; 0: raw.", 0, 1
    )

    def __post_init__(self) -> None:
        check_options(self, NAME)
        if self.multimodal_weight + self.multilingual_weight + self.base_weight <= 0:
            raise ValueError("fisher options: the model weights must not all be 0")


def merge(
    base: Tensor,
    tuned: list[Tensor],
    options: FisherOptions,
    *,
    name: str = "",
    offset: int = 0,
    extra: Sequence[Tensor] = (),
) -> Tensor:
    """The Fisher-weighted mean ``Σ λ_i F_i θ_i / Σ λ_i F_i`` of the models, elementwise.

    base (Tensor of shape (out, in) or (n,)), tuned = [multimodal, multilingual_1, ...] shaped like
    base. extra: the Fishers, shaped like base, ``[F_base, F_multimodal, F_multilingual_1, ...]``,
    or without ``F_base`` when the base takes no part; none at all means every ``F_i = 1`` (the
    paper's "isotropic merging"; a recipe never asks for that silently: it needs the Fishers).
    Returns a float32 tensor shaped like base.
    """
    fishers = list(extra) or [torch.ones_like(base) for _ in tuned]
    with_base = len(fishers) == len(tuned) + 1
    if len(fishers) != len(tuned) + with_base:
        raise ValueError(
            f"fisher: {name or 'a tensor'} has {len(fishers)} Fisher tensors for {len(tuned)} tuned "
            "models; give one Fisher per model (and one for the base to include it)"
        )
    weights = model_weights(tuned, options.multimodal_weight, options.multilingual_weight)
    models: list[Tensor | None] = list(tuned)
    if with_base:
        weights, models = [options.base_weight, *weights], [None, *models]  # Δ_base = 0
    elif options.base_weight > 0:
        raise ValueError("fisher: base_weight > 0 needs the base model's Fisher")
    # the engine's reused buffers inside its loop (no allocation per slice), new tensors outside
    update = scratch_like("fisher.update", base).zero_()  # Σ λ_i F_i Δ_i
    total = scratch_like("fisher.total", base).zero_()  # Σ λ_i F_i
    wf = scratch_like("fisher.weighted", base)
    delta = scratch_like("fisher.delta", base)
    for w, theta, f in zip(weights, models, fishers, strict=True):
        if w == 0:
            continue
        torch.clamp_min(f, options.floor, out=wf).mul_(w)  # λ_i max(F_i, floor)
        total.add_(wf)
        if theta is not None:
            update.addcmul_(wf, torch.sub(theta, base, out=delta))
    return update.div_(total).add_(base)
