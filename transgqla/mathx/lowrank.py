"""Rank-``r`` factorization of the joint key/value map ``W ~ B A`` (DESIGN.md section 3, step 4).

``A`` becomes ``W_DKV`` (the latent every group shares) and the row blocks of ``B`` the per-group
up-projections. The optimum of ``E || L (W - B A) x ||^2`` over rank-``r`` ``B A`` is closed form:
with ``L`` diagonal (row weights, TransMLA's K/V balance is one) it is the top-``r`` eigenvectors
``Q`` of ``L W C W^T L`` and ``A = Q^T L W``, ``B = L^-1 Q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import eigh_descending, moment_trace, single_thread
from .moments import InputMoment


@dataclass
class Factorization:
    up: torch.Tensor  # B [m, r]
    down: torch.Tensor  # A [r, D+1]
    captured: float  # fraction of the (weighted) output energy kept


def top_eigvecs(sym: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of a symmetric matrix, descending, with a deterministic sign."""
    vals, vecs = eigh_descending(sym)
    return vals[:rank], vecs[:, :rank]


def factorize(weight: torch.Tensor, moment: InputMoment, rank: int, row_weight: torch.Tensor | None = None) -> Factorization:
    """Factorize ``weight[m, D+1]`` at ``rank`` under input moment ``moment``, rows scaled by ``row_weight``."""
    w = weight if row_weight is None else weight * row_weight[:, None]
    gram = moment.gram(w)
    gram = (gram + gram.T) / 2
    vals, q = top_eigvecs(gram, rank)
    captured = float(vals.clamp_min(0).sum() / torch.trace(gram).clamp_min(1e-300))
    down = q.T @ w
    up = q if row_weight is None else q / row_weight[:, None]
    return Factorization(up=up, down=down, captured=captured)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, moment: InputMoment) -> float:
    """``E||(W - W~) x||^2 / E||W x||^2`` under the input moment."""
    return moment_trace(weight - approx, moment) / max(moment_trace(weight, moment), 1e-300)


def factorize_metric(weight: torch.Tensor, moment: InputMoment, rank: int, metric_roots: torch.Tensor) -> Factorization:
    """Factorize ``weight[m, D+1]`` minimizing ``E || L (W - B A) x ||^2`` for a block-diagonal ``L``.

    ``metric_roots[k, b, b]`` are the square roots of the blocks of the output metric (``m = k b``),
    e.g. per group the query second moment for keys and ``W_O^T W_O`` for values. ``L`` must be
    invertible (callers add a ridge).
    """
    k, b, _ = metric_roots.shape
    lw = torch.einsum("kij,kjc->kic", metric_roots, weight.reshape(k, b, -1)).reshape(k * b, -1)
    gram = moment.gram(lw)
    gram = (gram + gram.T) / 2
    vals, q = top_eigvecs(gram, rank)
    captured = float(vals.clamp_min(0).sum() / torch.trace(gram).clamp_min(1e-300))
    down = q.T @ lw
    up = torch.linalg.solve(metric_roots, q.reshape(k, b, rank)).reshape(k * b, rank)
    return Factorization(up=up, down=down, captured=captured)


def psd_sqrt(mats: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Symmetric square roots of PSD matrices ``[..., b, b]``, each with a relative ridge so it inverts."""
    mats = (mats + mats.transpose(-1, -2)) / 2
    scale = torch.diagonal(mats, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    with single_thread():
        vals, vecs = torch.linalg.eigh(mats)
    vals = vals.clamp_min(0) + ridge * scale[..., None]
    return (vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
