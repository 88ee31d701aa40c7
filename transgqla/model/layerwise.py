"""A checkpoint run block by block in bounded memory: the one layer-by-layer runner.

Calibration (:mod:`transgqla.calib.runner`), ``eval-ppl`` (:mod:`transgqla.evaluate`) and every model
check in verify read checkpoints through it, and every block forward is the family's reference block
(:meth:`~transgqla.model.decoder.Decoder.block`), so the same windows give the same numbers everywhere.

Why bounded: verify must run on checkpoints far larger than memory (Llama-3-8B is 32 GB in float32, 16 GB
as stored). Nothing reads the whole model; each step reads what it needs, casts it to the compute
dtype and keeps it only while it is used:

* ``layer(i)`` -- a decoder holding layer ``i``'s tensors only (about 0.9 GB at Llama-3-8B in
  float32). Layers stay resident only within ``resident_bytes`` (0 by default): greedy decoding walks
  every layer once per token, so it raises the budget and a small model is read once, while a large
  one is streamed again at every step;
* ``embed(ids)`` -- the embedding rows of ``ids`` only (:meth:`SafetensorsCheckpoint.read_rows`),
  never the ``[V, D]`` matrix;
* ``final_norm(h)`` and ``head_chunks(rows)`` -- the output head in vocabulary chunks
  ``W[rows, D]``, so logits are produced (and reduced) a slice of the vocabulary at a time.

Every tensor is read through :meth:`LayerwiseModel._load`, the one place that counts what is live
(the memory-bound tests hook it). A loop that reads the same shapes again and again (decode: every
layer at every step; the head's chunks) hands finished tensors back (:meth:`recycle`, and the head
chunks by themselves) and the next read of that shape fills them in place through one reused
staging buffer: no fresh pages to fault in and zero for every tensor of every step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch

from ..errors import UnsupportedError
from ..io import SafetensorsCheckpoint
from ..io.safetensors_format import to_torch_dtype
from .decoder import Decoder

HEAD_CHUNK_BYTES = 64 << 20  # default vocabulary chunk of the head, in compute-dtype bytes


class LayerwiseModel:
    """A checkpoint read layer by layer; see the module docstring for what is held when."""

    def __init__(
        self,
        ckpt: SafetensorsCheckpoint,
        config: dict[str, Any],
        decoder_cls: type[Decoder],
        dtype: torch.dtype,
        device: torch.device,
        resident_bytes: int = 0,
    ):
        self.ckpt, self.config, self.cls = ckpt, config, decoder_cls
        self.dtype, self.device = dtype, device
        self.resident_bytes = resident_bytes
        self.shape = self._decoder({})  # an empty decoder: the geometry and the block's conventions
        self.geo, self.spec = self.shape.geo, self.shape.spec
        self.by_layer: dict[int, list[str]] = defaultdict(list)
        for name in ckpt.names:
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
                self.by_layer[int(parts[2])].append(name)
        self.head_name = self.spec.head if self.spec.head in ckpt else self.spec.embed
        self._resident: dict[int, Decoder] = {}
        self._resident_used = 0
        self._norm: torch.Tensor | None = None
        self._pool: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)  # shape -> free tensors
        self._staging = bytearray()

    def _decoder(self, tensors: dict[str, torch.Tensor]) -> Decoder:
        try:
            return self.cls(self.config, tensors, dtype=self.dtype, device=self.device)
        except ValueError as exc:  # e.g. an activation the reference decoder does not implement
            raise UnsupportedError(f"{self.ckpt.folder}: {exc}") from None

    def _load(self, name: str, rows: tuple[int, int] | None = None, pooled: bool = False) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[start, stop)``) on the device, in the compute dtype; with
        ``pooled``, into a recycled tensor of that shape when there is one."""
        spec = self.ckpt.spec(name)
        shape = tuple(spec.shape) if rows is None else (rows[1] - rows[0], *spec.shape[1:])
        free = self._pool.get(shape) if pooled else None
        if not free:
            t = self.ckpt.read(name) if rows is None else self.ckpt.read_rows(name, *rows)
            return t.to(device=self.device, dtype=self.dtype)
        out = free.pop()
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        offset, size = (0, spec.nbytes) if rows is None else (rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes)
        if len(self._staging) < size:
            self._staging = bytearray(size)
        view = memoryview(self._staging)[:size]
        self.ckpt.read_into(name, view, offset)
        out.copy_(torch.frombuffer(view, dtype=to_torch_dtype(spec.dtype)).view(shape))
        return out

    def recycle(self, dec: Decoder) -> None:
        """Take back the tensors of a streamed layer (not a resident one) that the caller is done
        with; ``dec`` is emptied, so a stale use fails loudly instead of reading refilled weights."""
        if any(d is dec for d in self._resident.values()):
            return
        for t in dec.t.values():
            self._pool[tuple(t.shape)].append(t)
        dec.t = {}

    @property
    def n_layers(self) -> int:
        return self.geo.n_layers

    def positions(self, t: int, start: int = 0) -> torch.Tensor:
        return torch.arange(start, start + t, device=self.device)

    # -- blocks ---------------------------------------------------------------------------------

    def layer(self, i: int) -> Decoder:
        """A decoder holding only layer ``i``; kept for later calls while ``resident_bytes`` allows."""
        if i in self._resident:
            return self._resident[i]
        dec = self._decoder({n: self._load(n, pooled=True) for n in self.by_layer[i]})
        size = sum(t.numel() * t.element_size() for t in dec.t.values())
        if self._resident_used + size <= self.resident_bytes:  # first come, never evicted: a cyclic
            self._resident[i] = dec  # walk over the layers gets its hits from the layers kept
            self._resident_used += size
        return dec

    def release(self) -> None:
        """Drop the resident layers, the recycled tensors and the final norm."""
        self._resident.clear()
        self._resident_used = 0
        self._norm = None
        self._pool.clear()
        self._staging = bytearray()

    # -- embedding and head ---------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, whole_table: bool = False) -> torch.Tensor:
        """``[..., D]`` embeddings of ``ids[...]`` (scaled as the family does), reading one row per
        distinct id. With ``whole_table`` (calibration and perplexity, whose many windows touch much of
        the vocabulary) the table is read once instead when the ids cover more than an eighth of it;
        verify never does that (its memory bound excludes the ``[V, D]`` matrix)."""
        uniq, inverse = torch.unique(ids.detach().cpu(), return_inverse=True)
        vocab = int(self.ckpt.spec(self.spec.embed).shape[0])
        if whole_table and len(uniq) * 8 > vocab:
            table = self._load(self.spec.embed)
            rows = table[uniq.to(self.device)]
            del table
        else:
            rows = torch.empty(len(uniq), self.geo.hidden, device=self.device, dtype=self.dtype)
            for j, u in enumerate(uniq.tolist()):
                rows[j] = self._load(self.spec.embed, (u, u + 1))[0]
        return self.shape.scale_embeddings(rows[inverse.to(self.device)])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        if self._norm is None:
            self._norm = self._load(self.spec.final_norm)
        return self.shape.norm(h, self._norm)

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's final logit soft-cap (elementwise, so it applies chunk by chunk)."""
        return self.shape.cap_logits(logits)

    @property
    def vocab(self) -> int:
        return int(self.ckpt.spec(self.head_name).shape[0])

    def head_chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, W[start : start + rows, D])`` over the head's vocabulary, one chunk in memory:
        each chunk is valid only until the next is asked for (it is refilled in place)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        rows = rows or max(1, HEAD_CHUNK_BYTES // (self.geo.hidden * itemsize))
        for start in range(0, self.vocab, rows):
            w = self._load(self.head_name, (start, min(start + rows, self.vocab)), pooled=True)
            yield start, w
            self._pool[tuple(w.shape)].append(w)  # the consumer asked for the next chunk: done with w
        for shape in {(rows, self.geo.hidden), (self.vocab % rows, self.geo.hidden)}:
            self._pool.pop(shape, None)  # keep the chunks only while this generator runs

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` of hidden states ``h[..., D]`` (meant for few rows: decode steps)."""
        x = self.final_norm(h)
        return self.cap_logits(torch.cat([torch.nn.functional.linear(x, w) for _, w in self.head_chunks()], dim=-1))
