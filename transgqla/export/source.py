"""OUT, the GQLA checkpoint an export reads: opened and checked against the format (:mod:`transgqla.format`),
its geometry, per-layer attention tensors, and the streaming writer the rewritten exports share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data_files import DataFiles, find_data_files
from ..errors import InputError
from ..format import FLOAT_DTYPES, FORMAT_VERSION, MANIFEST, MODEL_TYPE, REMOTE_CODE, attention_tensors
from ..io import SafetensorsCheckpoint, ShardedWriter, TensorSpec
from ..io.reader import COPY_BUFFER_BYTES
from ..io.safetensors_format import to_torch_dtype
from ..model.geometry import GQLAGeometry
from ..source_checkpoint import check_layer_count

ATTN = "model.layers.{}.self_attn."


@dataclass
class GQLACheckpoint:
    folder: Path
    config: dict[str, Any]
    geo: GQLAGeometry
    ckpt: SafetensorsCheckpoint
    dtype: str  # safetensors dtype of the attention weights
    notes: list[str] = field(default_factory=list)  # what the export dropped from OUT (its warnings)

    def attn(self, layer: int, rel: str) -> str:
        return ATTN.format(layer) + rel

    def read64(self, name: str) -> torch.Tensor | None:
        """A tensor in float64, or None when the checkpoint does not hold it."""
        return self.ckpt.read(name).to(torch.float64) if name in self.ckpt else None

    def manifest(self) -> dict[str, str]:
        path = self.folder / MANIFEST
        try:
            files = json.loads(path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return files if isinstance(files, dict) else {}

    def extra_files(self) -> DataFiles:
        """OUT's tokenizer and generation files under the same rule as convert's (data only, no auto_map);
        what was dropped goes to :attr:`notes`."""
        found = find_data_files(self.folder, own_code=REMOTE_CODE)
        self.notes += [n for n in found.notes if n not in self.notes]
        return found

    def close(self) -> None:
        self.ckpt.close()


def open_gqla(folder: Path) -> GQLACheckpoint:
    """Open and check OUT: a GQLA format-1 checkpoint (not itself a folded export) with the attention
    tensors its config implies. Raises InputError with one line otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder {folder} does not exist or is not a folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} has no config.json; is it a GQLA checkpoint written by transgqla "
                         "convert?") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}/config.json cannot be read: {exc}".splitlines()[0]) from None
    gq = config.get("gqla") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE or not isinstance(gq, dict):
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise InputError(f"{folder} is not a GQLA checkpoint (model_type {kind!r}); export reads the output of "
                         "transgqla convert")
    if gq.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{folder} has GQLA format_version {gq.get('format_version')!r}; this transgqla reads "
                         f"version {FORMAT_VERSION}")
    if (gq.get("export") or {}).get("folded"):
        raise InputError(f"{folder} is a --fold-kv export (no latent left); export from the GQLA checkpoint it "
                         "came from")
    if config.get("q_lora_rank"):
        raise InputError(f"{folder} has a factorized query (q_lora_rank); export supports q_proj checkpoints only")
    try:
        geo = GQLAGeometry.from_config(config)
        required, optional = attention_tensors(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder}/config.json lacks a GQLA geometry field: {exc}") from None
    if geo.n_heads % geo.n_groups:
        raise InputError(f"{folder}: num_attention_heads {geo.n_heads} is not a multiple of num_key_value_heads "
                         f"{geo.n_groups}")
    ckpt = SafetensorsCheckpoint(folder)
    try:
        check_layer_count(config, ckpt.names, folder)  # before the per-layer loop
        for layer in range(geo.n_layers):
            for rel, shape in list(required.items()) + list(optional.items()):
                name = ATTN.format(layer) + rel
                if name not in ckpt:
                    if rel in required:
                        raise InputError(f"{folder} lacks tensor {name}")
                    continue
                got = ckpt.spec(name).shape
                if got != shape:
                    raise InputError(f"{folder}: {name} has shape {list(got)}, the config implies {list(shape)}")
        dtype = ckpt.spec(ATTN.format(0) + "q_proj.weight").dtype
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"{folder}: attention weights are {dtype}; export needs float weights")
    except Exception:
        ckpt.close()
        raise
    return GQLACheckpoint(folder, config, geo, ckpt, dtype)


