"""NeuroMerging: each neuron's update split into the part along its base weights and the rest.

Paper: Fang et al., "Disentangling Task Interference within Neurons: Model Merging in Alignment
with Neuronal Mechanisms", https://arxiv.org/abs/2503.05320, as the DiM3 paper's reference code
(``merge/merging_methods/NeuroMerging.py``, ``ours_kernel`` and ``ties_kernel``) computes it. For a
2-D tensor (m, n), row by row (a row is one neuron's input weights ``w``), with N updates
``τ_i = tuned_i − base``:

1. Parallel scales: ``a_i = ⟨τ_i, w⟩ / ⟨w, w⟩`` and the perpendicular rest ``p_i = τ_i − a_i w``.
2. The scales ``a_1 … a_N`` are merged TIES-style (no trim): the elected sign is that of their sum,
   the result ``t`` the mean of the non-zero scales with that sign. The merged parallel part is
   ``t · w / ‖w‖``, as in the reference code (``parallel="reference"``): the scale is measured in
   units of ``w`` but applied to the unit direction, so this part is ``1/‖w‖`` times the projection
   it came from. ``parallel="projection"`` applies it to ``w`` itself (``t · w``), the projection
   the scale was measured against; with it a single update gives ``base + λ τ`` back.
3. The perpendicular parts: the SVD of the (N, n) matrix ``P = [p_1 … p_N]`` of the row,
   ``P = U S Vᵀ``; its rank ``k`` is ``1 + #{j : c_j < cum_threshold}`` (at most N), ``c_j`` the
   cumulative share of ``S²``. The coordinates ``P V = U S`` (N updates × N directions) are merged
   TIES-style per direction (sign of the sum; where a sum is exactly zero, the sign of the sum of
   the row's elected signs, as in the code), giving ``r_j``, and the merged perpendicular part is
   ``Σ_{j<k} r_j v_j``.
4. ``merged row = base row + λ · (parallel + perpendicular)``.

Tensors that are not 2-D (norms, biases) go through the same TIES kernel on their entries (the
reference code's ``ties_kernel``: no trim, elected sign of the sum, a zero sum taking the sign of
the whole tensor's majority), times λ.

Defaults are the reference code's: ``cum_threshold`` 1.0 (with it ``k`` is the rank of ``P``: every
direction with a non-zero singular value), the reference's parallel part, λ = 1 (the code has no
λ). Where this differs from the reference code:

- The reference merges only the decoder layers with this rule; the token embeddings, LM head and
  final norm get ``base + 0.9 τ_multimodal + 0.1 τ_multilingual``. Here NeuroMerging sees every
  tensor DiM3 merges by default (embeddings and LM head included, row = token), so methods
  compare like for like; ``outer_tensors="linear"`` gives the reference's split, with
  ``multimodal_weight`` and ``multilingual_weight`` (0.9 and 0.1, the reference's).
- A sum of parallel scales that is exactly zero elects + here (the reference takes the sign of
  the majority over the tensor's rows), so that each row is merged on its own and the engine can
  stream the tensor in row slices (kind "elementwise"). Such a tie needs exactly cancelling
  scales; when every scale of a row is 0 both give 0.
- A base row that is all zero has no direction: its parallel scales are 0 and the whole update is
  perpendicular (the reference divides 0 by 0).

The per-row SVD is computed exactly, through the eigendecomposition of the row's (N, N) Gram
matrix ``P Pᵀ = U S² Uᵀ`` in float64: by TIES' homogeneity ``r_j v_j = TIES(U[:, j]) · Pᵀ u_j``,
so no division by a singular value is needed and LAPACK's arbitrary vectors for zero singular
values contribute nothing. Cost: a few float64 passes over the N updates per row slice
(measured in docs/methods.md). N ≥ 1 updates; with N = 1 and the default parallel part the result
is ``base + λ (p + a w / ‖w‖)``, not ``base + λ τ``. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._utils import (
    check_options,
    choice,
    is_outer_tensor,
    number,
    outer_choice,
    weighted_sum,
)

NAME = "neuromerging"


@dataclass(frozen=True)
class NeuroMergingOptions:
    """Options of NeuroMerging."""

    cum_threshold: float = number(
        1.0,
        "Share of each neuron's perpendicular energy (cumulative squared singular values) the "
        "kept directions must reach; 1 keeps every direction (the reference code's default).",
        0.01,
        1.0,
    )
    parallel: str = choice(
        "reference",
        "How the merged parallel scale is applied: 'reference' to the unit direction of the "
        "base row (as the reference code does), 'projection' to the base row itself (the "
        "projection it was measured against).",
        ("reference", "projection"),
    )
    scaling: float = number(1.0, "λ: scale of the merged update (the reference code: 1).", 0, 10)
    outer_tensors: str = outer_choice()
    multimodal_weight: float = number(
        0.9, "With outer_tensors=linear: the VLM's weight there (the reference code's).", 0, 10
    )
    multilingual_weight: float = number(
        0.1, "With outer_tensors=linear: each multilingual weight there (the reference's).", 0, 10
    )

    def __post_init__(self) -> None:
        check_options(self, NAME)


def ties_mean(x: Tensor, dim: int = 0, tie: Tensor | None = None) -> Tensor:
    """TIES without trim along ``dim``: the mean of the non-zero entries whose sign is that of the
    sum (0 where none); where the sum is 0, the sign ``tie`` (+1 when not given).

    x (..., N, ...) -> the merged values with ``dim`` removed.
    """
    sign = torch.sign(x.sum(dim=dim, keepdim=True))
    fallback = torch.ones_like(sign) if tie is None else tie.expand_as(sign)
    sign = torch.where(sign == 0, fallback, sign)
    agree = torch.where(sign > 0, x > 0, x < 0)
    count = agree.sum(dim=dim, dtype=x.dtype).clamp(min=1)
    return (x * agree).sum(dim=dim) / count


def ties_kernel(deltas: Tensor) -> Tensor:
    """The reference's ``ties_kernel`` on (N, ...) updates: a zero sum takes the sign of the
    majority of the entries' elected signs over the whole tensor. Returns (...)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    majority = torch.sign(torch.sign(flat.sum(dim=0)).sum())
    return ties_mean(flat, 0, majority.reshape(1, 1)).reshape(deltas.shape[1:])


