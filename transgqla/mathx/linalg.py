"""Small linear-algebra helpers whose numerics and speed the conversion depends on."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_thread():
    """Run the enclosed torch ops on one thread. LAPACK's symmetric eigensolver is several times
    slower on two busy cores than on one (measured: 2048^2 float64, 2.4 s vs 5-14 s), and one thread
    also makes its result independent of the machine's thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def eigh_descending(sym: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetric matrix ``sym``, largest first (the ``top`` largest when given),
    each vector's largest-magnitude entry made positive (a deterministic sign). Only the lower
    triangle is read (LAPACK's convention), so a Gram product that is symmetric only up to
    rounding needs no explicit symmetrization (which costs a quarter of a 2048^2 eigh)."""
    with single_thread():
        vals, vecs = torch.linalg.eigh(sym)
    order = torch.argsort(vals, descending=True, stable=True)[:top]
    vals, vecs = vals[order], vecs[:, order]
    pivot = vecs.abs().argmax(dim=0)
    return vals, vecs * torch.sign(vecs[pivot, torch.arange(vecs.shape[1], device=vecs.device)])[None, :]


def orthonormalize(vecs: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``vecs`` (float64 QR), each as close as possible in sign to the
    input column: nearly orthonormal input (a float32 eigensolve) comes back nearly unchanged."""
    with single_thread():
        q, r = torch.linalg.qr(vecs)
    sign = torch.sign(torch.diagonal(r))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)[None, :]


def moment_trace(weight: torch.Tensor, moment) -> float:
    """``trace(W C W^T)`` without forming the ``m x m`` product."""
    return float((moment.right(weight) * weight).sum())
