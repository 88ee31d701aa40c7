"""DeepSeek's latent RMSNorm made harmless: GQLA has no norm on its latent ``c``, DeepSeek-V3 always applies
``kv_a_layernorm(c) = w * c / sqrt(mean(c^2) + eps)``. Two ways to make it reproduce ``c``:

**Linear regime** (:func:`linear_norm`, ``--target engines``, no extra dims, no bias). Scale the ``r`` latent
rows of ``kv_a_proj_with_mqa`` by ``alpha`` and set the norm weight to ``w = sqrt(eps) / alpha``. The norm sees
``alpha c`` and returns ``c / sqrt(1 + delta)`` with ``delta = alpha^2 mean(c^2) / eps``: relative error about
``delta / 2``. ``alpha`` comes from a worst-case bound: the attention input is ``x = ln_w * u`` with
``|u| = sqrt(D)`` (RMSNorm output before its weight), so ``|c| <= B = ||W_DKV diag(ln_w)||_2 sqrt(D) + |b_DKV|``
and ``mean(c^2) <= B^2 / r``. Choosing ``alpha = 2^floor(log2(sqrt(2^-24 eps r) / B))`` gives
``delta <= 2^-24`` for *every* input (below float32 resolution), and a power of two keeps ``alpha W_DKV``
exact in the checkpoint dtype. ``w`` is rounded to the dtype; the residual scale ``s = w alpha / sqrt(eps)``
is folded into ``kv_b_proj`` when it exceeds an eighth of the dtype's epsilon (bfloat16: ``|s - 1|`` up to
~2e-3 otherwise). The eps must be the one every runtime uses: transformers builds ``kv_a_layernorm`` with
1e-6 whatever the config says, vLLM and SGLang use ``config.rms_norm_eps``, so the export writes
``rms_norm_eps: 1e-6`` (which moves the other norms: see :func:`.deepseek.stream_scale` and
:func:`rescale_pays`). float16
cannot hold ``alpha W`` (subnormal): refused.

**Constant coordinate** (:func:`pin_norm`, ``--target transformers``, exact to float32 rounding). One extra
latent coordinate with a zero ``kv_a_proj_with_mqa`` row and bias ``M >= 2^14 B`` dominates the norm:
``kv_lora_rank`` becomes ``r + 1`` and ``kv_a_proj_with_mqa`` has a bias, which transformers loads but vLLM
and SGLang's DeepSeek attention (no biases, fixed kernel ranks) do not. Details in :class:`NormPin`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..io.safetensors_format import to_torch_dtype
from .source import GQLACheckpoint

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm(kv_lora_rank) is built without config eps: its default
HEADROOM_BITS = 14  # constant coordinate: M >= 2^14 |c|_max  =>  |c|^2 / M^2 <= 2^-28
LINEAR_HEADROOM_BITS = 24  # linear regime: delta = alpha^2 mean(c^2) / eps <= 2^-24
MANTISSA_BITS = {"F32": 23, "F64": 52, "BF16": 7, "F16": 10}
MAX_EXPONENT = {"F16": 15}  # float16 holds values < 65504: M <= 2^15 (1 + ...)
DEFAULT_MAX_EXPONENT = 40


def spectral_norm(w: torch.Tensor) -> float:
    """``||w||_2`` (float64) as the root of the largest eigenvalue of the small Gram matrix ``w w^T``.

    The Gram product is one BLAS call; its ``[r, r]`` eigensolve runs on one thread: a ``[512, 4096]``
    ``svdvals`` took 50-70 s on this 2-core machine under load (LAPACK threads contending), the Gram
    eigensolve 0.2 s. Squaring loses only the small singular values; the top one is accurate to ~1e-15
    relative, and a 1e-9 margin keeps the result an upper bound.
    """
    w = w.to(torch.float64)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        top = float(torch.linalg.eigvalsh(gram)[-1])
    finally:
        torch.set_num_threads(threads)
    return math.sqrt(max(top, 0.0)) * (1 + 1e-9)


def latent_bound(src: GQLACheckpoint, layer: int) -> float:
    """Max of ``|c| = |W_DKV x + b_DKV|`` over every input ``x = ln_w * u`` with ``|u| <= sqrt(D)``."""
    geo = src.geo
    w_c = src.read64(src.attn(layer, "kv_a_proj_with_mqa.weight"))[: geo.rank]
    ln = src.read64(f"model.layers.{layer}.input_layernorm.weight")
    if ln is not None:
        w_c = w_c * ln[None, :]
    bias = src.read64(src.attn(layer, "kv_a_proj_with_mqa.bias"))
    b = float(bias[: geo.rank].norm()) if bias is not None else 0.0
    return spectral_norm(w_c) * math.sqrt(geo.hidden) + b


#: Unit roundoff (half the relative spacing) of each storage dtype.
UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def embedding_mean_square(src: GQLACheckpoint) -> float:
    """Mean of the squares of every embedding value: the mean square of the first norm's input, on average
    over the vocabulary (the residual stream is smallest there). Streamed through a 64 MiB buffer."""
    name = "model.embed_tokens.weight"
    dtype = to_torch_dtype(src.ckpt.spec(name).dtype)
    total, count = 0.0, 0
    for piece in src.ckpt.iter_bytes(name, bytearray(64 * 1024**2)):
        x = torch.frombuffer(piece, dtype=dtype).to(torch.float64)
        total += float(x.pow(2).sum())
        count += x.numel()
    return total / max(count, 1)


def eps_shift(eps: float, mean_square: float, new_eps: float = LATENT_NORM_EPS) -> float:
    """Relative change of an RMSNorm's output when its eps goes from ``eps`` to ``new_eps`` on inputs of mean
    square ``m``: ``sqrt((m + eps) / (m + new_eps)) - 1`` (about ``(eps - new_eps) / (2 m)``)."""
    return abs(math.sqrt((mean_square + eps) / (mean_square + new_eps)) - 1.0)


def rescale_pays(eps: float, dtypes: set[str], mean_square: float | None) -> bool:
    """Whether to compensate ``rms_norm_eps -> 1e-6`` by scaling the residual stream (:func:`.deepseek.stream_scale`).

    In float32/float64 the rescale is exact to rounding: always. In half precision it re-rounds the embedding,
    ``o_proj`` and ``down_proj`` (a relative error up to the dtype's unit roundoff ``u`` on every weight),
    while the eps change moves the first norm by :func:`eps_shift` of the embedding's mean square (later norms
    see a larger residual stream and move less). Rescale when that shift exceeds ``u``. Measured (bf16
    weights, float32 compute, relative logit error against the GQLA reference): SmolLM2 demo, mean square
    1.8e-2, shift 2.4e-4: eps change 2.0e-3 against rescale 1.9e-2 (keep the eps change); a tiny
    Llama-3-8B-shaped random model, mean square 4e-4, shift 1.1e-2: eps change 2.1e-2 (fails the check)
    against rescale 6.2e-3 (rescale).
    """
    if dtypes <= {"F32", "F64"}:
        return True
    if mean_square is None:
        return False
    return eps_shift(eps, mean_square) > max(UNIT_ROUNDOFF.get(d, 2.0**-8) for d in dtypes)


def input_bound(src: GQLACheckpoint, layer: int) -> float:
    """Max of ``|x|`` for the attention input ``x = ln_w * u``, ``|u| <= sqrt(D)``."""
    ln = src.read64(f"model.layers.{layer}.input_layernorm.weight")
    return (float(ln.abs().max()) if ln is not None else 1.0) * math.sqrt(src.geo.hidden)


def _needs_fold(scale: float, dtype: str) -> bool:
    return abs(scale - 1) > torch.finfo(to_torch_dtype(dtype)).eps / 8


@dataclass
class LinearNorm:
    """One layer's latent norm in the linear regime: latent rows times ``alpha``, norm weight ``weight``."""

    alpha: float  # a power of two
    weight: float  # sqrt(eps) / alpha rounded to the checkpoint dtype
    scale: float  # s = weight alpha / sqrt(eps): the norm returns ~ s c
    bound: float  # worst-case |c| over all inputs (B)
    rank: int
    folded: bool  # whether 1/s was folded into kv_b_proj
    eps: float = LATENT_NORM_EPS

    @property
    def worst_rel_error(self) -> float:
        """Worst case of ``1 - 1/sqrt(1 + delta)`` ~ ``delta / 2`` with ``delta = alpha^2 B^2 / (r eps)``."""
        return (self.alpha * self.bound) ** 2 / (self.rank * self.eps) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "weight": self.weight, "residual_scale": self.scale, "c_bound": self.bound,
                "worst_rel_error": self.worst_rel_error, "residual_folded": self.folded}


