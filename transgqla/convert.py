"""``transgqla convert``: plan and validate a conversion, then stream it into a staged output folder.

Plan first: the source is resolved, its config and every shard header validated, the settings
resolved and the full list of output tensors (names, dtypes, shapes) fixed before one byte is
written. Then layer by layer: the layer's q/k/v are read (wherever their shards are), converted
(float64 when calibrated, float32 data-free; see mathx/lowrank.py on precision) and written in the
output dtype; every other tensor is copied byte for byte, through a fixed 64 MiB buffer.

Failure safety. Everything is written into ``.<OUT>.transgqla-partial`` (marked ``INCOMPLETE``) and
renamed to OUT only when complete. Each output shard is renamed into place once whole and fsynced, and
then recorded in ``transgqla-progress.json`` (written atomically) with its sha256, the layer reports
known so far and a fingerprint of the plan (source, settings, output tensors, calibration tokens). With
``resume=True`` a later run whose plan fingerprint matches re-verifies the recorded shards, keeps them
and writes the rest; the result is bit-identical to an uninterrupted run because every shard's bytes
are a pure function of the plan. Data-free conversions only recompute the layers that feed unfinished
shards; calibrated ones recompute every layer in order (calibration must see the layers in order) and
only skip writing the finished shards.

Overlap. The per-layer math runs on a background thread (``layer_prefetch``), one layer ahead of
the writer, so it overlaps the copying of everything else. It runs on a fixed number of torch
threads (``TRANSGQLA_MATH_THREADS``, default 1) because LAPACK's eigh and torch's reductions give
different bits for different thread counts.

Test hook (used by tests/test_failure_safety.py, harmless otherwise): ``TRANSGQLA_TEST_KILL`` =
``shard:N`` (after N shards were completed and journaled by this process), ``tensor:N`` (after N
tensors were streamed by this process, usually mid-shard) or ``commit`` (everything written, just before
the rename) sends the process ``TRANSGQLA_TEST_KILL_SIGNAL`` (``KILL`` by default; ``TERM``, ``INT``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, hf_remote
from .errors import InputError, OutputError, UnsupportedError
from .gqla_config import build_config, cache_sizes
from .io import SafetensorsCheckpoint, ShardedWriter, StagedOutput, TensorSpec, copy_file_hashed, ensure_free_space
from .io.safetensors_format import to_torch_dtype
from .io.writer import MARKER, plan_shards, sha256_file, shard_file_name, staging_path, write_file_atomic
from .layer_converters import CalibratedConverter, DataFreeConverter
from .layer_prefetch import LayerPrefetcher
from .settings import ConversionSettings, resolve_settings
from .source_checkpoint import load_config, natural_key, resolve, validate_tensors
from .source_geometry import SourceGeometry, read_geometry

Progress = Callable[[str, int, int], None]
MANIFEST = "transgqla-manifest.json"
AUTO_CALIB = "auto"
REMOTE_CODE = ("configuration_gqla.py", "modeling_gqla.py")
DEFAULT_SHARD_BYTES = 5 * 1024**3
COPIED_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
    r"generation_config\.json|chat_template.*|.*\.tiktoken|tokenizer\.model)$"
)
DROPPED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")  # stale buffers some old checkpoints saved
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ATTN_SOURCE_PARTS = ("q", "k", "v")
PROGRESS = "transgqla-progress.json"  # the resume journal inside the staging folder
JOURNAL_VERSION = 1
MATH_THREADS_ENV = "TRANSGQLA_MATH_THREADS"
LAYER_WORKERS_ENV = "TRANSGQLA_LAYER_WORKERS"
DEFAULT_MATH_THREADS = 1
LAYERS_AHEAD = 1  # finished layers per worker that may wait for the writer (plus one being computed)
COPY_BUFFER_BYTES = 64 * 1024**2  # copied tensors stream through this (embeddings can be GBs)
DATA_FREE_WORKERS = 2  # data-free layers are independent: two at a time (benchmarks/README.md)
KILL_ENV = "TRANSGQLA_TEST_KILL"
KILL_SIGNAL_ENV = "TRANSGQLA_TEST_KILL_SIGNAL"
WRITER_METADATA = {"gqla_format_version": "1"}


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) during a conversion; the message says
    where the partial output is kept and that ``--resume`` continues it."""


