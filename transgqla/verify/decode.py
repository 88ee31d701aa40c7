"""Reference decoding: greedy generation on both paths must give identical tokens; the KV cache each
path actually holds is measured from its cache tensors and set against the formulas.

Both paths decode together, layer by layer at every step: layer ``i`` is read once per step and
applied to each path's hidden state and cache, then the head (in vocabulary chunks) picks each path's
next token. Memory holds one layer (the whole model only while it fits ``RESIDENT_BYTES``, so a small
model is read once), both caches and the head's chunk. Each path's tokens/s counts the time spent
in its own blocks (both attend through :mod:`~transgqla.mathx.decode_kernels`, which read the cache
without per-head copies); reading the weights and the shared head are not charged to either path.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..model.attention import PATHS, KVCache
from ..model.layerwise import LayerwiseModel
from ..text.pipeline import PROMPT, encode, fixed_ids
from .report import Check

FIXED_PROMPT = 8  # fixed ids when there is no tokenizer
RESIDENT_BYTES = 512 << 20  # layers kept in memory across steps, in compute-dtype bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model: LayerwiseModel, ids: torch.Tensor, n: int) -> dict[str, tuple[list[int], KVCache, float]]:
    """``n`` greedy tokens after ``ids[1, T]`` on every path: ``{path: (tokens, cache, seconds)}``."""
    caches = {p: KVCache(p) for p in PATHS}
    seconds = dict.fromkeys(PATHS, 0.0)
    tokens: dict[str, list[int]] = {p: [] for p in PATHS}
    step_ids = dict.fromkeys(PATHS, ids)
    start = 0
    for step in range(n):
        t = ids.shape[1] if step == 0 else 1
        pos = model.positions(t, start)
        h = {p: model.embed(step_ids[p]) for p in PATHS}
        for i in range(model.n_layers):
            dec = model.layer(i)
            for p in PATHS:
                _sync(model.device)
                began = time.perf_counter()
                h[p] = dec.block(i, h[p], pos, caches[p])
                _sync(model.device)
                seconds[p] += time.perf_counter() - began
            model.recycle(dec)  # layer i + 1 is read into these tensors
        logits = model.logits(torch.cat([h[p][:, -1] for p in PATHS]))  # [paths, V]: one head pass
        for row, p in enumerate(PATHS):
            nxt = int(logits[row].argmax())
            tokens[p].append(nxt)
            step_ids[p] = torch.tensor([[nxt]], device=model.device)
        start += t
    return {p: (tokens[p], caches[p], seconds[p]) for p in PATHS}


def _warm_up(model: LayerwiseModel, ids: torch.Tensor) -> None:
    """First-call allocations and kernel selection of both paths, on layer 0 only."""
    dec = model.layer(0)
    h = model.embed(ids)
    for p in PATHS:
        cache = KVCache(p)
        dec.block(0, dec.block(0, h, model.positions(ids.shape[1]), cache)[:, -1:], model.positions(1, ids.shape[1]), cache)
    model.recycle(dec)


def source_values_per_token(cfg: dict[str, Any]) -> int:
    """``2 n_g d`` of the GQA source (``d`` = the source head dim, which conversion keeps as d_v)."""
    d = cfg.get("head_dim") if type(cfg.get("head_dim")) is int else cfg["v_head_dim"]
    return 2 * int(cfg["num_key_value_heads"]) * int(d)


@torch.no_grad()
def check_decode(model: LayerwiseModel, tokenizer, n_tokens: int) -> list[Check]:
    cfg, geo = model.config, model.geo
    vocab = int(cfg["vocab_size"])
    if tokenizer is not None:
        prompt, how = encode(tokenizer, PROMPT, vocab), "tokenized prompt"
    else:
        prompt, how = fixed_ids(FIXED_PROMPT, vocab), "fixed prompt (no tokenizer)"
    ids = torch.tensor(prompt, device=model.device)[None]
    model.resident_bytes = RESIDENT_BYTES
    try:
        _warm_up(model, ids)
        runs = greedy(model, ids, n_tokens)
    finally:
        model.resident_bytes = 0
        model.release()
    toks = {p: runs[p][0] for p in PATHS}
    same = next((i for i, (a, g) in enumerate(zip(toks["absorb"], toks["gqa"])) if a != g), n_tokens)
    speed = {p: (n_tokens / runs[p][2] if runs[p][2] > 0 else float("inf")) for p in PATHS}
    where = f"{model.device.type}, {str(model.dtype).removeprefix('torch.')}"
    rate = ", ".join(f"{p} {speed[p]:.1f} tok/s" for p in PATHS) + " (time in each path's blocks)"
    if same == n_tokens:
        msg = f"{n_tokens} greedy tokens identical on both paths ({how}, {len(prompt)} tokens); {rate} ({where})"
    else:
        msg = f"paths diverge at generated token {same} of {n_tokens} ({how}); {rate} ({where})"
    tokens = Check(
        "decode.tokens", same == n_tokens, same, n_tokens, msg, ">=",
        {"prompt": prompt, "tokens": toks, "tokens_per_second": speed, "device": str(model.device)},
    )

    item = torch.empty((), dtype=model.dtype).element_size()
    per_layer = {p: [runs[p][1].bytes_per_token(l) for l in range(geo.n_layers)] for p in PATHS}
    absorb_formula = (geo.rank + geo.d_rope) * item
    gqa_formula = geo.cache_values_per_token("gqa") * item
    source = source_values_per_token(cfg) * item
    measured = max(per_layer["absorb"])
    ok = all(b == absorb_formula for b in per_layer["absorb"])
    ratio = measured / source
    msg = (
        f"bytes/token/layer held: absorb {measured} (formula (r + d_R) x {item} = {absorb_formula}), "
        f"gqa {max(per_layer['gqa'])} (n_g (d_nope + d_R + d_v) x {item} = {gqa_formula}), "
        f"source GQA 2 n_g d x {item} = {source}; absorb/source {100 * ratio:.3f}%"
    )
    cache = Check(
        "decode.cache_bytes", ok, measured, absorb_formula, msg, "==",
        {
            "itemsize": item,
            "absorb_per_layer": per_layer["absorb"],
            "gqa_per_layer": per_layer["gqa"],
            "gqa_formula": gqa_formula,
            "source_gqa": source,
            "absorb_ratio": ratio,
            "gqa_ratio": max(per_layer["gqa"]) / source,
        },
    )
    return [tokens, cache]
