"""Llama, Mistral and Qwen2: the plain pre-norm block (RMSNorm ``w``, gated SiLU MLP, q/k/v/o).

The three differ only in data: Qwen2 always has q/k/v biases, Mistral never, Llama when its config
says ``attention_bias``; Mistral's (and Qwen2's, when switched on) sliding window is the block's
generic per-layer window rule.
"""

from __future__ import annotations

from .base import Family

FAMILIES = (
    Family("llama", ("LlamaForCausalLM",), qkv_bias=None),
    Family("mistral", ("MistralForCausalLM",), qkv_bias=False),
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias=True),
)
