"""Perplexity of a source or GQLA checkpoint, computed layer by layer in bounded memory.

Windows are non-overlapping ``seqlen``-token slices of the tokenized text (no special tokens, a short
tail dropped); each window is scored independently from its first token, and perplexity is
``exp(mean NLL)`` over every predicted token (``seqlen - 1`` per window). The checkpoint is read
through the one layer-by-layer runner (:class:`~transgqla.model.layerwise.LayerwiseModel`, the same
reader and reference blocks verify uses): hidden states of all windows and one layer's tensors are in
memory at a time, the head in vocabulary chunks, so the model size does not matter.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import InputError
from .io import SafetensorsCheckpoint
from .model.attention import PATHS
from .model.decoder import Decoder, GQLADecoder, SourceDecoder
from .model.layerwise import LayerwiseModel
from .model.lazy import CheckpointTensors
from .source_checkpoint import load_config, resolve
from .source_geometry import read_geometry
from .text.pipeline import load_tokenizer, source_windows


@dataclass
class PerplexityResult:
    model: str
    kind: str  # "gqla" or the source architecture
    path: str | None
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def open_decoder(folder: Path, config: dict, dtype=torch.float32, device: str = "cpu") -> Decoder:
    """A lazily-read decoder for a GQLA (``model_type: gqla``) or a supported source checkpoint."""
    tensors = CheckpointTensors(SafetensorsCheckpoint(folder), dtype, device)
    if config.get("model_type") == "gqla":
        return GQLADecoder(config, tensors, dtype=dtype, device=device)
    read_geometry(config)  # refuses unsupported sources with the usual message
    return SourceDecoder(config, tensors, dtype=dtype, device=device)


def open_layerwise(folder: Path, config: dict, dtype=torch.float32, device: str = "cpu") -> LayerwiseModel:
    """The layer-by-layer runner over a GQLA or a supported source checkpoint."""
    if config.get("model_type") == "gqla":
        cls: type[Decoder] = GQLADecoder
    else:
        read_geometry(config)  # refuses unsupported sources with the usual message
        cls = SourceDecoder
    return LayerwiseModel(SafetensorsCheckpoint(folder), config, cls, dtype, torch.device(device))


@torch.no_grad()
def layerwise_nll(model: LayerwiseModel, windows: torch.Tensor, path: str | None, micro_batch: int = 4) -> tuple[float, int]:
    """Sum of next-token NLL over ``windows[n, L]`` and the number of predicted tokens."""
    positions = model.positions(windows.shape[1])
    h = model.embed(windows, whole_table=True).to(torch.float32)
    for i in range(model.n_layers):
        dec = model.layer(i)
        for s in range(0, h.shape[0], micro_batch):
            sl = slice(s, s + micro_batch)
            h[sl] = dec.block(i, h[sl], positions, dec.new_cache(path)).float()
        model.recycle(dec)
    total, count = 0.0, 0
    for s in range(0, h.shape[0], micro_batch):
        sl = slice(s, s + micro_batch)
        logits = model.logits(h[sl]).float()
        targets = windows[sl, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(nll)
        count += targets.numel()
    model.release()
    return total, count


def perplexity(model: str, text: list[str], *, seqlen: int = 512, max_tokens: int | None = None,
               path: str | None = None, device: str = "cpu") -> PerplexityResult:
    start = time.perf_counter()
    folder, _ = resolve(model, None)
    config = load_config(folder)
    is_gqla = config.get("model_type") == "gqla"
    if path is not None and path not in PATHS:
        raise InputError(f"--path must be one of {', '.join(PATHS)}")
    if is_gqla:
        path = path or config.get("gqla", {}).get("decode_path", "absorb")
    elif path is not None:
        raise InputError("--path applies to GQLA checkpoints only")
    windows = source_windows(text, load_tokenizer(folder), seqlen, max_tokens)  # streamed up to max_tokens
    total, count = layerwise_nll(open_layerwise(folder, config, device=device), windows, path)
    kind = "gqla" if is_gqla else config["architectures"][0]
    return PerplexityResult(model=model, kind=kind, path=path, perplexity=math.exp(total / count), nll=total / count,
                            tokens=count, windows=windows.shape[0], seqlen=seqlen, seconds=time.perf_counter() - start)
