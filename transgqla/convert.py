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

from .errors import InputError, TransGQLAError, UnsupportedError
from .families import Family
from .gqla_config import build_config, cache_sizes
from .io import SafetensorsCheckpoint, ShardedWriter, StagedOutput, TensorSpec, copy_file_hashed, ensure_free_space, resolve_source
from .io.safetensors_format import to_torch_dtype
from .mathx.gqla_layer import LayerSettings, SourceAttention, convert_attention
from .mathx.moments import InputMoment
from .settings import ConversionSettings, resolve_settings
from .source_geometry import SourceGeometry, read_geometry

Progress = Callable[[str, int, int], None]
MANIFEST = "transgqla-manifest.json"
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
    calib: str = "none"
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


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold a JSON object")
    return cfg


def _resolve(request: ConvertRequest):
    if request.source.startswith("demo:"):
        from .demo import materialize_demo  # optional dependencies live behind this import

        path = materialize_demo()
        return path, {"source": request.source, "demo": True, "local": True}
    resolved = resolve_source(request.source, request.revision)
    return resolved.path, dict(resolved.identity)


def _expected_attention(fam: Family, geo: SourceGeometry, layer: int) -> dict[str, tuple[int, ...]]:
    d, hd = geo.hidden, geo.head_dim
    shapes = {
        fam.tensor(layer, "q"): (geo.n_heads * hd, d),
        fam.tensor(layer, "k"): (geo.n_groups * hd, d),
        fam.tensor(layer, "v"): (geo.n_groups * hd, d),
        fam.tensor(layer, "o"): (d, geo.n_heads * hd),
    }
    if geo.qkv_bias:
        shapes[fam.tensor(layer, "q", "bias")] = (geo.n_heads * hd,)
        shapes[fam.tensor(layer, "k", "bias")] = (geo.n_groups * hd,)
        shapes[fam.tensor(layer, "v", "bias")] = (geo.n_groups * hd,)
    shapes[fam.norm(layer)] = (d,)
    return shapes


def _validate_tensors(ckpt: SafetensorsCheckpoint, geo: SourceGeometry) -> None:
    fam = geo.family
    names = set(ckpt.names)
    for name in names:
        for frag in fam.refused_tensors:
            if frag in name:
                raise UnsupportedError(f"tensor {name}: per-head q/k norms are not supported by GQLA conversion")
    for layer in range(geo.n_layers):
        for name, shape in _expected_attention(fam, geo, layer).items():
            if name not in names:
                raise InputError(f"tensor {name} is missing from the checkpoint")
            got = ckpt.spec(name).shape
            if tuple(got) != shape:
                raise InputError(f"tensor {name} has shape {list(got)}, the config implies {list(shape)}")
        if not geo.qkv_bias and fam.tensor(layer, "k", "bias") in names:
            raise InputError(f"tensor {fam.tensor(layer, 'k', 'bias')} exists but the config declares no attention bias")
    extra = [n for n in names if re.match(rf"model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= geo.n_layers]
    if extra:
        raise InputError(f"tensor {sorted(extra, key=natural_key)[0]} belongs to a layer beyond num_hidden_layers={geo.n_layers}")


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
    if request.calib != "none":
        raise UnsupportedError("calibration on text (--calib PATH) is not available yet; use --calib none")
    path, identity = _resolve(request)
    config = _load_config(path)
    geo = read_geometry(config)
    ckpt = SafetensorsCheckpoint(path)
    identity["fingerprint"] = ckpt.fingerprint()
    _validate_tensors(ckpt, geo)
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
        calib=request.calib,
        dtype=out_dtype,
    )
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
    return ConversionPlan(request, path, identity, config, geo, settings, ckpt, outputs, converted, copied)


def _read_attention(plan: ConversionPlan, layer: int) -> tuple[SourceAttention, InputMoment]:
    fam, geo, ckpt = plan.geo.family, plan.geo, plan.checkpoint

    def get(part: str, kind: str = "weight") -> torch.Tensor | None:
        name = fam.tensor(layer, part, kind)
        if kind == "bias" and not geo.qkv_bias:
            return None
        t = ckpt.read(name).to(torch.float64)
        if not torch.isfinite(t).all():
            raise InputError(f"tensor {name} holds NaN or Inf values")
        return t

    src = SourceAttention(
        wq=get("q"), wk=get("k"), wv=get("v"),
        n_heads=geo.n_heads, n_groups=geo.n_groups, head_dim=geo.head_dim,
        bq=get("q", "bias"), bk=get("k", "bias"), bv=get("v", "bias"),
        softmax_scale=geo.softmax_scale,
    )
    moment = InputMoment.data_free(ckpt.read(fam.norm(layer)))
    return src, moment


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Write the planned checkpoint into a staged folder and move it to OUT when complete."""
    request, s = plan.request, plan.settings
    start = time.perf_counter()
    staged = StagedOutput(request.out, request.force, protect=[plan.source_path])
    try:
        ensure_free_space(staged.path, plan.output_bytes)
        layer_settings = LayerSettings(s.kv_lora_rank, s.qk_rope_head_dim, s.freqfold, s.balance_kv)
        out_dtype = to_torch_dtype(DTYPES[s.dtype])
        reports: list[dict[str, float]] = []
        current: tuple[int, dict[str, torch.Tensor]] | None = None
        writer = ShardedWriter(staged.path, plan.outputs, request.max_shard_bytes, {"gqla_format_version": "1"})
        for i, spec in enumerate(plan.outputs):
            if spec.name in plan.converted:
                layer, rel = plan.converted[spec.name]
                if current is None or current[0] != layer:
                    src, moment = _read_attention(plan, layer)
                    conv = convert_attention(src, moment, layer_settings)
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
        config = build_config(plan.source_config, plan.geo, s, plan.identity, reports)
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
