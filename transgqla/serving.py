"""Which decode path a server runs a GQLA checkpoint on, and whether the vLLM plugin can run its block.

Why here and not in the plugin: the choice is the project's (the format's ``gqla.decode_path``, the planner's
roofline, the engine kernel table), it must be testable without vLLM installed, and the plugin calls it twice
(once where vLLM sizes the cache, once where it builds the model), so it must be one pure function.

The path is, in order: ``gqla_decode_path`` given at load time (vLLM's ``hf_overrides``), else the config's
``gqla.decode_path``. ``auto`` resolves by device (:func:`auto_path`):

* CUDA: ``transgqla plan``'s pick for the GPU vLLM runs on (its name matched to :data:`transgqla.plan.GPUS`),
  planned for ``s_q = 1`` on one rank: vLLM sizes the cache from the config before the parallel setup is known,
  and both places must agree; for MTP or tensor parallelism run ``transgqla plan --sq --tp`` and pass its pick
  explicitly. A GPU missing from the table gets absorb, the smaller cache;
* CPU: absorb when vLLM's CPU MLA kernel takes the latent shape (``r + d_R = 512 + 64``), else gqa (the CPU
  build has no other MLA decode kernel; ``export --kernel-shape 512+64`` makes a small latent fit).
"""

from __future__ import annotations

from typing import Any, Mapping

from .engines import DECODE_KERNELS, MLAShape

OVERRIDE_KEY = "gqla_decode_path"  # hf_overrides={"gqla_decode_path": "absorb" | "gqa" | "auto"}
CHOICES = ("absorb", "gqa", "auto")
CPU_KERNEL = "vLLM CPU MLA"


def mla_shape(cfg: Mapping[str, Any]) -> MLAShape:
    return MLAShape(int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"]),
                    int(cfg["v_head_dim"]))


def requested_path(cfg: Mapping[str, Any]) -> str:
    """The path asked for: the load-time override, else ``gqla.decode_path`` (ValueError on anything else)."""
    path = cfg.get(OVERRIDE_KEY) or (cfg.get("gqla") or {}).get("decode_path") or "absorb"
    if path not in CHOICES:
        raise ValueError(f"{OVERRIDE_KEY} must be one of {', '.join(CHOICES)}, got {path!r}")
    return path


def cpu_takes_absorb(shape: MLAShape) -> bool:
    return next(k for k in DECODE_KERNELS if k.name == CPU_KERNEL).accepts(shape)


def gpu_row(name: str):
    """The planner's GPU whose table key appears in a CUDA device name (longest key first: H200 before H20)."""
    from .plan import GPUS

    flat = name.lower().replace(" ", "").replace("-", "")
    for key in sorted(GPUS, key=len, reverse=True):
        if key in flat:
            return GPUS[key]
    return None


def auto_path(cfg: Mapping[str, Any], device: str, gpu_name: str | None = None, tp: int = 1,
              sq: int = 1) -> tuple[str, str]:
    """``(path, why)`` for ``auto`` on ``device`` (``"cuda"`` with its ``gpu_name``, or ``"cpu"``)."""
    shape = mla_shape(cfg)
    if device != "cuda":
        if cpu_takes_absorb(shape):
            return "absorb", f"CPU: vLLM's CPU MLA kernel takes {shape}"
        return "gqa", f"CPU: vLLM's CPU MLA kernel needs r + d_R = 512 + 64, this checkpoint has {shape}"
    gpu = gpu_row(gpu_name or "")
    if gpu is None:
        return "absorb", f"GPU {gpu_name!r} is not in the planner's table: absorb, the smaller cache"
    from .plan import Workload, plan, shape_from_config

    doc = plan(shape_from_config(dict(cfg)), gpu, Workload(sq=sq, tp=tp))
    return doc["recommended"], f"transgqla plan on {gpu.name} (s_q={sq}, tp={tp}): {doc['recommended']}"


def resolve_path(cfg: Mapping[str, Any], device: str, gpu_name: str | None = None, tp: int = 1,
                 sq: int = 1) -> tuple[str, str]:
    """The path the server runs and why."""
    path = requested_path(cfg)
    if path != "auto":
        why = "hf_overrides" if cfg.get(OVERRIDE_KEY) else "config gqla.decode_path"
        return path, why
    return auto_path(cfg, device, gpu_name, tp, sq)


def unsupported_block(cfg: Mapping[str, Any]) -> str | None:
    """What of the checkpoint's decoder block the vLLM plugin does not implement (one line), or None.

    The plugin serves Llama-shaped blocks (Llama, Mistral, Qwen2 with its q/k/v biases, SmolLM2) on vLLM's own
    Llama layers; the rest is named rather than run wrongly."""
    from .families import gqla_block

    block = gqla_block(dict(cfg))
    beyond = block.beyond_llama()
    if beyond:
        return (f"the transgqla vLLM plugin serves Llama-shaped blocks; this {block.family} checkpoint has "
                f"{'; '.join(beyond)}, which it does not implement: serve it with transformers "
                "(trust_remote_code) or export --format gqla")
    if block.activation != "silu":
        return f"vLLM's Llama MLP runs silu only; this {block.family} checkpoint uses {block.activation}"
    if (cfg.get("gqla") or {}).get("format_version", 1) != 1:
        return (f"GQLA format_version {(cfg.get('gqla') or {}).get('format_version')} (per-group key-norm scales) "
                "is not implemented by the vLLM plugin")
    return None
