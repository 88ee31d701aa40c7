"""The reference check every export runs on what it wrote, before DST is committed.

Reference: :class:`~transgqla.model.decoder.GQLADecoder` on OUT (absorb path, float32). Candidate:

* ``gqla`` format: ``GQLADecoder`` on DST's tensors, on the exported decode path;
* ``gqla`` format with ``--fold-kv``: :class:`FoldedGQADecoder`, a plain grouped-query attention that uses
  only DST's folded ``q_proj``/``k_proj``/``v_proj``/``o_proj``;
* ``deepseek`` format: stock ``transformers.DeepseekV3ForCausalLM.from_pretrained(DST)`` (no remote code).

Three modes (``--check``):

* ``manifest`` (byte-identical exports, ``--format gqla`` without ``--fold-kv``): every weight file of DST is
  hashed from disk and must equal OUT's manifest (or OUT's file); no model is loaded.
* ``layerwise`` (rewritten exports of models above :data:`FULL_CHECK_BYTES` in float32, or on request):
  :mod:`.layerwise`, one layer of each side in memory at a time, every layer, cached decode per layer.
* ``full`` (rewritten exports of small models, or on request): both whole models, as below.

Full mode is measured on a fixed prompt (OUT's tokenizer and :data:`~transgqla.text.pipeline.PROMPT`, else fixed ids):
the prompt followed by the reference's ``GREEDY_TOKENS`` greedy tokens is scored teacher-forced by both
models, giving the max absolute and the relative (Frobenius) logit error over every position; and each
model generates ``GREEDY_TOKENS`` greedy tokens with its own KV cache, which are compared. The check
passes when the relative error is within the tolerance (:func:`tolerance_for`) and the greedy tokens agree
(:func:`tokens_must_match`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError, UnsupportedError
from ..io import SafetensorsCheckpoint, sha256_file
from ..mathx.rope import cos_sin, interleaved_layout
from ..model.attention import KVCache, _softmax, causal_mask
from ..model.decoder import Decoder, GQLADecoder
from ..model.geometry import GQLAGeometry
from ..text.pipeline import PROMPT, encode, find_tokenizer, fixed_ids

GREEDY_TOKENS = 16
FIXED_PROMPT = 8
#: Relative logit tolerance by the checkpoint's storage dtype (both sides compute in float32) for exports
#: that write GQLA's own weights (byte copies, replicated blocks, pinned norms): float32 rounding only.
TOLERANCES = {"F32": 1e-4, "F64": 1e-4, "BF16": 5e-3, "F16": 2e-3}
#: ... and for exports whose new weights are products rounded to the checkpoint dtype (``--fold-kv``):
#: a half-precision fold moves the logits by about the dtype's rounding (~1e-3 measured, tiny bf16 models).
REROUNDED_TOLERANCES = {"F32": 1e-4, "F64": 1e-4, "BF16": 2e-2, "F16": 5e-3}
HALF = ("BF16", "F16")
#: Above this many float32 bytes of OUT, ``--check auto`` runs layer by layer (the demo, 135M: full).
FULL_CHECK_BYTES = 2 * 1024**3
CHECK_MODES = ("auto", "full", "layerwise")


def tolerance_for(safetensors_dtype: str, rerounded: bool = False) -> float:
    table = REROUNDED_TOLERANCES if rerounded else TOLERANCES
    return table.get(safetensors_dtype, 2e-2)


def tokens_must_match(safetensors_dtype: str, rerounded: bool = False) -> bool:
    """Greedy tokens gate the check unless the export re-rounds weights to half precision, where a
    near-tie may legitimately flip (then the tokens are reported only)."""
    return not (rerounded and safetensors_dtype in HALF)


class FoldedGQADecoder(Decoder):
    """A ``--fold-kv`` export run as ordinary grouped-query attention.

    Per layer: ``q = q_proj x`` (``n_h`` heads of ``d_nope + d_R``), ``k = k_proj x`` (``n_g`` heads of
    ``d_nope + d_R``), ``v = v_proj x`` (``n_g`` heads of ``d_v``); the last ``d_R`` dims of every q and k
    head are interleaved RoPE pairs rotating at ``base^(-2p/d_R)`` (with the rope scaling); head ``h`` reads
    KV head ``h // (n_h / n_g)``; softmax scale ``1/sqrt(d_nope + d_R)``. Nothing of GQLA's latent is used.
    """

    cache_path = "folded"

    def _geometry(self, config):
        return GQLAGeometry.from_config(config)

    def _attention(self, x, p, positions, cache: KVCache, layer, geo=None):
        geo = geo or self.geo  # the layer's geometry (its sliding window)
        b, t, _ = x.shape
        dq = geo.d_nope + geo.d_rope
        cos, sin = cos_sin(geo.freqs, positions, dtype=x.dtype)

        def heads(name: str, n: int, d: int) -> torch.Tensor:
            y = torch.nn.functional.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
            return y.view(b, t, n, d).transpose(1, 2)

        def rope(z: torch.Tensor) -> torch.Tensor:
            return torch.cat((z[..., : geo.d_nope], interleaved_layout(z[..., geo.d_nope :], cos, sin)), dim=-1)

        q = rope(heads("q_proj", geo.n_heads, dq))
        k = rope(heads("k_proj", geo.n_groups, dq))
        v = heads("v_proj", geo.n_groups, geo.d_v)
        k_all, v_all = cache.extend(layer, k, v)
        m = geo.heads_per_group
        scores = q @ k_all.repeat_interleave(m, dim=1).transpose(2, 3) * geo.softmax_scale
        if geo.softcap is not None:  # the family's attention-logit soft-cap (Gemma2)
            scores = torch.tanh(scores / geo.softcap) * geo.softcap
        probs = _softmax(scores, causal_mask(positions, k_all.shape[2], geo.sliding_window))
        out = (probs @ v_all.repeat_interleave(m, dim=1)).transpose(1, 2).reshape(b, t, geo.n_heads * geo.d_v)
        return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))


@dataclass
class CheckResult:
    reference: str
    candidate: str
    prompt_tokens: int
    prompt_source: str
    max_abs_error: float
    rel_error: float
    tolerance: float
    tokens_reference: list[int]
    tokens_candidate: list[int]
    tokens_required: bool = True
    notes: list[str] = field(default_factory=list)
    mode: str = "full"  # full | layerwise | manifest
    per_layer: list[float] = field(default_factory=list)  # layerwise: relative hidden-state error after each layer

    @property
    def tokens_equal(self) -> bool:
        return self.tokens_reference == self.tokens_candidate

    @property
    def tokens_matched(self) -> int:
        """Leading greedy tokens on which the two models agree."""
        n = 0
        for a, b in zip(self.tokens_reference, self.tokens_candidate):
            if a != b:
                break
            n += 1
        return n

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance and (self.tokens_equal or not self.tokens_required)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reference": self.reference,
            "candidate": self.candidate,
            "prompt": {"tokens": self.prompt_tokens, "source": self.prompt_source},
            "max_abs_logit_error": self.max_abs_error,
            "rel_logit_error": self.rel_error,
            "tolerance": self.tolerance,
            "greedy_tokens": len(self.tokens_reference),
            "greedy_tokens_equal": self.tokens_equal,
            "greedy_tokens_matched": self.tokens_matched,
            "greedy_tokens_required": self.tokens_required,
            "tokens_reference": self.tokens_reference,
            "tokens_candidate": self.tokens_candidate,
            "notes": self.notes,
            "mode": self.mode,
            "per_layer_rel_error": self.per_layer,
        }


def prompt_ids(folder: Path, vocab: int) -> tuple[torch.Tensor, str]:
    """``[1, T]`` ids: the fixed prompt through ``folder``'s tokenizer, else fixed pseudo-random ids."""
    tok = find_tokenizer(folder)
    ids = encode(tok, PROMPT, vocab) if tok is not None else []
    if len(ids) >= 2:
        return torch.tensor(ids)[None], "tokenized prompt"
    return torch.tensor(fixed_ids(FIXED_PROMPT, vocab))[None], "fixed token ids (no tokenizer)"