@dataclass
class ConvertRequest:
    source: str
    out: Path
    kv_lora_rank: int | None = None
    qk_rope_dim: int | str | None = None  # or 'auto': the split of kv_budget by calibration error
    freqfold: str | None = None
    recipe: str | None = None
    calib: list[str] | None = None  # files, builtin:NAME, hf:REPO[:CONFIG[:SPLIT]], self (calib/sources.py); None = data-free; ["auto"] (the CLI's default)
    calib_tokens: int = 16384
    calib_seqlen: int = 512
    method: str | None = None  # pca | transmla | gqla (default: gqla with calibration, pca without)
    sequential: bool = False
    device: str = "cpu"
    dtype: str | None = None
    revision: str | None = None
    force: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    resume: bool = False  # continue from OUT's staging folder when its journal matches this plan
    refine: int | None = None  # refinement steps per layer (None: the recipe's or the default)
    kv_budget: int | None = None  # r + d_R, values per token per layer (kv_budget.py)


@dataclass
class ConversionPlan:
    request: ConvertRequest
    source_path: Path
    identity: dict[str, Any]
    source_config: dict[str, Any]
    geo: SourceGeometry
    settings: ConversionSettings
    checkpoint: SafetensorsCheckpoint
    outputs: list[TensorSpec]  # in write order
    converted: dict[str, tuple[int, str]]  # output name -> (layer, name relative to self_attn.)
    copied_files: list[Path]
    windows: "torch.Tensor | None" = None  # calibration token windows [n, seqlen]
    math_threads: int = DEFAULT_MATH_THREADS  # torch threads for the per-layer math
    layer_workers: int = DATA_FREE_WORKERS  # background threads for the per-layer math
    notes: list[str] = field(default_factory=list)  # what the user should know before it runs (CLI: warnings)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.outputs) + sum(p.stat().st_size for p in self.copied_files)


@dataclass
class ConversionResult:
    out: Path
    plan: ConversionPlan
    layer_reports: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    resume: dict[str, Any] | None = None  # what --resume found and reused (None: not asked)

    def summary(self) -> dict[str, Any]:
        geo, s = self.plan.geo, self.plan.settings
        worst = {k: max(r[k] for r in self.layer_reports) for k in ("key_nope_rel_error", "value_rel_error")} if self.layer_reports else {}
        return {
            "out": str(self.out),
            "source": self.plan.identity,
            "architecture": geo.architecture,
            "layers": geo.n_layers,
            "settings": s.to_dict(),
            "cache_values_per_token": cache_sizes(geo, s),
            "rope_energy_kept_mean": sum(r["rope_energy_kept"] for r in self.layer_reports) / max(1, len(self.layer_reports)),
            "worst_layer_errors": worst,
            "tensors_written": len(self.plan.outputs),
            "bytes_written": sum(t.nbytes for t in self.plan.outputs),
            "seconds": round(self.seconds, 3),
            "resume": self.resume,
        }


def _output_names(geo: SourceGeometry) -> list[str]:
    names = ["q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight"]
    if geo.qkv_bias:
        names += ["q_proj.bias", "kv_a_proj_with_mqa.bias", "kv_b_proj.bias"]
    return names


def _output_shapes(geo: SourceGeometry, s: ConversionSettings) -> dict[str, tuple[int, ...]]:
    d, dr, r = geo.head_dim, s.qk_rope_head_dim, s.kv_lora_rank
    return {
        "q_proj.weight": (geo.n_heads * (d + dr), geo.hidden),
        "kv_a_proj_with_mqa.weight": (r + dr, geo.hidden),
        "kv_b_proj.weight": (geo.n_groups * 2 * d, r),
        "q_proj.bias": (geo.n_heads * (d + dr),),
        "kv_a_proj_with_mqa.bias": (r + dr,),
        "kv_b_proj.bias": (geo.n_groups * 2 * d,),
    }


