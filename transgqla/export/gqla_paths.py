"""GQLA-format exports: the same checkpoint set to one decode path, or folded for GQA runtimes.

``--path absorb`` / ``--path gqa``
    Shards and index are copied byte for byte (streamed, hashed, and checked against OUT's manifest
    when it lists them); ``config.json`` gets ``gqla.decode_path`` and ``gqla.export``; the remote code
    (``configuration_gqla.py``, ``modeling_gqla.py``) and tokenizer/generation files are copied; the
    manifest is rewritten. ``from_pretrained(DST, trust_remote_code=True)`` then decodes on that path.

``--path gqa --fold-kv``
    For runtimes with an ordinary grouped-query attention kernel: ``kv_b_proj`` is multiplied into the
    latent projection, per layer and per group ``g`` (``n_g`` groups, computed in float64, written in the
    checkpoint dtype)::

        k_proj.weight  [n_g (d_nope + d_R), D]  group g = [ W_UK_g W_DKV  (d_nope rows) ;
                                                            W_KR          (d_R rows, the shared RoPE key,
                                                                           replicated in every group) ]
        v_proj.weight  [n_g d_v, D]             group g = W_UV_g W_DKV
        k_proj.bias    group g = [ W_UK_g b_DKV + b_UK_g ; b_KR ]   (when OUT has attention biases)
        v_proj.bias    group g =   W_UV_g b_DKV + b_UV_g

    ``q_proj`` ([n_h (d_nope + d_R), D], per head ``d_nope`` nope rows then ``d_R`` RoPE rows, + bias) and
    ``o_proj`` are unchanged. **RoPE convention**: a runtime must rotate only the *last* ``d_R`` dims of
    every q and k head, as *interleaved* pairs (pair ``p`` = dims ``2p, 2p+1``) at angular frequency
    ``rope_theta^(-2p/d_R)`` with the config's rope scaling applied (DeepSeek-V3's ``rope_interleave``
    convention), leave the first ``d_nope`` dims unrotated, and scale scores by ``1/sqrt(d_nope + d_R)``.
    Stock Llama-style RoPE (rotate_half over the whole head) does not apply. ``config.json`` states this in
    ``gqla.export``; the folded checkpoint has no ``auto_map`` (the shipped GQLA modeling code reads the
    latent form only). KV cache: ``n_g (d_nope + d_R + d_v)`` values per token per layer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import __version__, hf_remote
from ..data_files import write_data_files
from ..errors import InputError, OutputError
from ..format import MANIFEST, REMOTE_CODE, json_bytes, manifest
from ..io import TensorSpec, copy_file_hashed
from ..io.safetensors_format import to_torch_dtype
from ..io.writer import INDEX_NAME
from ..source_checkpoint import natural_key
from .source import GQLACheckpoint, write_planned

FOLDED_ARCHITECTURE = "GQLAFoldedGQAForCausalLM"


def _write_json(folder: Path, name: str, obj: Any, files: dict[str, str]) -> None:
    data = json_bytes(obj)
    (folder / name).write_bytes(data)
    files[name] = hashlib.sha256(data).hexdigest()


def finish(src: GQLACheckpoint, folder: Path, config: dict, files: dict[str, str], remote_code: bool,
           export_info: dict | None = None) -> dict[str, str]:
    """Copy tokenizer/generation files (and the remote code), write config.json and the manifest (hashes and
    sizes; the sizes are what the commit checks are still in place)."""
    files |= write_data_files(src.extra_files(), folder)
    if remote_code:
        for code in REMOTE_CODE:
            files[code] = copy_file_hashed(Path(hf_remote.__file__).parent / code, folder / code)
    _write_json(folder, "config.json", config, files)
    sizes = {}
    for name in files:
        try:
            sizes[name] = (folder / name).stat().st_size
        except OSError:
            raise OutputError(f"{folder / name} vanished while the export was written (changed by another "
                              "program?)") from None
    _write_json(folder, MANIFEST, manifest(files, export_info, sizes), {})
    return files


def export_info(src: GQLACheckpoint, **kw) -> dict[str, Any]:
    return {"tool": "transgqla", "tool_version": __version__, "from": str(src.folder.absolute()), **kw}


def write_same(src: GQLACheckpoint, folder: Path, path: str) -> dict[str, Any]:
    """Byte-identical copy of OUT's shards + index, with ``gqla.decode_path = path``."""
    index = src.folder / INDEX_NAME
    if index.is_file():
        shards = sorted({src.ckpt.shard_of(n).name for n in src.ckpt.names})
        weight_files = shards + [INDEX_NAME]
    else:  # a single-file checkpoint (not what convert writes, but readable)
        weight_files = [src.ckpt.shard_of(src.ckpt.names[0]).name]
    expected = src.manifest()
    files: dict[str, str] = {}
    for name in weight_files:
        files[name] = copy_file_hashed(src.folder / name, folder / name)
        if name in expected and expected[name] != files[name]:
            raise InputError(f"{src.folder / name} does not match {MANIFEST} (sha256 differs); OUT is damaged")
    config = json.loads(json.dumps(src.config))
    info = export_info(src, format="gqla", path=path, folded=False)
    config["gqla"]["decode_path"] = path
    config["gqla"]["export"] = info
    finish(src, folder, config, files, remote_code=True, export_info=info)
    return {"tensors_written": len(src.ckpt.names), "bytes_written": sum(src.ckpt.spec(n).nbytes for n in src.ckpt.names),
            "tensors_byte_identical": True, "cache_values_per_token": src.geo.cache_values_per_token(path),
            "weight_files": weight_files}


