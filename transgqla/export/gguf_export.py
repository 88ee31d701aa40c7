"""``transgqla export OUT DST.gguf --path absorb --format gguf``: write, check, commit one GGUF file.

1. refuse what the file cannot carry (:func:`.gguf.check_supported`) and read the vocabulary
   (:mod:`.gguf_vocab`);
2. write ``.<DST>.transgqla-partial`` beside DST, tensor by tensor (:func:`.gguf.write_gguf`);
3. check it against the GQLA reference on OUT (:func:`.check.reference_outputs`: absorb path, float32):
   logits of the prompt + the reference's greedy tokens, and the file's own greedy tokens, from llama.cpp
   when ``llama-cpp-python`` is installed, else from the torch transcription of its graph
   (:mod:`.gguf_check`);
4. rename to DST only when the check passes (a failed check leaves DST untouched).

Tolerances (relative logit error, :data:`TOLERANCES`) follow what each type does to the computation, not
only to storage: llama.cpp's CPU matmul converts activations to the weight's type (bfloat16 keeps 8 bits,
float16 11; Q8_0 quantizes them to 8 bits per block of 32, like its weights). Measured on the demo (30
layers, bfloat16 weights, float32 latent cache): f32 4.4e-6, f16 3.6e-3, bf16 2.2e-2, q8_0 1.1e-1 (a lossy
format: its bound catches a wrong layout, which moves logits by ~1, not quantization). Greedy tokens gate
the check for ``f32`` only (elsewhere a near-tie may flip; they are reported).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, OutputError
from ..integrity import require_manifest
from ..io import OutputLock, ensure_free_space
from ..io.writer import guard_write
from .check import FULL_CHECK_BYTES, GREEDY_TOKENS, CheckResult, compare, float32_bytes, prompt_ids, reference_outputs
from .gguf import OUTTYPES, check_supported, resolve_outtype, write_gguf
from .gguf_check import llama_cpp_available, llama_cpp_outputs, torch_outputs
from .gguf_vocab import read_vocab
from .source import GQLACheckpoint, open_gqla

#: Relative logit error allowed, by output type (measured figures in the README / tests).
TOLERANCES = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.25}


def _within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _destination(dst: Path, out: Path, force: bool) -> tuple[Path, Path]:
    """(DST made absolute, the staging file beside it); OutputError for a DST that cannot be written."""
    dst = Path(dst).expanduser().absolute()
    if dst.is_dir():
        raise OutputError(f"{dst} is a folder; --format gguf writes one file (for example {dst / 'model.gguf'})")
    if dst.exists() and not force:
        raise OutputError(f"{dst} exists; pass --force to replace it")
    if _within(dst.resolve(), Path(out).resolve()):
        raise OutputError(f"{dst} is inside OUT {out}; write the GGUF elsewhere")
    if not dst.parent.is_dir():
        raise OutputError(f"folder {dst.parent} does not exist")
    return dst, dst.parent / f".{dst.name}.transgqla-partial"


def _estimated_bytes(src: GQLACheckpoint, outtype: str) -> int:
    """An upper bound of the file size: every OUT element at 4 bytes (f32) or 2, plus ``kv_b`` per head."""
    geo = src.geo
    elements = sum(math.prod(src.ckpt.spec(n).shape) for n in src.ckpt.names)
    elements += geo.n_layers * (geo.n_heads - geo.n_groups) * (geo.d_nope + geo.d_v) * geo.rank
    return elements * (4 if outtype == "f32" else 2) + 64 * 1024**2


def _streamed_reference(out: Path, config: dict[str, Any], ids: torch.Tensor, device: str) -> torch.Tensor:
    """GQLADecoder logits of ``ids`` reading OUT tensor by tensor (bounded memory, no greedy tokens)."""
    from ..io import SafetensorsCheckpoint
    from ..model.decoder import GQLADecoder
    from ..model.lazy import CheckpointTensors

    with SafetensorsCheckpoint(out) as ckpt:
        dec = GQLADecoder(config, CheckpointTensors(ckpt, torch.float32, device), dtype=torch.float32, device=device)
        return dec.forward(ids.to(dec.device), dec.new_cache("absorb")).float().cpu()


def run_check(out: Path, config: dict[str, Any], path: Path, outtype: str, tolerance: float | None,
              device: str = "cpu") -> CheckResult:
    """The GGUF at ``path`` against GQLADecoder on OUT: whole models with greedy tokens when OUT holds at most
    :data:`~.check.FULL_CHECK_BYTES` of float32 weights; above that, both sides read tensor by tensor and only
    the prompt's logits are compared (a greedy token would re-read the whole model)."""
    ids, how = prompt_ids(out, int(config["vocab_size"]))
    streamed = float32_bytes(out) > FULL_CHECK_BYTES
    use_llama = llama_cpp_available()
    label = ("llama.cpp (llama-cpp-python, float32 latent cache) on DST" if use_llama else
             "torch transcription of llama.cpp's deepseek2 graph on DST (float32; llama-cpp-python not installed)")
    n = 0 if streamed else GREEDY_TOKENS
    if streamed:
        ref_tokens, ref_logits = [], _streamed_reference(out, config, ids, device)
    else:
        ref_tokens, ref_logits = reference_outputs(out, config, ids, device)
    scored = torch.cat((ids, torch.tensor(ref_tokens, dtype=ids.dtype)[None]), dim=1)
    if use_llama:
        tokens, logits = llama_cpp_outputs(path, ids, scored, n)
    else:
        tokens, logits = torch_outputs(path, ids, scored, n, device)
    tol = tolerance if tolerance is not None else TOLERANCES[outtype]
    result = compare(ref_tokens, ref_logits, tokens, logits, reference="GQLADecoder on OUT (absorb, float32)",
                     candidate=label, prompt_len=ids.shape[1], how=how, tolerance=tol)
    result.tokens_required = outtype == "f32" and not streamed
    if streamed:
        result.mode = "streamed"
        result.notes.append("both sides read tensor by tensor: the prompt's logits compared, no greedy tokens")
    return result


