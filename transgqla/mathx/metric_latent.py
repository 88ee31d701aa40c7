"""The joint key/value latent in the attention's own metric, shared by a grid of key/value balances.

``gqla`` factorizes the joint map ``W = [W_nope; W_V]`` (``2 n_g d`` rows, ``D+1`` columns) minimizing
``E || L (W - B A) x ||^2`` with a block-diagonal ``L`` (gqla_layer.py, ``LayerObjective``): per group the
root of the query second moment for keys, the root of ``W_O^T W_O`` for values, each normalized to unit mean
eigenvalue; keys are then scaled by ``s sqrt(b)``, where ``s`` equalizes the weighted key and value energies
(TransMLA's balance, in this metric) and ``b`` is the balance a calibrated layer searches over.

The expensive product, the Gram ``G = L W C W^T L^T`` (``2 n_g d`` rows times ``(D+1)^2``: 100 GFLOP at
Llama-3-8B), is made once at ``s sqrt(b) = 1``; any balance only rescales its key rows and columns. So a
balance costs one eigensolve of ``G`` plus products with ``r`` columns. The residual reports need no product
with ``C`` either: ``W - B A = L^-1 (I - QQ^T) L W``, so row ``i``'s plain-metric residual is the diagonal of
``L^-1 (I - P) G (I - P) L^-T``, which reads only the diagonal ``d x d`` blocks of ``(I - P) G (I - P)``.
"""

from __future__ import annotations

import math

import torch

from .lowrank import Factorization, _row_residual, psd_sqrt, top_eigvecs
from .moments import InputMoment


def block_apply(roots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``blockdiag(roots) @ weight`` for ``roots[k, b, b]`` and ``weight[k b, C]``."""
    k, b, _ = roots.shape
    return torch.einsum("kij,kjc->kic", roots, weight.reshape(k, b, -1)).reshape(k * b, -1)


class MetricLatent:
    """``weight[2 n_g d, D+1]``: nope-key rows then value rows (bias columns already zero where they travel
    elsewhere); ``key_metric``/``value_metric`` ``[n_g, d, d]`` PSD. Float64 throughout except the
    eigensolve (lowrank.py)."""

    def __init__(self, weight: torch.Tensor, moment: InputMoment, key_metric: torch.Tensor, value_metric: torch.Tensor):
        km, vm = psd_sqrt(key_metric), psd_sqrt(value_metric)
        km = km / torch.diagonal(km, dim1=-2, dim2=-1).mean()
        vm = vm / torch.diagonal(vm, dim1=-2, dim2=-1).mean()
        self.roots = torch.cat((km, vm), 0)  # [2 n_g, d, d]
        self.half = km.shape[0] * km.shape[1]  # n_g d: rows before the values
        self.lw = block_apply(self.roots, weight)
        self.gram = moment.gram(self.lw)
        self.inv = torch.linalg.inv(self.roots)  # invertible: psd_sqrt adds a ridge
        e_k, e_v = float(torch.trace(self.gram[: self.half, : self.half])), float(torch.trace(self.gram[self.half :, self.half :]))
        self.key_scale = math.sqrt(e_v / e_k) if e_k > 0 and e_v > 0 else 1.0
        # Plain-metric energies trace(W C W^T) of the two sections, from the Gram's diagonal blocks.
        plain = (self._block_sandwich(self.inv, self._diag_blocks(self.gram))).diagonal(dim1=-2, dim2=-1).sum(-1)
        n_g = km.shape[0]
        self.key_energy, self.value_energy = float(plain[:n_g].sum()), float(plain[n_g:].sum())

    def _diag_blocks(self, m: torch.Tensor) -> torch.Tensor:
        k, b, _ = self.roots.shape
        return m.reshape(k, b, k, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [k, b, b]

    @staticmethod
    def _block_sandwich(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a @ m @ a.transpose(-1, -2)

    def factorize(self, rank: int, balance: float = 1.0) -> Factorization:
        """The rank-``rank`` optimum at key/value balance ``balance``: ``up = L^-1 Q``, ``down = Q^T L W``."""
        s = self.key_scale * math.sqrt(balance)
        k, b, _ = self.roots.shape
        scale = torch.ones(k * b, dtype=self.gram.dtype, device=self.gram.device)
        scale[: self.half] = s
        gram = self.gram * scale[:, None] * scale[None, :]
        _, q = top_eigvecs(gram, rank)
        residual_w = _row_residual(gram, q)
        captured = float(1 - residual_w.sum() / torch.trace(gram).clamp_min(1e-300))
        down = (q * scale[:, None]).T @ self.lw
        inv = self.inv / scale.reshape(k, b)[:, :1, None]  # blocks of L^-1
        up = torch.einsum("kij,kjr->kir", inv, q.reshape(k, b, rank)).reshape(k * b, rank)
        # diag blocks of (I-P) G (I-P) = G - Q Y^T - Y Q^T + Q H Q^T, Y = G Q, H = Q^T G Q
        y = gram @ q
        h = q.T @ y
        qb, yb = q.reshape(k, b, rank), y.reshape(k, b, rank)
        rest = self._diag_blocks(gram) - qb @ yb.transpose(1, 2) - yb @ qb.transpose(1, 2) + qb @ h @ qb.transpose(1, 2)
        residual = self._block_sandwich(inv, rest).diagonal(dim1=-2, dim2=-1).reshape(-1).clamp_min(0)
        return Factorization(up=up, down=down, captured=captured, row_residual=residual)
