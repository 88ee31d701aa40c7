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
from rich.markup import escape

from transgqla import __version__
from transgqla.errors import TransGQLAError

from .progress import progress_reporter
from .render import conversion_table, plan_line, recipes_table
from .export_cmd import register as register_export
from .plan_cmd import register as register_plan
from .verify_cmd import register as register_verify

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Convert GQA checkpoints to GQLA, verify and export them.")
err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        print(f"transgqla {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """transgqla: Group-Query Latent Attention checkpoints from GQA ones."""


def _fail(exc: TransGQLAError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": str(exc), "exit_code": exc.exit_code}))
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _warn(notes: list[str]) -> None:
    for note in notes:
        err.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Make SIGTERM interrupt like Ctrl-C (the partial output stays resumable); returns the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupted(exc: KeyboardInterrupt, as_json: bool) -> None:
    message = str(exc) or "interrupted"
    if as_json:
        print(json.dumps({"ok": False, "error": message, "exit_code": 130}))
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _device(name: str) -> str:
    """The shared parser (transgqla/devices.py): a one-line error when CUDA is asked for and absent."""
    from transgqla.devices import resolve_device

    return str(resolve_device(name))


def _rope_dim(value: str | None) -> int | str | None:
    """``--qk-rope-dim``: an integer or 'auto' (a one-line error otherwise)."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        from transgqla.errors import InputError

        raise InputError(f"--qk-rope-dim must be an even integer or 'auto', got {value!r}") from None


@app.command()
def convert(
    source: str = typer.Argument(..., help="Local model folder, Hugging Face model id, or demo:smollm2-135m."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder (must be empty unless --force)."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", help="Latent rank r (default: recipe, else ~28% cache rule)."),
    qk_rope_dim: Optional[str] = typer.Option(None, "--qk-rope-dim", help="RoPE key dims d_R (default: recipe, else head_dim/2), or 'auto': the split of the KV budget with the lowest calibration error on a few layers (needs calibration text; runs before the conversion)."),
    kv_budget: Optional[int] = typer.Option(None, "--kv-budget", help="KV cache values per token per layer, r + d_R (absorb path); with --qk-rope-dim auto the split is searched, else r = N - d_R."),
    freqfold: Optional[str] = typer.Option(None, "--freqfold", help="Frequencies per PCA block, or 'auto'."),
    calib: list[str] = typer.Option(["auto"], "--calib", help="Calibration source (repeatable; several mix with an even token budget): a .txt/.jsonl file, builtin:calib (Python docs), builtin:prose-calib (general English, Debian's fortunes), hf:REPO[:CONFIG[:SPLIT]] (a dataset already in the local Hugging Face cache), self (text the source samples itself; one forward per token), 'none' (statistics from the weights alone), or 'auto' (the most general source available offline, said on stderr; none without tokenizer.json)."),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Calibration tokens to use at most."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Calibration window length in tokens."),
    method: Optional[str] = typer.Option(None, "--method", help="pca (data-free) | transmla | gqla (default with --calib)."),
    sequential: bool = typer.Option(False, "--sequential", help="Calibrate layer l on the outputs of converted layers < l."),
    refine: Optional[int] = typer.Option(None, "--refine", help="Gradient steps per layer fitting the converted attention's output to the source's on the calibration text (0 = closed form only; default: recipe, else 50 with calibration text)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda: where calibration and the layer math run (auto: CUDA when available)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Built-in recipe name or a TOML file."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16|float16|float32 for converted tensors (default: source's)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    max_shard_size: float = typer.Option(5.0, "--max-shard-size", help="Shard size cap in GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted conversion from OUT's partial output (bit-identical result); starts fresh if there is none."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Stream a GQA checkpoint into a GQLA checkpoint (format v1)."""
    from transgqla.convert import ConvertRequest, plan_conversion, run_conversion

    restore_sigterm = _sigterm_as_interrupt()
    try:
        request = ConvertRequest(
            source=source, out=out_dir, kv_lora_rank=kv_lora_rank, qk_rope_dim=_rope_dim(qk_rope_dim), freqfold=freqfold,
            recipe=recipe, calib=None if calib == ["none"] else calib, calib_tokens=calib_tokens,
            calib_seqlen=calib_seqlen, method=method, sequential=sequential, device=_device(device), dtype=dtype,
            revision=revision, force=force, max_shard_bytes=int(max_shard_size * 1e9), resume=resume,
            refine=refine, kv_budget=kv_budget,
        )
        plan = plan_conversion(request)
        if dry_run:
            _warn(plan.notes)
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
    except TransGQLAError as exc:
        _fail(exc, as_json)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the message says how to --resume
        _interrupted(exc, as_json)
    finally:
        restore_sigterm()
    _warn(plan.notes)  # after the run: a failure's one line is the news; notes are about a finished conversion
    summary = result.summary()
    if as_json:
        print(json.dumps({"ok": True, **summary}, indent=2))
    else:
        out.print(conversion_table(summary, result.layer_reports))


@app.command("eval-ppl")
def eval_ppl(
    model: str = typer.Argument(..., help="A source or GQLA checkpoint folder (or model id / demo:smollm2-135m)."),
    text: list[str] = typer.Option(..., "--text", help="Text file(s) (.txt or .jsonl with 'text'), or builtin:eval."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length; windows do not overlap."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Use at most this many tokens of the text."),
    path: Optional[str] = typer.Option(None, "--path", help="absorb|gqa for GQLA checkpoints (default: config's)."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Perplexity on non-overlapping windows, computed layer by layer (bounded memory)."""
    from transgqla.evaluate import perplexity

    try:
        result = perplexity(model, text, seqlen=seqlen, max_tokens=max_tokens, path=path, device=_device(device))
    except TransGQLAError as exc:
        _fail(exc, as_json)
    doc = result.to_dict()
    if as_json:
        print(json.dumps({"ok": True, **doc}, indent=2))
    else:
        out.print(f"perplexity {doc['perplexity']:.3f} over {doc['tokens']} predicted tokens "
                  f"({doc['windows']} windows of {doc['seqlen']}; {doc['kind']}{' ' + doc['path'] if doc['path'] else ''}; "
                  f"{doc['seconds']:.1f} s)")


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout.")) -> None:
    """List the built-in recipes and what they match."""
    from transgqla.recipe_book import builtin_recipes

    found = builtin_recipes()
    if as_json:
        print(json.dumps([{"name": r.name, "description": r.description, "match": r.match, "settings": r.settings} for r in found], indent=2))
        return
    out.print(recipes_table(found))


def _plan_doc(plan) -> dict[str, Any]:
    from transgqla.gqla_config import cache_sizes

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
