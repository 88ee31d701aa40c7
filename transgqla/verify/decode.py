"""Reference decoding: greedy generation on both paths must give identical tokens; the KV cache each
path actually holds is measured from its cache tensors and set against the formulas.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..model.attention import PATHS, KVCache
from ..model.decoder import Decoder
from .inputs import PROMPT, encode, fixed_ids
from .report import Check

FIXED_PROMPT = 8  # fixed ids when there is no tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(dec: Decoder, ids: torch.Tensor, n: int, path: str) -> tuple[list[int], KVCache, float]:
    """``n`` greedy tokens after ``ids[1, T]`` on ``path``: (tokens, the cache, seconds)."""
    _sync(dec.device)
    start = time.perf_counter()
    cache = dec.new_cache(path)
    logits = dec.forward(ids, cache)
    out: list[torch.Tensor] = []
    for step in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if step + 1 < n:
            logits = dec.forward(nxt, cache)
    _sync(dec.device)
    seconds = time.perf_counter() - start
    return torch.cat(out, 1)[0].tolist() if out else [], cache, seconds


def source_values_per_token(cfg: dict[str, Any]) -> int:
    """``2 n_g d`` of the GQA source (``d`` = the source head dim, which conversion keeps as d_v)."""
    d = cfg.get("head_dim") if type(cfg.get("head_dim")) is int else cfg["v_head_dim"]
    return 2 * int(cfg["num_key_value_heads"]) * int(d)


def check_decode(dec: Decoder, tokenizer, n_tokens: int) -> list[Check]:
    cfg, geo = dec.config, dec.geo
    vocab = int(cfg["vocab_size"])
    if tokenizer is not None:
        prompt, how = encode(tokenizer, PROMPT, vocab), "tokenized prompt"
    else:
        prompt, how = fixed_ids(FIXED_PROMPT, vocab), "fixed prompt (no tokenizer)"
    ids = torch.tensor(prompt, device=dec.device)[None]
    runs: dict[str, tuple[list[int], KVCache, float]] = {}
    for path in PATHS:
        greedy(dec, ids, 1, path)  # warm-up: first-call allocations and kernel selection
        runs[path] = greedy(dec, ids, n_tokens, path)
    toks = {p: runs[p][0] for p in PATHS}
    same = next((i for i, (a, g) in enumerate(zip(toks["absorb"], toks["gqa"])) if a != g), n_tokens)
    speed = {p: (n_tokens / runs[p][2] if runs[p][2] > 0 else float("inf")) for p in PATHS}
    where = f"{dec.device.type}, {str(dec.dtype).removeprefix('torch.')}"
    rate = ", ".join(f"{p} {speed[p]:.1f} tok/s" for p in PATHS)
    if same == n_tokens:
        msg = f"{n_tokens} greedy tokens identical on both paths ({how}, {len(prompt)} tokens); {rate} ({where})"
    else:
        msg = f"paths diverge at generated token {same} of {n_tokens} ({how}); {rate} ({where})"
    tokens = Check(
        "decode.tokens", same == n_tokens, same, n_tokens, msg, ">=",
        {"prompt": prompt, "tokens": toks, "tokens_per_second": speed, "device": str(dec.device)},
    )

    item = torch.empty((), dtype=dec.dtype).element_size()
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
