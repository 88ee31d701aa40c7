"""``transgqla plan SRC``: the CLI around :func:`transgqla.plan.plan` (and :func:`transgqla.plan_bench.bench`).

stdout carries the plan (a rich table, or one JSON document with ``--json``); stderr one line on error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from transgqla.errors import TransGQLAError

from .options import Device, JsonFlag, KvLoraRank, QkRopeDim, device_name
from .render import fail

ROWS = (
    ("FLOPs per cache byte", "flops_per_byte", lambda v: f"{v:.1f}"),
    ("bound", "bound", str),
    ("attention time / token / layer", "attention_seconds_per_token_per_layer", lambda v: f"{v * 1e9:.3g} ns"),
    ("KV cache values / token / layer", "kv_values_per_token_per_layer", lambda v: f"{v:g}"),
    ("KV bytes / token (all layers, per rank)", "kv_bytes_per_token", lambda v: f"{v / 1024:.1f} KiB"),
    ("concurrent tokens that fit", "concurrent_tokens", lambda v: f"{v:,}"),
)


def plan_table(doc: dict[str, Any], src: str) -> Table:
    g, w = doc["gpu"], doc["workload"]
    title = (f"plan {src} on {g['name']} ({g['tflops']:g} TFLOP/s, {g['tbps']:g} TB/s, "
             f"ridge {g['ridge_flops_per_byte']:.0f} "
             f"FLOPs/byte): s_q {w['sq']}, tp {w['tp']}, context {w['context']}, batch {w['batch']}")
    table = Table(title=Text(title), header_style="bold")
    table.add_column("per decode step")
    for p in ("absorb", "gqa"):
        table.add_column(p + (" (recommended)" if doc["recommended"] == p else ""), justify="right")
    for label, key, fmt in ROWS:
        table.add_row(label, *(fmt(doc["paths"][p][key]) for p in ("absorb", "gqa")))
    return table


def bench_table(doc: dict[str, Any]) -> Table:
    b = doc["bench"]
    table = Table(title=Text(f"measured on {b['device']} ({b['dtype']}, median of {b['repeats']}) vs predicted on "
                             f"{doc['gpu']['name']}"), header_style="bold")
    table.add_column("seconds / step / layer")
    table.add_column("absorb", justify="right")
    table.add_column("gqa", justify="right")
    table.add_column("absorb / gqa", justify="right")
    m = b["seconds_per_step_per_layer"]
    p = {k: doc["paths"][k]["attention_seconds_per_step_per_layer"] for k in ("absorb", "gqa")}
    table.add_row("measured", f"{m['absorb']:.3e}", f"{m['gqa']:.3e}", f"{m['absorb'] / m['gqa']:.2f}")
    table.add_row("predicted", f"{p['absorb']:.3e}", f"{p['gqa']:.3e}", f"{p['absorb'] / p['gqa']:.2f}")
    return table


def register(app: typer.Typer) -> None:
    """Add the ``plan`` command to ``app``."""

    @app.command("plan")
    def plan_cmd(
        src: Path = typer.Argument(
            ..., metavar="SRC",
            help="A GQLA checkpoint, or a source GQA checkpoint / config.json (ranks from the flags or the recipe)."),
        gpu: Optional[str] = typer.Option(
            None, "--gpu",
            help="h100 | h200 | h20 | a100 | l40s | rtx4090 | mi300x (default h100 unless --tflops/--tbps)."),
        tflops: Optional[float] = typer.Option(None, "--tflops", help="Dense BF16 TFLOP/s (overrides the table)."),
        tbps: Optional[float] = typer.Option(None, "--tbps", help="Memory bandwidth in TB/s (overrides the table)."),
        memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="GPU memory in GB (overrides the table)."),
        sq: int = typer.Option(1, "--sq", help="Query tokens per decode step (MTP / speculative decoding)."),
        tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks."),
        context: int = typer.Option(8192, "--context", help="Cached tokens per sequence."),
        batch: int = typer.Option(1, "--batch", help="Sequences per decode step."),
        cache_bytes: int = typer.Option(2, "--cache-bytes", help="Bytes per cached value (2 = bf16, 1 = fp8)."),
        mem_util: float = typer.Option(0.9, "--mem-util", help="Share of GPU memory for weights and cache."),
        kv_lora_rank: KvLoraRank = None,
        qk_rope_dim: QkRopeDim = None,
        do_bench: bool = typer.Option(False, "--bench", help="Also time both paths' decode attention on this device."),
        device: Device = "auto",
        as_json: JsonFlag = False,
    ) -> None:
        """Roofline plan: arithmetic intensity, bound, time and KV cache of the absorb and GQA paths on a GPU."""
        from transgqla.plan import Workload, gpu_from, plan, read_config, shape_from_config

        out = Console()
        try:
            shape = shape_from_config(read_config(src), kv_lora_rank, qk_rope_dim)
            card = gpu_from(gpu if gpu or tflops or tbps else "h100", tflops, tbps, memory_gb)
            work = Workload(sq, tp, context, batch, cache_bytes, mem_util)
            doc = plan(shape, card, work)
            if do_bench:
                doc["bench"] = _bench(shape, work, device)
        except TransGQLAError as exc:
            fail(exc, as_json)
        if as_json:
            print(json.dumps(doc, indent=2))
            return
        out.print(plan_table(doc, str(src)))
        if do_bench:
            out.print(bench_table(doc))


def _bench(shape, work, device: str) -> dict[str, Any]:
    from transgqla.plan_bench import bench

    return bench(shape, work, device_name(device))
