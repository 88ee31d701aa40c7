"""``verify`` on a DeepSeek-V3 export (``export --format deepseek``): which serving kernels take its shape.

A DeepSeek export is not a GQLA checkpoint (the structure, paths and decode sections do not apply; the
export was checked against the GQLA reference when it was written). What ``verify`` can still say without a
GPU is whether the engines will run it, and fast: the MLA decode kernels that accept its
``(kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim)``, vLLM's prefill shape rule
(:mod:`transgqla.engines`, the one table), and whether the config is the engine form (no biases,
``rms_norm_eps`` 1e-6 so the linear latent norm holds in every runtime) or the transformers-only one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..engines import MLAShape, advice, decode_support, vllm_prefill_ok
from ..export.latent_norm import LATENT_NORM_EPS
from .report import Check, VerifyReport


def _config(out: Path) -> dict | None:
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def engine_checks(cfg: dict) -> list[Check]:
    """The ``engines`` section for a ``deepseek_v3`` config."""
    try:
        shape = MLAShape(int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"]),
                         int(cfg["v_head_dim"]))
    except (KeyError, TypeError, ValueError) as exc:
        return [Check("engines.shape", False, message=f"config lacks an MLA shape field: {exc}")]
    checks = [Check("engines.shape", True, str(shape), None, f"KV cache {shape.cache_values} values/token/layer")]
    for v in decode_support(shape):
        note = "accepts" if v.accepted else "refuses"
        checks.append(Check(f"engines.decode.{v.kernel.replace(' ', '_')}", True, v.accepted, None,
                            f"{note}: {v.rule} [{v.engines}]"))
    checks.append(Check("engines.vllm_prefill", True, vllm_prefill_ok(shape), None,
                        "vLLM starts only with (d_nope, d_R, d_v) in (128, 64, 128), (192, 64, 256), (64, 64, 128)"))
    hint = advice(shape)
    checks.append(Check("engines.advice", True, "change" if hint else "none", None, hint or "vLLM starts and a fast kernel decodes it"))
    target = (cfg.get("transgqla") or {}).get("target")
    if target == "transformers" or cfg.get("attention_bias"):
        checks.append(Check("engines.form", True, "transformers", None,
                            "constant-coordinate form (kv_lora_rank r + 1, biases): exact in stock transformers, not run by "
                            "vLLM/SGLang; export --target engines for them"))
    else:
        eps = float(cfg.get("rms_norm_eps", -1))
        ok = abs(eps - LATENT_NORM_EPS) < 1e-12
        checks.append(Check("engines.form", ok, eps, LATENT_NORM_EPS,
                            "engine form: the linear latent norm needs rms_norm_eps 1e-6 (transformers hard-codes it)"
                            if ok else "rms_norm_eps is not 1e-6: vLLM/SGLang and transformers disagree on the latent norm",
                            "==" ))
    return checks


def deepseek_export(out: Path, report: VerifyReport) -> bool:
    """When ``out`` holds a DeepSeek-V3 export, fill ``report`` with the engines section and return True."""
    start = time.perf_counter()
    cfg = _config(Path(out))
    if cfg is None or cfg.get("model_type") != "deepseek_v3":
        return False
    report.info["sections"] = ["engines"]
    report.info["export"] = "deepseek_v3"
    for check in engine_checks(cfg):
        report.add(check)
    report.info["seconds"] = round(time.perf_counter() - start, 3)
    return True
