"""The joint K/V factorization against a dense float64 reference written here (numpy SVD): the float32
eigensolve must stay optimal to well below bf16 rounding, and the error reports computed from the Gram
matrix must equal the residuals of the factors actually returned."""

import numpy as np
import pytest
import torch

from transgqla.mathx.gqla_layer import LayerSettings, SourceAttention, convert_attention
from transgqla.mathx.linalg import orthonormalize
from transgqla.mathx.lowrank import factorize
from transgqla.mathx.moments import InputMoment


def optimal_dropped_energy(w: np.ndarray, c_diag: np.ndarray, rank: int) -> tuple[float, float]:
    """(dropped, total) energy of the best rank-``rank`` approximation of ``w diag(c)^1/2`` (Eckart-Young)."""
    s = np.linalg.svd(w * np.sqrt(c_diag)[None, :], compute_uv=False)
    return float((s[rank:] ** 2).sum()), float((s**2).sum())


def residual_rows(w: torch.Tensor, approx: torch.Tensor, c_diag: torch.Tensor) -> torch.Tensor:
    diff = (w - approx).double()
    return (diff * diff * c_diag[None, :]).sum(1)


@pytest.mark.parametrize("shape,rank", [((96, 161), 24), ((128, 257), 100), ((64, 80), 60)])
def test_float32_eigensolve_is_optimal_to_a_millionth_of_the_dropped_energy(shape, rank):
    g = torch.Generator().manual_seed(rank)
    m, n = shape
    # A realistic spectrum: a few strong directions over a flat bulk, and uneven input scales.
    w = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 3, n, dtype=torch.float64))
    w[:4] += 20 * torch.randn(4, n, generator=g, dtype=torch.float64)
    c = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.01
    fac = factorize(w, InputMoment(diag=c), rank)
    dropped_opt, total = optimal_dropped_energy(w.numpy(), c.numpy(), rank)
    got = residual_rows(w, fac.up @ fac.down, c)
    assert float(got.sum()) - dropped_opt <= 1e-6 * dropped_opt
    assert fac.captured == pytest.approx(1 - dropped_opt / total, abs=1e-7)
    # The per-row residual the reports use equals the residual of the returned factors.
    assert torch.allclose(fac.row_residual, got, rtol=1e-5, atol=1e-7 * total / m)
    # Orthonormal latent directions in float64: exact when nothing is dropped.
    q = fac.up
    assert torch.allclose(q.T @ q, torch.eye(rank, dtype=torch.float64), atol=1e-12)


def test_row_weighted_factorization_reports_residuals_in_the_plain_metric():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 65, generator=g, dtype=torch.float64)
    c = torch.rand(65, generator=g, dtype=torch.float64) + 0.5
    weight = torch.cat((torch.full((20,), 3.0, dtype=torch.float64), torch.ones(20, dtype=torch.float64)))
    fac = factorize(w, InputMoment(diag=c), 12, weight)
    got = residual_rows(w, fac.up @ fac.down, c)
    assert torch.allclose(fac.row_residual, got, rtol=1e-5, atol=1e-9 * float(got.sum()))
    # Weighted optimum: the reference SVD of the row-weighted matrix.
    dropped_opt, _ = optimal_dropped_energy((w * weight[:, None]).numpy(), c.numpy(), 12)
    assert float((got * weight**2).sum()) - dropped_opt <= 1e-6 * dropped_opt


