"""GQLA attention on its two decoding paths, with explicit KV caches.

Per layer tensors (names relative to ``self_attn.``) follow the format contract. Both paths share
the projections; they differ only in what they cache and where ``kv_b_proj`` is applied:

* absorb: caches ``[c ; k_R]`` (``r + d_R`` values/token); ``kv_b_proj``'s key block is absorbed
  into the query (``q~ = W_UK^T q_nope``) and its value block applied after attention.
* gqa: caches per group ``k = [W_UK c ; k_R]`` and ``v = W_UV c`` (``n_g`` KV heads) and runs
  ordinary grouped attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..mathx.decode_kernels import absorb_attention, gqa_attention
from ..mathx.rope import cos_sin, interleaved_layout
from .geometry import GQLAGeometry

PATHS = ("absorb", "gqa")


@dataclass
class KVCache:
    """Per-layer cached tensors of one path: absorb holds ``(c[B,S,r], k_R[B,S,d_R])``, gqa holds
    ``(k[B,n_g,S,d_nope+d_R], v[B,n_g,S,d_v])``. RoPE keys are stored already rotated."""

    path: str
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def length(self) -> int:
        return 0 if not self.layers else next(iter(self.layers.values()))[0].shape[-2]

    def extend(self, layer: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            pa, pb = self.layers[layer]
            a, b = torch.cat((pa, a), dim=-2), torch.cat((pb, b), dim=-2)
        self.layers[layer] = (a, b)
        return a, b

    def values_per_token(self, layer: int = 0) -> int:
        """Cached values per token in ``layer``, counted from the tensors actually held."""
        a, b = self.layers[layer]
        return sum(t[0].numel() // t.shape[-2] for t in (a, b))

    def bytes_per_token(self, layer: int = 0) -> int:
        a, b = self.layers[layer]
        return sum(t[0].numel() // t.shape[-2] * t.element_size() for t in (a, b))


def causal_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """Boolean ``[T, S]``: query at absolute position ``t`` may see key ``s <= t`` (within the window)."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok &= (q_pos[:, None] - k_pos[None, :]) < window
    return ok


def _project(x, p, geo: GQLAGeometry, positions):
    """Shared projections: queries ``[B,n_h,T,*]``, latent ``c[B,T,r]``, rotated ``k_R[B,T,d_R]``."""
    b, t, _ = x.shape
    q = torch.nn.functional.linear(x, p["q_proj.weight"], p.get("q_proj.bias"))
    q = q.view(b, t, geo.n_heads, geo.d_nope + geo.d_rope).transpose(1, 2)
    q_nope, q_rope = q[..., : geo.d_nope], q[..., geo.d_nope :]
    kv = torch.nn.functional.linear(x, p["kv_a_proj_with_mqa.weight"], p.get("kv_a_proj_with_mqa.bias"))
    c, k_rope = kv[..., : geo.rank], kv[..., geo.rank :]
    cos, sin = cos_sin(geo.freqs, positions, dtype=x.dtype)
    return q_nope, interleaved_layout(q_rope, cos, sin), c, interleaved_layout(k_rope, cos, sin)


def _softmax(scores, mask):
    scores = scores.masked_fill(~mask, float("-inf"))
    wide = torch.promote_types(scores.dtype, torch.float32)  # at least float32, float64 stays float64
    return torch.softmax(scores.to(wide), dim=-1).to(scores.dtype)


def _up_blocks(p, geo: GQLAGeometry):
    """``kv_b_proj`` as per-group key ``[n_g, d_nope, r]`` and value ``[n_g, d_v, r]`` blocks (+ biases)."""
    w = p["kv_b_proj.weight"].view(geo.n_groups, geo.d_nope + geo.d_v, geo.rank)
    bias = p.get("kv_b_proj.bias")
    if bias is not None:
        bias = bias.view(geo.n_groups, geo.d_nope + geo.d_v)
        return w[:, : geo.d_nope], w[:, geo.d_nope :], bias[:, : geo.d_nope], bias[:, geo.d_nope :]
    return w[:, : geo.d_nope], w[:, geo.d_nope :], None, None


def attention(x, p, geo: GQLAGeometry, positions, cache: KVCache, layer: int, path: str) -> torch.Tensor:
    """GQLA attention of ``x[B,T,D]`` at absolute ``positions[T]`` on ``path``; extends ``cache``.

    Both paths attend through :mod:`~transgqla.mathx.decode_kernels` (heads folded into query rows),
    so neither materializes a per-head copy of its cache and per-path timings compare the paths.
    """
    b, t, _ = x.shape
    q_nope, q_rope, c, k_rope = _project(x, p, geo, positions)
    w_uk, w_uv, b_uk, b_uv = _up_blocks(p, geo)
    n_g, m = geo.n_groups, geo.heads_per_group
    if path == "absorb":
        c_all, kr_all = cache.extend(layer, c, k_rope)
        mask = causal_mask(positions, c_all.shape[1], geo.sliding_window)
        # q~_h = W_UK_g(h)^T q_nope_h, heads viewed as [n_g, m] (no per-head copy of W_UK).
        q_lat = torch.einsum("bgmtn,gnr->bgmtr", q_nope.view(b, n_g, m, t, geo.d_nope), w_uk)
        # A nope-key bias adds q_nope . b to every score of a query: softmax-invariant, so it is skipped.
        o_lat = absorb_attention(q_lat.reshape(b, geo.n_heads, t, geo.rank), q_rope, c_all, kr_all, mask, geo.softmax_scale, geo.softcap)
        out = torch.einsum("bgmtr,gvr->bgmtv", o_lat.view(b, n_g, m, t, geo.rank), w_uv)
        if b_uv is not None:
            out = out + b_uv[None, :, None, None, :]
        out = out.reshape(b, geo.n_heads, t, geo.d_v)
    elif path == "gqa":
        k_nope = torch.einsum("btr,gnr->bgtn", c, w_uk)
        v = torch.einsum("btr,gvr->bgtv", c, w_uv)
        if b_uk is not None:
            k_nope = k_nope + b_uk[None, :, None, :]
            v = v + b_uv[None, :, None, :]
        k = torch.cat((k_nope, k_rope[:, None].expand(b, n_g, t, geo.d_rope)), dim=-1)
        k_all, v_all = cache.extend(layer, k, v)
        mask = causal_mask(positions, k_all.shape[2], geo.sliding_window)
        out = gqa_attention(torch.cat((q_nope, q_rope), dim=-1), k_all, v_all, mask, geo.softmax_scale, geo.softcap)
    else:
        raise ValueError(f"unknown decode path {path!r}; choose from {PATHS}")
    out = out.transpose(1, 2).reshape(b, t, geo.n_heads * geo.d_v)
    return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))
