"""Path equivalence: on this checkpoint's weights the absorb and GQA paths give the same attention.

Every layer is checked in prefill and in cached decoding with ``s_q = 1`` and ``s_q = 2`` (each
path's cached pieces against both paths' prefill), on random inputs and on the hidden states of a
real prompt (tokenized when the checkpoint ships a tokenizer, fixed ids otherwise).
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.attention import PATHS, KVCache, attention
from ..model.layerwise import LayerwiseModel
from ..text.pipeline import PROMPT, encode, fixed_ids
from .report import Check, bounded

# The same bound in float64: the reference attention takes its softmax (and RMSNorm) in float32,
# so float64 runs agree to ~1e-7, not to float64 rounding.
DEFAULT_TOL = 1e-5
RANDOM_SHAPE = (2, 9)  # batch, tokens: 3 prefilled, then 6 decoded (three s_q = 2 steps)
PREFILL = 3
DECODE_STEPS = (1, 2)
MAX_PROMPT = 24  # real-token inputs are cut here: cached decode costs one call per token


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _run(x, params, geo, path: str, step: int | None) -> torch.Tensor:
    """Attention of ``x[B,T,D]`` on ``path``: one prefill (``step=None``) or prefill + cached steps."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device)
    cache = KVCache(path)
    if step is None:
        return attention(x, params, geo, pos, cache, 0, path)
    pieces = [attention(x[:, :PREFILL], params, geo, pos[:PREFILL], cache, 0, path)]
    for s in range(PREFILL, t, step):
        pieces.append(attention(x[:, s : s + step], params, geo, pos[s : s + step], cache, 0, path))
    return torch.cat(pieces, dim=1)


def compare_paths(x: torch.Tensor, params: dict[str, torch.Tensor], geo) -> dict[str, float]:
    """Relative differences between the paths for one attention input ``x[B,T,D]``."""
    full = {p: _run(x, params, geo, p, None) for p in PATHS}
    errs = {"prefill": rel_err(full["absorb"], full["gqa"])}
    for step in DECODE_STEPS:
        dec = {p: _run(x, params, geo, p, step) for p in PATHS}
        errs[f"decode_s{step}"] = max(
            rel_err(dec["absorb"], full["gqa"]),
            rel_err(dec["gqa"], full["absorb"]),
            rel_err(dec["absorb"], dec["gqa"]),
        )
    return errs


@torch.no_grad()
def check_paths(model: LayerwiseModel, tokenizer, tol: float | None = None, seed: int = 0) -> Check:
    tol = DEFAULT_TOL if tol is None else tol
    geo = model.geo
    vocab = int(model.config["vocab_size"])
    if tokenizer is not None:
        ids, how = encode(tokenizer, PROMPT, vocab)[:MAX_PROMPT], "prompt tokens (tokenizer.json)"
    else:
        ids, how = fixed_ids(16, vocab), "fixed token ids (no tokenizer)"
    ids_t = torch.tensor(ids, device=model.device)[None]
    gen = torch.Generator().manual_seed(seed)
    h = model.embed(ids_t)
    pos = model.positions(ids_t.shape[1])
    per_layer: list[dict[str, Any]] = []
    worst, where = 0.0, ""
    for i in range(model.n_layers):
        dec = model.layer(i)
        params = dec.layer(i, "self_attn.")
        noise = torch.randn(*RANDOM_SHAPE, geo.hidden, generator=gen, dtype=torch.float64)
        inputs = {
            "random": dec.attention_input(i, noise.to(device=model.device, dtype=model.dtype)),
            "tokens": dec.attention_input(i, h),
        }
        row: dict[str, Any] = {"layer": i}
        for kind, x in inputs.items():
            errs = compare_paths(x, params, dec.layer_geo(i))  # this layer's window
            row[kind] = errs
            for mode, e in errs.items():
                if not e <= worst:  # NaN propagates as the worst
                    worst, where = e, f"layer {i}, {kind} inputs, {mode.replace('_s', ' s_q=')}"
        per_layer.append(row)
        h = dec.block(i, h, pos, KVCache("absorb"))
        model.recycle(dec)  # layer i + 1 is read into its tensors
        del dec, params, inputs
    model.release()
    msg = (
        f"absorb vs gqa, {model.n_layers} layers, prefill + cached decode s_q=1,2; random inputs and "
        f"{len(ids)} {how}; worst at {where or 'layer 0'}"
    )
    return bounded("paths.equivalence", worst, tol, "<=", msg, dtype=str(model.dtype).removeprefix("torch."), layers=per_layer)
