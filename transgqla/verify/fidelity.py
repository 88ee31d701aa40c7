"""Fidelity to the source: how far the (lossy) conversion moved the model.

Both models run block by block over the same token windows. At every layer the source's attention
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
from ..source_checkpoint import resolve
from ..model.attention import KVCache, attention
from ..model.decoder import SourceDecoder
from ..model.source_attention import gqa_attention
from .inputs import LayerwiseModel, batches
from .report import Check, bounded, skipped

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
    else:
        loc = recorded.get("source")
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
    """Per-layer attention errors and logit statistics of the two models on ``wins``."""
    bs = [b.to(src.device) for b in batches(wins)]
    hs = [src.embed(b) for b in bs]
    hg = [gq.embed(b) for b in bs]
    layer_errors: list[float] = []
    for i in range(src.n_layers):
        ds, dg = src.layer(i), gq.layer(i)
        ps, pg = ds.layer(i, "self_attn."), dg.layer(i, "self_attn.")
        num = den = 0.0
        for k, b in enumerate(bs):
            pos = src.positions(b.shape[1])
            x = ds.attention_input(i, hs[k])
            a_s = gqa_attention(x, ps, ds.geo, pos, KVCache("source"), i)
            a_g = attention(x, pg, dg.geo, pos, KVCache(path), i, path)
            num += float((a_g.double() - a_s.double()).pow(2).sum())
            den += float(a_s.double().pow(2).sum())
            hs[k] = ds.block(i, hs[k], pos, KVCache("source"))
            hg[k] = dg.block(i, hg[k], pos, KVCache(path))
        layer_errors.append(math.sqrt(num / den) if den > 0 else float("nan"))
        del ds, dg, ps, pg
    kl = agree = nll_s = nll_g = 0.0
    positions = scored = 0
    for k, b in enumerate(bs):
        for row in range(b.shape[0]):  # one window at a time: [T, V] logits stay small
            ls = torch.log_softmax(src.logits(hs[k][row]).float(), -1)
            lg = torch.log_softmax(gq.logits(hg[k][row]).float(), -1)
            kl += float((ls.exp() * (ls - lg)).sum(-1).double().sum())
            agree += float((ls.argmax(-1) == lg.argmax(-1)).sum())
            positions += ls.shape[0]
            target = b[row, 1:, None]
            nll_s -= float(ls[:-1].gather(-1, target).double().sum())
            nll_g -= float(lg[:-1].gather(-1, target).double().sum())
            scored += target.shape[0]
    return {
        "layer_errors": layer_errors,
        "kl": kl / positions,
        "top1": agree / positions,
        "ppl_source": math.exp(nll_s / scored),
        "ppl_gqla": math.exp(nll_g / scored),
        "positions": positions,
        "windows": sum(b.shape[0] for b in bs),
    }


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
