"""``transgqla export OUT DST``: the CLI around :func:`transgqla.export.run_export`.

stdout carries the summary (a rich table, or one JSON document with ``--json``); stderr carries one line
on failure. Exit 0 when DST was written and its reference check passed; 5 when the check failed (the
summary is printed first, DST is not written); the error's own code otherwise (2 input, 3 unsupported,
4 output folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from transgqla.errors import TransGQLAError, VerificationError

from .options import DEFAULT_SHARD_SIZE, Device, Force, JsonFlag, MaxShardSize, device_name, parse_size
from .render import error_line, fail, warn


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "0" if v == 0 else (f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}")
    return str(v)


def _check_rows(table: Table, c: dict[str, Any]) -> None:
    layerwise = c["mode"] == "layerwise"
    greedy = "" if layerwise else f" + {c['greedy_tokens']} greedy"
    table.add_row("prompt", f"{c['prompt']['tokens']} tokens ({c['prompt']['source']}){greedy}")
    what = "hidden state after the final norm" if layerwise else "logit"
    table.add_row(f"max |{what} error|", _fmt(c["max_abs_logit_error"]))
    rel_ok = c["rel_logit_error"] <= c["tolerance"]
    table.add_row(f"relative {what} error", Text(f"{_fmt(c['rel_logit_error'])} (tolerance {_fmt(c['tolerance'])})",
                                                 style="green" if rel_ok else "bold red"))
    if layerwise:
        table.add_row("how", "; ".join(c["notes"]))
        return
    toks = "equal" if c["greedy_tokens_equal"] else f"diverge at {c['greedy_tokens_matched']}"
    if not c["greedy_tokens_required"]:
        toks += " (reported only: half-precision fold)"
    tok_style = "green" if c["greedy_tokens_equal"] else ("yellow" if not c["greedy_tokens_required"] else "bold red")
    table.add_row(f"greedy tokens (N={c['greedy_tokens']})", Text(toks, style=tok_style))


def export_table(s: dict[str, Any]) -> Table:
    c = s["check"]
    kind = f"{s['format']} format, {s['path']} path" + (", k/v folded" if s["fold_kv"] else "")
    verdict = f"written to {s['dst']}" if s["ok"] else "check FAILED, nothing written"
    table = Table(title=Text(f"export {kind}: {verdict}"), header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("from", s["out"])
    table.add_row("tensors / bytes written", f"{s['tensors_written']} / {s['bytes_written'] / 1e6:.1f} MB"
                  + (" (byte-identical)" if s.get("tensors_byte_identical") else ""))
    cache = str(s["cache_values_per_token"])
    unpadded = (s.get("kernel_padding") or {}).get("cache_values_per_token_unpadded") or (
        s.get("cache_values_per_token_unpadded") if s.get("equal_kv") else None)
    if unpadded:
        cache += f" (zero-padded; {unpadded} unpadded)"
    table.add_row("KV cache / token / layer", cache)
    if "latent_norm" in s:
        ln = s["latent_norm"]
        table.add_row("target", s.get("target", ""))
        n_folded = ln["residual_folded_layers"]
        folded = f" ({n_folded} layers folded into kv_b_proj)" if n_folded else ""
        table.add_row(f"latent norm ({ln['form']}): |scale - 1|", _fmt(ln["max_residual_scale_error"]) + folded)
        table.add_row("latent norm worst-case rel. deviation", _fmt(ln["worst_case_rel_error"]))
    if "engines" in s:
        e = s["engines"]
        table.add_row("fast MLA decode kernels", ", ".join(e["fast_decode_kernels"]) or "none (Triton MLA only)")
        table.add_row("vLLM prefill shape", "accepted" if e["vllm_prefill_accepts"] else "refused")
    table.add_row("reference", c["reference"])
    table.add_row("checked", c["candidate"])
    if c["mode"] == "manifest":
        table.add_row("check", Text("; ".join(c["notes"]), style="green" if c["ok"] else "bold red"))
    else:
        _check_rows(table, c)
    for w in s["warnings"]:
        table.add_row(Text("warning", style="yellow"), Text(w, style="yellow"))
    table.add_row("time", f"{s['seconds']:.1f} s")
    return table


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export")
    def export(
        out_dir: Path = typer.Argument(
            ..., metavar="OUT",
            help="GQLA checkpoint folder (written by transgqla convert)."),
        dst_dir: Path = typer.Argument(..., metavar="DST", help="Export folder (must be empty unless --force)."),
        path: str = typer.Option(
            ..., "--path",
            help="Decode path: absorb (MLA-like latent cache) | gqa (per-group K/V cache)."),
        fmt: str = typer.Option(
            "gqla", "--format",
            help="gqla (GQLA checkpoint, remote code) | deepseek (stock DeepSeek-V3, --path absorb) | mimo (stock "
                 "MiMo-V2-Flash, --path gqa) | gguf (one llama.cpp deepseek2 file DST.gguf, --path absorb)."),
        outtype: str = typer.Option(
            "auto", "--outtype",
            help="With --format gguf: auto (the checkpoint's dtype) | f32 | f16 | bf16 | q8_0."),
        target: str = typer.Option(
            "engines", "--target",
            help="With --format deepseek: engines (vLLM/SGLang/transformers: no biases, kv_lora_rank = r, linear "
                 "latent norm, rms_norm_eps 1e-6) | transformers (exact constant-coordinate pin, stock transformers "
                 "only)."),
        fold_kv: bool = typer.Option(
            False, "--fold-kv",
            help="With --path gqa: fold kv_b_proj into per-group k_proj/v_proj for GQA runtimes."),
        q_lora_bias: bool = typer.Option(
            False, "--q-lora-bias",
            help="With --format deepseek --target transformers: carry a query bias (Qwen2) exactly through q_lora_rank "
                 "= hidden_size + 1 instead of refusing."),
        equal_kv: bool = typer.Option(
            False, "--equal-kv",
            help="With --format mimo: V zero-padded to the key's head size, so engines run their ordinary attention "
                 "(exact; cache 2 n_g (d_nope + d_R) instead of n_g (d_nope + d_R + d_v))."),
        kernel_shape: Optional[str] = typer.Option(
            None, "--kernel-shape",
            help="With --format deepseek: zero-pad the latent and the RoPE key to a kernel's R+DR (e.g. 512+64, the "
                 "shape vLLM's CPU MLA kernel and FlashMLA take); exact, costs cache; unreachable shapes refused."),
        force: Force = False,
        device: Device = "auto",
        check: str = typer.Option(
            "auto", "--check",
            help="Check of a rewritten export: auto (layer by layer above 2 GiB of float32 weights) | full (both whole "
                 "models, logits and greedy tokens) | layerwise (one layer at a time, bounded memory). "
                 "Byte-identical exports are checked by their hashes."),
        tol: Optional[float] = typer.Option(
            None, "--tol",
            help="Relative logit error allowed by the check (default: 1e-4 for float32 weights; bfloat16/float16 "
                 "5e-3/2e-3, or 2e-2/5e-3 with --fold-kv)."),
        max_shard_size: MaxShardSize = DEFAULT_SHARD_SIZE,
        as_json: JsonFlag = False,
    ) -> None:
        """Write OUT for a decode path / runtime, check it against the GQLA reference, then commit DST."""
        from transgqla.export import ExportRequest, failure_message, run_export

        out = Console()
        try:
            request = ExportRequest(out_dir, dst_dir, path=path, format=fmt, fold_kv=fold_kv, target=target,
                                    query_bias_lora=q_lora_bias, check=check, force=force, device=device_name(device),
                                    tolerance=tol, max_shard_bytes=parse_size(max_shard_size),
                                    outtype=outtype, equal_kv=equal_kv, kernel_shape=kernel_shape)
            result = run_export(request)
        except TransGQLAError as exc:
            fail(exc, as_json)
        summary = result.summary()
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            out.print(export_table(summary))
        if as_json:  # the table already shows them
            warn(result.warnings)
        if not result.ok:
            error_line(failure_message(result))
            raise typer.Exit(VerificationError.exit_code)
