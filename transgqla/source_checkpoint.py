"""Open a source checkpoint: resolve it (folder, Hub id or demo), read its config, check every tensor
the conversion needs against the config, and read one layer's attention on demand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, UnsupportedError
from .families import Family
from .io import SafetensorsCheckpoint, resolve_source
from .mathx.gqla_layer import SourceAttention
from .source_geometry import DEQUANTIZE_HINT, SourceGeometry

# Tensors that only quantized checkpoints hold: FP8 block scales, GPTQ/AWQ packed weights and scales.
QUANTIZATION_TENSORS = re.compile(r"(_scale|_scale_inv|\.scales|\.qweight|\.qzeros|\.g_idx)$")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def stored_layers(names: list[str]) -> int:
    """How many decoder layers the tensor names hold: 1 + the largest ``layers.N.`` index (0 when none)."""
    found = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(found) + 1 if found else 0


def check_layer_count(config: dict[str, Any], names: list[str], where: Path | str) -> None:
    """One-line InputError unless ``num_hidden_layers`` equals the layer count of the tensor names: checked
    before anything is built per layer, so a config claiming 10^9 layers costs nothing. A missing or
    non-integer count is left to the geometry's own message."""
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return
    stored = stored_layers(names)
    if n != stored:
        raise InputError(f"{where}: config.json says num_hidden_layers = {n}, but the tensors hold {stored} "
                         "layers; the config does not describe these weights")


def load_config(folder: Path) -> dict[str, Any]:
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


def resolve(source: str, revision: str | None) -> tuple[Path, dict[str, Any]]:
    from .demo import is_demo_source, materialize_demo  # heavy optional imports happen inside materialize_demo

    if is_demo_source(source):
        path = materialize_demo()
        return path, {"source": source, "demo": True, "local": True}
    resolved = resolve_source(source, revision)
    return resolved.path, dict(resolved.identity)


def _expected_attention(fam: Family, geo: SourceGeometry, layer: int) -> dict[str, tuple[int, ...]]:
    """The attention tensors of ``layer`` the family names (q/k/v or the fused qkv, o, the input norm)."""
    d, hd = geo.hidden, geo.head_dim
    rows = {"q": geo.n_heads * hd, "k": geo.n_groups * hd, "v": geo.n_groups * hd}
    shapes: dict[str, tuple[int, ...]] = {}
    kinds = ("weight", "bias") if geo.qkv_bias else ("weight",)
    for kind in kinds:
        for part, n in rows.items():  # a fused projection accumulates the three row blocks
            name = fam.tensor(layer, part, kind)
            prev = shapes.get(name, (0,))[0]
            shapes[name] = (prev + n, d) if kind == "weight" else (prev + n,)
    shapes[fam.tensor(layer, "o")] = (d, geo.n_heads * hd)
    shapes[fam.norm(layer)] = (d,)
    return shapes


def _positive(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _expected_others(geo: SourceGeometry, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes the config implies for every copied (non-attention) tensor the family names; checked
    where present, so that a wrong-shaped tensor is not passed through silently."""
    vocab, inter = _positive(config, "vocab_size") or 0, _positive(config, "intermediate_size") or 0
    shapes = geo.block.copied_weights(geo.n_layers, vocab, geo.hidden, inter)
    shapes.setdefault(geo.block.head, (vocab, geo.hidden))  # a tied config may still store a head
    return {n: s for n, s in shapes.items() if all(s)}


def _required_others(geo: SourceGeometry, config: dict[str, Any]) -> list[str]:
    """Copied tensors the block cannot run without: norms, MLP or experts, embedding, final norm."""
    if _positive(config, "intermediate_size") is None:
        return []
    names = geo.block.copied_weights(geo.n_layers, 1, geo.hidden, 1)
    return [n for n in names if n != geo.block.head]


def validate_tensors(ckpt: SafetensorsCheckpoint, geo: SourceGeometry, config: dict[str, Any] | None = None) -> None:
    """One-line InputError for a missing or wrong-shaped attention tensor, a wrong-shaped standard
    tensor (embeddings, norms, MLP; when ``config`` is given), or a layer beyond the config's count."""
    fam = geo.family
    names = set(ckpt.names)
    for name in sorted(names, key=natural_key):
        spec = ckpt.spec(name)
        if QUANTIZATION_TENSORS.search(name) or (name.endswith(".weight") and spec.dtype not in FLOAT_DTYPES):
            raise UnsupportedError(f"tensor {name} ({spec.dtype}) belongs to a quantized checkpoint; {DEQUANTIZE_HINT}")
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
    for name in (_required_others(geo, config) if config is not None else []):
        if name not in names:
            raise InputError(f"tensor {name} is missing from the checkpoint (the {fam.name} block names it)")
    for name, shape in (_expected_others(geo, config) if config is not None else {}).items():
        if name in names and tuple(ckpt.spec(name).shape) != shape:
            raise InputError(f"tensor {name} has shape {list(ckpt.spec(name).shape)}, the config implies {list(shape)}")
    extra = [n for n in names if re.match(r"model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= geo.n_layers]
    if extra:
        raise InputError(f"tensor {sorted(extra, key=natural_key)[0]} belongs to a layer beyond num_hidden_layers={geo.n_layers}")


def read_attention(ckpt: SafetensorsCheckpoint, geo: SourceGeometry, layer: int,
                   dtype: torch.dtype = torch.float64) -> SourceAttention:
    """One layer's q/k/v (and biases) in ``dtype``, a fused ``qkv_proj`` split by the family's hook;
    InputError on NaN/Inf (checked as stored)."""
    fam = geo.family
    cache: dict[str, torch.Tensor] = {}

    def get(part: str, kind: str = "weight") -> torch.Tensor | None:
        name = fam.tensor(layer, part, kind)
        if kind == "bias" and not geo.qkv_bias:
            return None
        if name not in cache:
            t = ckpt.read(name)
            if not torch.isfinite(t).all():
                raise InputError(f"tensor {name} holds NaN or Inf values")
            cache[name] = t.to(dtype)
        t = cache[name]
        if fam.fused_qkv:
            return fam.split_qkv(t, geo.n_heads, geo.n_groups, geo.head_dim)["qkv".index(part)]
        return t

    return SourceAttention(
        wq=get("q"), wk=get("k"), wv=get("v"),
        n_heads=geo.n_heads, n_groups=geo.n_groups, head_dim=geo.head_dim,
        bq=get("q", "bias"), bk=get("k", "bias"), bv=get("v", "bias"),
        softmax_scale=geo.softmax_scale,
    )
