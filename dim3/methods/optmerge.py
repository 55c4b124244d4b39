"""OptMerge: WUDI's interference loss on low-rank denoised updates, optimised by SGD with momentum.

Paper: Wei et al., "Unifying Multimodal Large Language Model Capabilities and Modalities via Model
Merging" (the MLLM merging benchmark, ICLR 2026), https://arxiv.org/abs/2505.19892, following its
reference code. Per 2-D tensor (m, n) with N updates ``τ_i = tuned_i − base`` and
``K = ⌊min(m, n) / N⌋`` (at least 1), with ``τ_i ≈ U_K S_K V_Kᵀ`` its top-K SVD:

- denoised targets ``τ̂_i = U_K S_K V_Kᵀ`` and input directions ``L_i = S_K V_Kᵀ`` (K, n);
- ``L(θ) = Σ_i ‖(θ − τ̂_i) L_iᵀ‖²_F / ‖τ_i‖²_F`` (normalised by the full update's norm);
- θ starts from the mean ``Σ τ_i / N`` and takes ``iterations`` steps of SGD with momentum
  (``torch.optim.SGD(lr, momentum)``, dampening 0; the code's 300, 1e-4, 0.9);
- ``merged = base + λ θ``.

The steps are computed exactly, not run one by one. The loss is quadratic, with gradient
``2 (θ M − P)``, ``M = Σ_i L_iᵀ L_i / ‖τ_i‖²`` (n, n) of rank ≤ NK, ``P = Σ_i τ̂_i L_iᵀ L_i /
‖τ_i‖²``. Every gradient lies in M's range, so SGD with momentum moves θ only there, and in the
eigenbasis ``M = Q Λ Qᵀ`` (from the thin SVD of the (n, NK) matrix ``[V_K S_K / ‖τ_i‖]_i``) each
eigen-direction j follows its own scalar linear recursion ``g = 2 λ_j z + f_j``, ``b ← μ b + g``,
``z ← z − lr · b``. Its coefficient after T steps is computed once per λ_j (in float64, O(T · NK)),
and ``θ_T = θ_0 + (f ⊙ c_T) Qᵀ``: the same iterate as T optimizer steps in exact arithmetic, for
the cost of the N truncated SVDs, one SVD of the (n, NK) matrix and a few (m, n, NK) products,
instead of T × 4N (m, n, K) products. The test checks it against a plain SGD loop.

Updates that are all zero take no part in the loss; if none is left (or K directions carry no
energy), θ stays at the mean. With N = 1, K = min(m, n): τ̂ = τ is θ_0 and the minimum, so the
result is ``base + λ τ``. Tensors that are not 2-D get the mean update ``base + λ Σ τ_i / N``, as in
the reference code. Every SVD is exact on every device; ``svd="randomized"`` (off by default) takes
a randomized SVD for the truncations when K is at most a quarter of the rank (N ≥ 5, see
``_svd.top_svd``), which changes the result (docs/methods.md). This module knows tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dim3.methods._svd import exact_svd, mean_update, numerical_rank, top_svd
from dim3.methods._utils import check_options, number, report_step, svd_choice

NAME = "optmerge"


@dataclass(frozen=True)
class OptMergeOptions:
    """Options of OptMerge."""

    iterations: int = number(300, "SGD steps per matrix (the reference code: 300).", 0, 1_000_000)
    lr: float = number(1e-4, "SGD learning rate (the reference code: 1e-4).", 1e-9, 1.0)
    momentum: float = number(0.9, "SGD momentum (the reference code: 0.9).", 0.0, 0.999)
    scaling: float = number(1.0, "λ: scale of the optimised update.", 0, 10)
    svd: str = svd_choice("OptMerge")

    def __post_init__(self) -> None:
        check_options(self, NAME)


@dataclass(frozen=True)
class Problem:
    """OptMerge's quadratic for one tensor: targets, input directions and norms of the updates.

    targets: τ̂_i (m, n); inputs: L_i (K, n); norms: ‖τ_i‖²; start: θ_0 (m, n).
    """

    targets: list[Tensor]
    inputs: list[Tensor]
    norms: list[float]
    start: Tensor


def problem(deltas: list[Tensor], randomized: bool = False) -> Problem:
    """Truncate each (m, n) update to its top ``⌊min(m, n)/N⌋`` components (zero ones dropped)."""
    k = max(1, min(deltas[0].shape) // len(deltas))
    targets, inputs, norms = [], [], []
    for i, d in enumerate(deltas):
        report_step(i, len(deltas) + 1)  # one SVD per update, then the solve's
        norm2 = float((d * d).sum())
        if norm2 == 0.0:
            continue
        u, s, vh = top_svd(d, k, randomized=randomized)
        targets.append((u * s) @ vh)  # τ̂_i = U_K S_K V_Kᵀ
        inputs.append(s[:, None] * vh)  # L_i = S_K V_Kᵀ
        norms.append(norm2)
    report_step(len(deltas), len(deltas) + 1)
    return Problem(targets, inputs, norms, mean_update(deltas))


def loss(theta: Tensor, p: Problem) -> float:
    """``Σ_i ‖(θ − τ̂_i) L_iᵀ‖² / ‖τ_i‖²`` as a Python float."""
    return sum(
        float(((theta - t) @ li.T).square().sum()) / n
        for t, li, n in zip(p.targets, p.inputs, p.norms, strict=True)
    )


def step_coefficients(lam: Tensor, steps: int, lr: float, momentum: float) -> Tensor:
    """``c_T`` per eigenvalue: SGD with momentum on ``g = 2 λ z + 1`` from z = 0, b = 0.

    lam (float64 Tensor of shape (k,)) -> the coefficients after ``steps`` steps, (k,).
    """
    z, b = torch.zeros_like(lam), torch.zeros_like(lam)
    for _ in range(steps):
        b = momentum * b + (2.0 * lam * z + 1.0)
        z = z - lr * b
    return z


def solve(p: Problem, iterations: int, lr: float, momentum: float) -> Tensor:
    """θ after ``iterations`` SGD-with-momentum steps from ``p.start``, in closed form (m, n)."""
    if not p.targets or iterations == 0:
        return p.start.clone()
    # M = W Wᵀ with W = [V_K S_K / ‖τ_i‖]_i (n, NK); its eigenvectors Q and eigenvalues σ²
    w = torch.cat([li.T / n**0.5 for li, n in zip(p.inputs, p.norms, strict=True)], dim=1)
    q, sig, _ = exact_svd(w)
    keep = numerical_rank(sig, tuple(w.shape))
    if keep == 0:
        return p.start.clone()
    q, lam = q[:, :keep], sig[:keep].square()  # (n, k), (k,)
    # P Q = Σ_i τ̂_i L_iᵀ (L_i Q) / ‖τ_i‖² and θ_0 Q, both (m, k)
    pq = sum(
        (t @ li.T) @ (li @ q) / n for t, li, n in zip(p.targets, p.inputs, p.norms, strict=True)
    )
    f = 2.0 * (p.start @ q * lam - pq)  # the constant part of the gradient, per direction
    c = step_coefficients(lam.double(), iterations, lr, momentum).to(f.dtype)
    return torch.addmm(p.start, f * c, q.T)


def merge(base: Tensor, tuned: list[Tensor], options: OptMergeOptions, *, name: str = "") -> Tensor:
    """``base + λ θ`` with θ OptMerge-optimised from the mean update; the mean if not 2-D.

    base (Tensor of shape (m, n) or any other), tuned: N ≥ 1 tensors shaped like base.
    """
    deltas = [t - base for t in tuned]
    if base.dim() == 2:
        p = problem(deltas, options.svd == "randomized")
        update = solve(p, options.iterations, options.lr, options.momentum)
        report_step(len(deltas) + 1, len(deltas) + 1)
    else:
        update = mean_update(deltas)
    return update.mul_(options.scaling).add_(base)
