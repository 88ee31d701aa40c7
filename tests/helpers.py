"""Test helpers: load a converted checkpoint into the reference decoder, compare logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from transgqla.convert import ConvertRequest, convert
from transgqla.model.decoder import GQLADecoder


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def load_decoder(folder: Path, dtype=torch.float64) -> GQLADecoder:
    config = json.loads((folder / "config.json").read_text())
    return GQLADecoder(config, load_tensors(folder), dtype=dtype)


def run_convert(src: Path, out: Path, **kw):
    return convert(ConvertRequest(source=str(src), out=out, **kw))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) any aten op produces while active: a per-head copy of
    a cache shows up here even when it happens inside ``torch.matmul``."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.untyped_storage().nbytes() // out.element_size())
        return out
