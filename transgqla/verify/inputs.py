"""Inputs the model checks share: the compute dtype, batches and groups of token windows, and the short
windows of verify's own texts (the built-in text, fixed ids). Text and tokens come from the one pipeline,
:mod:`transgqla.text.pipeline`; the checkpoint itself is read by :mod:`.layerwise`.
"""

from __future__ import annotations

import torch

from ..errors import InputError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Tokens per forward batch: bounds the activations (the MLP's [tokens, intermediate] products are the
#: largest: 1024 x 14336 float32 = 59 MB each at Llama-3-8B).
BATCH_TOKENS = 1024
#: Tokens whose hidden states are held at once: the model is streamed once per group of windows.
GROUP_TOKENS = 8192  # enough for two 512-token windows with a Llama-style tokenizer


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be float32 or float64, got {dtype!r}")
    return DTYPES[dtype]


def windows(ids: list[int], seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens; a last shorter window is kept if it has 2+ tokens (verify's
    own short texts: the start of the built-in text, fixed ids; a ``--text`` file is cut by
    :func:`transgqla.text.pipeline.token_windows`, as ``eval-ppl`` cuts it)."""
    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    out = [torch.tensor(ids[i : i + seqlen]) for i in range(0, len(ids), seqlen)]
    out = [w for w in out if w.numel() >= 2]
    return out[:max_windows] if max_windows else out


def batches(wins: list[torch.Tensor], max_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """Consecutive windows of equal length stacked into ``[B, T]`` batches of at most ``max_tokens``."""
    out: list[torch.Tensor] = []
    group: list[torch.Tensor] = []
    for w in wins:
        if group and (w.numel() != group[0].numel() or (len(group) + 1) * w.numel() > max_tokens):
            out.append(torch.stack(group))
            group = []
        group.append(w)
    if group:
        out.append(torch.stack(group))
    return out


def groups(wins: list[torch.Tensor], max_tokens: int = GROUP_TOKENS) -> list[list[torch.Tensor]]:
    """Consecutive windows in groups of at most ``max_tokens`` tokens (a longer window is alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for w in wins:
        if not out or size + w.numel() > max_tokens:
            out.append([])
            size = 0
        out[-1].append(w)
        size += w.numel()
    return out
