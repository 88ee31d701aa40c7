"""Structure checks: the config against the format contract (:func:`transgqla.format.config_problems`), the
tensor inventory (names, shapes, float dtypes) derived from that config (attention from the format, the rest
of the block from the source layout), finiteness of every float tensor, and the manifest's hashes.

Nothing here loads the model: shapes come from the shard headers, and the finiteness scan reads
through one 64 MiB buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TransGQLAError
from ..families import gqla_block
from ..format import FLOAT_DTYPES, FORMAT_VERSION, MANIFEST, attention_tensors, config_problems
from ..io import SafetensorsCheckpoint, sha256_file
from ..io.safetensors_format import to_torch_dtype
from .report import Check

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


# -- tensors --------------------------------------------------------------------------------------


@dataclass
class Expected:
    required: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]]


def expected_tensors(cfg: dict[str, Any]) -> Expected:
    """Tensor names and shapes a contract-valid config implies (shapes in ``[out, in]`` order)."""
    D, V, I = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]  # noqa: E741 (the paper's names)
    L = cfg["num_hidden_layers"]
    block = gqla_block(cfg)  # every weight outside attention, named by the source family's block
    req: dict[str, tuple[int, ...]] = block.copied_weights(L, V, D, I)
    opt: dict[str, tuple[int, ...]] = {}
    if block.tie_embeddings:
        opt[block.head] = (V, D)
    mlp_bias = bool(cfg.get("mlp_bias"))
    attn_required, attn_optional = attention_tensors(cfg)
    for layer in range(L):
        pre, att = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
        if mlp_bias:
            req.update({pre + "mlp.gate_proj.bias": (I,), pre + "mlp.up_proj.bias": (I,),
                        pre + "mlp.down_proj.bias": (D,)})
        req.update({att + rel: shape for rel, shape in attn_required.items()})
        opt.update({att + rel: shape for rel, shape in attn_optional.items()})
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
    if not isinstance(files, dict) or doc.get("format_version") != FORMAT_VERSION:
        why = f"{MANIFEST} must hold format_version {FORMAT_VERSION} and a files object"
        return Check(name, False, None, None, why)
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
            good = f"{len(ckpt.names)} tensors, shapes and dtypes as the config implies"
            checks.append(_problem_check("structure.tensors", tp, good))
            if tp:
                blocker = blocker or "structure.tensors"
        else:
            checks.append(Check("structure.tensors", None, message="skipped: the config is not usable"))
        if full:
            checks.append(finite_check(ckpt))
    if full:
        checks.append(manifest_check(out))
    return Structure(cfg, ckpt, checks, blocker)
