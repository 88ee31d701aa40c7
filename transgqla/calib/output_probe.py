"""The layer's attention-output error on calibration sequences: what a calibrated layer's choices are judged by.

The searches of a calibrated conversion (which components fill the RoPE slots, rope_search.py; the key/value
balance and FreqFold, methods.py) compare candidates by ``||(o - o_src) W_O^T||^2 / ||o_src W_O^T||^2``: the
relative error of the layer's attention output after ``o_proj``, on ``S`` sample sequences of length ``L``.
:class:`OutputProbe` holds what every candidate shares, made once per layer: the source's output (exact RoPE,
float64), the causal / sliding-window mask as an additive bias, the values and ``W_O^T``.

Cost. A candidate costs a softmax over its scores, ``P V`` and the ``o_proj`` product (at Llama-3-8B, where
``n_h d = D = 4096``, that product dominates). Three choices keep it small:

* Query rows are subsampled: every ``stride``-th position, ending at the last one; every key position stays.
  Softmax is per query row, so each kept row is exact; the error is a systematic sample of the full sum over
  rows (the candidates are ranked on the same rows, and their differences are smooth in position).
* float32 for the candidates. Scores are ``O(10)``, outputs are compared after ``o_proj`` against a float64
  reference; float32 rounding moves an error by ~1e-6 of itself, while the candidates a search compares differ
  by 1e-3 and more.
* Heads are folded into query rows (``[S n_g, m T, *]``, head ``h = g m + j``): values are read once per
  group, never copied per head, and a caller can keep one logits buffer for all its candidates.

Everything is made on the device of the inputs.
"""

from __future__ import annotations

import torch

from ..mathx.rope import cos_sin, rotate_half_layout

QUERY_STRIDE = 4  # see the module docstring; quality checked on the demo (benchmarks/README.md)
PROBE_DTYPE = torch.float32


class OutputProbe:
    """Reference output and shared tensors for scoring candidates of one layer.

    ``q[S, n_h, L, d]``, ``k``/``v`` ``[S, n_g, L, d]``: the source's unrotated projections on the sample
    sequences (biases included); ``wo[D, n_h d]``; ``freqs[d/2]`` rad/token; ``scale``: the source's softmax
    scale; ``window``: sliding window or None.
    """

    def __init__(self, q, k, v, wo, freqs, scale: float, window: int | None = None, stride: int = QUERY_STRIDE,
                 dtype: torch.dtype = PROBE_DTYPE):
        s, n_h, length, d = q.shape
        n_g = k.shape[1]
        self.s, self.n_g, self.m, self.length, self.dtype = s, n_g, n_h // n_g, length, dtype
        dev = q.device
        pos = torch.arange(length, device=dev)
        self.rows = torch.arange(length - 1, -1, -stride, device=dev).flip(0)  # [T] query positions
        self.t = int(self.rows.shape[0])
        allowed = self.rows[:, None] >= pos[None, :]
        if window is not None:
            allowed &= (self.rows[:, None] - pos[None, :]) < window
        # Additive mask [m T, L] (folded rows): adding it is masking, and a finite change keeps -inf at -inf.
        bias = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        self.mask_bias = bias.repeat(self.m, 1)
        self.v = self.fold_keys(v).to(dtype)
        self.wo_t = wo.T.to(device=dev, dtype=dtype).contiguous()  # [n_h d, D]
        cos, sin = cos_sin(freqs.to(dev), pos, dtype=torch.float64)
        q_rot = rotate_half_layout(q[:, :, self.rows].double(), cos[self.rows], sin[self.rows])
        k_rot = rotate_half_layout(k.double(), cos, sin)
        logits = self.fold_queries(q_rot) @ self.fold_keys(k_rot).transpose(1, 2) * scale
        logits += self.mask_bias.double()
        out = self.heads_to_rows(torch.softmax(logits, -1) @ self.fold_keys(v.double()))
        reference = out @ wo.T.to(device=dev, dtype=torch.float64)  # [S T, D]
        self.ref_energy = float(reference.pow(2).sum())
        self.reference = reference.to(dtype)

    def fold_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, n_h, T, e]`` -> ``[S n_g, m T, e]`` (a view when ``x`` is contiguous)."""
        return x.reshape(self.s * self.n_g, self.m * x.shape[2], x.shape[3])

    def fold_keys(self, x: torch.Tensor) -> torch.Tensor:
        """``[S, n_g, L, e]`` -> ``[S n_g, L, e]``."""
        return x.reshape(self.s * self.n_g, x.shape[2], x.shape[3])

    def heads_to_rows(self, o: torch.Tensor) -> torch.Tensor:
        """``[S n_g, m T, e]`` -> ``[S T, n_h e]`` (the layout ``o_proj`` reads)."""
        e = o.shape[-1]
        o = o.reshape(self.s, self.n_g, self.m, self.t, e).permute(0, 3, 1, 2, 4)
        return o.reshape(self.s * self.t, self.n_g * self.m * e)

    def empty_logits(self) -> torch.Tensor:
        """A ``[S n_g, m T, L]`` buffer for :meth:`error`."""
        return torch.empty(self.s * self.n_g, self.m * self.t, self.length, dtype=self.dtype, device=self.mask_bias.device)

    def errors(self, logits: torch.Tensor, v: torch.Tensor | None = None) -> list[float]:
        """Relative output errors of candidates from their scaled, masked ``logits[C, S n_g, m T, L]`` and
        their values ``v[C or 1, S n_g, L, d_v]`` (default: the source's)."""
        c = logits.shape[0]
        probs = torch.softmax(logits, -1)
        o = torch.matmul(probs, self.v if v is None else v)  # [C, S n_g, m T, d_v]
        o = o.reshape(c, self.s, self.n_g, self.m, self.t, -1).permute(0, 1, 4, 2, 3, 5).reshape(c * self.s * self.t, -1)
        diff = (o @ self.wo_t).view(c, self.s * self.t, -1).sub_(self.reference)  # o W_O^T - reference
        return [float(e) / self.ref_energy for e in diff.square_().sum((1, 2))]

    def error(self, logits: torch.Tensor, v: torch.Tensor | None = None) -> float:
        """:meth:`errors` of one candidate: ``logits[S n_g, m T, L]``, ``v[S n_g, L, d_v]``."""
        return self.errors(logits[None], None if v is None else v[None])[0]
