"""``--calib self``: calibration text the source model writes itself, in bounded memory.

Why: text of one domain tunes a conversion to that domain (benchmarks/quality.py: calibrated on
documentation, a 33% cache is 2.4x the source's perplexity on prose; calibrated on the model's own text,
1.8x on both). Sampling from the model needs no dataset and no network, and it is domain-general by
construction: it is what the model itself finds likely.

How: all windows decode as one batch, one cached step per token, through the one layer-by-layer runner
(:class:`~transgqla.model.layerwise.LayerwiseModel`): layers stay resident while ``resident_bytes``
allows (the demo is read once), the rest are read again at every step, so memory holds the resident
layers, one streamed layer, the KV cache and one vocabulary chunk of the head, whatever the model size.
Window ``i`` starts with BOS (when the config has one) and prompt ``PROMPTS[i % len]``; then top-k
sampling at a fixed temperature from a ``torch.Generator`` seeded by ``seed``, so one seed gives the
same tokens. The cost is one forward of the source per generated token (batched over the windows),
plus re-reading the streamed layers at every step; a GPU is the place for it at 8B.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..io import SafetensorsCheckpoint
from ..model.attention import KVCache
from ..model.decoder import SourceDecoder
from ..model.layerwise import LayerwiseModel
from ..text.pipeline import load_tokenizer

# Openings: varied registers, so the samples do not all drift into one genre.
PROMPTS = (
    "", "The", "Once upon a time", "In the year", "Dear", "Chapter 1", "Q:", "Breaking news:", "The recipe calls for",
    "According to the report,", "My favorite", "def ", "The history of", "Abstract:", "I think that", "Yesterday",
    "How to", "The following", "Introduction", "She said", "1.", "When I was", "The theory of", "Ladies and gentlemen,",
)
TEMPERATURE, TOP_K = 0.9, 50
SEED = 0
RESIDENT_BYTES = 2 << 30  # float32 layer bytes kept across steps on a CPU (SmolLM2-135M: all; Llama-3-8B: two layers)


def resident_budget(device: str) -> int:
    """Layer bytes to keep across steps: :data:`RESIDENT_BYTES` in host memory; on a GPU half of what is
    free on it (an 8B source in float32, 32 GB, stays whole on an 80 GB card instead of crossing the bus
    at every step)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return RESIDENT_BYTES
    free, _ = torch.cuda.mem_get_info(dev)
    return max(RESIDENT_BYTES, free // 2)


def _starts(model_folder: Path, config: dict, n: int, seqlen: int) -> list[list[int]]:
    """The forced opening of each window: BOS (when the config has one), then its prompt's tokens."""
    tok = load_tokenizer(model_folder)
    bos = config.get("bos_token_id")
    bos = bos[0] if isinstance(bos, list) else bos
    starts = []
    for i in range(n):
        prompt = tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids
        ids = ([int(bos)] if bos is not None else []) + prompt
        starts.append(ids[: max(1, seqlen // 2)] or [0])
    return starts


def _next_logits(model: LayerwiseModel, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``[B, V]`` after ``ids[B, T]``, which follow the tokens already in ``cache``."""
    positions = model.positions(ids.shape[1], cache.length())
    h = model.embed(ids.to(model.device)).to(torch.float32)
    for i in range(model.n_layers):
        dec = model.layer(i)
        h = dec.block(i, h, positions, cache)
        model.recycle(dec)  # a streamed layer's tensors take the next layer's weights
    return model.logits(h[:, -1]).float()


def _reporter(total: int) -> Callable[[int], None]:
    """Plain progress lines on stderr (about every 10% and at the end): generation is long at 8B."""
    began, shown = time.perf_counter(), [0]

    def report(done: int) -> None:
        if done == total or done * 10 // total > shown[0]:
            shown[0] = done * 10 // total
            print(f"transgqla: --calib self: {done}/{total} steps, {time.perf_counter() - began:.0f} s",
                  file=sys.stderr, flush=True)
    return report


@torch.no_grad()
def self_generated(model_folder: Path, n: int, seqlen: int, seed: int = SEED, device: str = "cpu", *,
                   top_k: int = TOP_K, temperature: float = TEMPERATURE, resident_bytes: int | None = None,
                   quiet: bool = False) -> torch.Tensor:
    """``[n, seqlen]`` int64 tokens sampled from the source at ``model_folder`` (see the module docstring).
    ``top_k=1`` is greedy decoding; ``resident_bytes`` defaults to :func:`resident_budget`."""
    folder = Path(model_folder)
    config = json.loads((folder / "config.json").read_text())
    starts = _starts(folder, config, n, seqlen)
    out = torch.zeros(n, seqlen, dtype=torch.int64)
    for i, s in enumerate(starts):
        out[i, : len(s)] = torch.tensor(s)
    forced_until = torch.tensor([len(s) for s in starts])
    width = int(forced_until.min())  # common prefill; longer prompts are forced token by token
    gen = torch.Generator().manual_seed(seed)
    report = (lambda done: None) if quiet else _reporter(seqlen - width)
    ckpt = SafetensorsCheckpoint(folder)
    try:
        model = LayerwiseModel(ckpt, config, SourceDecoder, torch.float32, torch.device(device),
                               resident_budget(device) if resident_bytes is None else resident_bytes)
        cache = KVCache("source")
        logits = _next_logits(model, out[:, :width], cache)
        for t in range(width, seqlen):
            probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
            top = probs.topk(min(top_k, probs.shape[-1]))
            pick = top.indices.gather(1, torch.multinomial(top.values, 1, generator=gen))[:, 0]
            out[:, t] = torch.where(t < forced_until, out[:, t], pick)
            if t + 1 < seqlen:
                logits = _next_logits(model, out[:, t:t + 1], cache)
            report(t + 1 - width)
        model.release()
    finally:
        ckpt.close()
    return out
