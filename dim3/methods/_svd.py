"""Shared linear algebra of the SVD-based and optimising merge rules (TSV, Iso, WUDI, OptMerge).

Everything here works on one 2-D float32 tensor at a time, on whatever device it is on, and knows
nothing about files or models. Three pieces:

- :func:`numerical_rank`: how many singular values count as non-zero (``torch.linalg.matrix_rank``'s
  default tolerance, ``σ > σ_max · max(m, n) · eps``). The rules drop the singular directions past
  it: LAPACK returns arbitrary (and device-dependent) vectors for zero singular values, and Iso or
  TSV's orthogonalisation would otherwise turn them into non-zero updates.
- :func:`top_svd`: the top ``k`` singular triplets, from the exact ``torch.linalg.svd`` unless the
  caller asks for ``randomized=True`` (a rule's ``svd="randomized"`` option, off by default): a
  randomized SVD (Halko, Martinsson & Tropp 2011, Algorithm 4.4 with ``NITER`` power iterations and
  a fixed-seed Gaussian sketch drawn on the CPU), about ``(2·NITER + 2) · m n (k + OVERSAMPLE)``
  flops instead of a full SVD's ``~4 m n min(m, n)``, taken only when ``k + OVERSAMPLE ≤ rank / 4``.
  Its *reconstruction* error is small (tests/test_methods_matrix.py: ``‖A − Â_k‖_F / ‖A − A_k‖_F −
  1`` below 1e-5 on a geometric spectrum, ≤ 2 % on a flat one), but the *subspace* it finds can be
  far from the exact one on a flat spectrum, and TSV, Iso-CTS and OptMerge use the subspace: the
  merged update then differs from the exact rule's by tens of percent (measured in
  tests/test_methods_reference.py and docs/methods.md). It was once the CPU's silent default, which
  made a CPU merge differ from a GPU one; now every device computes the exact rule unless asked.
- :func:`polar`: the orthogonal polar factor ``P Qᵀ`` of ``X = P Σ Qᵀ`` (the nearest matrix with
  orthonormal columns, i.e. the Procrustes solution), restricted to ``X``'s numerical rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

OVERSAMPLE = 10  # extra sketch columns of the randomized SVD (Halko et al. recommend 5-10)
NITER = 2  # power iterations of the randomized SVD
SKETCH_SEED = 0x5EED


def numerical_rank(s: Tensor, shape: tuple[int, ...], scale: float = 0.0) -> int:
    """How many of the (descending) singular values ``s`` of a ``shape`` matrix are non-zero:
    above ``max(s[0], scale) · max(shape) · eps``. ``scale`` is the size of what the matrix was
    computed from (a residual's parent), so that rounding residue does not count as a direction."""
    if s.numel() == 0:
        return 0
    eps = torch.finfo(s.dtype).eps
    tol = max(float(s[0]), scale) * max(shape) * eps
    return int((s > tol).sum()) if bool(s[0] > 0) else 0


def gram_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a tall ``a`` (m ≥ n) from the eigendecomposition of ``aᵀa`` in float64.

    Slower and less accurate for tiny singular values than LAPACK's divide and conquer, but it
    always converges: the fallback when ``torch.linalg.svd`` reports an ill-conditioned input.
    """
    a64 = a.double()
    evals, v = torch.linalg.eigh(a64.T @ a64)  # ascending
    evals, v = evals.flip(0), v.flip(1)
    s = evals.clamp(min=0.0).sqrt()  # (n,)
    keep = s > s[0] * max(a.shape) * torch.finfo(a.dtype).eps if s.numel() else s > 0
    u = torch.zeros((a.shape[0], s.numel()), dtype=torch.float64, device=a.device)
    u[:, keep] = (a64 @ v[:, keep]) / s[keep]
    s = torch.where(keep, s, torch.zeros_like(s))
    return u.to(a.dtype), s.to(a.dtype), v.T.to(a.dtype)


def _tall_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` of a tall matrix; if LAPACK fails to converge (it does on some
    ill-conditioned inputs with many repeated singular values), float64, then :func:`gram_svd`."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)
    except torch.linalg.LinAlgError:
        return gram_svd(a)


def exact_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``a = U diag(S) Vh``: (m, n) -> U (m, r), S (r,), Vh (r, n), r = min(m, n).

    A wide matrix is decomposed as its (tall) transpose: on the CPU, LAPACK is several times
    faster on a (32000, 256) matrix than on the (256, 32000) one (measured: 2.4 s vs 16 s).
    """
    if a.shape[0] < a.shape[1]:
        u, s, vh = _tall_svd(a.T)  # aᵀ = u s vh -> a = vhᵀ s uᵀ
        return vh.T, s, u.T
    return _tall_svd(a)


def _randomized_svd(a: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``q`` randomized SVD of ``a`` (m, n) with a fixed-seed sketch (HMT 2011, Alg. 4.4)."""
    gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype).to(a.device)  # (n, q)
    y, _ = torch.linalg.qr(a @ omega)  # (m, q): a basis of a's dominant range
    for _ in range(NITER):  # power iterations, re-orthonormalised each half step
        z, _ = torch.linalg.qr(a.T @ y)  # (n, q)
        y, _ = torch.linalg.qr(a @ z)  # (m, q)
    u_small, s, vh = exact_svd(y.T @ a)  # (q, n) -> (q, q), (q,), (q, n)
    return y @ u_small, s, vh


SVD_CHOICES = ("exact", "randomized")


def top_svd(
    a: Tensor, k: int, scale: float = 0.0, randomized: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``a`` (m, n): U (m, k), S (k,), Vh (k, n).

    Exact (``torch.linalg.svd``) on every device unless ``randomized`` is set; then randomized
    when ``k + OVERSAMPLE ≤ min(m, n) / 4`` (see the module docstring: it approximates the
    subspace, so it changes the result). Singular values past the numerical rank (see
    :func:`numerical_rank`, ``scale``) are zeroed together with their vectors, so that no
    arbitrary direction survives.
    """
    r = min(a.shape)
    k = max(0, min(k, r))
    if randomized and 4 * (k + OVERSAMPLE) <= r:
        u, s, vh = _randomized_svd(a, k + OVERSAMPLE)
    else:
        u, s, vh = exact_svd(a)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    keep = numerical_rank(s, tuple(a.shape), scale) if k else 0
    if keep < k:  # zero singular values: their vectors are arbitrary, drop them
        u, s, vh = u.clone(), s.clone(), vh.clone()
        u[:, keep:], s[keep:], vh[keep:] = 0.0, 0.0, 0.0
    return u, s, vh


def polar(x: Tensor) -> Tensor:
    """Orthogonal polar factor of ``x`` (m, c): ``P Qᵀ`` from ``x = P Σ Qᵀ``, over its numerical rank.

    For full-rank ``x`` this is the nearest matrix with orthonormal columns (rows when c > m) in
    Frobenius norm; columns of ``x`` that are zero stay zero.
    """
    p, s, qh = exact_svd(x)
    keep = numerical_rank(s, tuple(x.shape))
    return p[:, :keep] @ qh[:keep]


def summed(deltas: list[Tensor]) -> Tensor:
    """``Σ_i τ_i`` in a new tensor."""
    out = torch.zeros_like(deltas[0])
    for d in deltas:
        out.add_(d)
    return out


def mean_update(deltas: list[Tensor]) -> Tensor:
    """The mean of the updates, ``Σ_i τ_i / N``: what every rule here does with non-2-D tensors."""
    return summed(deltas).div_(len(deltas))
