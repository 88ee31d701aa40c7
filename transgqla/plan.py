"""``transgqla plan``: which decode path a GPU should run, from a roofline model of decode attention.

Per decode step, one sequence, one layer, ``T`` cached tokens, ``s_q`` query tokens (MTP / speculative
decoding), cache elements of ``b`` bytes, tensor parallelism ``t`` (DESIGN.md sections 2 and 7):

absorb (MLA-style; the latent cache is replicated on every rank, the heads split ``n_h / t``)
    bytes  = T (r + d_R) b
    FLOPs  = 2 (n_h / t) s_q T (2 r + d_R)        scores over ``[c ; k_R]`` (r + d_R), values over ``c`` (r)
    FLOPs per byte = 2 (n_h / t) s_q (2 r + d_R) / ((r + d_R) b)
gqa (per-group cache, the RoPE key copied per group as stock kernels need; groups split ``n_g / t``)
    bytes  = T (n_g / t) (d_k + d_v) b            with d_k = d_nope + d_R
    FLOPs  = 2 (n_h / t) s_q T (d_k + d_v)
    FLOPs per byte = 2 (n_h / n_g) s_q / b

Time = max(FLOPs / peak FLOP/s, bytes / bandwidth): compute-bound when FLOPs per byte exceeds the GPU's
ridge point (peak FLOP/s over bandwidth), memory-bound otherwise. Batch multiplies both terms, so it does not
change the bound or the time per token; ``s_q`` multiplies the FLOPs only. Time per token = time per step /
``s_q``. KV cache per token (all layers, per rank): absorb ``L (r + d_R) b``, gqa ``L (n_g / t) (d_k + d_v) b``.
Concurrent tokens that fit = (memory x ``mem_util`` - weights / t) / KV bytes per token per rank. The
recommended path is the faster per token (the smaller cache on a tie). Peak figures are dense BF16 tensor
throughput and HBM bandwidth from vendor data sheets (:data:`GPUS`); real kernels reach a fraction of both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # dense BF16 tensor TFLOP/s
    tbps: float  # HBM TB/s
    memory_gb: float

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which compute and memory take equal time."""
        return self.tflops / self.tbps


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 989.0, 3.35, 80.0),
    "h200": GPU("H200 SXM", 989.0, 4.8, 141.0),
    "h20": GPU("H20", 148.0, 4.0, 96.0),
    "a100": GPU("A100 SXM 80GB", 312.0, 2.039, 80.0),
    "l40s": GPU("L40S", 362.0, 0.864, 48.0),
    "rtx4090": GPU("RTX 4090", 165.2, 1.008, 24.0),  # FP16-accumulate peak; 82.6 with FP32 accumulate
    "mi300x": GPU("MI300X", 1307.0, 5.3, 192.0),
}


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a GQLA model."""

    n_heads: int
    n_groups: int
    rank: int  # r
    d_rope: int  # d_R
    d_nope: int
    d_v: int
    n_layers: int
    weight_params: int  # all parameters (for the memory left to the cache)

    @property
    def d_k(self) -> int:
        return self.d_nope + self.d_rope


@dataclass(frozen=True)
class Workload:
    sq: int = 1  # query tokens per decode step
    tp: int = 1  # tensor-parallel ranks
    context: int = 8192  # cached tokens T
    batch: int = 1
    bytes_per_value: int = 2  # bf16 cache
    mem_util: float = 0.9  # share of GPU memory for weights + cache


def check_workload(shape: Shape, w: Workload) -> None:
    if w.sq < 1 or w.context < 1 or w.batch < 1 or w.bytes_per_value < 1:
        raise InputError("--sq, --context, --batch and the cache bytes must be positive")
    if w.tp < 1 or shape.n_heads % w.tp:
        raise InputError(f"--tp {w.tp} must divide the {shape.n_heads} query heads")
    if not 0 < w.mem_util <= 1:
        raise InputError(f"--mem-util must be in (0, 1], got {w.mem_util}")


def path_figures(shape: Shape, gpu: GPU, w: Workload, path: str) -> dict[str, Any]:
    """The roofline figures of one path (formulas in the module docstring)."""
    heads = shape.n_heads / w.tp
    b, T = w.bytes_per_value, w.context
    if path == "absorb":
        values = shape.rank + shape.d_rope  # replicated on every rank
        flops = 2 * heads * w.sq * T * (2 * shape.rank + shape.d_rope)
    else:
        groups = -(-shape.n_groups // w.tp)  # the busiest rank's groups; t > n_g replicates one group per rank
        values = groups * (shape.d_k + shape.d_v)
        flops = 2 * heads * w.sq * T * (shape.d_k + shape.d_v)
    cache_bytes = T * values * b
    intensity = flops / cache_bytes
    t_compute, t_memory = flops / (gpu.tflops * 1e12), cache_bytes / (gpu.tbps * 1e12)
    step = max(t_compute, t_memory) * w.batch
    kv_token = shape.n_layers * values * b
    free = gpu.memory_gb * 1e9 * w.mem_util - shape.weight_params * b / w.tp
    return {
        "flops_per_byte": intensity,
        "bound": "compute" if intensity > gpu.ridge else "memory",
        "attention_seconds_per_step_per_layer": step,
        "attention_seconds_per_token_per_layer": step / (w.sq * w.batch),
        "kv_values_per_token_per_layer": values,
        "kv_bytes_per_token": kv_token,
        "concurrent_tokens": max(0, int(free // kv_token)),
    }


def plan(shape: Shape, gpu: GPU, w: Workload) -> dict[str, Any]:
    check_workload(shape, w)
    paths = {p: path_figures(shape, gpu, w, p) for p in ("absorb", "gqa")}
    a, g = (paths[p]["attention_seconds_per_token_per_layer"] for p in ("absorb", "gqa"))
    recommended = "gqa" if g < a * (1 - 1e-9) else "absorb"
    return {
        "recommended": recommended,
        "speedup": max(a, g) / min(a, g),
        "gpu": {**asdict(gpu), "ridge_flops_per_byte": gpu.ridge},
        "workload": asdict(w),
        "shape": asdict(shape),
        "paths": paths,
    }


def gpu_from(name: str | None, tflops: float | None, tbps: float | None, memory_gb: float | None) -> GPU:
    """A table GPU (``name``), optionally overridden, or a custom one from ``--tflops/--tbps``."""
    if name:
        key = name.lower().replace("-", "").replace(" ", "")
        if key not in GPUS:
            raise InputError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --tflops and --tbps)")
        base = GPUS[key]
    elif tflops is None or tbps is None:
        raise InputError("give --gpu NAME, or both --tflops and --tbps")
    else:
        base = GPU("custom", tflops, tbps, memory_gb or 80.0)
    return GPU(base.name, tflops or base.tflops, tbps or base.tbps, memory_gb or base.memory_gb)


def _params(cfg: dict[str, Any], n_h: int, n_g: int, d_nope: int, d_rope: int, d_v: int, r: int) -> int:
    D, V, L, inter = (int(cfg[k]) for k in ("hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"))
    attn = n_h * (d_nope + d_rope) * D + (r + d_rope) * D + n_g * (d_nope + d_v) * r + D * n_h * d_v
    heads = 1 if cfg.get("tie_word_embeddings") else 2
    return heads * V * D + L * (attn + 3 * D * inter + 2 * D) + D


def shape_from_config(cfg: dict[str, Any], rank: int | None = None, rope_dim: int | None = None) -> Shape:
    """A GQLA config as it is, or a source GQA config with the ranks ``convert`` would use (flags, recipe)."""
    try:
        if cfg.get("model_type") == "gqla":
            n_h, n_g = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
            d_nope, d_rope, d_v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
            r = int(cfg["kv_lora_rank"])
        else:
            from .settings import resolve_settings
            from .source_geometry import read_geometry

            geo = read_geometry(cfg)
            s = resolve_settings(geo, kv_lora_rank=rank, qk_rope_dim=rope_dim, dtype="bfloat16")
            n_h, n_g, d_nope, d_v = geo.n_heads, geo.n_groups, geo.head_dim, geo.head_dim
            d_rope, r = s.qk_rope_head_dim, s.kv_lora_rank
        return Shape(n_h, n_g, r, d_rope, d_nope, d_v, int(cfg["num_hidden_layers"]),
                     _params(cfg, n_h, n_g, d_nope, d_rope, d_v, r))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"config lacks a field the planner needs: {exc}") from None


def read_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"{file} does not exist; give a checkpoint folder or its config.json") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{file} cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise InputError(f"{file} does not hold a JSON object")
    return cfg


def ratio_note(doc: dict[str, Any]) -> str:
    a, g = (doc["paths"][p]["attention_seconds_per_token_per_layer"] for p in ("absorb", "gqa"))
    return f"{doc['recommended']} is {doc['speedup']:.2f}x faster per token (absorb {a * 1e9:.3g} ns, gqa {g * 1e9:.3g} ns)"