def fold_layer(src: GQLACheckpoint, layer: int) -> dict[str, torch.Tensor]:
    """``k_proj``/``v_proj`` weight (and bias) of one layer in float64, names relative to self_attn."""
    geo = src.geo
    a = src.read64(src.attn(layer, "kv_a_proj_with_mqa.weight"))
    a_bias = src.read64(src.attn(layer, "kv_a_proj_with_mqa.bias"))
    b = src.read64(src.attn(layer, "kv_b_proj.weight")).view(geo.n_groups, geo.d_nope + geo.d_v, geo.rank)
    b_bias = src.read64(src.attn(layer, "kv_b_proj.bias"))
    w_c, w_kr = a[: geo.rank], a[geo.rank :]
    w_uk, w_uv = b[:, : geo.d_nope], b[:, geo.d_nope :]
    k_nope = w_uk @ w_c  # [n_g, d_nope, D]
    k = torch.cat((k_nope, w_kr.expand(geo.n_groups, geo.d_rope, geo.hidden)), dim=1)
    out = {"k_proj.weight": k.reshape(-1, geo.hidden), "v_proj.weight": (w_uv @ w_c).reshape(-1, geo.hidden)}
    if a_bias is not None or b_bias is not None:
        b_c = a_bias[: geo.rank] if a_bias is not None else torch.zeros(geo.rank, dtype=torch.float64)
        b_kr = a_bias[geo.rank :] if a_bias is not None else torch.zeros(geo.d_rope, dtype=torch.float64)
        bb = b_bias.view(geo.n_groups, -1) if b_bias is not None else torch.zeros(geo.n_groups, geo.d_nope + geo.d_v, dtype=torch.float64)
        kb = torch.cat((w_uk @ b_c + bb[:, : geo.d_nope], b_kr.expand(geo.n_groups, geo.d_rope)), dim=1)
        out["k_proj.bias"] = kb.reshape(-1)
        out["v_proj.bias"] = (w_uv @ b_c + bb[:, geo.d_nope :]).reshape(-1)
    return out


def write_folded(src: GQLACheckpoint, folder: Path, max_shard_bytes: int) -> dict[str, Any]:
    geo, dtype = src.geo, src.dtype
    dq = geo.d_nope + geo.d_rope
    has_bias = any(src.attn(l, rel) in src.ckpt for l in range(geo.n_layers)
                   for rel in ("kv_a_proj_with_mqa.bias", "kv_b_proj.bias"))
    shapes = {"k_proj.weight": (geo.n_groups * dq, geo.hidden), "v_proj.weight": (geo.n_groups * geo.d_v, geo.hidden)}
    if has_bias:
        shapes.update({"k_proj.bias": (geo.n_groups * dq,), "v_proj.bias": (geo.n_groups * geo.d_v,)})
    dropped = {src.attn(l, f"{p}.{k}") for l in range(geo.n_layers) for p in ("kv_a_proj_with_mqa", "kv_b_proj") for k in ("weight", "bias")}
    specs = [src.ckpt.spec(n) for n in src.ckpt.names if n not in dropped]
    computed = {src.attn(l, rel) for l in range(geo.n_layers) for rel in shapes}
    specs += [TensorSpec(n, dtype, shapes[n.split("self_attn.")[1]]) for n in computed]
    specs.sort(key=lambda s: natural_key(s.name))
    torch_dtype = to_torch_dtype(dtype)

    def compute(layer: int) -> dict[str, torch.Tensor]:
        return {src.attn(layer, rel): t.to(torch_dtype).contiguous() for rel, t in fold_layer(src, layer).items()}

    files = write_planned(src, folder, specs, computed, compute, max_shard_bytes, metadata={"gqla_format_version": "1", "gqla_export": "gqa-folded"})
    cache = geo.cache_values_per_token("gqa")
    info = export_info(
        src, format="gqla", path="gqa", folded=True,
        num_key_value_heads=geo.n_groups, qk_head_dim=dq, v_head_dim=geo.d_v,
        k_proj=f"[n_g (d_nope + d_R), D] = [{geo.n_groups * dq}, {geo.hidden}]: per group d_nope rows W_UK_g W_DKV, then the d_R shared RoPE-key rows W_KR (replicated)",
        v_proj=f"[n_g d_v, D] = [{geo.n_groups * geo.d_v}, {geo.hidden}]: per group W_UV_g W_DKV",
        q_proj="unchanged: per head d_nope nope rows, then d_R RoPE rows",
        rope={"dims": "the last qk_rope_head_dim dims of every q and k head", "layout": "interleaved pairs (2p, 2p+1)",
              "frequency": "rope_theta^(-2p/qk_rope_head_dim), then the config's rope scaling",
              "convention": "DeepSeek-V3 rope_interleave=true; not Llama rotate_half"},
        softmax_scale=1.0 / math.sqrt(dq), cache_values_per_token=cache,
    )
    config = json.loads(json.dumps(src.config))
    config.pop("auto_map", None)
    config["architectures"] = [FOLDED_ARCHITECTURE]
    config["gqla"]["decode_path"] = "gqa"
    config["gqla"]["export"] = info
    finish(src, folder, config, files, remote_code=False, export_info=info)
    return {"tensors_written": len(specs), "bytes_written": sum(s.nbytes for s in specs),
            "tensors_byte_identical": False, "cache_values_per_token": cache}
