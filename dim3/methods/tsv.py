"""Task Singular Vectors merge (TSV-M).

Paper: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, https://arxiv.org/abs/2412.00081. For each 2-D tensor (m, n) with N updates
``τ_i = tuned_i − base`` and ``k = ⌊min(m, n) / N⌋`` (at least 1):

1. Thin SVD of each update, keep its top k components: ``τ_i ≈ U_i S_i V_iᵀ``.
2. Concatenate them: ``U = [U_1 … U_N]`` (m, Nk), ``S = [S_1 … S_N]``, ``V = [V_1 … V_N]`` (n, Nk).
3. Orthogonalise the concatenations (Procrustes): ``U⊥ = P Qᵀ`` from ``U = P Σ Qᵀ``, same for V.
4. ``merged = base + λ · U⊥ diag(S) V⊥ᵀ``.

This follows the paper's reference code (and FusionBench's ``TSVM``), including its default
λ = 1.0 ("alpha"). Two guards the reference lacks: components with a zero singular value (rank-
deficient or all-zero updates) are dropped before step 3, and the polar factors use only the
concatenations' numerical rank, so LAPACK's arbitrary null-space vectors never become updates.
Where the concatenation has full rank (the normal case) this is exactly the paper's rule.

N = 1 keeps all ``min(m, n)`` components of the one update and ``U⊥ = U``, ``V⊥ = V``: the result
is ``base + λ τ`` (up to rounding). Tensors that are not 2-D (norms, biases) get the mean of the
updates, ``base + λ · Σ τ_i / N``, as in the reference code. Note the MLLM merging benchmark's
original baseline script applied its TSV only where ``param_name == 'lm_head.weight'`` (``!=`` was
meant), a tensor its own exclusion list removes, so it averaged every tensor; here every 2-D tensor
the engine merges gets TSV.

Every SVD is exact on every device, so a CPU merge equals a GPU one up to float32 rounding. The
SVDs and orthogonalisations run in float64 (``_svd.gram_top_svd``, ``_svd.polar(precise=True)``):
the concatenations are ill-conditioned when N·k approaches min(m, n) (square for N = 6 on a
1536 × 8960 matrix), and in float32 the polar factor amplified the per-update SVDs' rounding to
4.7e-4 of the merged update's largest entry; in float64 it agrees with a float64 computation of
the rule to float32 rounding. Peak memory of one tensor: its float64 left vectors, their
orthogonalised float32 copy and the product, about four float32 copies of the tensor.
``svd="randomized"`` (off by default) takes a randomized SVD for the per-update SVDs when k is at
most a quarter of the rank (N ≥ 5, see ``_svd.top_svd``); it changes the merged update (measured in
docs/methods.md). The orthogonalisations are always exact. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._svd import mean_update, polar, top_svd
from dim3.methods._utils import check_options, number, report_step, svd_choice

NAME = "tsv"


@dataclass(frozen=True)
class TsvOptions:
    """Options of the TSV merge."""

    scaling: float = number(1.0, "λ (alpha): scale of the merged update.", 0, 10)
    svd: str = svd_choice("TSV")

    def __post_init__(self) -> None:
        check_options(self, NAME)


def tsv_update(deltas: list[Tensor], randomized: bool = False) -> Tensor:
    """The TSV-M merged update of N (m, n) updates, unscaled: ``U⊥ diag(S) V⊥ᵀ`` (m, n)."""
    n_models = len(deltas)
    k = max(1, min(deltas[0].shape) // n_models)
    stages = n_models + 2  # one SVD per update, then two orthogonalisations
    us, ss, vhs = [], [], []
    for i, d in enumerate(deltas):  # float64 (see the module docstring)
        u, s, vh = top_svd(d, k, randomized=randomized, precise=True)
        us.append(u.double()), ss.append(s.double()), vhs.append(vh.double())
        report_step(i + 1, stages)
    u = torch.cat(us, dim=1)  # (m, Nk)
    s = torch.cat(ss).float()  # (Nk,)
    vh = torch.cat(vhs, dim=0)  # (Nk, n)
    del us, vhs
    u_perp = polar(u, precise=True)  # (m, Nk) float32
    del u
    report_step(stages - 1, stages)
    v_perp_t = polar(vh.T, precise=True).T  # (Nk, n) float32
    report_step(stages, stages)
    return (u_perp * s) @ v_perp_t


def merge(base: Tensor, tuned: list[Tensor], options: TsvOptions, *, name: str = "") -> Tensor:
    """``base + λ · TSV-M(τ_1 … τ_N)``; the mean update for tensors that are not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base.
    Returns a float32 tensor shaped like base.
    """
    deltas = [t - base for t in tuned]
    if base.dim() == 2:
        update = tsv_update(deltas, options.svd == "randomized")
    else:
        update = mean_update(deltas)
    return update.mul_(options.scaling).add_(base)
