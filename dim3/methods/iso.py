"""Isotropic merging: Iso-C and Iso-CTS.

Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959. Per 2-D tensor (m, n),
with N updates ``τ_i = tuned_i − base`` and r = min(m, n):

- ``iso_c``: SVD of the task-arithmetic sum ``Σ τ_i = U S Vᵀ``; every singular value is replaced
  by their mean: ``merged = base + λ · mean(S) · U Vᵀ``.
- ``iso_cts``: a common subspace, the top ``r_c`` singular directions of ``Σ τ_i`` with
  ``r_c ≈ common_space_fraction · r``, plus, per update, its top ``(r − r_c) / N`` directions
  after projecting out the common left subspace (``τ_i − U_c U_cᵀ τ_i``). The concatenated left
  and right vectors are orthogonalised (polar factor, as in TSV), all r singular values are
  replaced by their mean, ``merged = base + λ · U⊥ diag(mean) V⊥ᵀ``. As in the paper's code the
  task-specific share is rounded so that every update gets the same number of directions and the
  common space takes the rest.

Defaults follow the paper's code (FusionBench ``iso_c`` / ``iso_cts``): common_space_fraction 0.8,
λ = 1 (the paper tunes λ on validation data; none is available here). Singular directions past the
numerical rank are dropped (their vectors are arbitrary), so a rank-deficient sum is flattened
within its own range only; the mean still runs over all r values, as in the paper. Tensors that
are not 2-D get the mean of the updates (``base + λ · Σ τ_i / N``), as in the reference code.
With N = 1 neither rule is the identity: both flatten the one update's spectrum.

Every SVD is exact on every device. Iso-CTS's SVDs, projections and orthogonalisations run in
float64 (``_svd.gram_top_svd``, ``_svd.polar(precise=True)``), as TSV's do and for the same
reason: its concatenation is square (r columns), and in float32 the polar factor amplified the
SVDs' rounding to 4.6e-6 of the update's largest entry against a 1.2e-6 tolerance with 6 updates
of a 1536 × 8960 matrix. Iso-C takes the polar factor of the sum itself, whose rounding is not
amplified, and stays in float32. Iso-CTS's ``svd="randomized"`` (off by default) takes a
randomized SVD (``_svd.top_svd``) for the SVD of the sum and the per-update SVDs where the share
kept is at most a quarter of the rank; it changes the merged update (measured in docs/methods.md).
The orthogonalisations are always exact. This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._svd import exact_svd, mean_update, numerical_rank, polar, summed, top_svd
from dim3.methods._utils import check_options, number, report_step, svd_choice


@dataclass(frozen=True)
class IsoCOptions:
    """Options of Iso-C."""

    scaling: float = number(1.0, "λ: scale of the merged (isotropic) update.", 0, 10)

    def __post_init__(self) -> None:
        check_options(self, "iso_c")


@dataclass(frozen=True)
class IsoCTSOptions:
    """Options of Iso-CTS."""

    common_space_fraction: float = number(
        0.8,
        "Share of the rank given to the common subspace of the summed updates; the rest is "
        "split evenly among the updates' own directions.",
        0.0,
        1.0,
    )
    scaling: float = number(1.0, "λ: scale of the merged (isotropic) update.", 0, 10)
    svd: str = svd_choice("Iso-CTS")

    def __post_init__(self) -> None:
        check_options(self, "iso_cts")


def iso_c_update(deltas: list[Tensor]) -> Tensor:
    """Iso-C's update of N (m, n) updates, unscaled: ``mean(S) · U Vᵀ`` of their sum."""
    u, s, vh = exact_svd(summed(deltas))
    keep = numerical_rank(s, tuple(deltas[0].shape))
    return (u[:, :keep] * s.mean()) @ vh[:keep]


def split_rank(r: int, n_models: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per update), with common + N · per-update = r."""
    common = int(r * fraction)
    per_task = min(round((r - common) / n_models), r // n_models)
    return r - per_task * n_models, per_task


def iso_cts_update(deltas: list[Tensor], fraction: float, randomized: bool = False) -> Tensor:
    """Iso-CTS's update of N (m, n) updates, unscaled: ``U⊥ diag(mean) V⊥ᵀ``."""
    r = min(deltas[0].shape)
    common, per_task = split_rank(r, len(deltas), fraction)
    stages = len(deltas) + 3  # the sum's SVD, one per update, two orthogonalisations
    u_c, s_c, vh_c = top_svd(
        summed(deltas), common, randomized=randomized, precise=True
    )  # (m, rc), (rc,), (rc, n), float64 (see the module docstring)
    u_c, s_c, vh_c = u_c.double(), s_c.double(), vh_c.double()
    report_step(1, stages)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    for i, d in enumerate(deltas):
        own = d.to(torch.float64, copy=True)  # the update without its common-subspace part
        own.addmm_(u_c, u_c.T @ own, alpha=-1.0)
        # rounding residue is no direction: its scale is the update's
        u, s, vh = top_svd(
            own, per_task, scale=float(d.norm()), randomized=randomized, precise=True
        )
        del own
        us.append(u.double()), ss.append(s.double()), vhs.append(vh.double())
        report_step(i + 2, stages)
    s_mean = float(torch.cat(ss).mean())  # over all r values
    u_perp = polar(torch.cat(us, dim=1), precise=True)  # (m, r) float32
    del us
    report_step(stages - 1, stages)
    v_perp_t = polar(torch.cat(vhs, dim=0).T, precise=True).T  # (r, n) float32
    report_step(stages, stages)
    return u_perp.mul_(s_mean) @ v_perp_t


def merge_c(base: Tensor, tuned: list[Tensor], options: IsoCOptions, *, name: str = "") -> Tensor:
    """``base + λ · Iso-C(τ_1 … τ_N)``; the mean update for tensors that are not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base.
    """
    deltas = [t - base for t in tuned]
    update = iso_c_update(deltas) if base.dim() == 2 else mean_update(deltas)
    return update.mul_(options.scaling).add_(base)


def merge_cts(
    base: Tensor, tuned: list[Tensor], options: IsoCTSOptions, *, name: str = ""
) -> Tensor:
    """``base + λ · Iso-CTS(τ_1 … τ_N)``; the mean update for tensors that are not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base.
    """
    deltas = [t - base for t in tuned]
    if base.dim() == 2:
        randomized = options.svd == "randomized"
        update = iso_cts_update(deltas, options.common_space_fraction, randomized)
    else:
        update = mean_update(deltas)
    return update.mul_(options.scaling).add_(base)
