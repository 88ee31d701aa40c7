"""``transgqla verify OUT``: the CLI around :func:`transgqla.verify.run_verify`.

stdout carries the report (a rich table, or one JSON document with ``--json``); stderr carries one
line on failure. Exit 0 only when every check holds; 5 when a check fails (the report is printed
first); the error's own code (2 input, 3 unsupported) when the arguments cannot be used.
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

from .options import Device, JsonFlag, Seqlen, device_name
from .render import error_line, fail

_STATUS = {"pass": ("pass", "bold green"), "fail": ("FAIL", "bold red"), "info": ("info", "cyan"),
           "skipped": ("skipped", "dim")}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def verify_table(report) -> Table:
    info = report.info
    caption = [f"device {info.get('device')}", info.get("dtype", "")]
    if info.get("source"):
        caption.append(f"source {info['source']}")
    if "seconds" in info:
        caption.append(f"{info['seconds']:.1f} s")
    n_fail = len(report.failed())
    n_run = sum(c.status in ("pass", "fail") for c in report.checks)
    verdict = f"all {n_run} checks passed" if not n_fail else f"{n_fail} of {n_run} checks FAILED"
    table = Table(
        title=Text(f"verify {report.out}: {verdict}"), caption=Text(" | ".join(caption)),
        header_style="bold", show_lines=False,
    )
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("measured", justify="right", no_wrap=True)
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column("message")
    for c in report.checks:
        label, style = _STATUS[c.status]
        threshold = "-" if c.threshold is None else f"{c.comparison} {fmt(c.threshold)}".strip()
        table.add_row(Text(c.name), Text(label, style=style), Text(fmt(c.value)), Text(threshold), Text(c.message))
    return table


def register(app: typer.Typer) -> None:
    """Add the ``verify`` command to ``app``."""

    @app.command("verify")
    def verify(
        out_dir: Path = typer.Argument(..., metavar="OUT", help="GQLA checkpoint folder to verify."),
        source: Optional[str] = typer.Option(
            None, "--source",
            help="Source GQA checkpoint (folder or Hub id) for fidelity; default: the local folder recorded in "
                 "config.json, if it exists."),
        text: Optional[Path] = typer.Option(
            None, "--text",
            help="UTF-8 text for KL, top-1 and perplexity (needs tokenizer.json); default: a built-in text."),
        seqlen: Seqlen = 512,
        max_tokens: int = typer.Option(
            1 << 17, "--max-tokens",
            help="Score at most this many tokens of --text (read and tokenized in chunks up to it)."),
        tokens: int = typer.Option(32, "--tokens", help="Greedy tokens to generate on each path."),
        device: Device = "auto",
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype of the numerical checks: float32|float64."),
        checks: str = typer.Option(
            "structure,paths,fidelity,decode", "--checks",
            help="Comma-separated sections to run."),
        path_tol: Optional[float] = typer.Option(
            None, "--path-tol",
            help="Max absorb-vs-gqa relative error (default 1e-5)."),
        max_attn_error: Optional[float] = typer.Option(
            None, "--max-attn-error",
            help="Fail if any layer's attention relative error vs the source exceeds this."),
        max_kl: Optional[float] = typer.Option(
            None, "--max-kl",
            help="Fail if KL(source || gqla) per token (nats) exceeds this."),
        min_top1: Optional[float] = typer.Option(
            None, "--min-top1",
            help="Fail if top-1 agreement with the source is below this (0..1)."),
        max_ppl_ratio: Optional[float] = typer.Option(
            None, "--max-ppl-ratio",
            help="Fail if perplexity gqla / source exceeds this."),
        as_json: JsonFlag = False,
    ) -> None:
        """Check a GQLA checkpoint: structure and hashes, path equivalence, fidelity to the source, reference decode."""
        from transgqla.verify import FidelityBounds, run_verify

        out = Console()
        try:
            report = run_verify(
                out_dir, source=source, text=text, device=device_name(device), tokens=tokens,
                checks=checks.split(","), dtype=dtype, seqlen=seqlen, path_tol=path_tol,
                bounds=FidelityBounds(max_attn_error, max_kl, min_top1, max_ppl_ratio), max_tokens=max_tokens,
            )
        except TransGQLAError as exc:
            fail(exc, as_json)
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            out.print(verify_table(report))
        if not report.ok:
            error_line("verification failed: " + ", ".join(c.name for c in report.failed()))
            raise typer.Exit(VerificationError.exit_code)
