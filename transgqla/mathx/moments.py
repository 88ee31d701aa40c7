"""Second moment of an attention layer's input, the statistic every projection choice is weighted by.

Inputs are augmented with a constant 1 (``x_aug = [x; 1]``) so that a projection ``W x + b`` is the
single matrix ``[W, b]`` and its output second moment is ``[W, b] C [W, b]^T``. Moments are held in float64
(calibration sums many small terms); a Gram product can be asked for in float32 where only a
float32 eigensolve consumes it (mathx/lowrank.py says why that is exact enough).
"""

from __future__ import annotations

import torch


class InputMoment:
    """``C = E[x_aug x_aug^T]``, ``(D+1) x (D+1)``, held diagonal when the statistics are data-free."""

    def __init__(self, diag: torch.Tensor | None = None, dense: torch.Tensor | None = None):
        if (diag is None) == (dense is None):
            raise ValueError("give exactly one of diag or dense")
        self.diag = None if diag is None else diag.to(torch.float64)
        self.dense = None if dense is None else dense.to(torch.float64)

    @property
    def dim(self) -> int:
        return int((self.diag if self.diag is not None else self.dense).shape[0])

    @classmethod
    def data_free(cls, norm_weight: torch.Tensor) -> "InputMoment":
        """Statistics from weights alone: the layer input is ``RMSNorm(h) * gamma`` with ``RMSNorm(h)``
        of unit mean square, so absent data we take independent coordinates of variance ``gamma_i^2``."""
        g = norm_weight.to(torch.float64)
        return cls(diag=torch.cat((g * g, torch.ones(1, dtype=torch.float64, device=g.device))))

    @classmethod
    def from_samples(cls, x: torch.Tensor) -> "InputMoment":
        """Moment of samples ``x[N, D]`` (the layer inputs), augmented with the constant 1."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        xa = torch.cat((x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)), dim=1)
        return cls(dense=xa.T @ xa / xa.shape[0])

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``W C`` for ``W[m, D+1]``, in ``W``'s dtype."""
        return w * self.diag.to(w.dtype) if self.diag is not None else w @ self.dense.to(w.dtype)

    def gram(self, a: torch.Tensor, b: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A C B^T`` (``B = A`` by default): the second moment of the outputs ``A x`` and ``B x``,
        computed in ``dtype`` (default: ``A``'s). float32 halves the cost of the large products
        when the result only feeds a float32 eigensolve."""
        dtype = dtype or a.dtype
        a = a.to(dtype)
        return self.right(a) @ (a if b is None else b.to(dtype)).T


def augment(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[W, b]`` in ``dtype``, with a zero column when the projection has no bias. ``W[..., D]`` -> ``[..., D+1]``."""
    out = torch.empty(weight.shape[:-1] + (weight.shape[-1] + 1,), dtype=dtype, device=weight.device)
    out[..., :-1] = weight
    out[..., -1] = 0.0 if bias is None else bias
    return out
