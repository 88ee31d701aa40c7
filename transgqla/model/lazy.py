"""A read-on-access view of a checkpoint, so decoders can run layer by layer in bounded memory."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class CheckpointTensors(Mapping):
    """``name -> tensor`` read from a :class:`~transgqla.io.SafetensorsCheckpoint` on each access and
    cast to ``dtype``; ``overrides`` (e.g. freshly converted layers) take precedence. Nothing is cached:
    memory holds what the caller keeps."""

    def __init__(self, checkpoint, dtype=torch.float32, device="cpu", overrides: dict | None = None):
        self.ckpt, self.dtype, self.device = checkpoint, dtype, device
        self.overrides = overrides if overrides is not None else {}
        self._names = sorted(set(checkpoint.names) | set(self.overrides))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        t = self.overrides[name] if name in self.overrides else self.ckpt.read(name)
        return t.to(device=self.device, dtype=self.dtype) if t.is_floating_point() else t

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self.overrides or name in self.ckpt
