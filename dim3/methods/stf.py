"""STF: superpose the updates' singular features, with coefficients from one linear solve.

Paper: Qiu et al., "Superpose Task-specific Features for Model Merging",
https://arxiv.org/abs/2502.10698, as the DiM3 paper's reference code computes it
(``merge/merging_methods/STF.py`` with ``utils.py:merge_matrix``). For a 2-D tensor (m, n) with N
updates ``τ_i = tuned_i − base``:

1. Thin SVD of every update, ``τ_i = Σ_a s_ia u_ia v_iaᵀ``; all the pairs of all updates,
   concatenated: ``U`` (m, K), ``S`` (K,), ``V`` (n, K).
2. The merged update is ``M = Σ_b c_b u_b v_bᵀ`` with the coefficients chosen so that every
   update's features keep their strength: ``u_aᵀ M v_a = s_a`` for every pair a, i.e. the K × K
   linear system ``((UᵀU) ⊙ (VᵀV)) c = S``. (The code solves for ``x = c / S`` with the columns
   scaled by S; that is the same system.)
3. ``merged = base + λ · M`` (the code's ``scale``).

Tensors that are not 2-D (norms, biases) are merged linearly, as in the code:
``base + w_mm τ_multimodal + w_ml Σ_k τ_multilingual_k``. The code takes these two weights
(``lambda_vl``, ``lambda_emma``) and ``scale`` as arguments without defaults; the defaults here are
the weights the same reference code fixes for the tensors it merges linearly (0.9 and 0.1, in
NeuroMerging.py) and λ = 1 (the solved merge itself).

Where this differs from the reference code:

- The reference merges only the decoder layers with this rule; the token embeddings, LM head and
  final norm get ``base + λ_vl τ_multimodal + λ_emma τ_multilingual``. Here STF sees every tensor
  DiM3 merges by default (2-D embeddings included, as (hidden, vocab): STF of a transpose is the
  transpose of STF), so methods compare like for like; ``outer_tensors="linear"`` gives the
  reference's split, with ``multimodal_weight`` and ``multilingual_weight``.
- Pairs with a zero singular value (rank-deficient updates, e.g. an all-zero one) are left out:
  their vectors are arbitrary (LAPACK's, device-dependent), and the code's equations for them ask
  the merge to be zero along those arbitrary directions.
- The system is solved in float64 by the eigendecomposition of its (symmetric, positive
  semi-definite: a Gram matrix of the rank-one features ``u_a v_aᵀ``) matrix, keeping the
  eigenvalues above ``K · eps(float32)`` of the largest: the minimum-norm solution when features
  repeat (identical updates give that update back), where the code falls back to ``lstsq``.

The SVDs are exact (float32, on the tensor's device); the K × K system costs ``O(K³)`` with
``K ≤ N · min(m, n)`` and holds a few K × K float64 matrices (0.3 GB for N = 2 at hidden size
1,536, 2.7 GB for N = 6). N ≥ 1; with N = 1 the result is ``base + λ τ``. This module knows
tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._svd import exact_svd, numerical_rank
from dim3.methods._utils import (
    check_options,
    is_outer_tensor,
    number,
    outer_choice,
    report_step,
    weighted_sum,
)

NAME = "stf"


@dataclass(frozen=True)
class StfOptions:
    """Options of STF."""

    scaling: float = number(
        1.0, "λ (the code's scale): scale of the merged update of each matrix.", 0, 10
    )
    multimodal_weight: float = number(
        0.9,
        "Weight of the VLM's update on tensors that are not 2-D (norms, biases), and on the "
        "outer tensors with outer_tensors=linear.",
        0,
        10,
    )
    multilingual_weight: float = number(
        0.1,
        "Weight of each multilingual update on tensors that are not 2-D (norms, biases), and "
        "on the outer tensors with outer_tensors=linear.",
        0,
        10,
    )

    outer_tensors: str = outer_choice()

    def __post_init__(self) -> None:
        check_options(self, NAME)


def features(deltas: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Every update's singular pairs with a non-zero value: U (m, K), S (K,), Vh (K, n)."""
    us, ss, vhs = [], [], []
    for i, d in enumerate(deltas):
        u, s, vh = exact_svd(d)
        keep = numerical_rank(s, tuple(d.shape))
        us.append(u[:, :keep]), ss.append(s[:keep]), vhs.append(vh[:keep])
        report_step(i + 1, len(deltas) + 1)
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


def coefficients(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """The minimum-norm solution c (K,) of ``((UᵀU) ⊙ (Vh Vhᵀ)) c = S``, in float64."""
    u64, vh64 = u.double(), vh.double()
    system = (u64.T @ u64).mul_(vh64 @ vh64.T)  # (K, K), symmetric PSD, unit diagonal
    evals, q = torch.linalg.eigh(system)
    tol = float(evals[-1]) * s.numel() * torch.finfo(torch.float32).eps
    inv = torch.where(evals > tol, 1.0 / evals.clamp(min=tol), 0.0)
    return q @ (inv * (q.T @ s.double()))


def stf_update(deltas: list[Tensor]) -> Tensor:
    """STF's merged update of N (m, n) updates, unscaled: ``U diag(c) Vh`` (m, n)."""
    u, s, vh = features(deltas)
    if s.numel() == 0:
        return torch.zeros_like(deltas[0])
    c = coefficients(u, s, vh).to(u.dtype)
    report_step(len(deltas) + 1, len(deltas) + 1)
    return (u * c) @ vh


def merge(base: Tensor, tuned: list[Tensor], options: StfOptions, *, name: str = "") -> Tensor:
    """``base + λ · STF(τ_1 … τ_N)``; the weighted sum of the updates if not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base, in the
    engine's order ``[multimodal, multilingual_1, ...]``. Returns a float32 tensor like base.
    """
    outer = options.outer_tensors == "linear" and is_outer_tensor(name)
    if base.dim() != 2 or outer:
        return weighted_sum(base, tuned, options.multimodal_weight, options.multilingual_weight)
    return stf_update([t - base for t in tuned]).mul_(options.scaling).add_(base)
