"""Rank-``r`` factorization of the joint key/value map ``W ~ B A`` (DESIGN.md section 3, step 4).

``A`` becomes ``W_DKV`` (the latent every group shares) and the row blocks of ``B`` the per-group
up-projections. The optimum of ``E || L (W - B A) x ||^2`` over rank-``r`` ``B A`` is closed form:
with ``L`` diagonal (row weights, TransMLA's K/V balance is one) it is the top-``r`` eigenvectors
``Q`` of ``G = L W C W^T L`` and ``A = Q^T L W``, ``B = L^-1 Q``.

Precision. Only the subspace ``span(Q)`` matters (any rotation inside it gives the same ``B A``),
and the energy a slightly tilted subspace loses is quadratic in the tilt. So the eigensolve (the
dominant cost: a ``2 n_g d`` square matrix, 2048 on Llama-3-8B) runs in float32 and ``Q`` is then
re-orthonormalized in float64; ``A`` and ``B`` are float64 projections of the weights. Measured
against an all-float64 solve, the extra energy lost is below 1e-6 of the energy the rank cut drops
(tests/test_lowrank.py), far under the rounding of a bf16 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import eigh_descending, orthonormalize, single_thread
from .moments import InputMoment

EIGEN_DTYPE = torch.float32  # see the module docstring


@dataclass
class Factorization:
    up: torch.Tensor  # B [m, r]
    down: torch.Tensor  # A [r, D+1]
    captured: float  # fraction of the (weighted) output energy kept
    row_residual: torch.Tensor  # [m] E||(W - B A)_i x||^2 per row of W, unweighted


def top_eigvecs(sym: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of a symmetric matrix, descending: solved in ``EIGEN_DTYPE`` with a
    deterministic sign, vectors returned float64 and orthonormal to float64 rounding."""
    vals, vecs = eigh_descending(sym.to(EIGEN_DTYPE), top=rank)
    return vals.double(), orthonormalize(vecs.double())


def _row_residual(gram: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``diag((I - QQ^T) G (I - QQ^T))`` for orthonormal ``Q``: each row's residual energy, from the
    Gram matrix alone (``O(m^2 r)``, never forming ``B A``)."""
    gq = gram @ q
    h = q.T @ gq
    return (torch.diagonal(gram) - 2 * (q * gq).sum(1) + (q @ h * q).sum(1)).clamp_min(0)


def factorize(weight: torch.Tensor, moment: InputMoment, rank: int, row_weight: torch.Tensor | None = None) -> Factorization:
    """Factorize ``weight[m, D+1]`` at ``rank`` under input moment ``moment``, rows scaled by ``row_weight``.
    ``A`` and ``B`` come in ``weight``'s dtype; the eigensolve is float32 whatever it is."""
    # L W C W^T L and Q^T L W, with the diagonal L applied to the small factors, not to W.
    gram = moment.gram(weight, dtype=EIGEN_DTYPE if moment.diag is not None else weight.dtype).double()
    ell = None if row_weight is None else row_weight.double()
    if ell is not None:
        gram = gram * ell[:, None] * ell[None, :]
    _, q = top_eigvecs(gram, rank)
    residual = _row_residual(gram, q)
    captured = float(1 - residual.sum() / torch.trace(gram).clamp_min(1e-300))
    if ell is None:
        q = q.to(weight.dtype)
        return Factorization(up=q, down=q.T @ weight, captured=captured, row_residual=residual)
    down = (q * ell[:, None]).to(weight.dtype).T @ weight
    up = (q / ell[:, None]).to(weight.dtype)
    return Factorization(up=up, down=down, captured=captured, row_residual=residual / ell.pow(2))


def factorize_metric(weight: torch.Tensor, moment: InputMoment, rank: int, metric_roots: torch.Tensor) -> Factorization:
    """Factorize ``weight[m, D+1]`` minimizing ``E || L (W - B A) x ||^2`` for a block-diagonal ``L``.

    ``metric_roots[k, b, b]`` are the square roots of the blocks of the output metric (``m = k b``),
    e.g. per group the query second moment for keys and ``W_O^T W_O`` for values. ``L`` must be
    invertible (callers add a ridge).
    """
    k, b, _ = metric_roots.shape
    lw = torch.einsum("kij,kjc->kic", metric_roots, weight.reshape(k, b, -1)).reshape(k * b, -1)
    gram = moment.gram(lw)
    _, q = top_eigvecs(gram, rank)
    captured = float(1 - _row_residual(gram, q).sum() / torch.trace(gram).clamp_min(1e-300))
    down = q.T @ lw
    up = torch.linalg.solve(metric_roots, q.reshape(k, b, rank)).reshape(k * b, rank)
    diff = weight - up @ down  # the residual in the plain metric needs the product (calibrated path only)
    residual = (moment.right(diff) * diff).sum(1)
    return Factorization(up=up, down=down, captured=captured, row_residual=residual)


def psd_sqrt(mats: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Symmetric square roots of PSD matrices ``[..., b, b]``, each with a relative ridge so it inverts."""
    mats = (mats + mats.transpose(-1, -2)) / 2
    scale = torch.diagonal(mats, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    with single_thread():
        vals, vecs = torch.linalg.eigh(mats)
    vals = vals.clamp_min(0) + ridge * scale[..., None]
    return (vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
