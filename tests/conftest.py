"""Shared fixtures: tiny random source checkpoints written with stock transformers, in several shards.

Tests never reach a hub: HF_HUB_OFFLINE is forced and every model is built here.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
}


def make_source(
    folder: Path,
    family: str = "llama",
    *,
    n_kv: int = 2,
    n_heads: int = 4,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: str = "24KB",
    shared_keys: bool = False,
    bias_scale: float = 0.5,
    **extra,
):
    """Write a random ``family`` model to ``folder`` (sharded so that layers straddle shards).

    ``shared_keys`` gives every KV group the same key weights. Qwen2's q/k/v biases are drawn
    non-zero (transformers initializes them to zero, which would hide bias bugs).
    Returns the stock transformers model in float32 (the independent reference).
    """
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden - 16, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim, tie_word_embeddings=False,
        max_position_embeddings=256, **extra,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_scale)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norms exercise the data-free statistics
            if shared_keys and name.endswith("k_proj.weight"):
                p.copy_(p[:head_dim].repeat(n_kv, 1))
            if shared_keys and name.endswith("k_proj.bias"):
                p.copy_(p[:head_dim].repeat(n_kv))
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    return model.float()


@pytest.fixture
def source_factory(tmp_path):
    counter = iter(range(1000))

    def build(family: str = "llama", **kw):
        folder = tmp_path / f"src-{family}-{next(counter)}"
        model = make_source(folder, family, **kw)
        return folder, model

    return build


@pytest.fixture
def sigint_raises_keyboard_interrupt():
    """In-process interrupts (SIGINT from a test hook) must not depend on the disposition the test process
    inherited: a process launched in the background by a shell starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