def scaled_pieces(ckpt: SafetensorsCheckpoint, name: str, factor: float, buffer: bytearray):
    """The tensor's bytes multiplied by ``factor`` (float64 for float32 data, float32 for half precision) and
    rounded back to its dtype, piece by piece through ``buffer`` (bounded memory for a multi-GB embedding)."""
    dtype = to_torch_dtype(ckpt.spec(name).dtype)
    wide = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    for piece in ckpt.iter_bytes(name, buffer):
        x = torch.frombuffer(piece, dtype=dtype)
        yield (x.to(wide) * factor).to(dtype).view(torch.uint8).numpy()


def plan_rewritten(src: GQLACheckpoint, keep: Callable[[str], bool], shapes: dict[str, tuple[int, ...]],
                   dtype: str) -> tuple[list[TensorSpec], set[str], dict[str, str]]:
    """The tensor plan of an export that rewrites attention: OUT's tensors that ``keep`` passes (copied),
    a tied ``lm_head`` written out as an alias of the embedding (stock loaders expect it), and every
    layer's attention tensors named in ``shapes`` (relative to ``self_attn.``, computed in ``dtype``).
    Returns the specs in natural order, the computed names and the aliases."""
    from ..source_checkpoint import natural_key

    specs = [src.ckpt.spec(n) for n in src.ckpt.names if keep(n)]
    aliases = {}
    if "lm_head.weight" not in src.ckpt:
        emb = src.ckpt.spec("model.embed_tokens.weight")
        specs.append(TensorSpec("lm_head.weight", emb.dtype, emb.shape))
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    computed = {src.attn(l, rel) for l in range(src.geo.n_layers) for rel in shapes}
    specs += [TensorSpec(n, dtype, shapes[n.split("self_attn.")[1]]) for n in computed]
    specs.sort(key=lambda s: natural_key(s.name))
    return specs, computed, aliases


def write_planned(src: GQLACheckpoint, folder: Path, specs, computed: set[str], compute: Callable[[int], dict],
                  max_shard_bytes: int, aliases: dict[str, str] | None = None,
                  metadata: dict[str, str] | None = None, scales: dict[str, float] | None = None) -> dict[str, str]:
    """Stream ``specs`` (in write order) into safetensors shards + index under ``folder``.

    Names in ``computed`` come from ``compute(layer)`` (``{full name: tensor in the planned dtype}``,
    called once per layer, one layer held at a time; computed names must be layer tensors). Every
    other tensor is copied from OUT's ``aliases.get(name, name)`` through a 64 MiB buffer: byte for byte,
    or multiplied by ``scales[name]`` when listed. Returns ``{file: sha256}``.
    """
    aliases, scales = aliases or {}, scales or {}
    buffer = bytearray(COPY_BUFFER_BYTES)
    writer = ShardedWriter(folder, specs, max_shard_bytes, metadata or {})
    current: tuple[int, dict] | None = None
    try:
        for spec in specs:
            if spec.name in computed:
                layer = int(spec.name.split(".")[2])
                if current is None or current[0] != layer:
                    current = (layer, compute(layer))
                writer.write(spec.name, current[1][spec.name])
                continue
            origin = aliases.get(spec.name, spec.name)
            if spec.name in scales:
                writer.write_stream(spec.name, scaled_pieces(src.ckpt, origin, scales[spec.name], buffer))
            else:
                writer.write_stream(spec.name, src.ckpt.iter_bytes(origin, buffer))
        return writer.close()
    except BaseException:
        writer.abort()
        raise
