"""``transgqla convert``: plan and validate a conversion, then stream it into a staged output folder.

Plan first: the source is resolved, its config and every shard header validated, the settings
resolved and the full list of output tensors (names, dtypes, shapes) fixed before one byte is
written. Then layer by layer: the layer's q/k/v are read (wherever their shards are), converted in
float64 and written in the output dtype; every other tensor is copied byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import hf_remote
from .errors import InputError, TransGQLAError, UnsupportedError
from .families import Family
from .gqla_config import build_config, cache_sizes
from .io import SafetensorsCheckpoint, ShardedWriter, StagedOutput, TensorSpec, copy_file_hashed, ensure_free_space
from .io.safetensors_format import to_torch_dtype
from .layer_converters import CalibratedConverter, DataFreeConverter
from .settings import ConversionSettings, resolve_settings
from .source_checkpoint import load_config, natural_key, resolve, validate_tensors
from .source_geometry import SourceGeometry, read_geometry

Progress = Callable[[str, int, int], None]
MANIFEST = "transgqla-manifest.json"
REMOTE_CODE = ("configuration_gqla.py", "modeling_gqla.py")
DEFAULT_SHARD_BYTES = 5 * 1024**3
COPIED_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
    r"generation_config\.json|chat_template.*|.*\.tiktoken|tokenizer\.model)$"
)
DROPPED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")  # stale buffers some old checkpoints saved
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ATTN_SOURCE_PARTS = ("q", "k", "v")


@dataclass
class ConvertRequest:
    source: str
    out: Path
    kv_lora_rank: int | None = None
    qk_rope_dim: int | None = None
    freqfold: str | None = None
    recipe: str | None = None
    calib: list[str] | None = None  # text files or builtin:NAME; None = data-free
    calib_tokens: int = 65536
    calib_seqlen: int = 512
    method: str | None = None  # pca | transmla | gqla (default: gqla with calibration, pca without)
    sequential: bool = False
    device: str = "cpu"
    dtype: str | None = None
    revision: str | None = None
    force: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


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
    validate_tensors(ckpt, geo)
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
    settings = resolve_settings(
        geo,
        kv_lora_rank=request.kv_lora_rank,
        qk_rope_dim=request.qk_rope_dim,
        freqfold=request.freqfold,
        recipe=request.recipe,
        calib=",".join(request.calib) if request.calib else "none",
        method=request.method,
        dtype=out_dtype,
    )
    windows = None
    if request.calib:
        from .calib.text import load_tokenizer, read_text, token_windows

        windows = token_windows(read_text(request.calib), load_tokenizer(path), request.calib_seqlen, request.calib_tokens)
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
    return ConversionPlan(request, path, identity, config, geo, settings, ckpt, outputs, converted, copied, windows)


def _layer_converter(plan: ConversionPlan):
    if plan.windows is None:
        return DataFreeConverter(plan.checkpoint, plan.geo, plan.settings)
    return CalibratedConverter(plan.checkpoint, plan.geo, plan.settings, plan.source_config, plan.windows,
                               sequential=plan.request.sequential, device=plan.request.device)


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Write the planned checkpoint into a staged folder and move it to OUT when complete."""
    request, s = plan.request, plan.settings
    start = time.perf_counter()
    staged = StagedOutput(request.out, request.force, protect=[plan.source_path])
    try:
        ensure_free_space(staged.path, plan.output_bytes)
        convert_layer = _layer_converter(plan)
        out_dtype = to_torch_dtype(DTYPES[s.dtype])
        reports: list[dict[str, float]] = []
        current: tuple[int, dict[str, torch.Tensor]] | None = None
        writer = ShardedWriter(staged.path, plan.outputs, request.max_shard_bytes, {"gqla_format_version": "1"})
        for i, spec in enumerate(plan.outputs):
            if spec.name in plan.converted:
                layer, rel = plan.converted[spec.name]
                if current is None or current[0] != layer:
                    conv = convert_layer(layer)
                    reports.append({"layer": layer, **conv.report})
                    current = (layer, conv.tensors)
                    if progress:
                        progress("layers", len(reports), plan.geo.n_layers)
                writer.write(spec.name, current[1][rel].to(out_dtype).contiguous())
            else:
                writer.write(spec.name, plan.checkpoint.read_bytes(spec.name))
        files = writer.close()
        for src_file in plan.copied_files:
            files[src_file.name] = copy_file_hashed(src_file, staged.path / src_file.name)
        for code in REMOTE_CODE:  # so that transformers loads OUT with trust_remote_code=True
            files[code] = copy_file_hashed(Path(hf_remote.__file__).parent / code, staged.path / code)
        config = build_config(plan.source_config, plan.geo, s, plan.identity, reports,
                              o_proj_bias=plan.geo.family.tensor(0, "o", "bias") in plan.checkpoint)
        config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        (staged.path / "config.json").write_bytes(config_bytes)
        files["config.json"] = hashlib.sha256(config_bytes).hexdigest()
        manifest = {"format_version": 1, "files": dict(sorted(files.items()))}
        (staged.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        out = staged.commit()
    except TransGQLAError:
        shutil.rmtree(staged.path, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    finally:
        plan.checkpoint.close()
    return ConversionResult(out, plan, reports, time.perf_counter() - start, files)


def convert(request: ConvertRequest, progress: Progress | None = None) -> ConversionResult:
    return run_conversion(plan_conversion(request), progress)
