"""Layer-wise refinement: after the closed-form conversion, fit one layer's GQLA attention to its source.

Why: the closed form (calib/methods.py) minimizes surrogates of the attention error (key and value
reconstruction in attention-aware metrics, a RoPE choice scored on a few sequences). What the model
needs is the attention *output* (after ``o_proj``) on the hidden states it will see. Refinement
optimizes exactly that, by gradient descent on this layer's converted parameters alone
(``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj`` and their biases; ``o_proj`` stays the source's).
Nothing is back-propagated beyond the layer, so memory stays one layer's and conversion stays
streaming; the weights keep the format's layout, so both decode paths and every export still hold.

Objective, for calibration inputs ``x[n, L, D]`` (the attention's input, after ``input_layernorm``):
``sum ||o_gqla(x)_t - o_src(x)_t||^2 / sum ||o_src(x)_t||^2`` over query positions ``t``. A step
draws ``windows_per_step`` training windows and ``queries_per_window`` query positions in each
(keys and values always span the whole causal prefix): far cheaper than all positions, and many
windows per step see more text than one window of all positions. Adam with a per-tensor step size
(``lr`` times the tensor's RMS at the start, so that latent factors and queries of different scales
move alike), a short warm-up and cosine decay. One window (``holdout_windows``) is never trained on;
its error on every position is measured every ``eval_every`` steps and the best parameters seen
(the closed form included) are returned, so refinement never makes the held-out error worse.

Deterministic for a seed: positions and windows come from a seeded ``torch.Generator``; the
arithmetic is float32 on the caller's device (the caller fixes the thread count).

Shapes: ``D`` hidden, ``n_h`` heads, ``n_g`` groups, ``d`` source head dim, GQLA ``d_nope``,
``d_R``, ``d_v``, ``r`` as in :mod:`transgqla.mathx.gqla_layer`; ``B`` windows, ``Q`` query
positions per window, ``L`` window length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..mathx.rope import cos_sin, interleaved_layout, rotate_half_layout
from ..model.geometry import GQLAGeometry
from ..model.source_attention import GQAGeometry

if TYPE_CHECKING:
    from ..mathx.gqla_layer import ConvertedAttention

TRAINABLE = ("q_proj.weight", "q_proj.bias", "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias",
             "kv_b_proj.weight", "kv_b_proj.bias")


@dataclass(frozen=True)
class RefineSettings:
    steps: int
    lr: float = 0.01  # peak step, relative to each tensor's RMS
    windows_per_step: int = 4
    queries_per_window: int = 32  # 50 steps of 4 x 32 beat 40 of 4 x 64 at 0.68x the cost per step (benchmarks/README.md)
    holdout_windows: int = 1
    eval_every: int = 10
    warmup: float = 0.1  # fraction of the steps
    seed: int = 0


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[B, L, C]``, ``idx[B, Q]`` -> ``x[b, idx[b, q]]`` as ``[B, Q, C]``."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _mask(q_pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """``[B, 1, Q, L]``: query at position ``t`` sees keys ``s <= t`` (within the sliding window)."""
    k_pos = torch.arange(length, device=q_pos.device)
    ok = k_pos[None, None, :] <= q_pos[..., None]
    if window is not None:
        ok &= (q_pos[..., None] - k_pos[None, None, :]) < window
    return ok[:, None]


def _attend(q, k, v, scale, mask, m):
    """``q[B,n_h,Q,*]`` against ``k``/``v`` ``[B,n_g,L,*]`` (head h reads group h // m) -> ``[B,Q,n_h*d_v]``."""
    b, n_h, nq, _ = q.shape
    qg = q.reshape(b, n_h // m, m * nq, -1)  # fold a group's heads into its query rows: no repeated k/v
    scores = (qg @ k.transpose(-1, -2)).reshape(b, n_h, nq, -1) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = (probs.reshape(b, n_h // m, m * nq, -1) @ v).reshape(b, n_h, nq, -1)
    return out.transpose(1, 2).reshape(b, nq, -1)


def gqla_output(p: dict[str, torch.Tensor], geo: GQLAGeometry, x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """GQLA attention output (after ``o_proj``) at query positions ``q_pos[B, Q]`` of windows
    ``x[B, L, D]`` starting at position 0: ``[B, Q, D]``. Differentiable; the GQA-path form of
    :func:`transgqla.model.attention.attention` (same weights, same result)."""
    b, length, _ = x.shape
    kv = torch.nn.functional.linear(x, p["kv_a_proj_with_mqa.weight"], p.get("kv_a_proj_with_mqa.bias"))
    c, k_rope = kv[..., : geo.rank], kv[..., geo.rank:]
    cos, sin = cos_sin(geo.freqs, torch.arange(length, device=x.device), dtype=x.dtype)
    k_rope = interleaved_layout(k_rope, cos, sin)  # [B, L, d_R]
    up = torch.nn.functional.linear(c, p["kv_b_proj.weight"], p.get("kv_b_proj.bias"))
    up = up.view(b, length, geo.n_groups, geo.d_nope + geo.d_v).transpose(1, 2)  # [B, n_g, L, d_nope + d_v]
    k = torch.cat((up[..., : geo.d_nope], k_rope[:, None].expand(b, geo.n_groups, length, geo.d_rope)), dim=-1)
    v = up[..., geo.d_nope:]
    xq = _gather_rows(x, q_pos)
    q = torch.nn.functional.linear(xq, p["q_proj.weight"], p.get("q_proj.bias"))
    q = q.view(b, -1, geo.n_heads, geo.d_nope + geo.d_rope).transpose(1, 2)  # [B, n_h, Q, d_nope + d_R]
    qc, qs = cos_sin(geo.freqs, q_pos.reshape(-1), dtype=x.dtype)
    shape = (b, 1, q_pos.shape[1], -1)
    q_rope = interleaved_layout(q[..., geo.d_nope:], qc.reshape(shape), qs.reshape(shape))
    q = torch.cat((q[..., : geo.d_nope], q_rope), dim=-1)
    out = _attend(q, k, v, geo.softmax_scale, _mask(q_pos, length, geo.sliding_window), geo.heads_per_group)
    return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))


def source_keys_values(p: dict[str, torch.Tensor], geo: GQAGeometry, x: torch.Tensor):
    """Rotated source keys and values ``[B, n_g, L, d]`` of windows ``x[B, L, D]``."""
    b, length, _ = x.shape
    k = torch.nn.functional.linear(x, p["k_proj.weight"], p.get("k_proj.bias")).view(b, length, geo.n_groups, -1)
    v = torch.nn.functional.linear(x, p["v_proj.weight"], p.get("v_proj.bias")).view(b, length, geo.n_groups, -1)
    cos, sin = cos_sin(geo.freqs, torch.arange(length, device=x.device), dtype=x.dtype)
    return rotate_half_layout(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def source_output(p, geo: GQAGeometry, x, q_pos, kv=None) -> torch.Tensor:
    """Source GQA attention output (after ``o_proj``) at ``q_pos[B, Q]`` of ``x[B, L, D]``: ``[B, Q, D]``
    (``kv``: this window batch's :func:`source_keys_values`, when already computed)."""
    b, length, _ = x.shape
    k, v = kv if kv is not None else source_keys_values(p, geo, x)
    q = torch.nn.functional.linear(_gather_rows(x, q_pos), p["q_proj.weight"], p.get("q_proj.bias"))
    q = q.view(b, -1, geo.n_heads, geo.head_dim).transpose(1, 2)
    qc, qs = cos_sin(geo.freqs, q_pos.reshape(-1), dtype=x.dtype)
    shape = (b, 1, q_pos.shape[1], -1)
    q = rotate_half_layout(q, qc.reshape(shape), qs.reshape(shape))
    out = _attend(q, k, v, geo.softmax_scale, _mask(q_pos, length, geo.sliding_window), geo.n_heads // geo.n_groups)
    return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (got - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)


def refine_attention(
    converted: dict[str, torch.Tensor],
    geo: GQLAGeometry,
    source: dict[str, torch.Tensor],
    source_geo: GQAGeometry,
    x: torch.Tensor,
    settings: RefineSettings,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Refine one layer. ``converted``: the closed-form GQLA tensors (names relative to ``self_attn.``,
    without ``o_proj``); ``source``: the source layer's q/k/v/o tensors; ``x[n, L, D]``: the attention
    inputs of the calibration windows. Returns the refined tensors (dtype and device of ``converted``)
    and a report: held-out relative error before and after, steps run, the step kept."""
    device = x.device
    work = torch.float32
    n, length, _ = x.shape
    x = x.to(work)
    src = {k: t.to(device=device, dtype=work) for k, t in source.items()}
    o_proj = {k: src[k] for k in ("o_proj.weight", "o_proj.bias") if k in src}
    params = {k: converted[k].detach().to(device=device, dtype=work).clone().requires_grad_(True)
              for k in TRAINABLE if k in converted}
    hold = min(settings.holdout_windows, n - 1)
    train = n - hold
    gen = torch.Generator().manual_seed(settings.seed)

    with torch.no_grad():
        x_hold = x[train:]
        pos_hold = torch.arange(length, device=device).expand(hold, length)
        target_hold = source_output(src, source_geo, x_hold, pos_hold) if hold else None

    def held_out() -> float:
        if not hold:
            return float("nan")
        with torch.no_grad():
            got = torch.cat([gqla_output({**params, **o_proj}, geo, x_hold[i:i + 1], pos_hold[i:i + 1])
                             for i in range(hold)])
            return float(_relative_error(got, target_hold))

    before = best_err = held_out()
    best = {k: t.detach().clone() for k, t in params.items()}
    best_step = 0
    scales = {k: float(t.detach().pow(2).mean().sqrt().clamp_min(1e-12)) for k, t in params.items()}
    opt = torch.optim.Adam([{"params": [t], "lr": settings.lr * scales[k]} for k, t in params.items()],
                           betas=(0.9, 0.99))
    base_lrs = [g["lr"] for g in opt.param_groups]
    warm = max(1, int(settings.warmup * settings.steps))
    n_q = min(settings.queries_per_window, length)
    per_step = min(settings.windows_per_step, train)
    kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(1, settings.steps + 1):
        frac = step / warm if step <= warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, settings.steps - warm)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * frac
        wins = torch.randperm(train, generator=gen, device="cpu")[:per_step].tolist()
        q_pos = torch.stack([torch.randperm(length, generator=gen, device="cpu")[:n_q].sort().values for _ in wins]).to(device)
        xb = torch.cat([x[w:w + 1] for w in wins])  # slices, not a list index: no index tensor to place
        with torch.no_grad():
            for w in wins:
                if w not in kv_cache:
                    k, v = source_keys_values(src, source_geo, x[w:w + 1])
                    kv_cache[w] = (k[0], v[0])
            kv = (torch.stack([kv_cache[w][0] for w in wins]), torch.stack([kv_cache[w][1] for w in wins]))
            target = source_output(src, source_geo, xb, q_pos, kv)
        loss = _relative_error(gqla_output({**params, **o_proj}, geo, xb, q_pos), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            err = held_out()
            if err < best_err:
                best_err, best_step = err, step
                best = {k: t.detach().clone() for k, t in params.items()}
    if not hold:  # nothing held out (a single window): keep the last step
        best, best_step = {k: t.detach() for k, t in params.items()}, settings.steps
    out = dict(converted)
    for k, t in best.items():
        out[k] = t.to(device=converted[k].device, dtype=converted[k].dtype)
    report = {"refine_heldout_rel_error_before": before, "refine_heldout_rel_error_after": best_err,
              "refine_steps": settings.steps, "refine_best_step": best_step}
    return out, report


def refine_layer(runner, layer: int, conv, gqla_config: dict, settings) -> "ConvertedAttention":
    """The calibrated converter's hook: refine ``conv`` (a :class:`ConvertedAttention` of ``layer``)
    on the inputs the calibration pass ``runner`` holds for that layer, ``settings.refine`` steps."""
    from ..mathx.gqla_layer import ConvertedAttention

    with torch.no_grad():
        x = runner.dec.attention_input(layer, runner.h)
    source = runner.dec.layer(layer, "self_attn.")
    tensors, report = refine_attention(conv.tensors, GQLAGeometry.from_config(gqla_config).for_layer(layer), source, runner.dec.layer_geo(layer),
                                       x, RefineSettings(steps=settings.refine, seed=settings.refine_seed + layer))
    return ConvertedAttention(tensors, {**conv.report, **report})
