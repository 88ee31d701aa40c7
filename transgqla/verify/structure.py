"""Structure checks: the config against the format contract, the tensor inventory (names, shapes,
float dtypes) derived from that config, finiteness of every float tensor, and the manifest's hashes.

Nothing here loads the model: shapes come from the shard headers, and the finiteness scan reads
through one 64 MiB buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..convert import MANIFEST
from ..errors import TransGQLAError
from ..gqla_config import FORMAT_VERSION
from ..families import gqla_block
from ..io import SafetensorsCheckpoint, sha256_file
from ..io.safetensors_format import to_torch_dtype
from ..mathx.rope import rope_settings
from .report import Check

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
DECODE_PATHS = ("absorb", "gqa")
INT_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
    "vocab_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
MAX_LISTED = 5  # problems spelled out in a message; the details carry all of them
SCAN_BYTES = 64 << 20  # finiteness scan buffer (a multiple of every element size)


def _listing(problems: list[str]) -> str:
    more = f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return "; ".join(problems[:MAX_LISTED]) + more


def _problem_check(name: str, problems: list[str], good: str) -> Check:
    return Check(
        name, not problems, len(problems), 0, _listing(problems) if problems else good, "==",
        {"problems": problems} if problems else {},
    )


# -- config ---------------------------------------------------------------------------------------


def load_config(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = out / "config.json"
    if not path.is_file():
        return None, "config.json is missing"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"config.json is not valid JSON: {exc}".splitlines()[0]
    if not isinstance(cfg, dict):
        return None, "config.json does not hold a JSON object"
    return cfg, None


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Every way ``cfg`` breaks the format contract (DESIGN.md section 4); empty when it holds."""
    p: list[str] = []
    if cfg.get("architectures") != ["GQLAForCausalLM"]:
        p.append(f"architectures is {cfg.get('architectures')!r}, expected ['GQLAForCausalLM']")
    if cfg.get("model_type") != "gqla":
        p.append(f"model_type is {cfg.get('model_type')!r}, expected 'gqla'")
    auto = cfg.get("auto_map")
    if not isinstance(auto, dict) or not {"AutoConfig", "AutoModelForCausalLM"} <= set(auto):
        p.append("auto_map must name AutoConfig and AutoModelForCausalLM")
    for key in INT_KEYS:
        v = cfg.get(key)
        if key not in cfg:
            p.append(f"required key {key} is missing")
        elif type(v) is not int or v <= 0:
            p.append(f"{key} must be a positive integer, got {v!r}")
    if "q_lora_rank" not in cfg:
        p.append("required key q_lora_rank is missing")
    elif cfg["q_lora_rank"] is not None:
        p.append(f"q_lora_rank is {cfg['q_lora_rank']!r}; format v1 verification expects null (unfactorized q_proj)")
    if cfg.get("rope_interleave") is not True:
        p.append(f"rope_interleave is {cfg.get('rope_interleave')!r}, expected true")
    n_h, n_g = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if type(n_h) is int and type(n_g) is int and n_g > 0 and n_h % n_g:
        p.append(f"num_key_value_heads {n_g} does not divide num_attention_heads {n_h}")
    d_r = cfg.get("qk_rope_head_dim")
    if type(d_r) is int and d_r % 2:
        p.append(f"qk_rope_head_dim {d_r} must be even (interleaved RoPE pairs)")
    try:
        rope_settings(cfg)
    except TransGQLAError as exc:
        p.append(str(exc))
    except (TypeError, ValueError, KeyError) as exc:
        p.append(f"rope settings are unreadable: {exc!r}")
    g = cfg.get("gqla")
    if not isinstance(g, dict):
        p.append("required object gqla is missing")
        return p
    if g.get("format_version") != FORMAT_VERSION:
        p.append(f"gqla.format_version is {g.get('format_version')!r}, expected {FORMAT_VERSION}")
    if g.get("decode_path") not in DECODE_PATHS:
        p.append(f"gqla.decode_path is {g.get('decode_path')!r}, expected one of {', '.join(DECODE_PATHS)}")
    if not isinstance(g.get("source"), dict):
        p.append("gqla.source (the source's identity) is missing")
    return p


