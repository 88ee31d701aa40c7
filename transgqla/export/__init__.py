"""``transgqla export OUT DST``: write a GQLA checkpoint in the form a runtime loads, then check it.

Forms (``--path`` / ``--format`` / ``--fold-kv``):

* ``absorb`` or ``gqa``, format ``gqla``: OUT's tensors byte for byte, ``gqla.decode_path`` set, remote
  code shipped (``from_pretrained(DST, trust_remote_code=True)``). See :mod:`.gqla_paths`.
* ``gqa --fold-kv``: per-group ``k_proj``/``v_proj`` for ordinary GQA kernels (RoPE on the last ``d_R``
  dims, interleaved). See :mod:`.gqla_paths`.
* ``absorb``, format ``deepseek``: a stock DeepSeek-V3 checkpoint, ``AutoModelForCausalLM.from_pretrained(DST)``
  without remote code; ``--target engines`` (default: vLLM, SGLang, transformers) or ``transformers``
  (exact constant-coordinate form). See :mod:`.deepseek`.
* ``gqa``, format ``mimo``: a stock MiMo-V2-Flash checkpoint carrying the GQA path (transformers, vLLM,
  SGLang, no remote code). See :mod:`.mimo`.
* ``absorb``, format ``gguf``: one llama.cpp GGUF file (``deepseek2``, latent cache), ``--outtype``
  f32/f16/bf16/q8_0, checked by llama.cpp itself when installed. See :mod:`.gguf` and :mod:`.gguf_export`.

OUT must match its manifest first (:func:`transgqla.integrity.require_manifest`: no symlinks, every file's size
and sha256, nothing unlisted), under a shared lock that keeps a ``convert --force`` from replacing it meanwhile.
Every export is written into a staging folder and checked (:mod:`.check`): a byte-identical one by the
hashes of its files against OUT's manifest, a rewritten one against the GQLA reference decoder on OUT, whole
or layer by layer in bounded memory (:mod:`.layerwise`); DST appears only when the check passes. A failed check
leaves DST untouched and the result says by how much it failed (the CLI exits 5).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import devices
from ..errors import InputError, VerificationError
from ..format import DEFAULT_SHARD_BYTES, MANIFEST
from ..integrity import require_manifest
from ..io import OutputLock, StagedOutput, ensure_free_space
from .check import (
    CHECK_MODES,
    Candidate,
    CheckResult,
    FoldedGQADecoder,
    decoder_candidate,
    deepseek_candidate,
    manifest_check,
    mimo_candidate,
    run_check,
    tokens_must_match,
    tolerance_for,
)
from .source import GQLACheckpoint, open_gqla

PATHS = ("absorb", "gqa")
FORMATS = ("gqla", "deepseek", "mimo", "gguf")
TARGETS = ("engines", "transformers")

__all__ = ["ExportRequest", "ExportResult", "run_export", "export", "PATHS", "FORMATS"]


@dataclass
class ExportRequest:
    out: Path  # the GQLA checkpoint to read
    dst: Path  # where to write
    path: str = "absorb"
    format: str = "gqla"
    fold_kv: bool = False
    target: str = "engines"  # deepseek: engines (vLLM/SGLang-shaped) | transformers (exact pin)
    query_bias_lora: bool = False  # deepseek: carry a query bias through q_lora_rank = D + 1 instead of refusing
    force: bool = False
    device: str = "cpu"  # where the reference check runs: cpu | cuda | auto
    tolerance: float | None = None  # relative logit error allowed (default: by dtype, see check.TOLERANCES)
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    check: str = "auto"  # rewritten exports: auto | full | layerwise (see .check)
    outtype: str = "auto"  # gguf: auto (the checkpoint's dtype) | f32 | f16 | bf16 | q8_0
    equal_kv: bool = False  # mimo: V zero-padded to the key's head size (engines' ordinary attention)
    kernel_shape: str | None = None  # deepseek engines: "R+DR", zero-pad the latent and RoPE key to it


@dataclass
class ExportResult:
    request: ExportRequest
    committed: bool
    check: CheckResult
    details: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.committed and self.check.ok

    @property
    def kind(self) -> str:
        r = self.request
        return f"{r.format}/{r.path}" + ("/folded" if r.fold_kv else "")

    def summary(self) -> dict[str, Any]:
        r = self.request
        return {
            "ok": self.ok,
            "out": str(r.out),
            "dst": str(r.dst),
            "committed": self.committed,
            "format": r.format,
            "path": r.path,
            "fold_kv": r.fold_kv,
            **self.details,
            "check": self.check.to_dict(),
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def _validate(req: ExportRequest) -> None:
    if req.path not in PATHS:
        raise InputError(f"--path must be absorb or gqa, got {req.path!r}")
    if req.format not in FORMATS:
        raise InputError(f"--format must be gqla, deepseek, mimo or gguf, got {req.format!r}")
    if req.target not in TARGETS:
        raise InputError(f"--target must be engines or transformers, got {req.target!r}")
    if req.fold_kv and req.path != "gqa":
        raise InputError("--fold-kv folds kv_b_proj into per-group k/v projections for GQA runtimes; "
                         "use it with --path gqa")
    if req.format == "deepseek" and req.path != "absorb":
        raise InputError("--format deepseek writes DeepSeek-V3's MLA (absorb path); use --path absorb, "
                         "or --format gqla for the gqa path")
    if req.format == "mimo" and req.path != "gqa":
        raise InputError("--format mimo writes the GQA path (MiMo-V2-Flash attention); use --path gqa, "
                         "or --format deepseek for absorb")
    if req.fold_kv and req.format != "gqla":
        raise InputError(f"--fold-kv writes the gqla format; drop --format {req.format}")
    if req.query_bias_lora and (req.format != "deepseek" or req.target != "transformers"):
        raise InputError("--q-lora-bias applies to --format deepseek --target transformers only "
                         "(the engines have no query bias slot)")
    if req.equal_kv and req.format != "mimo":
        raise InputError("--equal-kv pads the values of the MiMo GQA-path export; use it with --path gqa --format mimo")
    if req.kernel_shape is not None and (req.format != "deepseek" or req.target != "engines"):
        raise InputError("--kernel-shape pads the DeepSeek engine form; use it with --path absorb --format deepseek")
    if req.check not in CHECK_MODES:
        raise InputError(f"--check must be one of {', '.join(CHECK_MODES)}, got {req.check!r}")
    if req.tolerance is not None and not req.tolerance > 0:
        raise InputError(f"--tol must be positive, got {req.tolerance}")


def _write(req: ExportRequest, src: GQLACheckpoint, folder: Path, warnings: list[str]) -> tuple[dict, Candidate | None]:
    """Write the export into ``folder``; return (details, how to run it; None for a byte-identical copy)."""
    if req.format == "deepseek":
        from .deepseek import write_deepseek

        details = write_deepseek(src, folder, req.max_shard_bytes, warnings, req.target, req.query_bias_lora)
        return details, deepseek_candidate
    if req.format == "mimo":
        from .mimo import write_mimo

        return write_mimo(src, folder, req.max_shard_bytes, warnings, req.equal_kv), mimo_candidate
    from .gqla_paths import write_folded, write_same

    if req.fold_kv:
        details = write_folded(src, folder, req.max_shard_bytes)
        how = "plain GQA attention on DST's folded k/v (float32)"
        return details, decoder_candidate(FoldedGQADecoder, "folded", how)
    return write_same(src, folder, req.path), None


def run_export(req: ExportRequest) -> ExportResult:
    """Write, check, and commit DST when the check passes. Bad input raises a TransGQLAError (nothing
    is left at DST); a failed check returns a result with ``ok == False`` (DST not written)."""
    start = time.perf_counter()
    _validate(req)
    if req.format == "gguf":  # one file, not a folder: its own staging and check
        from .gguf_export import run

        return run(req)
    device = str(devices.resolve_device(req.device))  # the one --device parser
    reading = OutputLock(Path(req.out), "export (reading)", shared=True).acquire()  # no convert replaces OUT now
    try:
        return _run_folder_export(req, device, start)
    finally:
        reading.release()


def _run_folder_export(req: ExportRequest, device: str, start: float) -> ExportResult:
    src = open_gqla(Path(req.out))
    staged: StagedOutput | None = None
    try:
        require_manifest(src.folder)  # a damaged or edited OUT is refused before anything is written
        warnings: list[str] = []
        written, padding = src, None  # what the writer reads: OUT, or OUT zero-padded to a kernel's shape
        if req.kernel_shape is not None:
            from .kernel_pad import padded_view

            written, padding = padded_view(src, req.kernel_shape)
            source_values = (src.config["gqla"].get("cache_values_per_token") or {}).get("source_gqa")
            warnings.append(padding.warning(source_values))
        if req.format == "deepseek":
            from .deepseek import check_supported

            warnings += check_supported(written, req.target, req.query_bias_lora)
        elif req.format == "mimo":
            from .mimo import check_supported as mimo_supported

            warnings += mimo_supported(src)
        staged = StagedOutput(Path(req.dst), req.force, protect=[src.folder], command="export")
        total = sum(written.ckpt.spec(n).nbytes for n in written.ckpt.names)
        ensure_free_space(staged.path, int(total * (1.25 if req.format == "deepseek" else 1.0)))
        details, candidate = _write(req, written, staged.path, warnings)
        if padding is not None:
            details["kernel_padding"] = padding.to_dict(source_values)
        weight_files = details.pop("weight_files", [])
        src.close()
        if candidate is None:  # byte-identical: hashes, not models
            check = manifest_check(src.folder, staged.path, MANIFEST, weight_files)
        else:
            dst_config = _read_json(staged.path / "config.json")
            rerounded = req.fold_kv or req.format == "mimo" or (req.format == "deepseek" and req.target == "engines")
            tol = req.tolerance if req.tolerance is not None else tolerance_for(src.dtype, rerounded)
            check = run_check(src.folder, src.config, staged.path, dst_config, candidate, tol, device,
                              tokens_required=tokens_must_match(src.dtype, rerounded), mode=req.check)
        warnings += src.notes
        committed = False
        if check.ok:
            _write_card(staged.path, ExportResult(req, False, check, details, warnings).summary())
            staged.commit(manifest_sizes(staged.path))
            committed = True
        return ExportResult(req, committed, check, details, warnings, time.perf_counter() - start)
    finally:
        src.close()
        if staged is not None and not staged.committed:
            shutil.rmtree(staged.path, ignore_errors=True)
        if staged is not None:
            staged.close()


def _write_card(folder: Path, summary: dict[str, Any]) -> None:
    """The model card (:mod:`transgqla.model_card`), listed in the manifest beside the other files."""
    import json

    from ..format import json_bytes
    from ..model_card import CARD, export_card, write_card

    digest = write_card(folder, export_card(_read_json(folder / "config.json"), summary))
    doc = json.loads((folder / MANIFEST).read_text())
    doc["files"] = dict(sorted({**doc["files"], CARD: digest}.items()))
    if "sizes" in doc:  # what the commit checks is in place, and verify compares first
        doc["sizes"] = dict(sorted({**doc["sizes"], CARD: (folder / CARD).stat().st_size}.items()))
    (folder / MANIFEST).write_bytes(json_bytes(doc))


def export(req: ExportRequest) -> ExportResult:
    """:func:`run_export`, raising VerificationError when the reference check fails."""
    result = run_export(req)
    if not result.ok:
        raise VerificationError(failure_message(result))
    return result


def failure_message(result: ExportResult) -> str:
    c = result.check
    parts = []
    if c.mode == "manifest":
        parts += c.notes
    elif c.rel_error > c.tolerance:
        what = "hidden-state" if c.mode == "layerwise" else "logit"
        why = "" if c.rel_error < float("inf") else f" ({c.notes[-1]})"
        parts.append(f"relative {what} error {c.rel_error:.3e} exceeds {c.tolerance:.1e}{why}")
    if not c.tokens_equal and c.tokens_required:
        parts.append(f"greedy tokens diverge at token {c.tokens_matched} of {len(c.tokens_reference)}")
    return f"export check failed ({'; '.join(parts)}); {result.request.dst} not written"


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def manifest_sizes(folder: Path) -> dict[str, int]:
    """``{file: bytes}`` of everything the staged export's manifest lists, and the manifest itself: what its
    commit checks is in place before the rename."""
    path = folder / MANIFEST
    sizes = dict(_read_json(path).get("sizes") or {})
    sizes[MANIFEST] = path.stat().st_size
    return sizes
