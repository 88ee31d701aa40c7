"""Layer-by-layer calibration pass over the source checkpoint, in bounded memory.

The source is read through the one layer-by-layer runner (:class:`~transgqla.model.layerwise.LayerwiseModel`)
and pushed through the family's reference block, as ``eval-ppl`` and verify do. Only the calibration
hidden states ``h[n, L, D]`` (float32) and one decoder layer's tensors are held, both on the run's device; statistics come back on that device too (``LayerCalibration.to`` moves them
to wherever the layer math runs).
For layer ``l``: ``statistics(l)`` returns the input moment of its attention and a few sample input
sequences; the caller converts the layer; ``advance(l, converted)`` pushes ``h`` through layer ``l``
— through the source attention, or with ``sequential`` through the converted one, so that later
layers are calibrated on what the converted model will actually feed them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mathx.attention_stats import source_attention_parts
from ..mathx.moments import InputMoment
from ..model.attention import KVCache, attention
from ..model.decoder import Decoder, SourceDecoder
from ..model.geometry import GQLAGeometry
from ..model.layerwise import LayerwiseModel


@dataclass
class LayerCalibration:
    moment: InputMoment  # E[[x;1][x;1]^T] over all calibration tokens, float64
    samples: torch.Tensor  # x for the first few windows, [s, L, D], float32
    tokens: int
    # The same moment with each token weighted by the attention it receives (summed over heads and
    # queries): the tokens attention reads from, attention sinks first, are the ones whose keys and
    # values must be reconstructed well.
    attention_moment: InputMoment | None = None

    def to(self, device: torch.device | str) -> "LayerCalibration":
        """The same statistics on ``device``."""
        def move(m: InputMoment | None) -> InputMoment | None:
            if m is None:
                return None
            return InputMoment(diag=m.diag.to(device)) if m.diag is not None else InputMoment(dense=m.dense.to(device))
        return LayerCalibration(move(self.moment), self.samples.to(device), self.tokens, move(self.attention_moment))


class LayerwiseCalibration:
    def __init__(self, checkpoint, config: dict, windows: torch.Tensor, *, sample_windows: int = 2,
                 sequential: bool = False, micro_batch: int = 4, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = LayerwiseModel(checkpoint, config, SourceDecoder, torch.float32, self.device)
        self.config, self.sequential, self.micro = config, sequential, micro_batch
        self.n_samples = min(sample_windows, windows.shape[0])
        with torch.no_grad():
            self.h = self.model.embed(windows, whole_table=True).to(torch.float32)
        self.positions = torch.arange(windows.shape[1], device=self.device)
        self.next_layer = 0
        self._held: tuple[int, Decoder] | None = None  # the layer being calibrated, read once
        # The source attention outputs the attention-weighted statistics already computed (layer, [chunks]):
        # advance() adds them instead of running the same attention again.
        self._attention_out: tuple[int, list[torch.Tensor]] | None = None

    @property
    def dec(self) -> Decoder:
        """The source decoder holding the layer being calibrated (``next_layer``)."""
        if self._held is None or self._held[0] != self.next_layer:
            if self._held is not None:
                self.model.recycle(self._held[1])
            self._held = (self.next_layer, self.model.layer(self.next_layer))
        return self._held[1]

    @property
    def tokens(self) -> int:
        return self.h.shape[0] * self.h.shape[1]

    def _chunks(self):
        for i in range(0, self.h.shape[0], self.micro):
            yield slice(i, i + self.micro)

    @torch.no_grad()
    def statistics(self, layer: int, attention_weighted: bool = False) -> LayerCalibration:
        if layer != self.next_layer:
            raise RuntimeError(f"calibration is at layer {self.next_layer}, asked for {layer}")
        dim = self.h.shape[-1] + 1
        acc = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        acc_w = torch.zeros_like(acc) if attention_weighted else None
        weight_sum = 0.0
        samples = []
        attn = self.dec.layer(layer, "self_attn.") if attention_weighted else None
        geo = self.dec.layer_geo(layer)
        reuse = attention_weighted and not self.sequential
        outs = []
        for sl in self._chunks():
            x = self.dec.attention_input(layer, self.h[sl])
            if sum(s.shape[0] for s in samples) < self.n_samples:
                samples.append(x[: self.n_samples - sum(s.shape[0] for s in samples)].clone())
            xa = torch.cat((x.reshape(-1, x.shape[-1]), torch.ones(x.shape[0] * x.shape[1], 1, device=x.device)), 1)
            acc += (xa.T @ xa).double()  # float32 products, float64 accumulation across chunks
            if attention_weighted:
                _, _, probs = source_attention_parts(
                    x, attn["q_proj.weight"], attn.get("q_proj.bias"), attn["k_proj.weight"], attn.get("k_proj.bias"),
                    geo.n_heads, geo.n_groups, geo.head_dim, geo.freqs, geo.sliding_window,
                    geo.softmax_scale, geo.softcap)
                received = probs.sum(dim=(1, 2)).reshape(-1, 1)  # [B*L, 1]
                acc_w += ((xa * received).T @ xa).double()
                weight_sum += float(received.sum())
                if reuse:
                    outs.append(self._source_attention_output(x, probs, attn, geo))
        self._attention_out = (layer, outs) if reuse else None
        moment = InputMoment(dense=acc / self.tokens)
        weighted = InputMoment(dense=acc_w / weight_sum) if attention_weighted else None
        return LayerCalibration(moment=moment, samples=torch.cat(samples), tokens=self.tokens, attention_moment=weighted)

    def _source_attention_output(self, x: torch.Tensor, probs: torch.Tensor, attn: dict, geo) -> torch.Tensor:
        """``o_proj(probs @ v)`` of the source attention, ``[B, L, D]``, from ``probs[B, n_h, L, L]``."""
        b, length, _ = x.shape
        v = torch.nn.functional.linear(x, attn["v_proj.weight"], attn.get("v_proj.bias"))
        v = v.view(b, length, geo.n_groups, geo.head_dim).transpose(1, 2)
        m = geo.n_heads // geo.n_groups
        o = (probs.view(b, geo.n_groups, m * length, length) @ v).view(b, geo.n_groups, m, length, -1)
        o = o.permute(0, 3, 1, 2, 4).reshape(b, length, -1)
        return torch.nn.functional.linear(o, attn["o_proj.weight"], attn.get("o_proj.bias"))

    @torch.no_grad()
    def advance(self, layer: int, converted: dict[str, torch.Tensor] | None = None, gqla_config: dict | None = None) -> None:
        """Push the hidden states through ``layer`` (with its converted attention if sequential)."""
        dec = self.dec
        attn_src = dec.layer(layer, "self_attn.")
        use_converted = self.sequential and converted is not None
        if use_converted:
            geo = GQLAGeometry.from_config(gqla_config).for_layer(layer)
            params = {k: v.to(device=self.device, dtype=torch.float32) for k, v in converted.items()}
            params["o_proj.weight"] = attn_src["o_proj.weight"]
            if "o_proj.bias" in attn_src:
                params["o_proj.bias"] = attn_src["o_proj.bias"]
        done = self._attention_out[1] if self._attention_out and self._attention_out[0] == layer and not use_converted else None
        self._attention_out = None
        for i, sl in enumerate(self._chunks()):
            h = self.h[sl]
            if done is not None:
                self.h[sl] = dec.mlp_residual(layer, dec.attention_residual(layer, h, done[i]))
                continue
            x = dec.attention_input(layer, h)
            cache = KVCache("absorb" if use_converted else "source")
            if use_converted:
                a = attention(x, params, geo, self.positions, cache, 0, "absorb")
            else:
                a = dec._attention(x, attn_src, self.positions, cache, 0, dec.layer_geo(layer))
            self.h[sl] = dec.mlp_residual(layer, dec.attention_residual(layer, h, a))
        self.next_layer = layer + 1