def linear_norm(bound: float, rank: int, dtype: str, eps: float = LATENT_NORM_EPS) -> LinearNorm:
    """``alpha`` (power of two, ``delta <= 2^-24`` at the bound) and the dtype-rounded weight."""
    bound = max(float(bound), 1e-30)
    alpha = 2.0 ** math.floor(math.log2(math.sqrt(2.0**-LINEAR_HEADROOM_BITS * eps * rank) / bound))
    w = float(torch.tensor(math.sqrt(eps) / alpha, dtype=torch.float64).to(to_torch_dtype(dtype)))
    scale = w * alpha / math.sqrt(eps)
    return LinearNorm(alpha, w, scale, bound, rank, _needs_fold(scale, dtype), eps)


@dataclass
class NormPin:
    """How one layer's latent RMSNorm is pinned to the identity with a constant coordinate.

    ``kv_lora_rank`` becomes ``r + 1``; the extra coordinate has a zero ``kv_a_proj_with_mqa`` row and bias
    ``M``, so the norm sees ``[c ; M]`` and returns ``w c sqrt(r + 1) / sqrt(|c|^2 + M^2 + (r + 1) eps)`` on
    the first ``r`` dims. ``M >= 2^14 B`` makes ``|c|^2 / M^2 < 2^-28``. ``w = M / sqrt(r + 1)`` rounded to
    the dtype; ``M``'s mantissa is searched so that ``s = w sqrt(r + 1) / sqrt(M^2 + (r + 1) eps)`` is as
    close to 1 as the dtype allows, and a residual beyond an eighth of the dtype's epsilon is folded into
    ``kv_b_proj``. The extra coordinate's norm weight is 0 (the cache holds ``[c ; 0]``) and its
    ``kv_b_proj`` column is 0. float16 caps ``M`` at ``2^15`` (range).
    """

    bias: float  # M, the constant latent coordinate (exact in the checkpoint dtype)
    weight: float  # w, the norm weight of the r real latent dims (in the checkpoint dtype)
    scale: float  # s = w sqrt(r+1) / sqrt(M^2 + (r+1) eps): the norm's output is s c
    bound: float  # worst-case |c| over all inputs
    folded: bool  # whether 1/s was folded into kv_b_proj

    @property
    def worst_rel_error(self) -> float:
        """Worst-case relative deviation of the norm's scale from s: |c|^2 / (2 M^2)."""
        return self.bound**2 / (2 * self.bias**2)

    def to_dict(self) -> dict[str, Any]:
        return {"M": self.bias, "weight": self.weight, "residual_scale": self.scale, "c_bound": self.bound,
                "worst_rel_error": self.worst_rel_error, "residual_folded": self.folded}


def pin_norm(bound: float, dim: int, dtype: str, eps: float = LATENT_NORM_EPS) -> NormPin:
    """Choose ``M`` (>= 2^14 bound, exact in ``dtype``) and ``w`` (``dtype``) with ``s`` closest to 1."""
    bound = max(float(bound), 1e-3)
    exp = min(math.ceil(math.log2(bound)) + HEADROOM_BITS, MAX_EXPONENT.get(dtype, DEFAULT_MAX_EXPONENT))
    bits = min(MANTISSA_BITS.get(dtype, 23), 12)
    tdt = to_torch_dtype(dtype)
    j = torch.arange(2**bits, dtype=torch.float64)
    m = 2.0**exp * (1 + j / 2**bits)
    if dtype == "F16":
        m = m[m <= torch.finfo(torch.float16).max]
    w = (m / math.sqrt(dim)).to(tdt).to(torch.float64)
    s = w * math.sqrt(dim) / torch.sqrt(m * m + dim * eps)
    best = int((s - 1).abs().argmin())
    scale = float(s[best])
    return NormPin(float(m[best]), float(w[best]), scale, bound, _needs_fold(scale, dtype))
