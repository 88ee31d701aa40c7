"""Typer app: one function per subcommand; each parses options, calls the library, renders.

Results go to stdout (a rich table, or one JSON document with ``--json``); progress and errors go
to stderr. Expected failures (:class:`transgqla.errors.TransGQLAError`) print one line and exit
with their code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from transgqla import __version__
from transgqla.errors import TransGQLAError

from .export_cmd import register as register_export
from .options import (
    DEFAULT_SHARD_SIZE,
    Device,
    Force,
    JsonFlag,
    KvBudget,
    KvLoraRank,
    MaxShardSize,
    QkRopeDimOrAuto,
    Seqlen,
    device_name,
    parse_rope_dim,
    parse_size,
)
from .plan_cmd import register as register_plan
from .progress import progress_reporter
from .render import conversion_table, fail, plan_line, recipes_table, warn
from .verify_cmd import register as register_verify

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Convert GQA checkpoints to GQLA, verify and export them.")
err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        print(f"transgqla {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True,
        help="Print the version and exit."),
) -> None:
    """transgqla: Group-Query Latent Attention checkpoints from GQA ones."""


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Make SIGTERM interrupt like Ctrl-C (the partial output stays resumable); returns the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Local model folder, Hugging Face model id, or demo:smollm2-135m."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder (must be empty unless --force)."),
    kv_lora_rank: KvLoraRank = None,
    qk_rope_dim: QkRopeDimOrAuto = None,
    kv_budget: KvBudget = None,
    freqfold: Optional[str] = typer.Option(None, "--freqfold", help="Frequencies per PCA block, or 'auto'."),
    calib: list[str] = typer.Option(
        ["auto"], "--calib",
        help="Calibration source (repeatable; several mix with an even token budget): a .txt/.jsonl file, "
             "builtin:calib (Python docs), builtin:prose-calib (general English, Debian's fortunes), "
             "hf:REPO[:CONFIG[:SPLIT]] (a dataset already in the local Hugging Face cache), self (text the source "
             "samples itself; one forward per token), 'none' (statistics from the weights alone), or 'auto' (the "
             "most general source available offline, said on stderr; none without tokenizer.json)."),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Calibration tokens to use at most."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Calibration window length in tokens."),
    method: Optional[str] = typer.Option(
        None, "--method",
        help="pca (data-free) | transmla | gqla (default with --calib)."),
    sequential: bool = typer.Option(
        False, "--sequential",
        help="Calibrate layer l on the outputs of converted layers < l."),
    refine: Optional[int] = typer.Option(
        None, "--refine",
        help="Gradient steps per layer fitting the converted attention's output to the source's on the calibration "
             "text (0 = closed form only; default: recipe, else 50 with calibration text)."),
    device: Device = "auto",
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Built-in recipe name or a TOML file."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype",
        help="bfloat16|float16|float32 for converted tensors (default: source's)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    max_shard_size: MaxShardSize = DEFAULT_SHARD_SIZE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; write nothing."),
    force: Force = False,
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue an interrupted conversion from OUT's partial output (bit-identical result); starts fresh if "
             "there is none."),
    as_json: JsonFlag = False,
) -> None:
    """Stream a GQA checkpoint into a GQLA checkpoint (format v1)."""
    from transgqla.convert import ConvertRequest, plan_conversion, run_conversion

    restore_sigterm = _sigterm_as_interrupt()
    try:
        request = ConvertRequest(
            source=source, out=out_dir, kv_lora_rank=kv_lora_rank, qk_rope_dim=parse_rope_dim(qk_rope_dim),
            freqfold=freqfold,
            recipe=recipe, calib=None if calib == ["none"] else calib, calib_tokens=calib_tokens,
            calib_seqlen=calib_seqlen, method=method, sequential=sequential, device=device_name(device), dtype=dtype,
            revision=revision, force=force, max_shard_bytes=parse_size(max_shard_size), resume=resume,
            refine=refine, kv_budget=kv_budget,
        )
        plan = plan_conversion(request)
        if dry_run:
            warn(plan.notes)
            doc = _plan_doc(plan)
            print(json.dumps(doc, indent=2)) if as_json else out.print_json(json.dumps(doc))
            return
        long_work = plan.windows is not None  # calibrated: minutes to hours; data-free: seconds a layer
        tty = sys.stderr.isatty()
        if long_work:
            err.print(plan_line(plan), markup=False, highlight=False, soft_wrap=True)
        with progress_reporter(err, tty and not as_json or long_work, tty and not as_json, sys.stderr,
                               plan.geo.n_layers, "converting layers") as update:
            result = run_conversion(plan, lambda stage, done, total: update(done, total))
    except (TransGQLAError, KeyboardInterrupt) as exc:  # Ctrl-C or SIGTERM: the message says how to --resume
        fail(exc, as_json)
    finally:
        restore_sigterm()
    warn(plan.notes)  # after the run: a failure's one line is the news; notes are about a finished conversion
    summary = result.summary()
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2))
    else:
        out.print(conversion_table(summary, result.layer_reports))


@app.command("eval-ppl")
def eval_ppl(
    model: str = typer.Argument(..., help="A source or GQLA checkpoint folder (or model id / demo:smollm2-135m)."),
    text: list[str] = typer.Option(..., "--text", help="Text file(s) (.txt or .jsonl with 'text'), or builtin:eval."),
    seqlen: Seqlen = 512,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use at most this many tokens of the text."),
    path: Optional[str] = typer.Option(None, "--path", help="absorb|gqa for GQLA checkpoints (default: config's)."),
    device: Device = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Perplexity on non-overlapping windows, computed layer by layer (bounded memory)."""
    from transgqla.evaluate import perplexity

    try:
        result = perplexity(model, text, seqlen=seqlen, max_tokens=max_tokens, path=path, device=device_name(device))
    except TransGQLAError as exc:
        fail(exc, as_json)
    doc = result.to_dict()
    if as_json:
        print(json.dumps({"ok": True, **doc}, indent=2))
    else:
        out.print(f"perplexity {doc['perplexity']:.3f} over {doc['tokens']} predicted tokens "
                  f"({doc['windows']} windows of {doc['seqlen']}; {doc['kind']}"
                  f"{' ' + doc['path'] if doc['path'] else ''}; "
                  f"{doc['seconds']:.1f} s)")


@app.command()
def recipes(as_json: JsonFlag = False) -> None:
    """List the built-in recipes and what they match."""
    from transgqla.recipe_book import builtin_recipes

    found = builtin_recipes()
    if as_json:
        docs = [{"name": r.name, "description": r.description, "match": r.match, "settings": r.settings} for r in found]
        print(json.dumps(docs, indent=2))
        return
    out.print(recipes_table(found))


def _plan_doc(plan) -> dict[str, Any]:
    from transgqla.format import cache_sizes

    return {
        "ok": True,
        "dry_run": True,
        "source": plan.identity,
        "architecture": plan.geo.architecture,
        "settings": plan.settings.to_dict(),
        "cache_values_per_token": cache_sizes(plan.geo, plan.settings),
        "tensors": len(plan.outputs),
        "output_bytes": plan.output_bytes,
    }


register_verify(app)
register_export(app)
register_plan(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