def load_all(folder: Path, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    with SafetensorsCheckpoint(folder) as ckpt:
        return {n: ckpt.read(n).to(device=device, dtype=dtype) for n in ckpt.names}


@torch.no_grad()
def _decoder_outputs(dec: Decoder, ids: torch.Tensor, path: str, n: int, scored: torch.Tensor | None):
    """(greedy tokens after ``ids``, logits of ``scored`` [or ids + greedy tokens] teacher-forced)."""
    tokens = dec.generate(ids.to(dec.device), n, path)[0, ids.shape[1]:].tolist()
    seq = scored if scored is not None else torch.cat((ids, torch.tensor(tokens)[None]), dim=1)
    logits = dec.forward(seq.to(dec.device), dec.new_cache(path))
    return tokens, logits.float().cpu()


def reference_outputs(out: Path, config: dict, ids: torch.Tensor, device="cpu", n: int = GREEDY_TOKENS):
    """GQLADecoder on OUT (absorb path, float32): (greedy tokens, teacher-forced logits of ids + tokens)."""
    dec = GQLADecoder(config, load_all(out, device=device), dtype=torch.float32, device=device)
    tokens, logits = _decoder_outputs(dec, ids, "absorb", n, None)
    return tokens, logits


@dataclass
class Candidate:
    """How to run an export: the whole model (``full``) or one layer at a time (``layers``)."""

    label: str
    full: Callable  # (dst, config, ids, scored, device) -> (greedy tokens, logits)
    layers: Callable  # (dst, config, device) -> an object with .block(layer, h), .ckpt, .eps, .close()


def decoder_candidate(cls: type[Decoder], path: str, label: str) -> Candidate:
    def run(dst: Path, config: dict, ids: torch.Tensor, scored: torch.Tensor, device="cpu", n: int = GREEDY_TOKENS):
        dec = cls(config, load_all(dst, device=device), dtype=torch.float32, device=device)
        return _decoder_outputs(dec, ids, path, n, scored)

    def layers(dst: Path, config: dict, device="cpu"):
        from .layerwise import GQLALayers

        return GQLALayers(dst, config, cls, path, device, cached=True)

    return Candidate(label, run, layers)


def stock_candidate(class_name: str) -> Candidate:
    """A candidate run by a stock transformers class (float32, no remote code): ``generate()`` tokens and logits."""

    @torch.no_grad()
    def run(dst: Path, config: dict, ids: torch.Tensor, scored: torch.Tensor, device="cpu", n: int = GREEDY_TOKENS):
        import transformers
        from transformers import GenerationConfig

        cls = getattr(transformers, class_name)
        hf_log = transformers.utils.logging
        verbosity, bars = hf_log.get_verbosity(), hf_log.is_progress_bar_enabled()
        hf_log.set_verbosity_error()
        hf_log.disable_progress_bar()
        try:
            model, info = cls.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
        finally:
            hf_log.set_verbosity(verbosity)
            if bars:
                hf_log.enable_progress_bar()
        missing = [k for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(kind, [])]
        if missing:
            raise UnsupportedError(f"stock {class_name} does not load every tensor of the export: "
                                   f"{sorted(missing)[:4]}")
        model = model.to(device).eval()
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n,
                               eos_token_id=None, pad_token_id=0, bos_token_id=None)
        ids_d = ids.to(device)
        generated = model.generate(ids_d, attention_mask=torch.ones_like(ids_d), generation_config=gen)
        tokens = generated[0, ids.shape[1]:].tolist()
        logits = model(scored.to(device), use_cache=False).logits.float().cpu()
        return tokens, logits

    def layers(dst: Path, config: dict, device="cpu"):
        from .layerwise import StockLayers

        return StockLayers(dst, class_name, device)

    return Candidate(f"stock transformers {class_name} on DST (float32)", run, layers)


