"""Fidelity to the source: how far the (lossy) conversion moved the model.

Both models run block by block over the same token windows, one layer of one model in memory at a
time (:mod:`.layerwise`), the next-token statistics reduced a vocabulary chunk at a time
(:mod:`.token_stats`). At every layer the source's attention
and the GQLA attention see the same input (the source's own hidden state there), which isolates
each layer's conversion error; the logits of the two full models give KL(source || gqla), top-1
agreement and both perplexities. These are figures, not pass/fail: a bound applies only when one is
given (``max_attn_error``, ``max_kl``, ``min_top1``, ``max_ppl_ratio``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, TransGQLAError
from ..io import SafetensorsCheckpoint
from ..model.attention import KVCache, attention
from ..model.decoder import SourceDecoder
from ..model.layerwise import LayerwiseModel
from ..model.source_attention import gqa_attention
from ..source_checkpoint import resolve
from .inputs import batches, groups
from .report import Check, bounded, skipped
from .token_stats import TokenStats, token_stats

FIXED_WINDOWS = 4  # windows of fixed ids when there is no tokenizer
FIXED_SEQLEN = 128


@dataclass
class FidelityBounds:
    max_attn_error: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.max_attn_error, self.max_kl, self.min_top1, self.max_ppl_ratio))


@dataclass
class SourceRef:
    path: Path | None
    how: str  # where it came from, or why there is none
    notes: list[str] = field(default_factory=list)
    usable: bool = True


def find_source(cfg: dict[str, Any], source: str | None) -> SourceRef:
    """``--source`` (local folder or Hub id), else the config's ``gqla.source`` if it is a local folder."""
    recorded = (cfg.get("gqla") or {}).get("source") or {}
    if source:
        ref = SourceRef(resolve(source, None)[0], f"--source {source}")
    elif recorded.get("demo") and isinstance(recorded.get("source"), str):
        try:
            ref = SourceRef(resolve(recorded["source"], None)[0], f"gqla.source {recorded['source']}")
        except TransGQLAError as exc:
            return SourceRef(None, f"the recorded demo source is not available here ({exc})", usable=False)
    else:  # the resolved path convert records (found from any folder), else the path as typed (older outputs)
        loc = recorded.get("path") if isinstance(recorded.get("path"), str) else recorded.get("source")
        if not (recorded.get("local") and isinstance(loc, str)):
            return SourceRef(None, "no local source recorded in config.json; pass --source SRC", usable=False)
        if not Path(loc).expanduser().is_dir():
            return SourceRef(None, f"the recorded source {loc} does not exist here; pass --source SRC", usable=False)
        ref = SourceRef(Path(loc).expanduser().resolve(), f"gqla.source {loc}")
    want = recorded.get("fingerprint")
    if want:
        try:
            got = SafetensorsCheckpoint(ref.path).fingerprint()
        except TransGQLAError:
            got = None
        if got != want:
            note = "the source's shard headers differ from those recorded at conversion (fingerprint mismatch)"
            if not source:  # an auto-discovered folder that changed is not the source any more
                return SourceRef(None, f"{ref.how}: {note}; pass --source SRC to compare anyway", usable=False)
            ref.notes.append(note)
    return ref


def source_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"source {path} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"source {path}/config.json is unreadable: {exc}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise InputError(f"source {path}/config.json does not hold a JSON object")
    return cfg


