"""``verify`` on a stock-class export (``export --format deepseek`` or ``--format mimo``).

Such a DST is not a GQLA checkpoint (the GQLA config, paths, fidelity and decode sections do not apply). What
``verify`` does instead: say what it is; run the integrity checks that need nothing but DST (no symlinks, index
and headers, a NaN/Inf scan, the manifest the export wrote; no code files or ``auto_map``); run ``export``'s own
reference check again against the OUT it was written from (recorded in ``config.json``'s ``transgqla.from``; skipped when that folder is gone), and for a
DeepSeek export say whether the engines will run it, without a GPU: the MLA decode kernels that accept its
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
from .structure import integrity_checks


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


#: model_type of a stock-class export -> (carrier name, --format, export.check candidate name)
STOCK_EXPORTS = {"deepseek_v3": ("DeepSeek-V3", "deepseek", "deepseek_candidate"),
                 "mimo_v2_flash": ("MiMo-V2-Flash", "mimo", "mimo_candidate")}


def reference_recheck(out: Path, cfg: dict, device: str = "cpu") -> Check:
    """``export``'s own check, run again: DST against the GQLA reference on the OUT it was written from."""
    from ..errors import TransGQLAError
    from ..export import check as export_check
    from ..export.source import open_gqla

    info = cfg.get("transgqla") or {}
    origin = Path(str(info.get("from") or ""))
    if not info.get("from") or not origin.is_dir():
        return Check("export.reference", None, message=f"skipped: OUT ({info.get('from') or 'not recorded'}) is not "
                     "reachable; the export was checked against it when it was written")
    try:
        src = open_gqla(origin)
    except TransGQLAError as exc:
        return Check("export.reference", None, message=f"skipped: {exc}")
    src.close()
    candidate = getattr(export_check, STOCK_EXPORTS[cfg["model_type"]][2])
    rerounded = cfg["model_type"] == "mimo_v2_flash" or info.get("target") == "engines"
    try:
        result = export_check.run_check(origin, src.config, out, cfg, candidate,
                                        export_check.tolerance_for(src.dtype, rerounded), device,
                                        tokens_required=export_check.tokens_must_match(src.dtype, rerounded))
    except Exception as exc:  # DST no longer loads (edited or damaged): that is the finding, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Check("export.reference", False, message=f"DST does not run against {origin}: {first}"[:300])
    what = "hidden-state" if result.mode == "layerwise" else "logit"
    tokens = "" if result.mode == "layerwise" else (
        "; greedy tokens equal" if result.tokens_equal else f"; greedy tokens diverge at {result.tokens_matched}")
    return Check("export.reference", result.ok, result.rel_error, result.tolerance,
                 f"relative {what} error of DST against GQLADecoder on {origin} ({result.mode} check, export's own){tokens}",
                 "<=")


def no_code_check(out: Path, cfg: dict) -> Check:
    """A stock export loads without remote code: it holds no code file and nothing points at one."""
    found = sorted(p.name for p in out.iterdir() if p.name.endswith(".py"))
    tok = _config_file(out / "tokenizer_config.json")
    found += [f"{name} auto_map" for name, doc in (("config.json", cfg), ("tokenizer_config.json", tok))
              if isinstance(doc, dict) and "auto_map" in doc]
    msg = ("code or a pointer to code: " + ", ".join(found)) if found else "no code files, no auto_map"
    return Check("export.no_code", not found, len(found), 0, msg, "==")


def _config_file(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stock_export(out: Path, report: VerifyReport, device: str = "cpu") -> bool:
    """When ``out`` is a stock-class export (DeepSeek-V3 or MiMo-V2-Flash), say so, run the integrity checks
    (they need no OUT: the export's manifest and its own tensors), re-run export's check against the OUT it came
    from when reachable, list the engine kernels (DeepSeek), and return True."""
    start = time.perf_counter()
    cfg = _config(Path(out))
    kind = STOCK_EXPORTS.get(cfg.get("model_type")) if cfg is not None else None
    if kind is None:
        return False
    name, fmt, _ = kind
    deepseek = cfg["model_type"] == "deepseek_v3"
    report.info["sections"] = ["structure", "export"] + (["engines"] if deepseek else [])
    report.info["export"] = cfg["model_type"]
    origin = (cfg.get("transgqla") or {}).get("from") or "an unrecorded OUT"
    report.add(Check("export.kind", True, cfg["model_type"], None,
                     f"a stock {name} export (transgqla export --format {fmt}) of {origin}, not a GQLA checkpoint: the "
                     "GQLA sections (config, paths, fidelity, decode) do not apply; the integrity checks and export's "
                     "own check do"))
    integ = integrity_checks(Path(out))
    if integ.checkpoint is not None:
        integ.checkpoint.close()
    for check in integ.checks:
        report.add(check)
    report.add(no_code_check(Path(out), cfg))
    if integ.blocker is None:
        report.add(reference_recheck(Path(out), cfg, device))
    else:
        report.add(Check("export.reference", None, message=f"skipped: {integ.blocker} failed"))
    if deepseek:
        for check in engine_checks(cfg):
            report.add(check)
    report.info["seconds"] = round(time.perf_counter() - start, 3)
    return True