def row_update(base: Tensor, tuned: list[Tensor], options: NeuroMergingOptions) -> Tensor:
    """NeuroMerging's merged update of the rows of ``base`` (m, n), float64 inside.

    tuned: N tensors (m, n) -> (m, n), unscaled. The perpendicular parts are never formed: with
    ``⟨τ_i, w⟩ = a_i ‖w‖²``, their Gram matrix is ``⟨τ_i, τ_k⟩ − a_i a_k ‖w‖²`` and a combination
    ``Σ_i c_i p_i`` is ``Σ_i c_i τ_i − (Σ_i c_i a_i) w``.
    """
    w = base.double()  # (m, n)
    d = torch.empty((len(tuned), *base.shape), dtype=torch.float64, device=base.device)
    for i, t in enumerate(tuned):
        torch.sub(t.double(), w, out=d[i])  # τ_i (N, m, n), in one float64 buffer
    ww = torch.einsum("mc,mc->m", w, w)  # (m,)
    has_dir = ww > 0
    a = torch.einsum("imc,mc->mi", d, w) / torch.where(has_dir, ww, 1.0)[:, None]  # (m, N)
    a = a * has_dir[:, None]  # parallel scales; a zero row has no direction
    t = ties_mean(a, 1)  # (m,) the merged parallel scale
    along = t / torch.where(has_dir, ww.sqrt(), 1.0) if options.parallel == "reference" else t
    gram = torch.einsum("imc,kmc->mik", d, d)  # (m, N, N) ⟨τ_i, τ_k⟩ per row
    gram -= a[:, :, None] * a[:, None, :] * ww[:, None, None]  # P Pᵀ
    evals, u = torch.linalg.eigh(gram)  # ascending
    evals, u = evals.flip(-1).clamp(min=0.0), u.flip(-1)  # S² descending, U (m, N, N)
    total = evals.sum(dim=1, keepdim=True)
    share = evals.cumsum(dim=1) / torch.where(total > 0, total, 1.0)
    rank = ((share < options.cum_threshold) & (total > 0)).sum(dim=1) + 1  # (m,)
    kept = torch.arange(u.shape[2], device=u.device)[None, :] < rank[:, None]  # (m, N)
    # per direction j the TIES coordinate r_j = s_j · TIES(U[:, j]) (homogeneity; s_j > 0)
    col_sign = torch.sign(u.sum(dim=1))  # (m, N) the elected sign of each direction
    majority = torch.sign(torch.where(evals > 0, col_sign, 0.0).sum(dim=1))  # (m,)
    coef = ties_mean(u, 1, majority[:, None, None]) * kept * (evals > 0)  # (m, N)
    mix = (u * coef[:, None, :]).sum(dim=2)  # (m, N): Σ_j U[i, j] TIES(U[:, j])
    # Σ_j r_j v_j = Σ_i mix_i p_i = Σ_i mix_i τ_i − (Σ_i mix_i a_i) w, plus the parallel part
    out = torch.einsum("mi,imc->mc", mix, d)
    return out.add_(w * (along - (mix * a).sum(dim=1))[:, None])


def merge(
    base: Tensor,
    tuned: list[Tensor],
    options: NeuroMergingOptions,
    *,
    name: str = "",
    offset: int = 0,
) -> Tensor:
    """``base + λ · NeuroMerging(τ_1 … τ_N)``, row by row; the TIES kernel if not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base; a row slice
    of a larger tensor gives the same rows as the whole (``offset`` is not needed).
    Returns a float32 tensor shaped like base.
    """
    if options.outer_tensors == "linear" and is_outer_tensor(name):
        return weighted_sum(base, tuned, options.multimodal_weight, options.multilingual_weight)
    if base.dim() == 2:
        update = row_update(base, tuned, options).float()
    else:
        update = ties_kernel(torch.stack([t - base for t in tuned]))  # (N, ...)
    return update.mul_(options.scaling).add_(base)
