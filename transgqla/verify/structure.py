"""Structure checks: the config against the format contract (:func:`transgqla.format.config_problems`), the
tensor inventory (names, shapes, float dtypes) derived from that config (attention from the format, the rest
of the block from the source layout), and the integrity checks that run whatever the config says
(:func:`integrity_checks`: no symlinks, index against headers, finiteness of every float tensor, the
manifest's sizes and hashes), and the remote code against the copy the installed package ships.

Nothing here loads the model: shapes come from the shard headers, and the finiteness scan reads
through one 64 MiB buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__, hf_remote
from ..errors import InputError, TransGQLAError
from ..format import FLOAT_DTYPES, REMOTE_CODE, config_problems
from ..integrity import FolderReport, compare_manifest
from ..inventory import Expected, expected_tensors  # noqa: F401 (re-exported: verify's inventory)
from ..io import SafetensorsCheckpoint, sha256_file
from ..io.safetensors_format import to_torch_dtype
from ..model.geometry import geometry_problems
from ..source_checkpoint import check_layer_count
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


# -- files, manifest, remote code -----------------------------------------------------------------


def files_check(report: FolderReport) -> Check:
    """Nothing under the folder is a symlink or a special file (the reader would follow a link)."""
    bad = report.links + report.special
    parts = [p for p in report.problems() if p.startswith(("symlinks", "not regular"))]
    msg = "; ".join(parts) if bad else "no symlinks or special files"
    return Check("structure.files", not bad, len(bad), 0, msg, "==",
                 {"links": report.links, "special": report.special} if bad else {})


def manifest_check(report: FolderReport) -> Check:
    """Every listed file present with its size and sha256, nothing unlisted (:mod:`transgqla.integrity`)."""
    name = "structure.manifest"
    if report.error:
        return Check(name, False, None, None, report.error)
    bad = len(report.changed) + len(report.missing) + len(report.extra)
    parts = [p for p in report.problems() if not p.startswith(("symlinks", "not regular"))]
    msg = "; ".join(parts) if bad else f"{report.files} files, every sha256 matches"
    details = ({"changed": report.changed, "missing": report.missing, "extra": report.extra} if bad
               else {"files": report.files})
    return Check(name, bad == 0, bad, 0, msg, "==", details)


def remote_code_check(out: Path, cfg: dict[str, Any] | None) -> Check:
    """OUT's remote code (what ``trust_remote_code=True`` runs) is byte for byte the copy this transgqla ships."""
    shipped = Path(hf_remote.__file__).parent
    gq = (cfg or {}).get("gqla") if isinstance((cfg or {}).get("gqla"), dict) else {}
    conv = gq.get("conversion") if isinstance(gq.get("conversion"), dict) else {}
    writer = conv.get("tool_version", "an unknown version")
    bad = []
    for code in REMOTE_CODE:
        path = out / code
        if path.is_symlink() or not path.is_file():
            bad.append(f"{code} is missing")
        elif sha256_file(path) != sha256_file(shipped / code):
            bad.append(f"{code} differs")
    if bad:
        msg = (f"{'; '.join(bad)} from the copy transgqla {__version__} ships (OUT was written by transgqla "
               f"{writer}): the code trust_remote_code=True would run is not transgqla's")
        return Check("structure.remote_code", False, len(bad), 0, msg, "==", {"written_by": writer})
    return Check("structure.remote_code", True, 0, 0,
                 f"{', '.join(REMOTE_CODE)} are the copies transgqla {__version__} ships", "==")


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


@dataclass
class Integrity:
    """The checks no config can switch off (:func:`integrity_checks`), and the shards they opened."""

    files: Check
    shards: Check
    finite: Check
    manifest: Check
    checkpoint: SafetensorsCheckpoint | None
    blocker: str | None

    @property
    def checks(self) -> list[Check]:
        return [self.files, self.shards, self.finite, self.manifest]


def integrity_checks(out: Path) -> Integrity:
    """Whatever the config says (a GQLA checkpoint, a stock export, an edited ``model_type``): no symlink under
    ``out``, the index against the shard headers, a NaN/Inf scan of every float tensor, and the manifest's sizes
    and hashes. The shards are not opened when a link is there (the reader would follow it)."""
    report = compare_manifest(out)
    files = files_check(report)
    blocker = None if files.ok else "structure.files"
    ckpt = None
    if not files.ok:
        shards = Check("structure.shards", None, message="skipped: symlinks or special files under the folder")
    else:
        try:
            ckpt = SafetensorsCheckpoint(out)
        except TransGQLAError as exc:
            shards = Check("structure.shards", False, None, None, str(exc))
            blocker = "structure.shards"
        else:
            idx = index_problems(ckpt, out)
            n_shards = len({ckpt.shard_of(n) for n in ckpt.names})
            shards = _problem_check("structure.shards", idx, f"index and {n_shards} shard header(s) agree")
    finite = finite_check(ckpt) if ckpt is not None else Check(
        "structure.finite", None, message="skipped: the shards cannot be read")
    return Integrity(files, shards, finite, manifest_check(report), ckpt, blocker)


def check_structure(out: Path) -> Structure:
    """The config against the format contract, the integrity checks, the tensor inventory (headers only) and
    the remote code against the installed package's."""
    cfg, why = load_config(out)
    problems = [why] if why else config_problems(cfg)
    if not problems:  # what the runtime builds from it: the family record, eps, activation, RoPE
        problems = geometry_problems(cfg)
    config = _problem_check("structure.config", problems, "matches the format contract (v1)")
    blocker = "structure.config" if problems else None
    integ = integrity_checks(out)
    blocker = blocker or integ.blocker
    ckpt = integ.checkpoint
    if ckpt is None:
        tensors = Check("structure.tensors", None, message="skipped: the shards cannot be read")
    elif problems:
        tensors = Check("structure.tensors", None, message="skipped: the config is not usable")
    else:
        try:  # before the inventory builds anything per layer
            check_layer_count(cfg, ckpt.names, "")
            tp = tensor_problems(ckpt, cfg)
        except InputError as exc:
            tp = [str(exc).removeprefix(": ")]
        tensors = _problem_check("structure.tensors", tp,
                                 f"{len(ckpt.names)} tensors, shapes and dtypes as the config implies")
        if tp:
            blocker = blocker or "structure.tensors"
    checks = [config, integ.files, integ.shards, tensors, integ.finite, integ.manifest,
              remote_code_check(out, cfg)]
    return Structure(cfg, ckpt, checks, blocker)
