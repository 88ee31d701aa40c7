"""What a model family is: its whole decoder block as data, and hooks for the quirks that need code.

A :class:`Block` names every weight of one checkpoint's decoder (embeddings, the per-layer norms, the
attention projections or a fused ``qkv_proj``, the MLP: dense gated, fused ``gate_up_proj`` or a
mixture of experts, the final norm, the head and its tie alias) and states every numeric convention
the reference decoders and the runtime need (norm weight ``w`` or ``1 + w``, embedding scale,
activation, softmax scale, logit soft-caps, per-layer sliding windows). It is plain data: the GQLA
checkpoint records it in ``config.json`` (``gqla.family``, :meth:`Block.record`) and the shipped
runtime rebuilds its modules from that record, so module names equal tensor names.

A :class:`Family` reads a source config into a Block and refuses, with one line, what it cannot
express (mergekit's architecture files are the data half, llama.cpp's converter classes the hooks).
Names in a Block are relative to the layer prefix ``model.layers.{layer}.`` unless they start with
``model.`` or ``lm_head``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import UnsupportedError

LAYER_PREFIX = "model.layers.{layer}."
MLP_KINDS = ("gated", "fused", "moe")


@dataclass(frozen=True)
class Mlp:
    """The feed-forward half of a block.

    * ``gated``: ``down(act(gate(x)) * up(x))`` with ``{module}.{gate,up,down}``;
    * ``fused``: ``gate_up`` holds ``[gate ; up]`` rows (Phi-3), split in half on use;
    * ``moe``: ``{module}.{router}`` scores ``n_experts`` experts, the ``top_k`` best run as gated MLPs
      ``{module}.{experts}.{e}.{gate,up,down}`` and are mixed with their softmax weights renormalized
      over the chosen ``top_k`` (Mixtral's routing).
    """

    kind: str = "gated"
    module: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None
    router: str | None = None
    experts: str | None = None
    n_experts: int = 0
    top_k: int = 0

    def weights(self, intermediate: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Every MLP weight (names relative to the layer prefix) and its ``[out, in]`` shape."""
        m, i, d = self.module, intermediate, hidden
        if self.kind == "fused":
            return {f"{m}.{self.gate_up}.weight": (2 * i, d), f"{m}.{self.down}.weight": (d, i)}
        if self.kind == "moe":
            out = {f"{m}.{self.router}.weight": (self.n_experts, d)}
            for e in range(self.n_experts):
                pre = f"{m}.{self.experts}.{e}."
                out.update({pre + f"{self.gate}.weight": (i, d), pre + f"{self.up}.weight": (i, d),
                            pre + f"{self.down}.weight": (d, i)})
            return out
        return {f"{m}.{self.gate}.weight": (i, d), f"{m}.{self.up}.weight": (i, d), f"{m}.{self.down}.weight": (d, i)}


@dataclass(frozen=True)
class Block:
    """One checkpoint's decoder as data (see the module docstring); built by :meth:`Family.block`."""

    family: str
    mlp: Mlp = field(default_factory=Mlp)
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    tie_embeddings: bool = False  # the head is the embedding (``head`` may be absent)
    attn_in: str = "input_layernorm"  # norm before attention
    attn_out: str | None = None  # norm of the attention output before the residual (Gemma2's sandwich)
    mlp_in: str = "post_attention_layernorm"  # norm before the MLP
    mlp_out: str | None = None  # norm of the MLP output before the residual
    qkv: str | None = None  # a fused q/k/v projection under ``self_attn.`` (Phi-3), rows [q ; k ; v]
    norm_offset: float = 0.0  # RMSNorm weight convention: ``w`` (0) or ``1 + w`` (1, computed in float32)
    embed_scale: bool = False  # embeddings times ``sqrt(hidden)``, rounded to the hidden dtype first
    activation: str = "silu"
    eps: float = 1e-6
    query_scalar: float | None = None  # softmax scale is ``query_scalar ** -0.5`` instead of ``head_dim ** -0.5``
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window (None: full attention)
    attention_scale: float | None = None  # the softmax scale itself (Granite's attention_multiplier)
    embed_multiplier: float | None = None  # embeddings times this (Granite)
    residual_multiplier: float | None = None  # attention and MLP outputs times this before the residual (Granite)
    logits_divisor: float | None = None  # logits divided by this (Granite's logits_scaling)

    def norms(self) -> tuple[str, ...]:
        """The per-layer norms, in the order the block applies them."""
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if layer < len(self.layer_windows) else None

    def copied_weights(self, n_layers: int, vocab: int, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
        """Every weight outside attention (full names) and its shape: what convert copies byte for byte.
        The head is listed unless tied."""
        out: dict[str, tuple[int, ...]] = {self.embed: (vocab, hidden), self.final_norm: (hidden,)}
        if not self.tie_embeddings:
            out[self.head] = (vocab, hidden)
        for layer in range(n_layers):
            pre = LAYER_PREFIX.format(layer=layer)
            out.update({pre + n + ".weight": (hidden,) for n in self.norms()})
            out.update({pre + n: s for n, s in self.mlp.weights(intermediate, hidden).items()})
        return out

    def beyond_llama(self) -> list[str]:
        """What this block has (phrases that follow "has") that a Llama-shaped stock target
        (DeepSeek-V3's dense block, MiMo-V2's) cannot carry, in words; empty for Llama, Mistral and Qwen2."""
        found = []
        if self.attn_softcap is not None:
            found.append(f"attention-logit soft-capping ({self.attn_softcap:g})")
        if self.final_softcap is not None:
            found.append(f"final logit soft-capping ({self.final_softcap:g})")
        if self.attn_out or self.mlp_out:
            found.append("sandwich norms (" + ", ".join(n for n in (self.attn_out, self.mlp_out) if n) + ")")
        if self.norm_offset:
            found.append(f"RMSNorm weights of the form {self.norm_offset:g} + w")
        if self.embed_scale:
            found.append("embeddings scaled by sqrt(hidden_size)")
        if self.mlp.kind == "moe":
            found.append(f"a mixture of {self.mlp.n_experts} experts with softmax top-{self.mlp.top_k} routing")
        if self.mlp.kind == "fused":
            found.append(f"a fused {self.mlp.gate_up}")
        for name, words in (("embed_multiplier", "an embedding multiplier"),
                            ("residual_multiplier", "a residual multiplier"),
                            ("logits_divisor", "a logits divisor")):
            if getattr(self, name) is not None:
                found.append(f"{words} ({getattr(self, name):g})")
        return found

    def record(self) -> dict[str, Any]:
        """The JSON record a GQLA ``config.json`` keeps as ``gqla.family`` (the runtime reads it)."""
        rec = asdict(self)
        rec["name"] = rec.pop("family")
        rec["layer_windows"] = list(self.layer_windows)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Block":
        rec = dict(rec)
        mlp = Mlp(**rec.pop("mlp"))
        windows = tuple(rec.pop("layer_windows", ()) or ())
        return cls(family=rec.pop("name"), mlp=mlp, layer_windows=windows, **rec)


def layer_windows(config: dict[str, Any]) -> tuple[int | None, ...]:
    """Per-layer sliding windows: ``sliding_window`` where it is set and not switched off
    (``use_sliding_window: false``), on the layers ``layer_types`` marks ``sliding_attention`` (all
    layers when there is no ``layer_types``)."""
    n = int(config.get("num_hidden_layers") or 0)
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return (None,) * n
    types = config.get("layer_types")
    return tuple(None if types is not None and i < len(types) and types[i] != "sliding_attention" else int(window)
                 for i in range(n))


@dataclass(frozen=True)
class Family:
    """A model family: the architectures it reads, its block (data) and its hooks.

    Subclasses override :meth:`block_settings` (the config-dependent part of the block) and
    :meth:`refuse` (one-line refusals); the data fields cover the rest.
    """

    name: str
    architectures: tuple[str, ...]
    qkv_bias: bool | None  # None: read the config's ``attention_bias``
    block_template: Block | None = None  # names and fixed conventions; None: Llama's
    activation_key: str = "hidden_act"
    # Tensor-name fragments whose presence means a feature GQLA cannot express (e.g. per-head q/k norms).
    refused_tensors: tuple[str, ...] = ("self_attn.q_norm", "self_attn.k_norm")
    layer_prefix: str = LAYER_PREFIX
    attention_names: dict[str, str] = field(
        default_factory=lambda: {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                 "o": "self_attn.o_proj"}
    )

    # -- hooks ------------------------------------------------------------------------------------

    def refuse(self, config: dict[str, Any]) -> None:
        """Raise UnsupportedError (one line) for a config this family cannot convert exactly."""
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                raise UnsupportedError(f"config.json: '{key}' is not supported by the {self.name} family")

    def block_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        """Config-dependent block fields (beyond the template): MoE sizes, soft-caps, ..."""
        return {}

    def split_qkv(self, fused, n_heads: int, n_groups: int, head_dim: int):
        """``(q, k, v)`` row blocks of a fused ``[q ; k ; v]`` projection (weight or bias)."""
        q, k = n_heads * head_dim, n_groups * head_dim
        return fused[:q], fused[q:q + k], fused[q + k:q + 2 * k]

    # -- data -------------------------------------------------------------------------------------

    def block(self, config: dict[str, Any]) -> Block:
        """This family's block for ``config`` (read once; every consumer takes names from it)."""
        template = self.block_template or Block(family=self.name)
        return replace(
            template,
            family=self.name,
            tie_embeddings=bool(config.get("tie_word_embeddings", template.tie_embeddings)),
            activation=str(config.get(self.activation_key) or template.activation),
            eps=float(config.get("rms_norm_eps", template.eps)),
            layer_windows=layer_windows(config),
            **self.block_settings(config),
        )

    @property
    def fused_qkv(self) -> str | None:
        return self.block_template.qkv if self.block_template else None

    def has_qkv_bias(self, config: dict[str, Any]) -> bool:
        return bool(config.get("attention_bias", False)) if self.qkv_bias is None else self.qkv_bias

    def tensor(self, layer: int, part: str, kind: str = "weight") -> str:
        """Full tensor name, e.g. ``tensor(3, "q")`` -> ``model.layers.3.self_attn.q_proj.weight``; a
        fused family answers its ``qkv_proj`` for ``q``, ``k`` and ``v``."""
        if part in ("q", "k", "v") and self.fused_qkv:
            return f"{self.attention_prefix(layer)}{self.fused_qkv}.{kind}"
        return f"{self.layer_prefix.format(layer=layer)}{self.attention_names[part]}.{kind}"

    def source_attention(self, layer: int, bias: bool) -> list[str]:
        """The source tensors conversion replaces in ``layer`` (q/k/v, or the fused projection)."""
        kinds = ("weight", "bias") if bias else ("weight",)
        return sorted({self.tensor(layer, p, k) for p in ("q", "k", "v") for k in kinds})

    def norm(self, layer: int) -> str:
        """The norm in front of attention (its weight is the data-free input statistic)."""
        name = (self.block_template or Block(family=self.name)).attn_in
        return f"{self.layer_prefix.format(layer=layer)}{name}.weight"

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layer_prefix.format(layer=layer)}self_attn."
