"""``transgqla verify``: is a GQLA checkpoint well formed, self-consistent, and how close to its source?

Sections (each a few :class:`Check` s in the :class:`VerifyReport`):

* ``structure`` -- config vs the format contract, tensor names/shapes/dtypes implied by the config,
  NaN/Inf scan (tensor by tensor), index vs shard headers, manifest hashes.
* ``paths`` -- absorb and GQA attention agree on every layer (prefill, cached decode s_q = 1, 2).
* ``fidelity`` -- against the source (``source=`` or the config's recorded local folder): per-layer
  attention error, KL(source || gqla), top-1 agreement, perplexities. Reported; bounded only on request.
* ``decode`` -- greedy tokens identical on both paths; KV-cache bytes actually held vs the formulas.

The model sections run only when the structure holds well enough to load the weights. None of them
loads a model: every section reads the checkpoint layer by layer (:mod:`.layerwise`: one layer's
tensors, embedding rows and head chunks at a time; greedy decoding streams the layers at every step
unless the model is small), so memory does not grow with depth (benchmarks/bounded_memory.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from .. import devices
from ..errors import InputError
from ..model.decoder import GQLADecoder
from ..model.layerwise import LayerwiseModel
from ..text.pipeline import builtin_eval_text, encode, find_tokenizer, fixed_ids, read_text_flag, source_windows
from .decode import check_decode
from .engines import stock_export
from .fidelity import (
    FIXED_SEQLEN,
    FIXED_WINDOWS,
    FidelityBounds,
    fidelity_checks,
    find_source,
    measure,
    no_source_checks,
    open_source,
)
from .inputs import resolve_dtype, windows
from .paths import check_paths
from .report import SECTIONS, Check, VerifyReport, skipped
from .structure import check_structure

__all__ = ["SECTIONS", "Check", "FidelityBounds", "VerifyReport", "run_verify"]

DEFAULT_TOKENS = 32
DEFAULT_SEQLEN = 512
DEFAULT_TEXT_TOKENS = 1 << 17  # --text is scored on at most this many tokens (256 windows of 512)
BUILTIN_WINDOWS = 2  # windows of the built-in text scored when no --text is given
_SKIP_NAMES = {"paths": "paths.equivalence", "fidelity": "fidelity.source", "decode": "decode.tokens"}


def _sections(checks: Iterable[str] | None) -> list[str]:
    if checks is None:
        return list(SECTIONS)
    wanted = [c.strip() for c in checks if c.strip()]
    bad = [c for c in wanted if c not in SECTIONS]
    if bad or not wanted:
        raise InputError(f"--checks takes a comma-separated subset of {','.join(SECTIONS)}; "
                         f"got {','.join(bad) or 'nothing'}")
    return [s for s in SECTIONS if s in wanted]


def _fidelity_text(tokenizer, text: Path | None, seqlen: int, vocab: int, max_tokens: int | None):
    """(windows, description, real text?) for the fidelity section."""
    if text is not None:  # read and tokenized in chunks up to max_tokens: bounded in the file's size
        wins = list(source_windows([str(text)], tokenizer, seqlen, max_tokens, vocab=vocab))
        how, real = f"{text}", True
    elif tokenizer is not None:
        body, how = builtin_eval_text()
        wins, real = windows(encode(tokenizer, body, vocab), seqlen, BUILTIN_WINDOWS), True
    else:
        n = min(seqlen, FIXED_SEQLEN)
        wins, how, real = windows(fixed_ids(FIXED_WINDOWS * n, vocab), n), "fixed token ids (no tokenizer)", False
    if not wins:
        raise InputError(f"the text {how} holds fewer than 2 tokens")
    return wins, how, real


def run_verify(
    out: str | Path,
    source: str | None = None,
    text: str | Path | None = None,
    device: str = "auto",
    tokens: int = DEFAULT_TOKENS,
    checks: Iterable[str] | None = None,
    *,
    dtype: str = "float32",
    seqlen: int = DEFAULT_SEQLEN,
    path_tol: float | None = None,
    bounds: FidelityBounds | None = None,
    max_tokens: int | None = DEFAULT_TEXT_TOKENS,
) -> VerifyReport:
    """Verify the GQLA checkpoint at ``out``; the report says which checks held.

    Raises :class:`~transgqla.errors.InputError` (and friends) for unusable arguments only; a
    checkpoint that fails a check yields a report with ``ok == False``.
    """
    start = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"checkpoint folder {out} does not exist or is not a folder")
    wanted = _sections(checks)
    if tokens < 1:
        raise InputError(f"--tokens must be at least 1, got {tokens}")
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    if max_tokens is not None and max_tokens < seqlen:
        raise InputError(f"--max-tokens must be at least one window (--seqlen {seqlen}), got {max_tokens}")
    text = Path(text) if text is not None else None
    if text is not None:
        read_text_flag(text)  # fail on a bad path before any work
    bounds = bounds or FidelityBounds()
    dev, dt = devices.resolve_device(device), resolve_dtype(dtype)  # the one --device parser
    report = VerifyReport(str(out), info={"device": str(dev), "dtype": dtype, "sections": wanted})

    # a DeepSeek-V3 / MiMo-V2 export: the integrity checks, export's check, engine kernels (verify/engines.py)
    if stock_export(out, report, str(dev)):
        return report
    st = check_structure(out)  # the integrity checks run whatever --checks says: they gate everything else
    for c in st.checks:
        if "structure" in wanted or c.ok is False:  # failed gates are shown even when not requested
            report.add(c)
    try:
        model_sections = [s for s in wanted if s != "structure"]
        if not st.usable:
            for s in model_sections:
                report.add(skipped(_SKIP_NAMES[s], f"skipped: {st.blocker} failed, the weights cannot be loaded"))
            return report
        if not model_sections:
            return report
        cfg = st.config
        tokenizer = find_tokenizer(out)
        report.info["tokenizer"] = tokenizer is not None
        if text is not None and tokenizer is None:
            raise InputError(f"--text needs {out}/tokenizer.json and the tokenizers package to tokenize it")
        model = LayerwiseModel(st.checkpoint, cfg, GQLADecoder, dt, dev)
        if "paths" in wanted:
            report.add(check_paths(model, tokenizer, path_tol))
        if "fidelity" in wanted:
            _fidelity(report, model, cfg, source, tokenizer, text, seqlen, bounds, dt, dev, max_tokens)
        if "decode" in wanted:
            for c in check_decode(model, tokenizer, tokens):
                report.add(c)
        return report
    finally:
        if st.checkpoint is not None:
            st.checkpoint.close()
        report.info["seconds"] = round(time.perf_counter() - start, 3)


def _fidelity(report, model, cfg, source, tokenizer, text, seqlen, bounds, dt, dev, max_tokens) -> None:
    ref = find_source(cfg, source)
    if not ref.usable:
        report.info["source"] = None
        for c in no_source_checks(ref.how, bounds):
            report.add(c)
        return
    report.info["source"] = str(ref.path)
    src = open_source(ref, cfg, dt, dev)
    try:
        wins, how, real = _fidelity_text(tokenizer, text, seqlen, int(cfg["vocab_size"]), max_tokens)
        report.info["text"] = how
        path = (cfg.get("gqla") or {}).get("decode_path", "absorb")
        m = measure(src, model, wins, path)
        for c in fidelity_checks(m, bounds, how, real, ref.how, ref.notes):
            report.add(c)
    finally:
        src.ckpt.close()
