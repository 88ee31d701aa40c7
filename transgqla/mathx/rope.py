"""RoPE geometry: frequencies (with Hugging Face rope scaling) and the two pair layouts.

Hugging Face Llama pairs head dims ``(i, i + d/2)`` ("rotate_half"); GQLA's RoPE rows are
interleaved, pair ``p`` = dims ``(2p, 2p+1)`` (DeepSeek-V3 with ``rope_interleave: true``).
In both, a pair is the complex number ``re + j im`` and position ``t`` multiplies it by
``exp(j t w)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UnsupportedError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Refused with their reason: converting them as plain RoPE would be silently wrong.
REFUSED_ROPE_TYPES = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length, and GQLA's RoPE key "
               "rotates at fixed ones: the converted model would diverge from the source past "
               "original_max_position_embeddings",
}


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return ``(base, scaling)`` from a config in either the v4 (``rope_theta`` +
    ``rope_scaling``) or v5 (``rope_parameters``) spelling; scaling is None for plain RoPE."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        base = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        base = float(config.get("rope_theta", 10000.0))
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in REFUSED_ROPE_TYPES:
            raise UnsupportedError(f"rope scaling '{kind}' is not supported: {REFUSED_ROPE_TYPES[kind]}")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedError(
                f"rope scaling '{kind}' is not supported; supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if kind == "default":
            scaling = None
    return base, scaling


def inv_freq(dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Angular frequency of each of the ``dim/2`` pairs, float64, rad/token.

    ``w_p = base^(-2p/dim)`` then the source's scaling. Every supported scaling maps a
    frequency to a function of that frequency alone, so ``inv_freq(d_R)[p]`` equals
    ``inv_freq(d)[p * d / d_R]``: the property that lets DeepSeek's geometry reuse the
    source's frequencies.
    """
    w = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return w
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return w / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / w
        scaled = torch.where(wavelen > old_len / low, w / factor, w)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedError(f"rope scaling '{kind}' is not supported")


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[len(positions), len(freqs)]`` computed in float64, on ``positions``'
    device (frequencies are small and kept on the CPU; they move to the data they meet)."""
    angles = positions.to(torch.float64)[:, None] * freqs.to(device=positions.device, dtype=torch.float64)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x[..., T, d]`` whose pairs are ``(i, i + d/2)``; cos/sin ``[T, d/2]``."""
    half = x.shape[-1] // 2
    re, im = x[..., :half], x[..., half:]
    return torch.cat((re * cos - im * sin, im * cos + re * sin), dim=-1)


def interleaved_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x[..., T, d_R]`` whose pairs are ``(2p, 2p+1)``; cos/sin ``[T, d_R/2]``."""
    re, im = x[..., 0::2], x[..., 1::2]
    out = torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1)
    return out.flatten(-2)


def half_to_interleaved(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reorder a rotate_half layout ``[re_0..re_{n-1}, im_0..im_{n-1}]`` to ``[re_0, im_0, ...]``."""
    x = x.movedim(dim, -1)
    half = x.shape[-1] // 2
    out = torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)
    return out.movedim(-1, dim)


def interleaved_to_half(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`half_to_interleaved`."""
    x = x.movedim(dim, -1)
    out = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    return out.movedim(-1, dim)