def run(req: Any) -> Any:
    """``export --format gguf`` for an :class:`~transgqla.export.ExportRequest`; returns an ExportResult."""
    from . import ExportResult

    start = time.perf_counter()
    if req.path != "absorb":
        raise InputError("--format gguf writes llama.cpp's deepseek2, which decodes through the latent (absorb path); "
                         "use --path absorb, or --format mimo / gqla for the gqa path")
    if req.outtype not in OUTTYPES:
        raise InputError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {req.outtype!r}")
    if req.check == "layerwise":
        raise InputError("--format gguf is checked whole (llama.cpp runs the file); drop --check layerwise")
    reading = OutputLock(Path(req.out), "export (reading)", shared=True).acquire()
    writing: OutputLock | None = None
    try:
        src = open_gqla(Path(req.out))
    except BaseException:
        reading.release()
        raise
    staging: Path | None = None
    try:
        require_manifest(src.folder)  # a damaged or edited OUT is refused before anything is written
        warnings = check_supported(src)
        outtype = resolve_outtype(req.outtype, src.dtype)
        vocab = read_vocab(src.folder, src.config, int(src.config["vocab_size"]))
        warnings += vocab.warnings
        dst, partial = _destination(Path(req.dst), src.folder, req.force)
        writing = OutputLock(dst, "export").acquire()  # one run per DST: the staging name is fixed
        staging = partial
        guard_write(staging, lambda: staging.unlink(missing_ok=True))
        ensure_free_space(staging.parent, _estimated_bytes(src, outtype))
        details = guard_write(staging, lambda: write_gguf(src, staging, outtype, vocab, name=src.folder.name))
        details["target"] = f"llama.cpp deepseek2, {outtype}"
        src.close()
        from ..devices import resolve_device

        check = run_check(src.folder, src.config, staging, outtype, req.tolerance, str(resolve_device(req.device)))
        committed = False
        if check.ok:
            guard_write(dst, lambda: staging.replace(dst))
            committed = True
        return ExportResult(req, committed, check, details, warnings, time.perf_counter() - start)
    finally:
        src.close()
        if staging is not None and staging.exists():
            try:
                staging.unlink()
            except OSError:
                pass  # a failing disk: the one error line already says what happened
        if writing is not None:
            writing.release()
        reading.release()