def float32_subspace_error_bound(w: torch.Tensor, c: torch.Tensor) -> float:
    """A first-order bound on ``||W - Q Q^T W|| / ||W||`` when ``Q`` spans the exact rank of ``W`` but
    comes from a float32 eigensolve of ``G = W C W^T`` (then re-orthonormalized in float64).

    The float32 Gram product and eigensolve perturb ``G`` by ``||dG|| ~ k eps32 lambda_1``, ``k`` about
    ``sqrt(terms per entry)`` for rounding that adds up like a random walk. That tilts eigenvector
    ``u_i`` out of the true range by at most ``||dG|| / lambda_i`` (Davis-Kahan: the rest of the
    spectrum is exactly zero), which leaves ``sqrt(lambda_i) ||dG|| / lambda_i`` of ``W C^1/2`` outside
    ``span(Q)``. Summed over ``i`` and relative to ``||W C^1/2|| = sqrt(sum lambda)``:
    ``k eps32 lambda_1 sqrt(sum 1/lambda_i) / sqrt(sum lambda_i)``, times ``sqrt(max C / min C)`` for
    measuring in the plain metric. The spectrum comes from a float64 reference, not from the code."""
    lam = torch.linalg.eigvalsh((w * c[None, :]) @ w.T).flip(0)
    lam = lam[lam > 1e-9 * lam[0]]
    k = w.shape[1] ** 0.5
    eps32 = torch.finfo(torch.float32).eps
    weighted = k * eps32 * lam[0] * (1 / lam).sum().sqrt() / lam.sum().sqrt()
    return float(weighted * (c.max() / c.min()).sqrt())


def test_full_rank_factorization_is_exact():
    """Exact up to the float32 eigensolve: measured 1.33e-6 on an AMD EPYC (the old fixed 1e-6 bound held
    only on other CPUs' LAPACK kernels) against the derived bound, 2.4e-5 here; one dropped direction
    would cost 3.6e-2."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(30, 17, generator=g, dtype=torch.float64) @ torch.randn(17, 50, generator=g, dtype=torch.float64)
    c = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    fac = factorize(w, InputMoment(diag=c), 17)
    bound = float32_subspace_error_bound(w, c)
    assert 1e-6 < bound < 1e-4  # the bound is a float32-rounding figure, not a loose catch-all
    assert float((w - fac.up @ fac.down).norm() / w.norm()) < bound


def test_orthonormalize_keeps_nearly_orthonormal_columns_and_their_signs():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(50, 8, generator=g, dtype=torch.float64))
    q[:, 3] *= -1
    noisy = (q.float() + 1e-6 * torch.randn(50, 8, generator=g)).double()
    out = orthonormalize(noisy)
    assert torch.allclose(out.T @ out, torch.eye(8, dtype=torch.float64), atol=1e-14)
    assert (out - q).abs().max() < 1e-5


def test_layer_error_reports_match_the_written_factors():
    """``key_nope_rel_error``/``value_rel_error`` against the residual of ``kv_b_proj @ kv_a_proj``."""
    g = torch.Generator().manual_seed(5)
    n_h, n_g, d, hidden, r, d_r = 4, 2, 16, 64, 20, 8
    src = SourceAttention(
        wq=torch.randn(n_h * d, hidden, generator=g, dtype=torch.float64),
        wk=torch.randn(n_g * d, hidden, generator=g, dtype=torch.float64),
        wv=torch.randn(n_g * d, hidden, generator=g, dtype=torch.float64),
        n_heads=n_h, n_groups=n_g, head_dim=d,
    )
    gamma = torch.rand(hidden, generator=g, dtype=torch.float64) + 0.5
    moment = InputMoment.data_free(gamma)
    conv = convert_attention(src, moment, LayerSettings(r, d_r, 2))
    t = conv.tensors
    latent = t["kv_b_proj.weight"].reshape(n_g, 2 * d, r) @ t["kv_a_proj_with_mqa.weight"][:r]  # [n_g, 2d, D]
    v_approx = latent[:, d:].reshape(n_g * d, hidden)
    c = gamma * gamma
    v_err = float(residual_rows(src.wv, v_approx, c).sum() / (src.wv * src.wv * c).sum())
    assert conv.report["value_rel_error"] == pytest.approx(v_err, rel=1e-5)
    # Keys: what the latent misses of each group's nope key (the source key minus its RoPE share).
    k_nope_approx = latent[:, :d].reshape(n_g * d, hidden)
    w_rope = t["kv_a_proj_with_mqa.weight"][r:]
    # The RoPE rows are an orthonormal projection of the keys: recover the basis from them.
    basis = torch.linalg.lstsq(src.wk.T, w_rope.T).solution  # [n_g d, d_R]
    k_nope = src.wk - basis @ w_rope
    k_err = float(residual_rows(k_nope, k_nope_approx, c).sum() / (k_nope * k_nope * c).sum())
    assert conv.report["key_nope_rel_error"] == pytest.approx(k_err, rel=1e-5)
