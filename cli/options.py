"""Options several commands share, defined once: one ``Annotated`` alias per flag, and the parsers behind them.

Why: ``--json``, ``--device``, ``--force``, ``--kv-lora-rank``... were spelled out again in every command,
with drifting help and, for ``--max-shard-size``, a different unit in the CLI (10**9) and the library (2**30).
A command takes the alias (``as_json: JsonFlag = False``) and passes the parsed value on; a new option that
two commands need goes here.

Sizes (:func:`parse_size`) follow Hugging Face's ``max_shard_size``: ``KB``/``MB``/``GB``/``TB`` are decimal
(``5GB`` = 5 * 10**9 bytes, the default, :data:`transgqla.format.DEFAULT_SHARD_BYTES`), ``KiB``/``MiB``/``GiB``/
``TiB`` binary (``5GiB`` = 5 * 2**30), ``B`` bytes; a bare number is in GB (``0.5`` = 500 MB), as the flag
always read. Devices: :func:`transgqla.devices.resolve_device`, the one parser.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Optional

import typer

from transgqla import devices
from transgqla.errors import InputError

#: Bytes per unit; a bare number is in GB.
SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
BARE_UNIT = "GB"
DEFAULT_SHARD_SIZE = "5GB"  # = transgqla.format.DEFAULT_SHARD_BYTES (tests/test_cli_options.py)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | float | int, flag: str = "--max-shard-size") -> int:
    """``5GB`` / ``500MB`` / ``5GiB`` / ``0.5`` (GB) -> whole bytes (rounded down); a one-line InputError
    for anything else, or for a size under one byte."""
    m = _SIZE.match(str(text))
    unit = (m.group(2).upper() or BARE_UNIT) if m else ""
    if not m or unit not in SIZE_UNITS:
        raise InputError(f"{flag} takes a size like 5GB, 500MB or 5GiB (GB when no unit is given), got {text!r}")
    try:
        n = int(Decimal(m.group(1)) * SIZE_UNITS[unit])
    except InvalidOperation:  # the pattern admits only numbers; kept for safety
        raise InputError(f"{flag}: {text!r} is not a number") from None
    if n <= 0:
        raise InputError(f"{flag} must be positive, got {text!r}")
    return n


def device_name(name: str) -> str:
    """``--device`` resolved once (``auto`` -> ``cuda`` or ``cpu``): a one-line error when CUDA is asked for
    and absent."""
    return str(devices.resolve_device(name))  # looked up at call time (tests stand in a fake device)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")]
Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N: where the command computes (auto: CUDA when available).")]
MaxShardSize = Annotated[str, typer.Option(
    "--max-shard-size", help="Shard size cap: 5GB, 500MB (decimal), 5GiB (binary); a bare number is GB.")]
KvLoraRank = Annotated[Optional[int], typer.Option(
    "--kv-lora-rank", help="Latent rank r (default: the recipe's, else the ~28% cache rule).")]
QkRopeDim = Annotated[Optional[int], typer.Option(
    "--qk-rope-dim", help="RoPE key dims d_R (default: the recipe's, else head_dim/2).")]
QkRopeDimOrAuto = Annotated[Optional[str], typer.Option(
    "--qk-rope-dim",
    help="RoPE key dims d_R (default: the recipe's, else head_dim/2), or 'auto': the split of the KV budget with "
         "the lowest calibration error on a few layers (needs calibration text; runs before the conversion).")]
KvBudget = Annotated[Optional[int], typer.Option(
    "--kv-budget",
    help="KV cache values per token per layer, r + d_R (absorb path); with --qk-rope-dim auto the split is "
         "searched, else r = N - d_R.")]


def parse_rope_dim(value: str | None) -> int | str | None:
    """``--qk-rope-dim``: an integer or 'auto' (a one-line error otherwise)."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--qk-rope-dim must be an even integer or 'auto', got {value!r}") from None
Seqlen = Annotated[int, typer.Option("--seqlen", help="Window length in tokens; windows do not overlap.")]
