"""The Hugging Face remote code shipped inside GQLA checkpoints (transgqla/hf_remote).

Tiny random Llama / Qwen2 / Mistral sources are written with stock transformers, converted, and the
two remote-code files are copied next to the weights. ``AutoModelForCausalLM`` with
``trust_remote_code`` must then reproduce the plain-torch reference decoder (``GQLADecoder``) on both
decoding paths, generate the same greedy tokens, and hold exactly the advertised KV cache.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from transgqla.convert import ConvertRequest, convert  # noqa: E402
from transgqla.mathx.rope import inv_freq, rope_settings  # noqa: E402
from transgqla.model.decoder import GQLADecoder  # noqa: E402

REMOTE_DIR = Path(__file__).resolve().parents[1] / "transgqla" / "hf_remote"
REMOTE_FILES = ("configuration_gqla.py", "modeling_gqla.py")
PATHS = ("absorb", "gqa")
VOCAB = 101
RANK, D_ROPE = 32, 8
MISTRAL_WINDOW = 6
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _write_source(folder: Path, family: str) -> None:
    """A random 2-layer GQA model (4 query heads, 2 KV groups, head dim 16), sharded on disk."""
    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": MISTRAL_WINDOW}),
    }
    cfg_name, model_name, extra = names[family]
    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[family])
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra,
    )
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # transformers initializes biases to zero, which would hide bias bugs
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size="24KB")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> converted GQLA checkpoint folder with the remote code beside the weights."""
    root = tmp_path_factory.mktemp("hf_remote")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            src, out = root / f"{family}-src", root / f"{family}-gqla"
            _write_source(src, family)
            convert(ConvertRequest(source=str(src), out=out, kv_lora_rank=RANK, qk_rope_dim=D_ROPE))
            for name in REMOTE_FILES:
                shutil.copy(REMOTE_DIR / name, out / name)
            made[family] = out
        return made[family]

    return get


def _reference(folder: Path) -> GQLADecoder:
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return GQLADecoder(config, tensors, dtype=torch.float32)


def _load(folder: Path, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **{DTYPE_KW: torch.float32}, **kw).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cache_of(output):
    return output.get("cache", None) if "cache" in output else output.get("past_key_values", None)


def _prompt(batch: int = 2, length: int = 7, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- 1. logits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("path", PATHS)
def test_logits_match_reference_decoder(checkpoints, family, path):
    folder = checkpoints(family)
    model, ref = _load(folder, decode_path=path), _reference(folder)
    assert model.config.decode_path == path
    ids = _prompt(length=9)
    with torch.no_grad():
        logits = model(ids).logits
    assert _rel(logits, ref.forward(ids, ref.new_cache(path))) < 1e-5

    # Prefill, then decode with the model's own cache: one token (s_q = 1), then two (s_q = 2).
    full = ref.forward(ids, ref.new_cache(path))
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        got = [out.logits]
        for chunk in (ids[:, 5:6], ids[:, 6:8], ids[:, 8:9]):
            out = model(chunk, past_key_values=_cache_of(out), use_cache=True)
            got.append(out.logits)
    assert _rel(torch.cat(got, dim=1), full) < 1e-5


def test_paths_agree_on_logits(checkpoints):
    folder = checkpoints("qwen2")
    ids = _prompt(length=11)
    with torch.no_grad():
        a, g = (_load(folder, decode_path=p)(ids).logits for p in PATHS)
    assert _rel(a, g) < 1e-5


# --- 2. generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_generate_matches_reference_on_both_paths(checkpoints, family):
    folder = checkpoints(family)
    ref = _reference(folder)
    ids = _prompt(batch=2, length=5)  # mistral: 5 + 8 tokens overrun its sliding window of 6
    tokens = {}
    for path in PATHS:
        model = _load(folder, decode_path=path)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True,
            pad_token_id=0,
        )
        tokens[path] = out.tolist()
        assert tokens[path] == ref.generate(ids, 8, path).tolist(), path
    assert tokens["absorb"] == tokens["gqa"]
    assert len(tokens["gqa"][0]) == 5 + 8


