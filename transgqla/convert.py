"""``transgqla convert``: plan and validate a conversion, then stream it into a staged output folder.

Plan first (:func:`plan_conversion`): the source is resolved, its config and every shard header
validated, the settings resolved and the full list of output tensors (names, dtypes, shapes) fixed
before one byte is written. Then (:func:`run_conversion`) layer by layer: the layer's q/k/v are read
(wherever their shards are), converted (float64 when calibrated, float32 data-free; see
mathx/lowrank.py on precision) and written in the output dtype; every other tensor is copied byte for
byte, through a fixed 64 MiB buffer. What is written, and how, is the format's (:mod:`transgqla.format`).

Failure safety and resume: :mod:`transgqla.io.staging` (the staged folder and its journal). With
``resume=True`` a run whose plan fingerprint (:func:`plan_fingerprint`) matches keeps the finished
shards; data-free conversions only recompute the layers that feed unfinished shards, calibrated ones
recompute every layer in order (calibration must see the layers in order) and only skip writing the
finished shards.

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
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__, hf_remote
from .data_files import DataFiles, find_data_files, write_data_files
from .errors import InputError, OutputError, UnsupportedError
from .format import (
    DEFAULT_SHARD_BYTES,
    FLOAT_DTYPES,
    MANIFEST,
    REMOTE_CODE,
    WRITER_METADATA,
    AttentionDims,
    build_config,
    cache_sizes,
    converted_names,
    json_bytes,
    manifest,
)
from .io import SafetensorsCheckpoint, ShardedWriter, StagedRun, TensorSpec, copy_file_sized, open_staged_run
from .io.reader import COPY_BUFFER_BYTES
from .io.safetensors_format import to_torch_dtype
from .io.staging import JOURNAL_VERSION
from .io.writer import plan_shards, shard_file_name, write_file_atomic
from .layer_converters import CalibratedConverter, DataFreeConverter
from .layer_prefetch import LayerPrefetcher
from .model_card import CARD, conversion_card, write_card
from .plan_checks import refuse_unwritable
from .provenance import numerical_environment
from .settings import ConversionSettings, resolve_settings
from .source_checkpoint import check_layer_count, load_config, natural_key, resolve, validate_tensors
from .source_geometry import SourceGeometry, read_geometry

Progress = Callable[[str, int, int], None]
AUTO_CALIB = "auto"
DROPPED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")  # stale buffers some old checkpoints saved
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ATTN_SOURCE_PARTS = ("q", "k", "v")
MATH_THREADS_ENV = "TRANSGQLA_MATH_THREADS"
LAYER_WORKERS_ENV = "TRANSGQLA_LAYER_WORKERS"
DEFAULT_MATH_THREADS = 1
LAYERS_AHEAD = 1  # finished layers per worker that may wait for the writer (plus one being computed)
DATA_FREE_WORKERS = 2  # data-free layers are independent: two at a time (benchmarks/README.md)
KILL_ENV = "TRANSGQLA_TEST_KILL"
KILL_SIGNAL_ENV = "TRANSGQLA_TEST_KILL_SIGNAL"


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
    # files, builtin:NAME, hf:REPO[:CONFIG[:SPLIT]], self (calib/sources.py); None = data-free; ["auto"] (the CLI's)
    calib: list[str] | None = None
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
    copied_files: DataFiles  # the source's tokenizer and generation files, checked (data only)
    windows: "torch.Tensor | None" = None  # calibration token windows [n, seqlen]
    math_threads: int = DEFAULT_MATH_THREADS  # torch threads for the per-layer math
    layer_workers: int = DATA_FREE_WORKERS  # background threads for the per-layer math
    notes: list[str] = field(default_factory=list)  # what the user should know before it runs (CLI: warnings)
    calib_sources: list[str] | None = None  # what each --calib resolved to (self with its seed), for the record
    environment: dict[str, Any] = field(default_factory=dict)  # torch, BLAS, CPU path, device (provenance.py)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.outputs) + self.copied_files.nbytes


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
        reports = self.layer_reports
        worst = {k: max(r[k] for r in reports) for k in ("key_nope_rel_error", "value_rel_error")} if reports else {}
        return {
            "out": str(self.out),
            "source": self.plan.identity,
            "architecture": geo.architecture,
            "layers": geo.n_layers,
            "settings": s.to_dict(),
            "cache_values_per_token": cache_sizes(geo, s),
            "rope_energy_kept_mean": sum(r["rope_energy_kept"] for r in reports) / max(1, len(reports)),
            "worst_layer_errors": worst,
            "tensors_written": len(self.plan.outputs),
            "bytes_written": sum(t.nbytes for t in self.plan.outputs),
            "seconds": round(self.seconds, 3),
            "resume": self.resume,
            "notes": list(self.plan.notes),
        }


def plan_conversion(request: ConvertRequest) -> ConversionPlan:
    """Resolve, read and validate everything; fix the output tensor list. Writes nothing."""
    path, identity = resolve(request.source, request.revision)
    config = load_config(path)
    ckpt = SafetensorsCheckpoint(path)  # index and headers only
    check_layer_count(config, ckpt.names, path)  # before anything is built per layer
    geo = read_geometry(config)
    identity["fingerprint"] = ckpt.fingerprint()
    identity["path"] = str(path.resolve())  # verify finds the source from any folder
    identity["shards"] = ckpt.shard_identities()
    validate_tensors(ckpt, geo, config)
    copied = find_data_files(path)  # only the source's own files, only data (auto_map dropped)
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
    calib, notes = request.calib, list(copied.notes)
    if calib == [AUTO_CALIB]:  # the most general text available offline, when the source has a tokenizer
        from .calib.sources import resolve_auto

        calib = None if request.method == "pca" else resolve_auto(path)  # pca is data-free by definition
        if calib is None and request.method != "pca":
            notes.append("--calib auto: the source has no tokenizer.json, so this conversion falls back to "
                         "weights-only statistics (data-free, method pca); pass --calib FILE with a source that "
                         "has a tokenizer for a calibrated conversion, or --calib none to silence this")
    if request.max_shard_bytes <= 0:
        raise InputError(f"--max-shard-size must be positive, got {request.max_shard_bytes} bytes")
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
    o_proj_bias = fam.tensor(0, "o", "bias") in ckpt  # what would be written wrong: refused before calibration
    refuse_unwritable(config, geo, settings, identity, _plan_outputs(ckpt, geo, settings, out_dtype)[0], o_proj_bias)
    windows, calib_sources = None, None
    if calib:
        from .calib.sources import calibration_windows

        calib_set = calibration_windows(calib, path, request.calib_seqlen, request.calib_tokens, request.device)
        windows, calib_sources = calib_set.windows, calib_set.sources
    if settings.split_candidates:  # --qk-rope-dim auto: the output shapes wait for the split search
        from .calib.split_search import choose_split
        from .settings import with_split

        settings = choose_split(ckpt, geo, config, windows, settings, lambda d_r: with_split(geo, settings, d_r),
                                request.device, _math_threads_setting())
    outputs, converted = _plan_outputs(ckpt, geo, settings, out_dtype)
    return ConversionPlan(request, path, identity, config, geo, settings, ckpt, outputs, converted, copied, windows,
                          _math_threads_setting(), _layer_workers(windows is not None), notes, calib_sources,
                          numerical_environment(request.device))


def _plan_outputs(ckpt: SafetensorsCheckpoint, geo: SourceGeometry, settings: ConversionSettings,
                  out_dtype: str) -> tuple[list[TensorSpec], dict[str, tuple[int, str]]]:
    """Every output tensor in write order (the source's, less q/k/v, plus the converted attention), and the
    converted ones' ``name -> (layer, name relative to self_attn.)``."""
    fam = geo.family
    replaced = {fam.tensor(l, p, k) for l in range(geo.n_layers) for p in ATTN_SOURCE_PARTS for k in ("weight", "bias")}
    outputs = [ckpt.spec(n) for n in ckpt.names if n not in replaced and not DROPPED_TENSORS.search(n)]
    shapes = AttentionDims.of_conversion(geo, settings).shapes()
    converted: dict[str, tuple[int, str]] = {}
    for layer in range(geo.n_layers):
        for rel in converted_names(geo.qkv_bias):
            name = fam.attention_prefix(layer) + rel
            converted[name] = (layer, rel)
            outputs.append(TensorSpec(name, DTYPES[out_dtype], shapes[rel]))
    outputs.sort(key=lambda s: natural_key(s.name))
    return outputs, converted


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
    """sha256 over everything the output shards' bytes depend on: source (each shard's header hash, its content
    hash where the Hub cache has one, sizes and modification times), settings, output tensor list and shard plan,
    calibration tokens, math threads, and the numerical environment (torch, BLAS/LAPACK, CPU path, device)."""
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
        "source_shards": plan.identity.get("shards") or plan.checkpoint.shard_identities(),
        "environment": plan.environment,
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


def _layer_converter(plan: ConversionPlan):
    if plan.windows is None:
        return DataFreeConverter(plan.checkpoint, plan.geo, plan.settings, device=plan.request.device)
    return CalibratedConverter(plan.checkpoint, plan.geo, plan.settings, plan.source_config, plan.windows,
                               sequential=plan.request.sequential, device=plan.request.device)


def _calibration_record(plan: ConversionPlan) -> dict[str, Any] | None:
    if plan.windows is None:
        return None
    from .text.pipeline import windows_record

    return windows_record(plan.windows, plan.calib_sources)


def _cast_converter(convert_layer, out_dtype: torch.dtype):
    """The prefetcher's work: one layer's report and its tensors, already cast and contiguous (the
    full-precision tensors are freed on the worker, not kept alive while the writer copies)."""
    def work(layer: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        conv = convert_layer(layer)
        return conv.report, {k: v.to(out_dtype).contiguous() for k, v in conv.tensors.items()}
    return work




def _all_finite(x: torch.Tensor | memoryview, dtype: torch.dtype | None = None) -> bool:
    """No NaN/Inf in ``x`` (a tensor, or raw bytes of ``dtype``): its min and max are finite (the reduction
    propagates NaN). One pass and no temporary: ~25x cheaper than ``isfinite(x).all()`` on bfloat16
    (benchmarks/README.md)."""
    t = x if isinstance(x, torch.Tensor) else torch.frombuffer(x, dtype=dtype)
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _finite(spec: TensorSpec, pieces: Iterator[memoryview]) -> Iterator[memoryview]:
    """``pieces`` of a copied tensor, each scanned for NaN/Inf when the tensor is a float type (a bad piece
    raises, and the run discards its output)."""
    dtype = to_torch_dtype(spec.dtype) if spec.dtype in FLOAT_DTYPES else None
    for piece in pieces:
        if dtype is not None and not _all_finite(piece, dtype):
            raise InputError(f"tensor {spec.name} holds NaN or Inf values; the source is damaged")
        yield piece


class _Job:
    """One run of a plan: the steps of :func:`run_conversion` and what each leaves open (the staged run,
    the writer, the math thread), so that :meth:`settle` can apply the one failure policy."""

    def __init__(self, plan: ConversionPlan, progress: Progress | None) -> None:
        self.plan, self.progress, self.hook = plan, progress, _KillHook()
        self.run: StagedRun | None = None
        self.writer: ShardedWriter | None = None
        self.prefetch: LayerPrefetcher | None = None
        self.torch_threads = torch.get_num_threads()

    def open_staging(self) -> StagedRun:
        """OUT's staging folder and journal; with ``resume``, what an interrupted run of this plan left."""
        plan, r = self.plan, self.plan.request
        shards = plan_shards(plan.outputs, r.max_shard_bytes)
        reuse = range(0) if plan.windows is not None else range(plan.geo.n_layers)  # calibration redoes all
        self.run = open_staged_run(
            r.out, fingerprint=plan_fingerprint(plan), shard_files=[shard_file_name(i, len(shards)) for i in
                                                                     range(len(shards))],
            output_bytes=plan.output_bytes, force=r.force, resume=r.resume, protect=[plan.source_path],
            reuse_layers=reuse, environment=plan.environment)
        return self.run

    def open_writer(self, run: StagedRun) -> ShardedWriter:
        def shard_done(index: int, name: str, digest: str) -> None:
            run.shard_done(name, digest)
            self.hook("shard")

        self.writer = ShardedWriter(run.path, self.plan.outputs, self.plan.request.max_shard_bytes, WRITER_METADATA,
                                    completed=run.kept.shards, on_shard=shard_done)
        return self.writer

    def start_math(self, run: StagedRun, writer: ShardedWriter) -> set[int]:
        """Start the layer math for the layers still needed, in write order: calibration must see every
        layer in order; data-free, those feeding an unfinished shard or lacking a report."""
        plan = self.plan
        calibrated = plan.windows is not None
        needed = sorted({layer for name, (layer, _) in plan.converted.items()
                         if calibrated or layer not in run.layers or not writer.is_done(name)})
        work = _cast_converter(_layer_converter(plan), to_torch_dtype(DTYPES[plan.settings.dtype]))
        self.prefetch = LayerPrefetcher(work, needed, ahead=LAYERS_AHEAD, threads=plan.math_threads,
                                        workers=plan.layer_workers)
        return set(needed)

    def stream_tensors(self, run: StagedRun, writer: ShardedWriter, needed: set[int]) -> dict[str, str]:
        """Every planned tensor in write order (converted ones from the math, the rest copied byte for byte;
        those in kept shards skipped); returns ``{file: sha256}`` of the shards and the index."""
        copy_buffer = bytearray(COPY_BUFFER_BYTES)
        plan, reports, prefetch = self.plan, run.layers, self.prefetch
        assert prefetch is not None
        current: tuple[int, dict[str, torch.Tensor]] | None = None
        if self.progress:  # the starting point (layers a resumed run already has), before any new work
            self.progress("layers", len(reports), plan.geo.n_layers)
        for spec in plan.outputs:
            done = writer.is_done(spec.name)
            if spec.name in plan.converted:
                layer, rel = plan.converted[spec.name]
                if layer in needed and (current is None or current[0] != layer):
                    current = None  # drop the previous layer's tensors before waiting for the next
                    report, tensors = prefetch.get(layer)
                    reports[layer] = {"layer": layer, **report}
                    current = (layer, tensors)
                    if self.progress:
                        self.progress("layers", len(reports), plan.geo.n_layers)
                if done:
                    writer.skip(spec.name)
                else:
                    assert current is not None and current[0] == layer
                    tensor = current[1][rel]
                    if not _all_finite(tensor):
                        raise InputError(f"the converted {spec.name} is not finite (NaN or Inf): the source's layer "
                                         f"{layer} overflows its dtype; try --dtype float32")
                    writer.write(spec.name, tensor)
            elif done:
                writer.skip(spec.name)
            else:  # byte for byte, scanned for NaN/Inf on the way (a damaged source is refused, not copied)
                pieces = plan.checkpoint.iter_bytes(spec.name, copy_buffer)
                writer.write_stream(spec.name, _finite(spec, pieces))
            if not done:
                self.hook("tensor")
        prefetch.close()
        return writer.close()

    def settle(self, exc: BaseException) -> None:
        """The one failure policy. Anything raised before the first shard is finished, and bad input found while
        converting (NaN weights, a shard changed underneath), removes the staging folder: nothing worth resuming.
        Output errors (disk full) and interrupts after that keep it, marked INCOMPLETE, and say so in one line.
        Raises that line; returns to re-raise ``exc`` as is."""
        if self.writer is not None:
            self.writer.abort()
        run = self.run
        if run is not None and run.kept_on_disk and not run.journal.shards:
            run.discard()  # no shard finished (nor kept): nothing worth resuming, whatever went wrong
        kept = run is not None and run.kept_on_disk
        if isinstance(exc, (InputError, UnsupportedError)):
            if run is not None:
                run.discard()
        elif isinstance(exc, OutputError) and kept:
            raise OutputError(f"{exc}; the partial output is kept in {run.path}: rerun with --resume to "
                              "continue") from None
        elif isinstance(exc, KeyboardInterrupt):
            if not kept:
                raise ConversionInterrupted("interrupted; nothing was written") from None
            raise ConversionInterrupted(f"interrupted; the partial output is kept in {run.path}: rerun the same "
                                        "command with --resume to continue") from None

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.run is not None:
            self.run.close()  # OUT's lock: released once committed, kept, or discarded
        self.plan.checkpoint.close()
        torch.set_num_threads(self.torch_threads)  # the worker pinned the process-wide count


def _copy_files(plan: ConversionPlan, folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    """The source's tokenizer and generation files, and the remote code (``trust_remote_code=True`` loading);
    returns ``{file: sha256}`` and records each file's bytes in ``sizes``."""
    files = write_data_files(plan.copied_files, folder, sizes)
    for code in REMOTE_CODE:
        files[code], sizes[code] = copy_file_sized(Path(hf_remote.__file__).parent / code, folder / code)
    return files


def _write_json(folder: Path, name: str, doc: Any, sizes: dict[str, int]) -> str:
    """One JSON file of the checkpoint, written atomically; returns its sha256 and records its bytes."""
    data = json_bytes(doc)
    write_file_atomic(folder / name, data)
    sizes[name] = len(data)
    return hashlib.sha256(data).hexdigest()


def _config(plan: ConversionPlan, layer_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """config.json (the format's builder)."""
    return build_config(plan.source_config, plan.geo, plan.settings, plan.identity, layer_reports,
                        o_proj_bias=plan.geo.family.tensor(0, "o", "bias") in plan.checkpoint,
                        calibration=_calibration_record(plan), environment=plan.environment)


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Write the planned checkpoint into a staged folder and move it to OUT when complete.

    Resolution, validation and planning happened in :func:`plan_conversion`; what remains are the numbered
    steps below. Any failure goes through one policy (:meth:`_Job.settle`): bad input removes the staging
    folder, a full disk or an interrupt keeps it for ``resume`` and says so in one line."""
    start = time.perf_counter()
    job = _Job(plan, progress)
    try:
        run = job.open_staging()                           # 1. staging folder + journal (what a resume keeps)
        writer = job.open_writer(run)                      # 2. the planned shards (kept ones are skipped)
        needed = job.start_math(run, writer)               # 3. the layer math, on its own thread
        files = job.stream_tensors(run, writer, needed)    # 4. convert + copy every tensor; shards, index
        sizes = dict(writer.sizes)
        files |= _copy_files(plan, run.path, sizes)        # 5. tokenizer, generation files, remote code
        layer_reports = [run.layers[layer] for layer in sorted(run.layers)]
        files["config.json"] = _write_json(run.path, "config.json", _config(plan, layer_reports), sizes)
        files[CARD] = write_card(run.path, conversion_card(json.loads((run.path / "config.json").read_text())))
        sizes[CARD] = (run.path / CARD).stat().st_size      # 6. config, card, then the manifest
        _write_json(run.path, MANIFEST, manifest(files, sizes=sizes), sizes)
        run.finish()                                       # 7. commit: drop the journal, check every file
        job.hook("commit")                                 #    is in place with its size, rename to OUT
        out = run.commit(sizes)
    except BaseException as exc:
        job.settle(exc)
        raise
    finally:
        job.close()
    return ConversionResult(out, plan, layer_reports, time.perf_counter() - start, files, run.resume_info)


def convert(request: ConvertRequest, progress: Progress | None = None) -> ConversionResult:
    return run_conversion(plan_conversion(request), progress)