# -- tensors --------------------------------------------------------------------------------------


@dataclass
class Expected:
    required: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]]


def expected_tensors(cfg: dict[str, Any]) -> Expected:
    """Tensor names and shapes a contract-valid config implies (shapes in ``[out, in]`` order)."""
    D, V, I = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    n_h, n_g, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    dn, dr, dv, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    block = gqla_block(cfg)  # every weight outside attention, named by the source family's block
    req: dict[str, tuple[int, ...]] = block.copied_weights(L, V, D, I)
    opt: dict[str, tuple[int, ...]] = {}
    if block.tie_embeddings:
        opt[block.head] = (V, D)
    mlp_bias, attn_bias = bool(cfg.get("mlp_bias")), bool(cfg.get("attention_bias"))
    for l in range(L):
        pre, att = f"model.layers.{l}.", f"model.layers.{l}.self_attn."
        if mlp_bias:
            req.update({pre + "mlp.gate_proj.bias": (I,), pre + "mlp.up_proj.bias": (I,), pre + "mlp.down_proj.bias": (D,)})
        req[att + "q_proj.weight"] = (n_h * (dn + dr), D)
        req[att + "kv_a_proj_with_mqa.weight"] = (r + dr, D)
        req[att + "kv_b_proj.weight"] = (n_g * (dn + dv), r)
        req[att + "o_proj.weight"] = (D, n_h * dv)
        if attn_bias:
            req[att + "q_proj.bias"] = (n_h * (dn + dr),)
            req[att + "kv_a_proj_with_mqa.bias"] = (r + dr,)
            req[att + "kv_b_proj.bias"] = (n_g * (dn + dv),)
        # Llama with attention_bias has an o_proj bias, Qwen2 none; a config that says so is held to it.
        if "o_proj_bias" not in cfg:
            opt[att + "o_proj.bias"] = (D,)
        elif cfg["o_proj_bias"]:
            req[att + "o_proj.bias"] = (D,)
    return Expected(req, opt)


def tensor_problems(ckpt: SafetensorsCheckpoint, cfg: dict[str, Any]) -> list[str]:
    exp = expected_tensors(cfg)
    names = set(ckpt.names)
    p: list[str] = []
    for name, shape in exp.required.items():
        if name not in names:
            p.append(f"{name} is missing")
    for name in ckpt.names:
        want = exp.required.get(name, exp.optional.get(name))
        spec = ckpt.spec(name)
        if want is None:
            p.append(f"{name} is not part of the format")
            continue
        if tuple(spec.shape) != want:
            p.append(f"{name} has shape {list(spec.shape)}, the config implies {list(want)}")
        if spec.dtype not in FLOAT_DTYPES:
            p.append(f"{name} has dtype {spec.dtype}, expected a float type ({', '.join(FLOAT_DTYPES)})")
    return p


def index_problems(ckpt: SafetensorsCheckpoint, out: Path) -> list[str]:
    """What the reader does not already refuse: the index's total_size and stray shard files."""
    p: list[str] = []
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        p.append("model.safetensors.index.json is missing")
        return p
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
        total = (obj.get("metadata") or {}).get("total_size")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return ["model.safetensors.index.json is not valid JSON"]
    if total is not None and total != ckpt.total_bytes:
        p.append(f"index metadata total_size {total} differs from the shards' {ckpt.total_bytes} bytes")
    listed = {ckpt.shard_of(n).name for n in ckpt.names}
    for stray in sorted(f.name for f in out.glob("*.safetensors") if f.name not in listed):
        p.append(f"shard file {stray} is not referenced by the index")
    return p


