"""``GQLAForCausalLM`` in vLLM: vLLM's own Llama model with GQLA attention, on the path the server picked.

Why Llama's: the plugin serves Llama-shaped blocks (Llama, Mistral, Qwen2, SmolLM2; others are refused in one
line by :func:`transgqla.serving.unsupported_block`), whose norms, MLP, embedding and head vLLM already runs
(fused, tensor-parallel); only attention differs, and ``LlamaDecoderLayer`` takes the attention class as an
argument. Per layer, with OUT's tensors (``[out, in]``; ``m = n_h / n_g`` heads per group, ``t`` ranks):

===========================  ===============================  =================================================
tensor                       absorb (vLLM ``MLAAttention``)   gqa (vLLM ``Attention``)
===========================  ===============================  =================================================
``q_proj`` (+bias)           column-parallel over heads       column-parallel over heads (``n_h / t`` per rank)
``kv_a_proj_with_mqa``       replicated: ``c`` and ``k_R``    replicated: ``c`` and ``k_R``
``kv_b_proj``                group blocks repeated per head,  column-parallel over groups (``n_g / t`` groups
                             column-parallel over heads       per rank: the cache splits by group, no copies)
``kv_b_proj.bias``           value part added after           keys and values, as is
                             attention (sums of probabilities
                             are 1); the nope-key part dropped
                             (the same shift for every key)
``o_proj`` (+bias)           row-parallel                     row-parallel
===========================  ===============================  =================================================

The absorb path hands ``c`` itself to ``MLAAttention`` (GQLA has no latent norm: nothing to undo, exact), with
``k_R`` rotated; vLLM caches ``[c ; k_R]`` (``r + d_R`` values per token per layer) and absorbs ``kv_b_proj``
into the query at decode. The gqa path caches per group ``k = [W_UK_g c ; k_R]`` and ``v = W_UV_g c`` zero-
padded to the key's size (vLLM's CPU attention, and its fast GPU kernels, need equal K/V head sizes; the
padded dims are zero, so the output is unchanged; ``hf_overrides={"gqla_equal_kv": False}`` keeps K != V for a
GPU diff-KV kernel). RoPE: interleaved pairs at the checkpoint's own frequencies
(``GQLAConfig.rope_inv_freq``, float64 angles, rope scaling applied), on the last ``d_R`` dims of every query
head and on ``k_R``; softmax scale ``1/sqrt(d_nope + d_R)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention, MLAAttention
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index

from ..serving import unsupported_block
from .arch import serving_path

EQUAL_KV_KEY = "gqla_equal_kv"


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_positions, d_R/2]`` from float64 angles, in the default dtype; one pair per model, shared
    by every layer (a Llama-3 context of 131072 positions is 17 MB per table, not per layer)."""
    key = (tuple(inv_freq.tolist()), max_positions, torch.get_default_dtype())
    if key not in _TABLES:
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
        _TABLES[key] = (angles.cos().to(key[2]), angles.sin().to(key[2]))
    return _TABLES[key]


class InterleavedRope(nn.Module):
    """RoPE on interleaved pairs ``(2p, 2p+1)`` of ``x[..., d_R]`` at the checkpoint's frequencies (the GQLA
    reference decoder's numbers: float64 angles, cos/sin rounded to the model dtype)."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        super().__init__()
        cos, sin = rope_tables(inv_freq, max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[T, heads, d_R]``; ``positions``: ``[T]``."""
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        re, im = x[..., 0::2], x[..., 1::2]
        return torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1).flatten(-2)


