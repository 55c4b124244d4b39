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
- ``precise=True`` (:func:`top_svd`, :func:`polar`): the same in float64, through the
  eigendecomposition of the Gram matrix of the short side (:func:`gram_top_svd`), streamed over
  the long side in float64 blocks. TSV and Iso-CTS orthogonalise a concatenation of per-update
  singular vectors whose condition number grows as the kept directions fill the rank (with 6
  updates of a 1536 × 8960 matrix the concatenation is square); the top-k subspace of one
  update is itself only as accurate as ``eps · σ_1 / (σ_k − σ_{k+1})``, and the polar factor
  multiplies that error by the condition number. In float32 that left the merged update 4.7e-4 of
  its largest entry away from a float64 computation of the rule (tests/test_methods_reference.py);
  in float64 that test passes at 1e-4 with 2 and 6 updates. Its cost at the real Qwen2-VL-2B shape
  is measured in docs/methods.md (`benchmarks/methods_cost.py`). The numerical rank of an update
  keeps the float32 inputs' tolerance (``σ > σ_max · max(m, n) · eps₃₂``); that of a polar
  factor's input the Gram's own (``σ > σ_max · max(m, n) · √eps₆₄``), since the concatenations
  are full-rank unless columns are exactly zero or dependent.
"""

from __future__ import annotations

import torch
from torch import Tensor

DATA_EPS = torch.finfo(torch.float32).eps  # the rules' inputs are float32: below it is rounding
# a float64 Gram matrix resolves singular values down to about √eps₆₄ of the largest: the
# numerical rank of a polar factor computed from it (a zero direction comes out near 1e-8)
GRAM_EPS = torch.finfo(torch.float64).eps ** 0.5
BLOCK_ELEMENTS = 1 << 22  # float64 elements of one block of the long side (32 MiB)
OVERSAMPLE = 10  # extra sketch columns of the randomized SVD (Halko et al. recommend 5-10)
NITER = 2  # power iterations of the randomized SVD
SKETCH_SEED = 0x5EED


def numerical_rank(
    s: Tensor, shape: tuple[int, ...], scale: float = 0.0, eps: float | None = None
) -> int:
    """How many of the (descending) singular values ``s`` of a ``shape`` matrix are non-zero:
    above ``max(s[0], scale) · max(shape) · eps`` (``eps``: of ``s``'s dtype unless given).
    ``scale`` is the size of what the matrix was computed from (a residual's parent), so that
    rounding residue does not count as a direction."""
    if s.numel() == 0:
        return 0
    eps = torch.finfo(s.dtype).eps if eps is None else eps
    tol = max(float(s[0]), scale) * max(shape) * eps
    return int((s > tol).sum()) if bool(s[0] > 0) else 0


def _blocks(rows: int, cols: int) -> range:
    return range(0, rows, max(1, BLOCK_ELEMENTS // max(1, cols)))


def _gram(a: Tensor) -> Tensor:
    """``aᵀa`` of a tall ``a`` (m, n) in float64, from float64 blocks of its rows."""
    step = max(1, BLOCK_ELEMENTS // max(1, a.shape[1]))
    g = torch.zeros((a.shape[1], a.shape[1]), dtype=torch.float64, device=a.device)
    for i in _blocks(*a.shape):
        blk = a[i : i + step].double()
        g.addmm_(blk.T, blk)
    return g


def _times(a: Tensor, w: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``a @ w`` for a tall ``a`` (m, n) and a float64 ``w`` (n, c), in float64 blocks of a's
    rows, stored as ``dtype``."""
    step = max(1, BLOCK_ELEMENTS // max(1, a.shape[1]))
    out = torch.empty((a.shape[0], w.shape[1]), dtype=dtype, device=a.device)
    for i in _blocks(*a.shape):
        out[i : i + step] = a[i : i + step].double() @ w
    return out


def _gram_eig(t: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values (descending) and right singular vectors of a tall ``t`` from ``eigh`` of
    its float64 Gram matrix: (s (n,), v (n, n)), float64."""
    evals, vecs = torch.linalg.eigh(_gram(t))  # ascending
    return evals.flip(0).clamp(min=0.0).sqrt(), vecs.flip(1)


def gram_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``a`` through :func:`gram_top_svd`, in ``a``'s dtype: slower than LAPACK's
    divide and conquer and less accurate for tiny singular values, but it always converges, so it
    is the fallback when ``torch.linalg.svd`` reports an ill-conditioned input."""
    u, s, vh = gram_top_svd(a, min(a.shape))
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def gram_top_svd(a: Tensor, k: int, scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``a`` (m, n) in float64: U (m, k), S (k,), Vh (k, n).

    From ``eigh`` of the float64 Gram matrix of the short side, the long side's vectors as
    ``a v / σ``; streamed in float64 blocks, so ``a`` is never copied whole. Singular values at
    or below the numerical rank (float32 tolerance, ``scale`` as in :func:`numerical_rank`) are
    zeroed with their vectors.
    """
    tall = a.shape[0] >= a.shape[1]
    t = a if tall else a.T  # (long, short)
    k = max(0, min(k, t.shape[1]))
    s, vecs = _gram_eig(t)
    s, vecs = s[:k], vecs[:, :k]
    keep = numerical_rank(s, tuple(a.shape), scale, DATA_EPS) if k else 0
    s, vecs = s.clone(), vecs.clone()
    s[keep:], vecs[:, keep:] = 0.0, 0.0
    other = _times(t, vecs[:, :keep] / s[:keep])  # (long, keep)
    if keep < k:
        other = torch.cat([other, other.new_zeros((other.shape[0], k - keep))], dim=1)
    return (other, s, vecs.T) if tall else (vecs, s, other.T)


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
RANDOMIZED_NOTE = (
    "svd=randomized: {method}'s per-update SVDs are randomized where they keep at most a quarter "
    "of the rank, so the merge is an approximation of the rule. Measured on Gaussian updates "
    "(docs/methods.md), it moved the merged update by 0.80 (tsv), 0.40 (iso_cts) and 0.015 "
    "(optmerge) of its largest entry (6 updates of a 192 x 160 matrix); real updates decay "
    "faster, but nothing bounds the change. Use svd=exact (the default) for the paper's rule."
)


def top_svd(
    a: Tensor, k: int, scale: float = 0.0, randomized: bool = False, precise: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` singular triplets of ``a`` (m, n): U (m, k), S (k,), Vh (k, n).

    Exact (``torch.linalg.svd``) on every device unless ``randomized`` is set; then randomized
    when ``k + OVERSAMPLE ≤ min(m, n) / 4`` (see the module docstring: it approximates the
    subspace, so it changes the result). ``precise``: exact in float64 (:func:`gram_top_svd`;
    float64 results), unless ``randomized`` applies. Singular values past the numerical rank (see
    :func:`numerical_rank`, ``scale``) are zeroed together with their vectors, so that no
    arbitrary direction survives.
    """
    r = min(a.shape)
    k = max(0, min(k, r))
    if randomized and 4 * (k + OVERSAMPLE) <= r:
        u, s, vh = _randomized_svd(a.float(), k + OVERSAMPLE)
    elif precise:
        return gram_top_svd(a, k, scale)
    else:
        u, s, vh = exact_svd(a)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    keep = numerical_rank(s, tuple(a.shape), scale) if k else 0
    if keep < k:  # zero singular values: their vectors are arbitrary, drop them
        u, s, vh = u.clone(), s.clone(), vh.clone()
        u[:, keep:], s[keep:], vh[keep:] = 0.0, 0.0, 0.0
    return u, s, vh


def polar(x: Tensor, precise: bool = False) -> Tensor:
    """Orthogonal polar factor of ``x`` (m, c): ``P Qᵀ`` from ``x = P Σ Qᵀ``, over its numerical rank.

    For full-rank ``x`` this is the nearest matrix with orthonormal columns (rows when c > m) in
    Frobenius norm; columns of ``x`` that are zero stay zero. ``precise``: computed in float64 as
    ``x Q Σ⁻¹ Qᵀ`` from ``eigh`` of the Gram matrix of the short side, in blocks of the long
    side, the factor stored as float32 (it is orthonormal: no later step amplifies its rounding).
    """
    if precise:
        tall = x.shape[0] >= x.shape[1]
        t = x if tall else x.T
        s, q = _gram_eig(t)
        # the rank at the Gram's own resolution, not the float32 data's: a concatenation of
        # unit vectors is full-rank however ill-conditioned (condition numbers in the thousands
        # are normal for TSV), and only exactly dependent or zero columns are to be dropped
        keep = numerical_rank(s, tuple(x.shape), eps=GRAM_EPS)
        w = (q[:, :keep] / s[:keep]) @ q[:, :keep].T  # Q Σ⁻¹ Qᵀ over the numerical rank
        out = _times(t, w, torch.float32)
        return out if tall else out.T
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