def finite_check(ckpt: SafetensorsCheckpoint) -> Check:
    """Scan every float tensor for NaN/Inf through one reused buffer of ``SCAN_BYTES`` (a 1 GB
    embedding is scanned 64 MiB at a time, never held whole)."""
    bad: list[str] = []
    count = 0
    buffer = bytearray(SCAN_BYTES)
    for name in ckpt.names:
        spec = ckpt.spec(name)
        if spec.dtype not in FLOAT_DTYPES:
            continue
        dtype = to_torch_dtype(spec.dtype)
        n_nan = n_inf = 0
        for piece in ckpt.iter_bytes(name, buffer):
            t = torch.frombuffer(piece, dtype=dtype)
            if not bool(torch.isfinite(t).all()):  # one pass in the common case; count only when needed
                n_nan += int(torch.isnan(t).sum())
                n_inf += int(torch.isinf(t).sum())
            del t
        if n_nan or n_inf:
            count += n_nan + n_inf
            bad.append(f"{name}: {n_nan} NaN, {n_inf} Inf")
    msg = _listing(bad) if bad else f"{len(ckpt.names)} tensors scanned, all finite"
    return Check("structure.finite", not bad, count, 0, msg, "==", {"tensors": bad} if bad else {})


# -- manifest -------------------------------------------------------------------------------------


def _present_files(out: Path) -> set[str]:
    """Regular files under OUT (relative POSIX paths), hidden entries and __pycache__ ignored."""
    found = set()
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if path.is_file():
            found.add(rel.as_posix())
    return found


def manifest_check(out: Path) -> Check:
    name = "structure.manifest"
    path = out / MANIFEST
    if not path.is_file():
        return Check(name, False, None, None, f"{MANIFEST} is missing: the files cannot be checked")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Check(name, False, None, None, f"{MANIFEST} is not valid JSON: {exc}".splitlines()[0])
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or doc.get("format_version") != 1:
        return Check(name, False, None, None, f"{MANIFEST} must hold format_version 1 and a files object")
    present = _present_files(out) - {MANIFEST}
    changed, missing = [], []
    for rel, digest in sorted(files.items()):
        if rel not in present:
            missing.append(rel)
        elif sha256_file(out / rel) != digest:
            changed.append(rel)
    extra = sorted(present - set(files))
    parts = []
    if changed:
        parts.append("sha256 differs: " + ", ".join(changed))
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if extra:
        parts.append("not in the manifest: " + ", ".join(extra))
    bad = len(changed) + len(missing) + len(extra)
    msg = "; ".join(parts) if parts else f"{len(files)} files, every sha256 matches"
    details = {"changed": changed, "missing": missing, "extra": extra} if bad else {"files": len(files)}
    return Check(name, bad == 0, bad, 0, msg, "==", details)


# -- all together ---------------------------------------------------------------------------------


@dataclass
class Structure:
    """What the model checks need from the structure pass; ``usable`` gates them."""

    config: dict[str, Any] | None
    checkpoint: SafetensorsCheckpoint | None
    checks: list[Check]
    blocker: str | None  # why the model checks cannot run, or None

    @property
    def usable(self) -> bool:
        return self.blocker is None


def check_structure(out: Path, full: bool = True) -> Structure:
    """Config, shards, tensors (cheap: headers only); with ``full`` also finiteness and manifest."""
    checks: list[Check] = []
    blocker = None
    cfg, why = load_config(out)
    problems = [why] if why else config_problems(cfg)
    checks.append(_problem_check("structure.config", problems, "matches the format contract (v1)"))
    if problems:
        blocker = "structure.config"
    ckpt = None
    try:
        ckpt = SafetensorsCheckpoint(out)
    except TransGQLAError as exc:
        checks.append(Check("structure.shards", False, None, None, str(exc)))
        blocker = blocker or "structure.shards"
        checks.append(Check("structure.tensors", None, message="skipped: the shards cannot be read"))
        if full:
            checks.append(Check("structure.finite", None, message="skipped: the shards cannot be read"))
    else:
        idx = index_problems(ckpt, out)
        n_shards = len({ckpt.shard_of(n) for n in ckpt.names})
        checks.append(_problem_check("structure.shards", idx, f"index and {n_shards} shard header(s) agree"))
        if cfg is not None and not problems:
            tp = tensor_problems(ckpt, cfg)
            checks.append(_problem_check("structure.tensors", tp, f"{len(ckpt.names)} tensors, shapes and dtypes as the config implies"))
            if tp:
                blocker = blocker or "structure.tensors"
        else:
            checks.append(Check("structure.tensors", None, message="skipped: the config is not usable"))
        if full:
            checks.append(finite_check(ckpt))
    if full:
        checks.append(manifest_check(out))
    return Structure(cfg, ckpt, checks, blocker)