def plan_conversion(request: ConvertRequest) -> ConversionPlan:
    """Resolve, read and validate everything; fix the output tensor list. Writes nothing."""
    path, identity = resolve(request.source, request.revision)
    config = load_config(path)
    geo = read_geometry(config)
    ckpt = SafetensorsCheckpoint(path)
    identity["fingerprint"] = ckpt.fingerprint()
    validate_tensors(ckpt, geo, config)
    fam = geo.family
    src_dtype = ckpt.spec(fam.tensor(0, "q")).dtype
    if request.dtype is None:
        out_dtype = next((k for k, v in DTYPES.items() if v == src_dtype), None)
        if out_dtype is None:
            raise InputError(f"source attention dtype {src_dtype} is not a float type; pass --dtype")
    elif request.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
    else:
        out_dtype = request.dtype
    calib, notes = request.calib, []
    if calib == [AUTO_CALIB]:  # the most general text available offline, when the source has a tokenizer
        from .calib.sources import resolve_auto

        calib = None if request.method == "pca" else resolve_auto(path)  # pca is data-free by definition
        if calib is None and request.method != "pca":
            notes.append("--calib auto: the source has no tokenizer.json, so this conversion falls back to "
                         "weights-only statistics (data-free, method pca); pass --calib FILE with a source that "
                         "has a tokenizer for a calibrated conversion, or --calib none to silence this")
    settings = resolve_settings(
        geo,
        kv_lora_rank=request.kv_lora_rank,
        qk_rope_dim=request.qk_rope_dim,
        freqfold=request.freqfold,
        recipe=request.recipe,
        calib=",".join(calib) if calib else "none",
        method=request.method,
        dtype=out_dtype,
        refine=request.refine,
        kv_budget=request.kv_budget,
    )
    windows = None
    if calib:
        from .calib.sources import calibration_windows

        windows = calibration_windows(calib, path, request.calib_seqlen, request.calib_tokens, request.device).windows
    if settings.split_candidates:  # --qk-rope-dim auto: the output shapes wait for the split search
        from .calib.split_search import choose_split
        from .settings import with_split

        settings = choose_split(ckpt, geo, config, windows, settings, lambda d_r: with_split(geo, settings, d_r),
                                request.device, _math_threads_setting())
    replaced = {fam.tensor(l, p, k) for l in range(geo.n_layers) for p in ATTN_SOURCE_PARTS for k in ("weight", "bias")}
    outputs = [ckpt.spec(n) for n in ckpt.names if n not in replaced and not DROPPED_TENSORS.search(n)]
    shapes = _output_shapes(geo, settings)
    converted: dict[str, tuple[int, str]] = {}
    for layer in range(geo.n_layers):
        for rel in _output_names(geo):
            name = fam.attention_prefix(layer) + rel
            converted[name] = (layer, rel)
            outputs.append(TensorSpec(name, DTYPES[out_dtype], shapes[rel]))
    outputs.sort(key=lambda s: natural_key(s.name))
    copied = sorted(p for p in path.iterdir() if p.is_file() and COPIED_FILES.match(p.name))
    if request.max_shard_bytes <= 0:
        raise InputError(f"--max-shard-size must be positive, got {request.max_shard_bytes} bytes")
    return ConversionPlan(request, path, identity, config, geo, settings, ckpt, outputs, converted, copied, windows,
                          _math_threads_setting(), _layer_workers(windows is not None), notes)


