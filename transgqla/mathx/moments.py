"""Second moment of an attention layer's input, the statistic every projection choice is weighted by.

Inputs are augmented with a constant 1 (``x_aug = [x; 1]``) so that a projection ``W x + b`` is the
single matrix ``[W, b]`` and its output second moment is ``[W, b] C [W, b]^T``. All in float64: the
moments feed eigen-decompositions whose small eigenvalues decide what is dropped.
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
        return cls(diag=torch.cat((g * g, torch.ones(1, dtype=torch.float64))))

    @classmethod
    def from_samples(cls, x: torch.Tensor) -> "InputMoment":
        """Moment of samples ``x[N, D]`` (the layer inputs), augmented with the constant 1."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        xa = torch.cat((x, torch.ones(x.shape[0], 1, dtype=torch.float64)), dim=1)
        return cls(dense=xa.T @ xa / xa.shape[0])

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``W C`` for ``W[m, D+1]``."""
        return w * self.diag if self.diag is not None else w @ self.dense

    def gram(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``A C B^T`` (``B = A`` by default): the second moment of the outputs ``A x`` and ``B x``."""
        return self.right(a) @ (a if b is None else b).T


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W, b]`` in float64, with a zero column when the projection has no bias. ``W[..., D]`` -> ``[..., D+1]``."""
    w = weight.to(torch.float64)
    col = torch.zeros(w.shape[:-1] + (1,), dtype=torch.float64) if bias is None else bias.to(torch.float64)[..., None]
    return torch.cat((w, col), dim=-1)
