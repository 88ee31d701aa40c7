"""GQLA (Group-Query Latent Attention) causal LM for Hugging Face ``transformers``.

This file travels inside converted checkpoints (``auto_map`` in ``config.json``); it imports only
torch, transformers and ``configuration_gqla`` beside it. Works with transformers 4.45+ and 5.x.

Usage::

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)              # config's path
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, decode_path="gqa")
    model.set_decode_path("absorb")        # switch later (a cache filled on one path is not reusable)
    out = model.generate(ids, max_new_tokens=32)

Per layer the KV cache holds (in a stock ``DynamicCache``, as its key/value tensors):

* absorb: the latent ``c`` as ``[B, 1, S, kv_lora_rank]`` and the rotated RoPE key ``k_R`` as
  ``[B, 1, S, qk_rope_head_dim]``; every query head attends to them (``kv_b_proj``'s key block is
  absorbed into the query, its value block applied after attention);
* gqa: per-group keys ``[B, n_g, S, qk_nope_head_dim + qk_rope_head_dim]`` (the RoPE key copied into
  every group, as stock GQA kernels expect) and values ``[B, n_g, S, v_head_dim]``.

``model.kv_cache_values_per_token()`` gives the values one token costs (all layers);
``GQLAForCausalLM.cache_numel(cache)`` counts the values a cache actually holds.

Every block is built from the checkpoint's ``gqla["family"]`` record (``GQLAConfig.gqla_block``), with
module names equal to its tensor names: Llama/Mistral/Qwen2/Granite (``mlp.gate_proj``...), Mixtral
(``block_sparse_moe.gate`` + ``experts.{e}.w1/w2/w3``, top-k softmax routing), Phi-3 (``mlp.gate_up_proj``),
Gemma2 (four norms per layer, ``1 + w`` weights, scaled embeddings, soft-capped scores and logits).

Attention is computed eagerly (grouped matmuls, float32 softmax); dynamic caches (including
transformers 5's sliding-window layers) are supported, static/compiled caches are not.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gqla import GQLAConfig

_TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
_TRANSFORMERS_MAJOR = _TRANSFORMERS_VERSION[0]
# transformers 5.x names the cache field of model outputs ``cache`` (4.x: ``past_key_values``).
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(2p, 2p+1)`` of ``x[..., T, d_R]``; ``cos/sin`` broadcast to ``[..., T, d_R/2]``."""
    re, im = x[..., 0::2], x[..., 1::2]
    return torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1).flatten(-2)