def _env_count(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise InputError(f"{name} must be {kind} integer, got {raw!r}")
    return n


def _math_threads_setting() -> int:
    return _env_count(MATH_THREADS_ENV, DEFAULT_MATH_THREADS, 1)


def _layer_workers(calibrated: bool) -> int:
    """Background threads for the layer math: ``TRANSGQLA_LAYER_WORKERS`` (0 = compute in the writer's
    thread, no overlap; less memory), default two data-free; calibration is sequential, so at most one."""
    n = _env_count(LAYER_WORKERS_ENV, DATA_FREE_WORKERS, 0)
    return min(n, 1) if calibrated else n


def plan_fingerprint(plan: ConversionPlan) -> str:
    """sha256 over everything the output shards' bytes depend on: source (headers, shard sizes and
    modification times), settings, output tensor list and shard plan, calibration tokens, math threads."""
    r = plan.request
    files = []
    for f in plan.checkpoint.files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
    doc = {
        "journal": JOURNAL_VERSION,
        "tool_version": __version__,
        "source_fingerprint": plan.checkpoint.fingerprint(),
        "source_files": files,
        "settings": plan.settings.to_dict(),
        "outputs": [[s.name, s.dtype, list(s.shape)] for s in plan.outputs],
        "shards": [[s.name for s in shard] for shard in plan_shards(plan.outputs, r.max_shard_bytes)],
        "writer_metadata": WRITER_METADATA,
        "calibration": None if plan.windows is None else {
            "windows": hashlib.sha256(plan.windows.contiguous().numpy().tobytes()).hexdigest(),
            "shape": list(plan.windows.shape), "sequential": r.sequential, "device": r.device,
        },
        "math_threads": plan.math_threads,
        "device": torch.device(r.device).type,  # another device computes other bits
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class _ResumeState:
    keep: bool  # reuse the staging folder
    completed: dict[str, str]  # verified shard file -> sha256
    layers: dict[int, dict[str, Any]]  # layer reports recorded by the interrupted run
    note: str


def _inspect_staging(staging: Path, fingerprint: str, force: bool, shard_files: list[str]) -> _ResumeState:
    """Decide what a --resume run can keep. Reads only; a mismatching plan is an error unless forced."""
    fresh = lambda note: _ResumeState(False, {}, {}, note)  # noqa: E731
    if not staging.is_dir() or staging.is_symlink():
        return fresh(f"no partial output at {staging}; started fresh")
    try:
        doc = json.loads((staging / PROGRESS).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
            raise ValueError("unknown journal version")
        plan_fp, shards, layers = doc["plan"], doc["shards"], doc["layers"]
        if not isinstance(shards, dict) or not isinstance(layers, dict):
            raise ValueError("bad journal")
        layer_reports = {int(k): dict(v) for k, v in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return fresh(f"partial output at {staging} has no usable progress journal; started fresh")
    if plan_fp != fingerprint:
        if force:
            return fresh(f"partial output at {staging} was for another source or settings; discarded (--force)")
        raise OutputError(
            f"the partial output in {staging} was made from another source or with other settings; "
            "rerun without --resume to start over (or with --force)"
        )
    completed = {}
    for name, digest in shards.items():
        if name in shard_files and (staging / name).is_file() and sha256_file(staging / name) == digest:
            completed[name] = digest
    return _ResumeState(True, completed, layer_reports,
                        f"resumed from {staging}: {len(completed)} of {len(shard_files)} shards kept")


class _Journal:
    """``transgqla-progress.json`` in the staging folder, rewritten atomically after every shard."""

    def __init__(self, folder: Path, fingerprint: str, shards: dict[str, str], layers: dict[int, dict[str, Any]]):
        self.path = folder / PROGRESS
        self.fingerprint, self.shards, self.layers = fingerprint, dict(shards), layers

    def save(self) -> None:
        doc = {
            "version": JOURNAL_VERSION,
            "plan": self.fingerprint,
            "shards": dict(sorted(self.shards.items())),
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
        }
        write_file_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {self.path}: {exc.strerror or exc}") from None


class _KillHook:
    """The fault-injection test hook (``TRANSGQLA_TEST_KILL``); inert unless the variable is set."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "").strip()
        self.point, _, count = spec.partition(":")
        self.count = int(count) if count.strip().isdigit() else 0
        self.signal = getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL_ENV, "KILL").strip().upper(), None)
        self.seen = {"shard": 0, "tensor": 0}

    def __call__(self, point: str) -> None:
        if not self.point or self.signal is None:
            return
        if point in self.seen:
            self.seen[point] += 1
            if point != self.point or self.seen[point] != self.count:
                return
        elif point != self.point:
            return
        os.kill(os.getpid(), self.signal)
        time.sleep(0.5)  # let an asynchronous handler (TERM, INT) run here, not later


def _clean_staging(staging: Path, keep: set[str]) -> None:
    """Remove everything in the staging folder except the files named in ``keep``."""
    try:
        for entry in staging.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise OutputError(f"cannot clean the partial output in {staging}: {exc.strerror or exc}") from None


def _layer_converter(plan: ConversionPlan):
    if plan.windows is None:
        return DataFreeConverter(plan.checkpoint, plan.geo, plan.settings, device=plan.request.device)
    return CalibratedConverter(plan.checkpoint, plan.geo, plan.settings, plan.source_config, plan.windows,
                               sequential=plan.request.sequential, device=plan.request.device)


def _calibration_record(plan: ConversionPlan) -> dict[str, Any] | None:
    if plan.windows is None:
        return None
    from .calib.text import windows_record

    return windows_record(plan.windows, plan.settings.calib.split(","))


def _cast_converter(convert_layer, out_dtype: torch.dtype):
    """The prefetcher's work: one layer's report and its tensors, already cast and contiguous (the
    full-precision tensors are freed on the worker, not kept alive while the writer copies)."""
    def work(layer: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        conv = convert_layer(layer)
        return conv.report, {k: v.to(out_dtype).contiguous() for k, v in conv.tensors.items()}
    return work


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Write the planned checkpoint into a staged folder and move it to OUT when complete.

    Input errors found while converting (NaN weights, a shard changed underneath) remove the staging
    folder; output errors (disk full) and interrupts keep it, marked INCOMPLETE, for ``resume``."""
    request, s = plan.request, plan.settings
    start = time.perf_counter()
    hook = _KillHook()
    staging = staging_path(request.out)
    staged: StagedOutput | None = None
    writer: ShardedWriter | None = None
    prefetch: LayerPrefetcher | None = None
    torch_threads = torch.get_num_threads()
    resume_info: dict[str, Any] | None = None
    try:
        fingerprint = plan_fingerprint(plan)
        shard_plan = plan_shards(plan.outputs, request.max_shard_bytes)
        shard_files = [shard_file_name(i, len(shard_plan)) for i in range(len(shard_plan))]
        state = _ResumeState(False, {}, {}, "")
        if request.resume:
            state = _inspect_staging(staging, fingerprint, request.force, shard_files)
            resume_info = {"staging": str(staging), "continued": state.keep,
                           "shards_kept": len(state.completed), "shards_total": len(shard_files), "note": state.note}
        kept_bytes = sum((staging / f).stat().st_size for f in state.completed)
        ensure_free_space(staging, max(0, plan.output_bytes - kept_bytes))
        staged = StagedOutput(request.out, request.force, protect=[plan.source_path], resume=state.keep)
        if state.keep:
            _clean_staging(staged.path, {MARKER, PROGRESS, *state.completed})
        calibrated = plan.windows is not None
        reports: dict[int, dict[str, Any]] = {} if calibrated else {
            l: r for l, r in state.layers.items() if 0 <= l < plan.geo.n_layers}
        journal = _Journal(staged.path, fingerprint, state.completed, reports)
        journal.save()

        def shard_done(index: int, name: str, digest: str) -> None:
            journal.shards[name] = digest
            journal.save()
            hook("shard")

        writer = ShardedWriter(staged.path, plan.outputs, request.max_shard_bytes, WRITER_METADATA,
                               completed=state.completed, on_shard=shard_done)
        assert writer.files == shard_files
        # Layers to compute, in write order: calibration must see every layer in order; data-free,
        # those feeding an unfinished shard or lacking a report (from an interrupted run).
        needed = sorted({layer for name, (layer, _) in plan.converted.items()
                         if calibrated or layer not in reports or not writer.is_done(name)})
        needed_set = set(needed)
        prefetch = LayerPrefetcher(_cast_converter(_layer_converter(plan), to_torch_dtype(DTYPES[s.dtype])),
                                   needed, ahead=LAYERS_AHEAD, threads=plan.math_threads,
                                   workers=plan.layer_workers)
        current: tuple[int, dict[str, torch.Tensor]] | None = None
        copy_buffer = bytearray(COPY_BUFFER_BYTES)

        def converted_layer(layer: int) -> dict[str, torch.Tensor]:
            nonlocal current
            if current is None or current[0] != layer:
                current = None  # drop the previous layer's tensors before waiting for the next
                report, tensors = prefetch.get(layer)
                reports[layer] = {"layer": layer, **report}
                current = (layer, tensors)
                if progress:
                    progress("layers", len(reports), plan.geo.n_layers)
            return current[1]

        if progress:  # the starting point (layers a resumed run already has), before any new work
            progress("layers", len(reports), plan.geo.n_layers)
        for spec in plan.outputs:
            done = writer.is_done(spec.name)
            if spec.name in plan.converted:
                layer, rel = plan.converted[spec.name]
                if layer in needed_set:
                    tensors = converted_layer(layer)
                if done:
                    writer.skip(spec.name)
                else:
                    writer.write(spec.name, tensors[rel])
            elif done:
                writer.skip(spec.name)
            else:
                writer.write_stream(spec.name, plan.checkpoint.iter_bytes(spec.name, copy_buffer))
            if not done:
                hook("tensor")
        prefetch.close()
        current = None
        files = writer.close()
        for src_file in plan.copied_files:
            files[src_file.name] = copy_file_hashed(src_file, staged.path / src_file.name)
        for code in REMOTE_CODE:  # so that transformers loads OUT with trust_remote_code=True
            files[code] = copy_file_hashed(Path(hf_remote.__file__).parent / code, staged.path / code)
        layer_reports = [reports[l] for l in sorted(reports)]
        config = build_config(plan.source_config, plan.geo, s, plan.identity, layer_reports,
                              o_proj_bias=plan.geo.family.tensor(0, "o", "bias") in plan.checkpoint,
                              calibration=_calibration_record(plan))
        config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        write_file_atomic(staged.path / "config.json", config_bytes)
        files["config.json"] = hashlib.sha256(config_bytes).hexdigest()
        manifest = {"format_version": 1, "files": dict(sorted(files.items()))}
        write_file_atomic(staged.path / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        journal.remove()
        hook("commit")
        out = staged.commit()
    except (InputError, UnsupportedError):
        if writer is not None:
            writer.abort()
        if staged is not None:
            shutil.rmtree(staged.path, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    except OutputError as exc:
        if writer is not None:
            writer.abort()
        if staged is None or staged.committed or not staged.path.is_dir():
            raise
        raise OutputError(f"{exc}; the partial output is kept in {staged.path}: rerun with --resume to continue") from None
    except KeyboardInterrupt:
        if writer is not None:
            writer.abort()
        if staged is None or staged.committed or not staged.path.is_dir():
            raise ConversionInterrupted("interrupted; nothing was written") from None
        raise ConversionInterrupted(
            f"interrupted; the partial output is kept in {staged.path}: rerun the same command with --resume to continue"
        ) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if prefetch is not None:
            prefetch.close()
        plan.checkpoint.close()
        torch.set_num_threads(torch_threads)  # the worker pinned the process-wide count
    return ConversionResult(out, plan, layer_reports, time.perf_counter() - start, files, resume_info)


def convert(request: ConvertRequest, progress: Progress | None = None) -> ConversionResult:
    return run_conversion(plan_conversion(request), progress)