@pytest.mark.parametrize("path", PATHS)
def test_left_padded_batch_generates_like_single_rows(checkpoints, path):
    model = _load(checkpoints("llama"), decode_path=path)
    long, short = _prompt(1, 9, seed=1), _prompt(1, 5, seed=2)
    alone = [model.generate(p, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist() for p in (long, short)]
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert batched[0].tolist() == alone[0]
    assert batched[1, 4:].tolist() == alone[1]


# --- 3. the cache -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("path", PATHS)
def test_cache_holds_exactly_the_path_layout(checkpoints, family, path):
    folder = checkpoints(family)
    model = _load(folder, decode_path=path)
    cfg = model.config
    layers, n_g = cfg.num_hidden_layers, cfg.num_key_value_heads
    d_nope, d_r, d_v, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    prompt, new = 6, 8
    out = model.generate(
        _prompt(1, prompt), attention_mask=torch.ones(1, prompt, dtype=torch.long), max_new_tokens=new,
        do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=0,
    )
    cache = _cache_of(out)
    tokens = prompt + new - 1  # the last generated token is never fed back
    per_token = r + d_r if path == "absorb" else n_g * (d_nope + d_r + d_v)
    assert model.cache_numel(cache) == layers * tokens * per_token
    assert model.kv_cache_values_per_token() == layers * per_token
    assert model.kv_cache_values_per_token(per_layer=True) == cfg.gqla["cache_values_per_token"][path]

    if hasattr(cache, "layers"):
        held = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        held = list(zip(cache.key_cache, cache.value_cache))
    else:
        held = [tuple(pair) for pair in cache]
    assert len(held) == layers
    expect = ((1, 1, tokens, r), (1, 1, tokens, d_r)) if path == "absorb" else (
        (1, n_g, tokens, d_nope + d_r), (1, n_g, tokens, d_v))
    for keys, values in held:
        assert (tuple(keys.shape), tuple(values.shape)) == expect


def test_absorb_cache_is_the_smaller_one(checkpoints):
    model = _load(checkpoints("llama"))
    assert model.kv_cache_values_per_token("absorb") < model.kv_cache_values_per_token("gqa")


# --- choosing the path, config round trip -----------------------------------------------------------------


def test_decode_path_default_override_and_errors(checkpoints, tmp_path):
    folder = checkpoints("llama")
    stored = json.loads((folder / "config.json").read_text())["gqla"]["decode_path"]
    assert _load(folder).config.decode_path == stored
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True, decode_path="gqa").decode_path == "gqa"

    model = _load(folder, decode_path="gqa")
    ids = _prompt(1, 4)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        model.set_decode_path("absorb")
        assert model.config.gqla["decode_path"] == "absorb"
        with pytest.raises(ValueError, match="filled on the 'gqa' path"):
            model(ids[:, :1], past_key_values=_cache_of(out), use_cache=True)
        gqa_logits = model(ids, decode_path="gqa").logits  # per-call override
        assert _rel(gqa_logits, model(ids).logits) < 1e-5
    with pytest.raises(ValueError, match="unknown decode path"):
        model.set_decode_path("mla")

    model.set_decode_path("gqa")
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["gqla"]["decode_path"] == "gqa" and "decode_path" not in saved
    assert saved["model_type"] == "gqla" and saved["kv_lora_rank"] == RANK
    assert _load(tmp_path / "resaved").config.decode_path == "gqa"


# --- RoPE frequencies and self-containment --------------------------------------------------------------


ROPE_CONFIGS = [
    {"rope_theta": 500000.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
]


@pytest.mark.parametrize("rope", ROPE_CONFIGS)
def test_rope_frequencies_match_the_converter(rope):
    from transgqla.hf_remote.configuration_gqla import GQLAConfig

    cfg = GQLAConfig(num_attention_heads=4, num_key_value_heads=2, qk_rope_head_dim=64, **rope)
    base, scaling = rope_settings(rope)
    expect = inv_freq(64, base, scaling)
    assert torch.equal(cfg.rope_inv_freq, expect)
    again = GQLAConfig.from_dict(cfg.to_dict())
    assert torch.equal(again.rope_inv_freq, expect)


def test_remote_files_import_only_torch_and_transformers():
    for name in REMOTE_FILES:
        tree = ast.parse((REMOTE_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling configuration module
                    assert node.module == "configuration_gqla", (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers", "__future__", "math", "dataclasses", "typing"}, (name, roots)