class GQLARMSNorm(nn.Module):
    """RMSNorm with the source family's weight convention: ``w`` (offset 0: normalize in float32,
    scale in the input dtype, as Llama) or ``1 + w`` (offset 1: scale in float32, as Gemma2)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


class GQLAMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``; module names from the block record (Mixtral's experts
    call them ``w1``/``w3``/``w2``). With ``gate_up`` set, one fused ``[gate ; up]`` projection (Phi-3)."""

    def __init__(self, config: GQLAConfig, spec: dict, intermediate: int | None = None, bias: bool | None = None):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False)) if bias is None else bias
        hidden, inter = config.hidden_size, intermediate or config.intermediate_size
        self.names = (spec["gate"], spec["up"], spec["down"], spec.get("gate_up"))
        if spec.get("gate_up"):
            setattr(self, spec["gate_up"], nn.Linear(hidden, 2 * inter, bias=bias))
        else:
            setattr(self, spec["gate"], nn.Linear(hidden, inter, bias=bias))
            setattr(self, spec["up"], nn.Linear(hidden, inter, bias=bias))
        setattr(self, spec["down"], nn.Linear(inter, hidden, bias=bias))
        self.act_fn = ACT2FN[config.gqla_block()["activation"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_name, up_name, down_name, fused = self.names
        if fused:
            gate, up = getattr(self, fused)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(self, gate_name)(x), getattr(self, up_name)(x)
        return getattr(self, down_name)(self.act_fn(gate) * up)


class GQLASparseMoE(nn.Module):
    """Mixtral's sparse mixture of experts: a router ``{router}`` over ``n_experts`` gated experts
    ``{experts}.{e}``; softmax of the router logits in float32, the ``top_k`` largest renormalized to
    sum to one, each token through its chosen experts (as transformers routes it)."""

    def __init__(self, config: GQLAConfig, spec: dict):
        super().__init__()
        self.router_name, self.experts_name = spec["router"], spec["experts"]
        self.n_experts, self.top_k = int(spec["n_experts"]), int(spec["top_k"])
        setattr(self, self.router_name, nn.Linear(config.hidden_size, self.n_experts, bias=False))
        expert = {**spec, "gate_up": None}
        setattr(self, self.experts_name, nn.ModuleList(GQLAMLP(config, expert, bias=False) for _ in range(self.n_experts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(getattr(self, self.router_name)(flat).float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        experts = getattr(self, self.experts_name)
        for e in range(self.n_experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                y = experts[e](flat[rows]) * top[rows, slot, None]
                out.index_add_(0, rows, y.to(out.dtype))
        return out.view_as(x)


class GQLAAttention(nn.Module):
    """GQLA attention; both decoding paths share these projections (format_version 1 layout)."""

    def __init__(self, config: GQLAConfig, layer_idx: int):
        super().__init__()
        if getattr(config, "q_lora_rank", None):
            raise ValueError("GQLA: checkpoints with a factorized query (q_lora_rank) are not supported by this code")
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_groups = config.num_key_value_heads
        self.heads_per_group = self.n_heads // self.n_groups
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.scaling = (self.d_nope + self.d_rope) ** -0.5
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.softcap = config.gqla_block()["attn_softcap"]  # Gemma2: scores -> cap * tanh(scores / cap)
        bias = bool(config.attention_bias)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * (self.d_nope + self.d_rope), bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.d_rope, bias=bias)
        self.kv_b_proj = nn.Linear(self.rank, self.n_groups * (self.d_nope + self.d_v), bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, hidden, bias=config.has_o_proj_bias())

    def _mask(self, q_idx, q_end, n_keys, attention_mask):
        """Boolean ``[B|1, 1, T, L]``: which of the ``n_keys`` keys the cache returned each query sees.

        Queries sit at cache slots ``q_idx`` (ending at slot ``q_end - 1``). A cache returns either the
        whole history (slots ``0..``) or, for a sliding-window layer, the last ``n_keys`` slots."""
        start = 0 if n_keys >= q_end else q_end - n_keys
        k_idx = torch.arange(start, start + n_keys, device=q_idx.device)
        allowed = k_idx[None, :] <= q_idx[:, None]
        if self.sliding_window is not None:
            allowed = allowed & ((q_idx[:, None] - k_idx[None, :]) < self.sliding_window)
        allowed = allowed[None, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape[-1] >= start + n_keys:
                keep = attention_mask[:, start: start + n_keys]
            elif attention_mask.shape[-1] == n_keys:
                keep = attention_mask
            else:
                raise ValueError(
                    f"GQLA: attention_mask covers {attention_mask.shape[-1]} tokens but the sequence has {start + n_keys}"
                )
            allowed = allowed & keep.bool()[:, None, None, :]
        elif attention_mask is not None and attention_mask.dim() == 4:
            am = attention_mask[..., -n_keys:]
            allowed = allowed & (am if am.dtype == torch.bool else am == 0)
        return allowed

    def _softmax(self, scores, allowed):
        scores = scores.float()
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        return torch.softmax(scores, dim=-1)

    def forward(self, x, cos, sin, q_idx, q_end, attention_mask, cache, path):
        b, t, _ = x.shape
        g, m = self.n_groups, self.heads_per_group
        q = self.q_proj(x).view(b, t, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rope = q[..., : self.d_nope], _rope(q[..., self.d_nope:], cos[:, None], sin[:, None])
        kv = self.kv_a_proj_with_mqa(x)
        c, k_rope = kv[..., : self.rank], _rope(kv[..., self.rank:], cos, sin)
        w = self.kv_b_proj.weight.view(g, self.d_nope + self.d_v, self.rank)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]

        if path == "absorb":
            a, r = c[:, None], k_rope[:, None]  # [B, 1, T, r], [B, 1, T, d_R]
            if cache is not None:
                a, r = cache.update(a, r, self.layer_idx)
            allowed = self._mask(q_idx, q_end, a.shape[-2], attention_mask)
            q_lat = torch.einsum("bgmtn,gnr->bgmtr", q_nope.reshape(b, g, m, t, self.d_nope), w_uk)
            q_lat = q_lat.reshape(b, self.n_heads, t, self.rank)
            # The nope-key bias adds q_nope . b_k to every score of a query: softmax-invariant, skipped.
            scores = (q_lat @ a.transpose(-1, -2) + q_rope @ r.transpose(-1, -2)) * self.scaling
            probs = self._softmax(scores, allowed).to(a.dtype)
            o_lat = (probs @ a).reshape(b, g, m, t, self.rank)
            out = torch.einsum("bgmtr,gvr->bgmtv", o_lat, w_uv)
            if self.kv_b_proj.bias is not None:
                b_uv = self.kv_b_proj.bias.view(g, self.d_nope + self.d_v)[:, self.d_nope:]
                out = out + b_uv[None, :, None, None, :]
        elif path == "gqa":
            kv_up = self.kv_b_proj(c).view(b, t, g, self.d_nope + self.d_v).transpose(1, 2)
            k = torch.cat((kv_up[..., : self.d_nope], k_rope[:, None].expand(b, g, t, self.d_rope)), dim=-1)
            v = kv_up[..., self.d_nope:]
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            allowed = self._mask(q_idx, q_end, k.shape[-2], attention_mask)
            qg = torch.cat((q_nope, q_rope), dim=-1).reshape(b, g, m, t, self.d_nope + self.d_rope)
            scores = (qg @ k[:, :, None].transpose(-1, -2)).reshape(b, self.n_heads, t, -1) * self.scaling
            probs = self._softmax(scores, allowed).to(v.dtype)
            out = probs.reshape(b, g, m, t, -1) @ v[:, :, None]
        else:
            raise ValueError(f"GQLA: unknown decode path {path!r}")
        out = out.reshape(b, self.n_heads, t, self.d_v).transpose(1, 2).reshape(b, t, self.n_heads * self.d_v)
        return self.o_proj(out)


class GQLADecoderLayer(nn.Module):
    """One decoder block as the checkpoint's ``gqla.family`` record describes it: norms named and
    placed by the record (Gemma2's sandwich norms included), a dense, fused or mixture-of-experts MLP
    under the record's module name, so module names equal tensor names."""

    def __init__(self, config: GQLAConfig, layer_idx: int):
        super().__init__()
        spec = config.gqla_block()
        self.norm_names = (spec["attn_in"], spec["attn_out"], spec["mlp_in"], spec["mlp_out"])
        self.residual_multiplier = spec["residual_multiplier"]  # Granite: branch outputs scaled before the residual
        self.self_attn = GQLAAttention(config, layer_idx)
        mlp = spec["mlp"]
        self.mlp_name = mlp["module"]
        setattr(self, self.mlp_name, GQLASparseMoE(config, mlp) if mlp["kind"] == "moe" else GQLAMLP(config, mlp))
        for name in self.norm_names:
            if name:
                setattr(self, name, GQLARMSNorm(config.hidden_size, spec["eps"], spec["norm_offset"]))

    def _norm(self, name, x):
        return x if not name else getattr(self, name)(x)

    def forward(self, h, cos, sin, q_idx, q_end, attention_mask, cache, path):
        attn_in, attn_out, mlp_in, mlp_out = self.norm_names
        a = self._norm(attn_out, self.self_attn(self._norm(attn_in, h), cos, sin, q_idx, q_end, attention_mask, cache, path))
        h = h + (a if self.residual_multiplier is None else a * self.residual_multiplier)
        y = self._norm(mlp_out, getattr(self, self.mlp_name)(self._norm(mlp_in, h)))
        return h + (y if self.residual_multiplier is None else y * self.residual_multiplier)


class GQLAPreTrainedModel(PreTrainedModel):
    config_class = GQLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["GQLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_cache_class = True  # transformers 4.x: generate() builds a DynamicCache
    _supports_static_cache = False
    _supports_quantized_cache = False
    _supports_sdpa = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False


class GQLAModel(GQLAPreTrainedModel):
    def __init__(self, config: GQLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(GQLADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        spec = config.gqla_block()
        self.norm = GQLARMSNorm(config.hidden_size, spec["eps"], spec["norm_offset"])
        # Gemma2 scales embeddings by sqrt(hidden), rounded to the hidden dtype (as transformers does).
        self.embed_scale = config.hidden_size**0.5 if spec["embed_scale"] else None
        self.embed_multiplier = spec["embed_multiplier"]  # Granite: every input embedding times this
        self._inv_freq = None  # float64 RoPE frequencies, computed on first use (not a buffer: nothing to load)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self) -> Cache:
        """An empty cache for this model (sliding-window layers where the config asks for them)."""
        try:
            return DynamicCache(config=self.config)
        except TypeError:  # transformers before 4.56
            return DynamicCache()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decode_path: str | None = None,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None)
        cache = cache if cache is not None else past_key_values
        cache_position = kwargs.pop("cache_position", None)
        path = GQLAConfig._check_path(decode_path or self.config.decode_path)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("GQLA: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            h = self.embed_tokens(input_ids)
            if self.embed_scale is not None:  # the ids path only, as transformers' scaled embedding
                h = h * torch.tensor(self.embed_scale, dtype=h.dtype, device=h.device)
        else:
            h = inputs_embeds
        if self.embed_multiplier is not None:
            h = h * self.embed_multiplier
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if isinstance(cache, (tuple, list)):  # legacy ((keys, values), ...) format
            legacy = getattr(DynamicCache, "from_legacy_cache", None)
            cache = legacy(cache) if legacy is not None else DynamicCache(cache)
        if use_cache and cache is None:
            cache = self.new_cache()
        if not use_cache:
            cache = None
        if cache is not None:
            used = getattr(cache, "_gqla_decode_path", None)
            if used is not None and used != path:
                raise ValueError(f"GQLA: this cache was filled on the {used!r} path, not {path!r}")
            cache._gqla_decode_path = path

        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is not None:  # transformers 4.x passes the queries' cache slots
            q_idx, q_end = cache_position.to(h.device), int(cache_position[-1]) + 1
        else:
            q_idx, q_end = torch.arange(past, past + t, device=h.device), past + t
        if position_ids is None:
            position_ids = q_idx[None].expand(b, t)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)
        if self._inv_freq is None or self._inv_freq.device != h.device:
            wide = torch.float32 if h.device.type == "mps" else torch.float64  # MPS has no float64
            self._inv_freq = self.config.rope_inv_freq.to(device=h.device, dtype=wide)
        angles = position_ids.to(self._inv_freq.dtype)[..., None] * self._inv_freq  # [B, T, d_R/2]
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)

        hidden_states = (h,) if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, cos, sin, q_idx, q_end, attention_mask, cache, path)
            if output_hidden_states:
                hidden_states += (h,)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states = hidden_states[:-1] + (h,)
        return BaseModelOutputWithPast(last_hidden_state=h, hidden_states=hidden_states, **{_CACHE_FIELD: cache})


class GQLAForCausalLM(GQLAPreTrainedModel, GenerationMixin):
    # Remote code: save_pretrained copies this file (and its config) and writes auto_map, on every
    # transformers version (4.45 does not set it when loading from a local folder).
    _auto_class = "AutoModelForCausalLM"
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: GQLAConfig):
        super().__init__(config)
        self.model = GQLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    # --- decoding path and cache accounting -------------------------------------------------

    @property
    def decode_path(self) -> str:
        return self.config.decode_path

    def set_decode_path(self, path: str) -> None:
        """Decode on ``"absorb"`` or ``"gqa"`` from now on (same weights; caches are not interchangeable)."""
        self.config.decode_path = path

    def kv_cache_values_per_token(self, path: str | None = None, per_layer: bool = False) -> int:
        """Cached values one token costs on ``path`` (default: the current path), summed over all
        layers unless ``per_layer``: absorb ``r + d_R``, gqa ``n_g (d_nope + d_R + d_v)`` per layer."""
        per = self.config.kv_cache_values_per_token(path)
        return per if per_layer else per * self.config.num_hidden_layers

    @staticmethod
    def cache_numel(cache) -> int:
        """Number of values a (dynamic) cache holds, all layers and sequences together."""
        if cache is None:
            return 0
        if isinstance(cache, (tuple, list)):  # legacy format: one (keys, values) pair per layer
            pairs = [tuple(pair[:2]) for pair in cache]
        elif hasattr(cache, "layers"):  # transformers >= 4.56
            pairs = [(layer.keys, layer.values) for layer in cache.layers]
        else:
            pairs = list(zip(cache.key_cache, cache.value_cache))
        return sum(t.numel() for pair in pairs for t in pair if isinstance(t, torch.Tensor))

    if _TRANSFORMERS_VERSION < (4, 46):
        # transformers 4.45's GenerationMixin has no generic input preparation; 4.46+ and 5.x do, and
        # their own version is used there.
        def prepare_inputs_for_generation(
            self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
            cache_position=None, position_ids=None, use_cache=True, **kwargs,
        ):
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            if cache_position is None:
                cache_position = torch.arange(past, input_ids.shape[1], device=input_ids.device)
            if past_key_values is not None and past > 0:
                input_ids = input_ids[:, -cache_position.shape[0]:]
            if attention_mask is not None and position_ids is None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                position_ids = position_ids[:, -input_ids.shape[1]:]
            if inputs_embeds is not None and past == 0:
                model_inputs = {"inputs_embeds": inputs_embeds, "input_ids": None}
            else:
                model_inputs = {"input_ids": input_ids.contiguous()}
            model_inputs.update(
                position_ids=position_ids, cache_position=cache_position, past_key_values=past_key_values,
                use_cache=use_cache, attention_mask=attention_mask,
            )
            for key in ("decode_path", "logits_to_keep", "num_logits_to_keep"):
                if key in kwargs:
                    model_inputs[key] = kwargs[key]
            return model_inputs

    # --- forward --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        decode_path: str | None = None,
        **kwargs,
    ):
        logits_to_keep = kwargs.pop("num_logits_to_keep", logits_to_keep)
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            decode_path=decode_path,
            cache=kwargs.pop("cache", None),
            cache_position=kwargs.pop("cache_position", None),
        )
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        spec = self.config.gqla_block()
        if spec["logits_divisor"] is not None:  # Granite's logits_scaling
            logits = logits / spec["logits_divisor"]
        cap = spec["final_softcap"]
        if cap is not None:  # Gemma2's final logit soft-cap
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        if return_dict is False:
            return out.to_tuple()
        return out


__all__ = ["GQLAForCausalLM", "GQLAModel", "GQLAPreTrainedModel"]
