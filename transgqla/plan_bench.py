"""``transgqla plan --bench``: time both paths' decode attention here, next to what the roofline predicts.

Uses the head-folded kernels of :mod:`transgqla.mathx.decode_kernels` (no per-head copies of the cache), on
random tensors of the plan's shape: one layer, ``batch`` sequences of ``context`` cached tokens, ``s_q`` query
tokens, tensor-parallel share ``n_h / t`` heads (and ``n_g / t`` groups). bfloat16 on CUDA, float32 on the
CPU (bfloat16 matmuls there are not what a runtime would use). Only the attention over the cache is timed
(no projections), median of ``repeats`` runs after a warm-up, with a device synchronize around each run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from .devices import synchronize
from .mathx.decode_kernels import absorb_attention, gqa_attention
from .plan import Shape, Workload


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench(shape: Shape, w: Workload, device: str = "cpu", repeats: int = 20) -> dict[str, Any]:
    """Measured seconds per decode step per layer on each path, and the dtype used."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    heads = shape.n_heads // w.tp
    groups = max(1, shape.n_groups // w.tp)
    B, T, s_q = w.batch, w.context, w.sq

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=dev, dtype=dtype)

    mask = torch.ones(s_q, T, dtype=torch.bool, device=dev)
    mask[:, T - s_q:] = torch.ones(s_q, s_q, dtype=torch.bool, device=dev).tril()
    scale = shape.d_k ** -0.5
    q_lat, q_rope = rand(B, heads, s_q, shape.rank), rand(B, heads, s_q, shape.d_rope)
    latent, k_rope = rand(B, T, shape.rank), rand(B, T, shape.d_rope)
    absorb = _time(lambda: absorb_attention(q_lat, q_rope, latent, k_rope, mask, scale), dev, repeats)  # noqa: F821
    del q_lat, q_rope, latent, k_rope
    q = rand(B, groups * (heads // groups), s_q, shape.d_k)
    k, v = rand(B, groups, T, shape.d_k), rand(B, groups, T, shape.d_v)
    gqa = _time(lambda: gqa_attention(q, k, v, mask, scale), dev, repeats)
    return {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "seconds_per_step_per_layer": {"absorb": absorb, "gqa": gqa}}