class GQLAAttention(nn.Module):
    """GQLA attention on the served path (see the module docstring); the signature is the one
    ``LlamaDecoderLayer`` calls its attention class with."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type=None,
                 vllm_config: VllmConfig | None = None) -> None:
        super().__init__()
        tp, self.rank_id = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        layer = extract_layer_index(prefix)
        self.path = serving_path(config)  # as the arch convertor decided (it cannot see the TP size)
        n_h, n_g = config.num_attention_heads, config.num_key_value_heads
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        if n_h % tp or (self.path == "gqa" and n_g % tp):
            groups = f" and the {n_g} KV groups (the gqa path shards by group)" if self.path == "gqa" else ""
            raise ValueError(f"transgqla: tensor parallelism {tp} must divide the {n_h} query heads{groups}")
        if self.path == "absorb" and not torch.cuda.is_available() and (self.rank, self.d_rope) != (512, 64):
            raise ValueError(f"transgqla: vLLM's CPU MLA kernel takes r + d_R = 512 + 64 only, this checkpoint has "
                             f"{self.rank} + {self.d_rope}: serve it with hf_overrides gqla_decode_path 'gqa' (or "
                             "'auto'), or export --path absorb --format deepseek --kernel-shape 512+64")
        self.n_heads, self.n_groups, self.m = n_h // tp, n_g // tp, n_h // n_g
        dq = self.d_nope + self.d_rope
        scale = dq**-0.5
        window = config.layer_sliding_window(layer)
        self.q_proj = ColumnParallelLinear(hidden_size, n_h * dq, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, self.rank + self.d_rope, bias=bias,
                                                   quant_config=quant_config, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.o_proj = RowParallelLinear(n_h * self.d_v, hidden_size, bias=config.has_o_proj_bias(),
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        positions = config.max_position_embeddings if vllm_config is None else vllm_config.model_config.max_model_len
        self.rotary = InterleavedRope(config.rope_inv_freq, max(int(positions), 1))
        if self.path == "absorb":
            self.kv_b_proj = ColumnParallelLinear(self.rank, n_h * (self.d_nope + self.d_v), bias=False,
                                                  quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
            self.value_bias = nn.Parameter(torch.zeros(self.n_heads * self.d_v), requires_grad=False) if bias else None
            self.attn = MLAAttention(num_heads=self.n_heads, scale=scale, qk_nope_head_dim=self.d_nope,
                                     qk_rope_head_dim=self.d_rope, v_head_dim=self.d_v, q_lora_rank=None,
                                     kv_lora_rank=self.rank, kv_b_proj=self.kv_b_proj, cache_config=cache_config,
                                     quant_config=quant_config, prefix=f"{prefix}.attn", sliding_window=window)
        else:
            self.kv_b_proj = ColumnParallelLinear(self.rank, n_g * (self.d_nope + self.d_v), bias=bias,
                                                  quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
            self.value_bias = None
            equal = getattr(config, EQUAL_KV_KEY, True)
            self.d_v_cache = dq if equal or equal is None else self.d_v
            self.attn = Attention(self.n_heads, dq, scale, num_kv_heads=self.n_groups, cache_config=cache_config,
                                  quant_config=quant_config, per_layer_sliding_window=window, prefix=f"{prefix}.attn",
                                  **({} if self.d_v_cache == dq else {"head_size_v": self.d_v_cache}))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t = hidden_states.shape[0]
        q = self.q_proj(hidden_states)[0].view(t, self.n_heads, self.d_nope + self.d_rope)
        q = torch.cat((q[..., : self.d_nope], self.rotary(positions, q[..., self.d_nope :])), dim=-1)
        kv = self.kv_a_proj_with_mqa(hidden_states)[0]
        c, k_rope = kv[:, : self.rank], self.rotary(positions, kv[:, None, self.rank :])
        if self.path == "absorb":
            out = self.attn(q, c.contiguous(), k_rope, output_shape=(t, self.n_heads * self.d_v))
            if self.value_bias is not None:
                out = out + self.value_bias
            return self.o_proj(out)[0]
        up = self.kv_b_proj(c)[0].view(t, self.n_groups, self.d_nope + self.d_v)
        k = torch.cat((up[..., : self.d_nope], k_rope.expand(t, self.n_groups, self.d_rope)), dim=-1)
        v = up[..., self.d_nope :]
        if self.d_v_cache > self.d_v:
            v = torch.nn.functional.pad(v, (0, self.d_v_cache - self.d_v))
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1))
        if self.d_v_cache > self.d_v:
            out = out.view(t, self.n_heads, self.d_v_cache)[..., : self.d_v]
        return self.o_proj(out.reshape(t, self.n_heads * self.d_v))[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """OUT's attention tensors (names relative to ``self_attn.``) into this rank's parameters."""
        params = dict(self.named_parameters())
        loaded = set()
        block = self.d_nope + self.d_v
        for name, w in weights:
            if name == "kv_b_proj.weight" and self.path == "absorb":  # per group -> per head (MLA's layout)
                w = w.view(-1, block, self.rank).repeat_interleave(self.m, dim=0).reshape(-1, self.rank)
            if name == "kv_b_proj.bias" and self.path == "absorb":
                values = w.view(-1, block)[:, self.d_nope :].repeat_interleave(self.m, dim=0)
                mine = values[self.rank_id * self.n_heads : (self.rank_id + 1) * self.n_heads]
                self.value_bias.data.copy_(mine.reshape(-1).to(self.value_bias.dtype))
                loaded.add("value_bias")
                continue
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, w)
            loaded.add(name)
        return loaded


class GQLADecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        config = config or vllm_config.model_config.hf_config
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=partial(GQLAAttention, vllm_config=vllm_config))


class GQLAModel(LlamaModel):
    # Llama's stacking of gate/up into gate_up_proj; q_proj and the latent projections load as they are.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={".gate_proj": (".gate_up_proj", 0),
                                                           ".up_proj": (".gate_up_proj", 1)})


class GQLAForCausalLM(LlamaForCausalLM):
    """A transgqla GQLA checkpoint served by vLLM (``architectures: ["GQLAForCausalLM"]``)."""

    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        problem = unsupported_block(config.to_dict())
        if problem:
            raise NotImplementedError(problem)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=GQLADecoderLayer)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=GQLADecoderLayer):
        return GQLAModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
