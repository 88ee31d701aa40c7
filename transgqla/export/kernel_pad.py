"""``export --format deepseek --kernel-shape R+DR``: a small latent zero-padded to a fixed-shape MLA kernel.

Why: fast MLA decode kernels are compiled for a few shapes (vLLM's CPU kernel and FlashMLA take only
``r + d_R = 512 + 64``; :mod:`transgqla.engines`), while a conversion's latent is whatever its cache budget
allows (the demo's 96 + 32). Padding is an exact GQLA-to-GQLA map, applied here as a read-only view of OUT
(:class:`PaddedCheckpoint`), so the DeepSeek writer and its check run unchanged on it. Per layer (``f`` below):

==============================  =================================================================
``kv_a_proj_with_mqa`` (+bias)  ``r`` latent rows, ``R - r`` zero rows; RoPE pair ``p`` moved to slot
                                ``p * DR / d_R`` (rows ``2s, 2s + 1``), zero rows in the other slots
``kv_b_proj`` (+bias)           per group: ``d_nope`` key rows then ``D_nope - d_nope`` zero rows, ``d_v``
                                value rows then ``D_v - d_v`` zero rows; ``R - r`` zero columns
``q_proj`` (+bias)              per head: nope rows, zero rows, RoPE rows in their slots; all times ``f``
``o_proj``                      ``D_v - d_v`` zero columns after each head's ``d_v`` columns
==============================  =================================================================

Why each step is exact: zero latent dims add nothing to a score or a value; slot ``s = p * DR / d_R`` of a
``DR``-dim RoPE key rotates at ``base^(-2s/DR) = base^(-2p/d_R)``, pair ``p``'s own frequency (checked against
the rope scaling, refused when it differs); zero nope/value dims add nothing; ``o_proj`` never reads the zero
value dims. The one rounding: the engines' softmax scale is ``1/sqrt(D_nope + DR)``, so the query is
multiplied by ``f = sqrt((D_nope + DR) / (d_nope + d_R))`` and re-rounded to the checkpoint dtype. ``d_nope``
and ``d_v`` are padded to the smallest (d_nope, d_R, d_v) vLLM's prefill accepts
(:data:`transgqla.engines.VLLM_PREFILL_SHAPES`); that costs weights and compute, not cache. The cost in cache:
``R + DR`` values per token per layer instead of ``r + d_R`` (stated in the result and the warnings).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..engines import VLLM_PREFILL_SHAPES, MLAShape
from ..errors import InputError, UnsupportedError
from ..io import TensorSpec
from ..io.safetensors_format import to_torch_dtype
from ..mathx.rope import inv_freq, rope_settings
from ..model.geometry import GQLAGeometry
from .source import GQLACheckpoint

_SHAPE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")
_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.(weight|bias)$")


def parse_kernel_shape(text: str) -> tuple[int, int]:
    """``"512+64"`` -> ``(512, 64)``: the kernel's latent rank and RoPE key dims."""
    m = _SHAPE.match(text or "")
    if not m or int(m.group(2)) % 2 or not int(m.group(1)) or not int(m.group(2)):
        raise InputError(f"--kernel-shape must be R+DR with positive R and even DR (e.g. 512+64), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class KernelPadding:
    """From GQLA's ``(r, d_R, d_nope, d_v)`` to the padded one, and the query factor ``f``."""

    old: MLAShape
    new: MLAShape
    q_factor: float  # f = sqrt((D_nope + DR) / (d_nope + d_R))

    @property
    def stride(self) -> int:
        """RoPE pair ``p`` goes to slot ``p * stride``."""
        return self.new.d_rope // self.old.d_rope

    def to_dict(self, source_values: int | None = None) -> dict[str, Any]:
        def shape(s: MLAShape) -> dict[str, int]:
            return {"kv_lora_rank": s.rank, "qk_rope_head_dim": s.d_rope, "qk_nope_head_dim": s.d_nope,
                    "v_head_dim": s.d_v}

        return {"from": shape(self.old), "to": shape(self.new), "query_factor": self.q_factor,
                "rope_slot_stride": self.stride, "cache_values_per_token": self.new.cache_values,
                "cache_values_per_token_unpadded": self.old.cache_values,
                "cache_cost": self.new.cache_values / self.old.cache_values,
                "source_cache_values_per_token": source_values}

    def warning(self, source_values: int | None = None) -> str:
        vs = f"; the source GQA holds {source_values}" if source_values else ""
        return (f"zero-padded to {self.new}: exact, but the cache holds {self.new.cache_values} values/token/layer "
                f"instead of {self.old.cache_values} ({self.new.cache_values / self.old.cache_values:.2f}x{vs})")


def plan_padding(geo: GQLAGeometry, config: dict[str, Any], rank: int, d_rope: int) -> KernelPadding:
    """The padding to ``rank + d_rope``, or a one-line refusal when no zero padding reaches it."""
    old = MLAShape(geo.rank, geo.d_rope, geo.d_nope, geo.d_v)
    want = f"--kernel-shape {rank}+{d_rope}"
    if rank < geo.rank or d_rope < geo.d_rope:
        raise UnsupportedError(f"{want} is smaller than the checkpoint's {geo.rank}+{geo.d_rope}: padding cannot "
                               "shrink a latent; reconvert with --kv-lora-rank / --qk-rope-dim instead")
    if d_rope % geo.d_rope:
        raise UnsupportedError(f"{want}: {geo.d_rope} RoPE dims cannot spread evenly over {d_rope} (the kernel's "
                               "RoPE dims must be a multiple of the checkpoint's); reconvert with --qk-rope-dim "
                               f"{d_rope}")
    base, scaling = rope_settings(config)
    stride = d_rope // geo.d_rope
    moved, own = inv_freq(d_rope, base, scaling)[::stride], inv_freq(geo.d_rope, base, scaling)
    if not torch.allclose(moved, own, rtol=1e-12, atol=0.0):
        raise UnsupportedError(f"{want}: this rope scaling gives slot p*{stride} of a {d_rope}-dim key another "
                               "frequency than pair p; reconvert with --qk-rope-dim " + str(d_rope))
    fits = [(n, v) for n, r, v in VLLM_PREFILL_SHAPES if r == d_rope and n >= geo.d_nope and v >= geo.d_v]
    d_nope, d_v = min(fits, key=lambda s: (s[0] + s[1], s)) if fits else (geo.d_nope, geo.d_v)
    new = MLAShape(rank, d_rope, d_nope, d_v)
    return KernelPadding(old, new, math.sqrt((d_nope + d_rope) / (geo.d_nope + geo.d_rope)))


def _pad_rows(w: torch.Tensor, n: int, parts: list[tuple[int, int, int]]) -> torch.Tensor:
    """Per block of ``n`` blocks: each ``(rows, padded_rows, stride)`` part spread to ``padded_rows`` rows
    (``stride`` 1: rows first, zeros after; ``stride`` k: interleaved pair ``p`` at slot ``p * k``)."""
    blocks = w.reshape(n, sum(p[0] for p in parts), *w.shape[1:])
    out, at = [], 0
    for rows, padded, stride in parts:
        piece = blocks[:, at : at + rows]
        at += rows
        full = piece.new_zeros(n, padded, *w.shape[1:])
        if stride == 1:
            full[:, :rows] = piece
        else:
            pairs = piece.reshape(n, rows // 2, 2, *w.shape[1:])
            full.view(n, padded // 2, 2, *w.shape[1:])[:, ::stride] = pairs
        out.append(full)
    return torch.cat(out, dim=1).reshape(n * sum(p[1] for p in parts), *w.shape[1:])


def pad_tensor(pad: KernelPadding, geo: GQLAGeometry, kind: str, t: torch.Tensor) -> torch.Tensor:
    """One attention tensor (``kind`` = ``q_proj.weight``, ``kv_b_proj.bias``...) in its padded layout."""
    o, n, k = pad.old, pad.new, pad.stride
    if kind.startswith("q_proj."):
        wide = t.to(torch.float64) * pad.q_factor
        return _pad_rows(wide, geo.n_heads, [(o.d_nope, n.d_nope, 1), (o.d_rope, n.d_rope, k)]).to(t.dtype)
    if kind.startswith("kv_a_proj_with_mqa."):
        return _pad_rows(t, 1, [(o.rank, n.rank, 1), (o.d_rope, n.d_rope, k)])
    if kind.startswith("kv_b_proj."):
        rows = _pad_rows(t, geo.n_groups, [(o.d_nope, n.d_nope, 1), (o.d_v, n.d_v, 1)])
        if kind == "kv_b_proj.bias":
            return rows
        return torch.cat((rows, rows.new_zeros(rows.shape[0], n.rank - o.rank)), dim=1)
    if kind == "o_proj.weight":
        return _pad_rows(t.T, geo.n_heads, [(o.d_v, n.d_v, 1)]).T.contiguous()
    return t  # o_proj.bias


class PaddedCheckpoint:
    """OUT's tensors as the padded checkpoint holds them (the subset of the reader's API exports use)."""

    def __init__(self, inner, pad: KernelPadding, geo: GQLAGeometry):
        self.inner, self.pad, self.geo = inner, pad, geo
        self._cache: tuple[str, torch.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        return self.inner.names

    def __contains__(self, name: object) -> bool:
        return name in self.inner

    def _kind(self, name: str) -> str | None:
        m = _ATTN.match(name)
        return f"{m.group(2)}.{m.group(3)}" if m else None

    def read(self, name: str) -> torch.Tensor:
        kind = self._kind(name)
        if kind is None:
            return self.inner.read(name)
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, pad_tensor(self.pad, self.geo, kind, self.inner.read(name)).contiguous())
        return self._cache[1]

    def spec(self, name: str) -> TensorSpec:
        spec = self.inner.spec(name)
        if self._kind(name) is None:
            return spec
        return TensorSpec(name, spec.dtype, tuple(self.read(name).shape))

    def iter_bytes(self, name: str, buffer: bytearray) -> Iterator[memoryview]:
        if self._kind(name) is None:
            yield from self.inner.iter_bytes(name, buffer)
            return
        t = self.read(name)
        assert t.dtype == to_torch_dtype(self.inner.spec(name).dtype)
        yield memoryview(t.reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self.inner.close()


def padded_view(src: GQLACheckpoint, kernel_shape: str) -> tuple[GQLACheckpoint, KernelPadding]:
    """OUT seen as the padded GQLA checkpoint (config, geometry and tensors), and the padding."""
    rank, d_rope = parse_kernel_shape(kernel_shape)
    pad = plan_padding(src.geo, src.config, rank, d_rope)
    config = json.loads(json.dumps(src.config))
    config.update(kv_lora_rank=pad.new.rank, qk_rope_head_dim=pad.new.d_rope, qk_nope_head_dim=pad.new.d_nope,
                  v_head_dim=pad.new.d_v)
    geo = GQLAGeometry.from_config(config)
    return GQLACheckpoint(src.folder, config, geo, PaddedCheckpoint(src.ckpt, pad, src.geo), src.dtype), pad
