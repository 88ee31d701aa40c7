"""``--qk-rope-dim auto``: choose the split ``r + d_R = N`` of a KV budget by the layers' own calibration error.

Each candidate ``d_R`` (kv_budget.py says which exist) is converted with the run's calibrated method on a
few probe layers spread over the depth, and scored by the error the method itself minimizes: the relative
attention-output error after ``o_proj`` on the sample windows (:class:`~.output_probe.OutputProbe`, the
``attn_output_rel_error`` every calibrated layer reports). The candidate with the smallest geometric mean
over the probe layers wins (a geometric mean, so that each layer counts by ratio, not by the scale of its
error). Refinement is not run here: the closed form is what the candidates differ in.

Measured limit (benchmarks/README.md): on the demo at 192 values the search picks 128 + 64 over 160 + 32
(closed-form error 0.062 against 0.087); after refinement the two are equal in-domain, and 128 + 64 is worse
on text of another domain (perplexity 54.7 against 50.5). The closed-form error does not predict where
refinement ends, so ``auto`` is opt-in; scoring refined probe layers is the next thing to try.

Why a few layers and a few windows: the output shapes must be fixed before anything is written (plan,
then write), so the search runs at plan time, ahead of the conversion's own calibration pass. It pushes
the first :data:`SEARCH_WINDOWS` calibration windows through the source up to the deepest probe layer
(about ``SEARCH_WINDOWS / windows * probe_depth`` of one calibration forward pass F) and converts each
probe layer once per candidate. Deterministic: the same windows, the same method math, on ``device``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch

from ..mathx.gqla_layer import LayerSettings
from ..mathx.rope import inv_freq
from ..source_checkpoint import read_attention
from .methods import LayerContext, convert_layer
from .runner import LayerwiseCalibration

SEARCH_WINDOWS = 8  # calibration windows the search pushes through the source (the first ones: all sources mix)
PROBE_LAYERS = 3


def probe_layers(n_layers: int, count: int = PROBE_LAYERS) -> list[int]:
    """The middle layer of each of ``count`` equal slices of the depth (``[5, 15, 25]`` of 30)."""
    return sorted({min(n_layers - 1, int((i + 0.5) * n_layers / count)) for i in range(count)})


def split_label(rank: int, rope_dim: int) -> str:
    return f"{rank}+{rope_dim}"


def search_split(ckpt, geo, source_config: dict, windows: torch.Tensor, options: dict[int, Any],
                 device: str = "cpu") -> dict[str, Any]:
    """Score every candidate of ``options`` (``d_R`` -> settings with ``kv_lora_rank``, ``qk_rope_head_dim``,
    ``freqfold``, ``freqfold_requested``, ``balance_kv``, ``method``). Returns the report: per-candidate
    geometric-mean error (keys ``"r+d_R"``), per-layer errors, the probe layers, windows, and the choice.
    No timings: the report is part of the settings, and so of the resume journal's plan fingerprint."""
    layers = probe_layers(geo.n_layers)
    dev = torch.device(device)
    runner = LayerwiseCalibration(ckpt, source_config, windows[:SEARCH_WINDOWS], sample_windows=2, device=device)
    freqs = inv_freq(geo.head_dim, geo.rope_base, geo.rope_scaling).to(dev)
    any_s = next(iter(options.values()))
    per_layer: dict[int, list[float]] = {d_r: [] for d_r in options}
    for layer in range(max(layers) + 1):
        if layer in layers:
            calib = runner.statistics(layer, attention_weighted=any_s.method == "gqla").to(dev)
            src = read_attention(ckpt, geo, layer)
            src = replace(src, **{k: getattr(src, k).to(dev) for k in ("wq", "wk", "wv", "bq", "bk", "bv")
                                  if getattr(src, k) is not None})
            wo = ckpt.read(geo.family.tensor(layer, "o")).to(device=dev, dtype=torch.float64)
            for d_r, s in options.items():
                gqla_config = {**source_config, "qk_nope_head_dim": geo.head_dim, "qk_rope_head_dim": d_r,
                               "v_head_dim": geo.head_dim, "kv_lora_rank": s.kv_lora_rank}
                ctx = LayerContext(wo=wo, freqs=freqs, window=runner.dec.geo.sliding_window,
                                   gqla_config=gqla_config, device=dev)
                conv = convert_layer(src, calib, LayerSettings(s.kv_lora_rank, d_r, s.freqfold, s.balance_kv),
                                     s.method, ctx, search_freqfold=s.freqfold_requested == "auto")
                per_layer[d_r].append(float(conv.report["attn_output_rel_error"]))
        runner.advance(layer)
    score = {d_r: math.exp(sum(math.log(max(e, 1e-300)) for e in errs) / len(errs)) for d_r, errs in per_layer.items()}
    chosen = min(score, key=lambda d_r: (score[d_r], d_r))
    return {
        "budget": any_s.kv_lora_rank + any_s.qk_rope_head_dim,
        "candidates": {split_label(options[d].kv_lora_rank, d): score[d] for d in options},
        "layer_errors": {split_label(options[d].kv_lora_rank, d): per_layer[d] for d in options},
        "probe_layers": layers,
        "windows": int(min(SEARCH_WINDOWS, windows.shape[0])),
        "chosen_qk_rope_head_dim": chosen,
        "chosen": split_label(options[chosen].kv_lora_rank, chosen),
    }


def report_line(report: dict[str, Any]) -> str:
    """One line for people: the candidates, their errors and the choice."""
    if "pinned" in report:
        return f"KV budget {report['budget']}: {report['pinned']}"
    if "note" in report:
        return f"KV budget {report['budget']}: d_R = {report['chosen_qk_rope_head_dim']} ({report['note']})"
    cands = ", ".join(f"{k} {v:.4f}" for k, v in report["candidates"].items())
    chosen = report["chosen"]
    return (f"KV budget {report['budget']} split by calibration error (attention output, geometric mean over "
            f"layers {', '.join(map(str, report['probe_layers']))}): {cands} -> {chosen}")


def choose_split(ckpt, geo, source_config: dict, windows: torch.Tensor, settings,
                 with_split: Callable[[int], Any], device: str = "cpu", threads: int = 1):
    """``settings`` with the best split of its budget (``settings.split_candidates``) and the search's report.
    Runs on ``threads`` torch threads (the conversion's math threads): other counts give other bits, and
    the choice must be the same on a resumed run."""
    options = {d_r: with_split(d_r) for d_r in settings.split_candidates}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = search_split(ckpt, geo, source_config, windows, options, device)
    finally:
        torch.set_num_threads(previous)
    return replace(options[report["chosen_qk_rope_head_dim"]], split_search=report)
