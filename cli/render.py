"""Rich tables for people; the JSON documents carry the same figures for machines. And the one way a
command reports an expected failure: one line on stderr (and, with ``--json``, one JSON document on stdout).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from transgqla.errors import TransGQLAError

INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT
_stderr = Console(stderr=True)


def fail(error: TransGQLAError | KeyboardInterrupt, as_json: bool = False) -> NoReturn:
    """End the command on an expected failure: ``error: <message>`` on stderr (one line, no traceback), with
    ``--json`` also ``{"ok": false, "error", "exit_code"}`` on stdout; exit with the error's code (130 for an
    interrupt, whose message says what was kept)."""
    if isinstance(error, TransGQLAError):
        message, code = str(error), error.exit_code
    else:
        message, code = str(error) or "interrupted", INTERRUPTED_EXIT
    if as_json:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    error_line(message)
    raise typer.Exit(code)


def error_line(message: str) -> None:
    """``error: <message>`` on stderr, as given (no markup is read from it)."""
    _stderr.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


def warn(notes: list[str]) -> None:
    """Warnings the user should read (stderr, one line each)."""
    for note in notes:
        _stderr.print(Text(f"warning: {note}", style="bold yellow"), soft_wrap=True)


def conversion_table(summary: dict[str, Any], layers: list[dict[str, float]]) -> Table:
    s, c = summary["settings"], summary["cache_values_per_token"]
    table = Table(title=f"GQLA checkpoint written to {summary['out']}", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("architecture", f"{summary['architecture']} ({summary['layers']} layers)")
    table.add_row("recipe", str(s["recipe"] or "default rule"))
    table.add_row("kv_lora_rank + qk_rope_head_dim", f"{s['kv_lora_rank']} + {s['qk_rope_head_dim']}")
    if s.get("split_search"):
        from transgqla.calib.split_search import report_line

        table.add_row("KV budget split", report_line(s["split_search"]))
    table.add_row("freqfold", f"{s['freqfold']} (requested {s['freqfold_requested']})")
    table.add_row("statistics", "data-free (weights)" if s["calib"] == "none" else s["calib"])
    table.add_row("KV cache / token / layer: source GQA", str(c["source_gqa"]))
    table.add_row("  absorb path", f"{c['absorb']} ({100 * c['absorb_ratio']:.2f}%)")
    table.add_row("  GQA path (RoPE key per group)", f"{c['gqa']} ({100 * c['gqa_ratio']:.2f}%)")
    table.add_row("RoPE key energy kept (mean)", f"{100 * summary['rope_energy_kept_mean']:.1f}%")
    worst = summary.get("worst_layer_errors", {})
    if worst:
        table.add_row("worst layer nope-key rel. error", f"{worst['key_nope_rel_error']:.3e}")
        table.add_row("worst layer value rel. error", f"{worst['value_rel_error']:.3e}")
    table.add_row("tensors / bytes written", f"{summary['tensors_written']} / {summary['bytes_written'] / 1e6:.1f} MB")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    return table


def plan_line(plan) -> str:
    """One line, printed before a long conversion starts: what will run, on what, where."""
    s, w = plan.settings, plan.windows
    calib = (f"{s.calib} ({w.numel()} tokens = {w.shape[0]} windows of {w.shape[1]})" if w is not None
             else "none (weights)")
    mode = ", sequential" if plan.request.sequential else ""
    return (f"converting {plan.geo.architecture} ({plan.geo.n_layers} layers) to GQLA {s.kv_lora_rank} + "
            f"{s.qk_rope_head_dim}: method {s.method}{mode}, calibration {calib}, device {plan.request.device}; "
            "time estimate after the first layer")


def recipes_table(recipes) -> Table:
    table = Table(title="built-in recipes", header_style="bold")
    for col in ("name", "matches", "settings", "description"):
        table.add_column(col)
    for r in recipes:
        match = ", ".join(f"{k}={v}" for k, v in r.match.items())
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        table.add_row(r.name, match, settings, r.description)
    return table