def check_compatible(src_cfg: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if src_cfg.get(key) != cfg.get(key):
            raise InputError(f"source {path} does not match the checkpoint: {key} is {src_cfg.get(key)} vs {cfg.get(key)}")
    n_g = src_cfg.get("num_key_value_heads") or src_cfg.get("num_attention_heads")
    if n_g != cfg.get("num_key_value_heads"):
        raise InputError(f"source {path} has {n_g} KV heads, the checkpoint {cfg.get('num_key_value_heads')} groups")


def open_source(ref: SourceRef, cfg: dict[str, Any], dtype: torch.dtype, device: torch.device) -> LayerwiseModel:
    assert ref.path is not None
    src_cfg = source_config(ref.path)
    check_compatible(src_cfg, cfg, ref.path)
    return LayerwiseModel(SafetensorsCheckpoint(ref.path), src_cfg, SourceDecoder, dtype, device)


@torch.no_grad()
def measure(src: LayerwiseModel, gq: LayerwiseModel, wins: list[torch.Tensor], path: str = "absorb") -> dict[str, Any]:
    """Per-layer attention errors and logit statistics of the two models on ``wins``.

    Memory: one layer of one model at a time (the source's layer ``i``, then the GQLA layer ``i``),
    the hidden states of one group of windows (:data:`~.inputs.GROUP_TOKENS`), and vocabulary chunks
    of the heads (:mod:`.token_stats`); the models are streamed once per group.
    """
    if src.vocab != gq.vocab:
        raise InputError(f"the source's head has {src.vocab} rows, the checkpoint's {gq.vocab}")
    num = [0.0] * src.n_layers
    den = [0.0] * src.n_layers
    total = TokenStats()
    for group in groups(wins):
        stats = _measure_group(src, gq, [b.to(src.device) for b in batches(group)], path, num, den)
        for key in vars(total):
            setattr(total, key, getattr(total, key) + getattr(stats, key))
    return {
        "layer_errors": [math.sqrt(n / d) if d > 0 else float("nan") for n, d in zip(num, den)],
        "kl": total.kl / total.positions,
        "top1": total.agree / total.positions,
        "ppl_source": math.exp(total.nll_source / total.scored),
        "ppl_gqla": math.exp(total.nll_gqla / total.scored),
        "positions": total.positions,
        "windows": len(wins),
    }


def _measure_group(src: LayerwiseModel, gq: LayerwiseModel, bs: list[torch.Tensor], path: str, num: list[float], den: list[float]) -> TokenStats:
    """One group of ``[B, T]`` batches through both models, adding layer ``i``'s squared attention
    error and norm to ``num[i]`` / ``den[i]``; returns the group's token statistics."""
    hs = [src.embed(b) for b in bs]
    hg = [gq.embed(b) for b in bs]
    for i in range(src.n_layers):
        ds = src.layer(i)
        ps = ds.layer(i, "self_attn.")
        xs, a_s = [], []
        for k, b in enumerate(bs):
            xs.append(ds.attention_input(i, hs[k]))
            a_s.append(gqa_attention(xs[k], ps, ds.layer_geo(i), src.positions(b.shape[1]), KVCache("source"), i))
            hs[k] = ds.mlp_residual(i, ds.attention_residual(i, hs[k], a_s[k]))  # = ds.block(i, hs[k], ...)
        del ds, ps
        dg = gq.layer(i)
        pg = dg.layer(i, "self_attn.")
        for k, b in enumerate(bs):
            pos = gq.positions(b.shape[1])
            a_g = attention(xs[k], pg, dg.layer_geo(i), pos, KVCache(path), i, path)
            num[i] += float((a_g.double() - a_s[k].double()).pow(2).sum())
            den[i] += float(a_s[k].double().pow(2).sum())
            hg[k] = dg.block(i, hg[k], pos, KVCache(path))
        del dg, pg, xs, a_s
    x_s = torch.cat([src.final_norm(h).reshape(-1, h.shape[-1]) for h in hs])
    x_g = torch.cat([gq.final_norm(h).reshape(-1, h.shape[-1]) for h in hg])
    # next-token targets, row-major like the hidden states; a window's last position has none
    targets = torch.cat([torch.cat((b[:, 1:], torch.full_like(b[:, :1], -1)), dim=1).reshape(-1) for b in bs])
    return token_stats(src, gq, x_s, x_g, targets)


def fidelity_checks(m: dict[str, Any], bounds: FidelityBounds, text_how: str, real_text: bool, source_how: str, notes: list[str]) -> list[Check]:
    errs = m["layer_errors"]
    worst = max(range(len(errs)), key=lambda i: (math.isnan(errs[i]), errs[i]))
    where = f"{m['windows']} window(s), {m['positions']} tokens of {text_how}; source: {source_how}"
    if notes:
        where += "; " + "; ".join(notes)
    checks = [
        bounded(
            "fidelity.attention", errs[worst], bounds.max_attn_error, "<=",
            f"worst layer {worst}: {errs[worst]:.3e}, mean {sum(errs) / len(errs):.3e} (relative error of the "
            f"attention output, both fed the source's hidden states); {where}",
            per_layer=errs,
        ),
        bounded("fidelity.kl", m["kl"], bounds.max_kl, "<=", "KL(source || gqla) per token, nats, on the same windows"),
        bounded("fidelity.top1", m["top1"], bounds.min_top1, ">=", "top-1 next-token agreement with the source"),
    ]
    ratio = m["ppl_gqla"] / m["ppl_source"]
    if real_text:
        checks.append(bounded(
            "fidelity.perplexity", ratio, bounds.max_ppl_ratio, "<=",
            f"perplexity gqla {m['ppl_gqla']:.3f} vs source {m['ppl_source']:.3f} (ratio gqla/source shown)",
            ppl_source=m["ppl_source"], ppl_gqla=m["ppl_gqla"],
        ))
    elif bounds.max_ppl_ratio is not None:
        checks.append(Check("fidelity.perplexity", False, None, bounds.max_ppl_ratio, "--max-ppl-ratio needs real text: the checkpoint has no tokenizer.json (or the tokenizers package is missing)"))
    else:
        checks.append(skipped("fidelity.perplexity", "skipped: no tokenizer, so no real text to score"))
    return checks


def no_source_checks(why: str, bounds: FidelityBounds) -> list[Check]:
    if bounds.any():
        return [Check("fidelity.source", False, None, None, f"fidelity bounds were given but there is no source to compare with: {why}")]
    return [skipped("fidelity.source", f"skipped: {why}")]