deepseek_candidate = stock_candidate("DeepseekV3ForCausalLM")
mimo_candidate = stock_candidate("MiMoV2FlashForCausalLM")


def compare(ref_tokens, ref_logits, cand_tokens, cand_logits, *, reference, candidate, prompt_len, how,
            tolerance) -> CheckResult:
    a, b = cand_logits.double(), ref_logits.double()
    diff = a - b
    rel = float(diff.norm() / b.norm().clamp_min(1e-30))
    return CheckResult(reference, candidate, prompt_len, how, float(diff.abs().max()), rel, tolerance,
                       list(ref_tokens), list(cand_tokens))


def float32_bytes(folder: Path) -> int:
    with SafetensorsCheckpoint(folder) as ckpt:
        return sum(4 * math.prod(ckpt.spec(n).shape) for n in ckpt.names)


def resolve_mode(mode: str, out: Path) -> str:
    if mode not in CHECK_MODES:
        raise InputError(f"--check must be one of {', '.join(CHECK_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "full" if float32_bytes(out) <= FULL_CHECK_BYTES else "layerwise"


def run_check(out: Path, out_config: dict, dst: Path, dst_config: dict, candidate: Candidate,
              tolerance: float, device="cpu", tokens_required: bool = True, mode: str = "auto") -> CheckResult:
    """The reference check of a rewritten export, whole-model or layer by layer (``mode``)."""
    reference = "GQLADecoder on OUT (absorb, float32)"
    ids, how = prompt_ids(out, int(out_config["vocab_size"]))
    if resolve_mode(mode, out) == "layerwise":
        return _layerwise_check(out, out_config, dst, dst_config, candidate, tolerance, device, ids, how)
    ref_tokens, ref_logits = reference_outputs(out, out_config, ids, device)
    scored = torch.cat((ids, torch.tensor(ref_tokens)[None]), dim=1)
    cand_tokens, cand_logits = candidate.full(dst, dst_config, ids, scored, device)
    result = compare(ref_tokens, ref_logits, cand_tokens, cand_logits, reference=reference,
                     candidate=candidate.label, prompt_len=ids.shape[1], how=how, tolerance=tolerance)
    result.tokens_required = tokens_required
    return result


def _layerwise_check(out, out_config, dst, dst_config, candidate: Candidate, tolerance, device, ids,
                     how) -> CheckResult:
    from .layerwise import head_bytes_equal, layerwise_outputs, reference_layers

    ref = reference_layers(out, out_config, device)
    cand = candidate.layers(dst, dst_config, device)
    try:
        n_layers = int(out_config["num_hidden_layers"])
        ref_h, cand_h, per_layer = layerwise_outputs(ref, cand, ids, n_layers)
        head_ok = head_bytes_equal(ref.ckpt, cand.ckpt)
    finally:
        ref.close()
        cand.close()
    diff = cand_h.double() - ref_h.double()
    rel = float(diff.norm() / ref_h.double().norm().clamp_min(1e-30))
    notes = [f"layer by layer over all {n_layers} layers: final-norm hidden states of the prompt compared "
             f"(candidate: cached prefill of T - 1 tokens + 1 decode step per layer); no greedy tokens"]
    if head_ok:
        notes.append("lm_head bytes equal OUT's")
    else:
        notes.append("lm_head bytes differ from OUT's")
        rel = float("inf")
    return CheckResult("GQLADecoder on OUT, layer by layer (absorb, float32)", candidate.label + ", layer by layer",
                       ids.shape[1], how, float(diff.abs().max()), rel, tolerance, [], [], True, notes,
                       mode="layerwise", per_layer=per_layer)


def manifest_check(out: Path, dst: Path, manifest_name: str, weight_files: list[str]) -> CheckResult:
    """Byte-identical export: DST's weight files, hashed from disk, against OUT's manifest (or OUT's files)."""
    try:
        listed = json.loads((out / manifest_name).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    listed = listed if isinstance(listed, dict) else {}
    bad = [name for name in weight_files if sha256_file(dst / name) != (listed.get(name) or sha256_file(out / name))]
    rel = 0.0 if not bad else float("inf")
    notes = [f"sha256 of {len(weight_files)} weight files from disk equal OUT's" if not bad
             else f"sha256 differs from OUT's: {', '.join(bad[:4])}"]
    return CheckResult("OUT's manifest (sha256)", "DST's weight files (sha256 from disk)", 0, "no model run",
                       0.0, rel, 0.0 if not bad else -1.0, [], [], True, notes, mode="manifest")
