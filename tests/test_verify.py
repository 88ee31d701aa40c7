"""``transgqla verify``: a good checkpoint passes, and each planted fault is caught by the check meant
to catch it (and, where the fault is invisible to the others, by that check alone).

Faults are planted with the real ``safetensors`` library; where a fault must get past the manifest,
the manifest is re-hashed so that only the targeted check can see it.
"""

from __future__ import annotations

import json
import math
import shutil
import string
from pathlib import Path

import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from transgqla import hf_remote
from transgqla.cli.verify_cmd import register
from transgqla.format import AUTO_MAP, MANIFEST, REMOTE_CODE
from transgqla.io import sha256_file
from transgqla.mathx.rope import interleaved_to_half
from transgqla.verify import FidelityBounds, run_verify

from helpers import run_convert

runner = CliRunner()
FAST = dict(tokens=4, seqlen=32, device="cpu")


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def _root() -> None:  # a group, so that "verify" is a subcommand as in the real app
        pass

    register(app)
    return app


def invoke(*args):
    return runner.invoke(_app(), ["verify", *[str(a) for a in args]], env={"COLUMNS": "240"})


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


# -- fault planting -------------------------------------------------------------------------------


def shard_of(out: Path, name: str) -> Path:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][name]


def refresh_manifest(out: Path, *files: str) -> None:
    """Re-hash ``files`` in the manifest (adding them if new): the fault gets past the hash check."""
    path = out / MANIFEST
    doc = json.loads(path.read_text())
    for f in files:
        doc["files"][f] = sha256_file(out / f)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def rewrite_tensor(out: Path, name: str, fn, rehash: bool = True) -> None:
    """Replace tensor ``name`` by ``fn(tensor)`` by rewriting its shard with safetensors."""
    shard = shard_of(out, name)
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name].clone()).contiguous()
    save_file(tensors, shard, metadata=meta)
    if rehash:
        refresh_manifest(out, shard.name)


def flip_byte(path: Path, offset_in_data: int = 5) -> None:
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + offset_in_data] ^= 0x01  # a low mantissa bit: the value stays finite
    path.write_bytes(bytes(raw))


def write_char_tokenizer(out: Path) -> None:
    """A character-level tokenizer.json (fits the tiny models' vocabulary of 101), added to the manifest."""
    from tokenizers import Tokenizer, models

    chars = ["<unk>"] + list(string.ascii_letters + string.digits + " .,;:!?'\"()-\n")
    bpe = models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>")
    Tokenizer(bpe).save(str(out / "tokenizer.json"))
    refresh_manifest(out, "tokenizer.json")


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture
def lossy(source_factory, tmp_path):
    """A typical lossy conversion, split over several shards."""
    src, _ = source_factory("llama", n_kv=2, n_heads=4, head_dim=16, hidden=64)
    out = tmp_path / "out"
    run_convert(src, out, kv_lora_rank=24, qk_rope_dim=8, max_shard_bytes=100_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    return src, out


@pytest.fixture
def exact(source_factory, tmp_path):
    """A conversion that is exact (groups share keys, all RoPE kept, full rank): fidelity errors ~1e-7,
    so any planted fault in the attention weights stands out against a tight bound."""
    src, _ = source_factory("llama", n_kv=2, n_heads=4, head_dim=16, shared_keys=True)
    out = tmp_path / "exact"
    run_convert(src, out, qk_rope_dim=16, freqfold="1", kv_lora_rank=2 * 2 * 16 - 16)
    return src, out


TIGHT = FidelityBounds(max_attn_error=1e-3)


def names(checks) -> list[str]:
    return [c.name for c in checks]


# -- a good checkpoint ------------------------------------------------------------------------------


def test_converted_checkpoint_verifies(lossy):
    src, out = lossy
    r = invoke(out, "--json", "--tokens", 4, "--seqlen", 32, "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["failed"] == []
    got = {c["name"]: c for c in doc["checks"]}
    for name in ("structure.config", "structure.shards", "structure.tensors", "structure.finite", "structure.manifest",
                 "paths.equivalence", "fidelity.attention", "fidelity.kl", "fidelity.top1", "decode.tokens",
                 "decode.cache_bytes"):
        assert name in got, name
        assert set(got[name]) >= {"name", "ok", "value", "threshold", "message"}
    assert got["paths.equivalence"]["value"] < 1e-5 and got["paths.equivalence"]["threshold"] == 1e-5
    # the source was found through config.json's gqla.source; lossy, so the figures are non-zero
    assert doc["source"] == str(src) and 0 < got["fidelity.attention"]["value"] < 1
    assert got["fidelity.attention"]["status"] == "info"  # reported, not judged, without a bound
    assert got["decode.cache_bytes"]["value"] == (24 + 8) * 4 == got["decode.cache_bytes"]["threshold"]
    assert got["decode.cache_bytes"]["details"]["source_gqa"] == 2 * 2 * 16 * 4


def test_table_output(lossy):
    _, out = lossy
    r = invoke(out, "--tokens", 2, "--checks", "structure,paths,decode", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "all 10 checks passed" in r.stdout
    for name in ("structure.manifest", "paths.equivalence", "decode.cache_bytes"):
        assert name in r.stdout
    assert r.stderr == ""


def test_exact_conversion_meets_tight_fidelity_bounds(exact):
    src, out = exact
    bounds = FidelityBounds(max_attn_error=1e-3, max_kl=1e-6, min_top1=1.0)
    report = run_verify(out, source=str(src), bounds=bounds, **FAST)
    assert report.ok, [(c.name, c.value, c.message) for c in report.failed()]
    assert report.get("fidelity.attention").value < 1e-4


# -- each fault caught ----------------------------------------------------------------------------


def test_wrong_shape_caught_by_shape_check_only(lossy):
    _, out = lossy
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    rewrite_tensor(out, name, lambda t: t.t())  # same bytes count, headers valid, manifest re-hashed
    report = run_verify(out, **FAST)
    assert names(report.failed()) == ["structure.tensors"]
    assert name in report.get("structure.tensors").message and "[24, 64]" in report.get("structure.tensors").message
    assert report.get("structure.manifest").ok and report.get("structure.finite").ok
    for skipped_check in ("paths.equivalence", "fidelity.source", "decode.tokens"):
        assert report.get(skipped_check).ok is None  # the weights cannot be run

    r = invoke(out, "--json", "--device", "cpu")
    assert r.exit_code == 5
    assert json.loads(r.stdout)["failed"] == ["structure.tensors"]  # the report is still printed
    assert "structure.tensors" in _one_line_error(r)


def test_nan_caught(lossy):
    _, out = lossy
    name = "model.layers.0.mlp.up_proj.weight"

    def plant(t):
        t[3, 5] = float("nan")
        return t

    rewrite_tensor(out, name, plant)
    structure = run_verify(out, checks=["structure"], **FAST)
    assert names(structure.failed()) == ["structure.finite"]
    check = structure.get("structure.finite")
    assert check.value == 1 and name in check.message
    full = run_verify(out, **FAST)
    assert "structure.finite" in names(full.failed())


def test_flipped_byte_named_by_manifest(lossy):
    _, out = lossy
    shard = shard_of(out, "model.layers.1.self_attn.q_proj.weight")
    flip_byte(shard)
    report = run_verify(out, **FAST)
    assert names(report.failed()) == ["structure.manifest"]
    check = report.get("structure.manifest")
    assert shard.name in check.message and check.details["changed"] == [shard.name]

    r = invoke(out, "--checks", "structure", "--device", "cpu")
    assert r.exit_code == 5 and shard.name in r.stdout


def test_manifest_names_missing_and_extra_files(lossy):
    _, out = lossy
    (out / "generation_config.json").unlink()
    (out / "notes.txt").write_text("not part of the checkpoint")
    check = run_verify(out, checks=["structure"], **FAST).get("structure.manifest")
    assert not check.ok
    assert check.details["missing"] == ["generation_config.json"] and check.details["extra"] == ["notes.txt"]


def test_swapped_group_blocks_caught_by_fidelity(exact):
    """Swapping the two groups' rows of kv_b_proj is invisible to the structure (shapes and re-hashed
    manifest hold) and to path equivalence (both paths use the same swapped blocks); only the
    comparison with the source sees group 0's heads reading group 1's keys and values."""
    src, out = exact
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    block = 16 + 16  # d_nope + d_v rows per group

    def swap(t):
        return torch.cat((t[block : 2 * block], t[:block]))

    rewrite_tensor(out, name, swap)
    report = run_verify(out, source=str(src), bounds=TIGHT, **FAST)
    assert names(report.failed()) == ["fidelity.attention"]
    check = report.get("fidelity.attention")
    assert check.value > 0.1 and check.details["per_layer"][1] < 1e-4  # layer 0 only
    assert report.get("paths.equivalence").ok and report.get("decode.tokens").ok


def test_broken_rope_interleave_caught_by_fidelity(exact):
    """RoPE rows of q_proj put back in rotate_half order: the queries' pairs no longer match the
    interleaved keys. Paths agree (same queries on both); the source comparison does not."""
    src, out = exact
    name = "model.layers.1.self_attn.q_proj.weight"
    n_h, d_nope, d_r = 4, 16, 16

    def to_half(t):
        heads = t.view(n_h, d_nope + d_r, -1)
        heads[:, d_nope:] = interleaved_to_half(heads[:, d_nope:].clone(), dim=1)
        return heads.reshape(t.shape)

    rewrite_tensor(out, name, to_half)
    report = run_verify(out, source=str(src), bounds=TIGHT, **FAST)
    assert names(report.failed()) == ["fidelity.attention"]
    per_layer = report.get("fidelity.attention").details["per_layer"]
    assert per_layer[0] < 1e-4 and per_layer[1] > 1e-2
    assert report.get("paths.equivalence").ok


# -- cache bytes at Llama-3-8B's attention geometry -------------------------------------------------


def write_gqla_checkpoint(out: Path, *, n_heads=8, n_groups=8, d=128, d_rope=64, rank=512, hidden=32, vocab=32) -> None:
    """A contract-valid one-layer GQLA checkpoint with random weights (only the geometry matters)."""
    out.mkdir()
    g = torch.Generator().manual_seed(0)

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    att = "model.layers.0.self_attn."
    tensors = {
        "model.embed_tokens.weight": w(vocab, hidden, std=1.0),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": w(vocab, hidden),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden),
        "model.layers.0.mlp.gate_proj.weight": w(hidden, hidden),
        "model.layers.0.mlp.up_proj.weight": w(hidden, hidden),
        "model.layers.0.mlp.down_proj.weight": w(hidden, hidden),
        att + "q_proj.weight": w(n_heads * (d + d_rope), hidden),
        att + "kv_a_proj_with_mqa.weight": w(rank + d_rope, hidden),
        att + "kv_b_proj.weight": w(n_groups * (d + d), rank),
        att + "o_proj.weight": w(hidden, n_heads * d),
    }
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, out / shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": {k: shard for k in tensors},
    }))
    config = {
        "architectures": ["GQLAForCausalLM"], "model_type": "gqla",
        "auto_map": AUTO_MAP,
        "hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": 1, "vocab_size": vocab,
        "num_attention_heads": n_heads, "num_key_value_heads": n_groups, "head_dim": d,
        "kv_lora_rank": rank, "q_lora_rank": None, "qk_nope_head_dim": d, "qk_rope_head_dim": d_rope, "v_head_dim": d,
        "rope_interleave": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False,
        "gqla": {"format_version": 1, "decode_path": "absorb", "source": {"source": "synthetic", "local": False}},
    }
    (out / "config.json").write_text(json.dumps(config))
    for code in REMOTE_CODE:  # the runtime trust_remote_code=True loads: the installed package's copy
        shutil.copy(Path(hf_remote.__file__).parent / code, out / code)
    files = {f.name: sha256_file(f) for f in out.iterdir()}
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}))


def test_absorb_cache_is_28_125_percent_of_llama3_8b_gqa(tmp_path):
    out = tmp_path / "llama3-geometry"
    write_gqla_checkpoint(out)
    report = run_verify(out, checks=["structure", "paths", "decode"], tokens=2, device="cpu")
    assert report.ok, [(c.name, c.message) for c in report.failed()]
    cache = report.get("decode.cache_bytes")
    assert cache.value == 576 * 4 == cache.threshold  # measured from the cache tensors == (r + d_R) x itemsize
    assert cache.details["source_gqa"] == 2048 * 4
    assert cache.details["absorb_ratio"] == 576 / 2048 == 0.28125
    assert cache.details["gqa_per_layer"] == [8 * (128 + 64 + 128) * 4]  # 2560 values, RoPE key per group


# -- real text, bounds, sources and errors ---------------------------------------------------------


def test_text_perplexity_and_bounds(lossy, tmp_path):
    src, out = lossy
    write_char_tokenizer(out)
    text = tmp_path / "eval.txt"
    text.write_text("The river ran past the mill and under the old stone bridge, as it had for centuries. " * 4)
    report = run_verify(out, text=text, **FAST)
    assert report.ok, [(c.name, c.message) for c in report.failed()]
    ppl = report.get("fidelity.perplexity")
    assert math.isfinite(ppl.details["ppl_source"]) and math.isfinite(ppl.details["ppl_gqla"])
    assert ppl.value == pytest.approx(ppl.details["ppl_gqla"] / ppl.details["ppl_source"])
    assert report.info["text"] == str(text) and report.get("fidelity.kl").value > 0
    assert "tokenized prompt" in report.get("decode.tokens").message
    assert "prompt tokens" in report.get("paths.equivalence").message

    r = invoke(out, "--text", text, "--seqlen", 32, "--tokens", 2, "--device", "cpu", "--min-top1", 1.5, "--json")
    assert r.exit_code == 5
    doc = json.loads(r.stdout)
    assert doc["failed"] == ["fidelity.top1"]
    top1 = next(c for c in doc["checks"] if c["name"] == "fidelity.top1")
    assert top1["threshold"] == 1.5 and top1["comparison"] == ">="


def test_builtin_text_used_without_text_flag(lossy):
    _, out = lossy
    write_char_tokenizer(out)
    report = run_verify(out, checks=["fidelity"], **FAST)
    assert report.ok and report.info["text"].startswith("built-in")
    assert report.get("fidelity.perplexity").ok is True


def test_missing_source_skips_fidelity_unless_bounded(lossy, tmp_path):
    src, out = lossy
    src.rename(tmp_path / "moved-away")
    report = run_verify(out, checks=["fidelity"], **FAST)
    assert report.ok and report.get("fidelity.source").ok is None
    bounded = run_verify(out, checks=["fidelity"], bounds=FidelityBounds(max_kl=0.1), **FAST)
    assert names(bounded.failed()) == ["fidelity.source"]
    found = run_verify(out, checks=["fidelity"], source=str(tmp_path / "moved-away"), **FAST)
    assert found.ok and found.get("fidelity.kl").value > 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--checks", "structure,bogus"], "--checks"),
        (["--dtype", "float16"], "--dtype"),
        (["--text", "/nonexistent/eval.txt"], "does not exist"),
        (["--text", "__self__"], "tokenizer.json"),
        (["--tokens", "0"], "--tokens"),
    ],
)
def test_bad_arguments_are_one_line_errors(lossy, args, fragment):
    _, out = lossy
    args = [str(out / "config.json") if a == "__self__" else a for a in args]
    r = invoke(out, *args, "--device", "cpu")
    assert r.exit_code == 2 and fragment in _one_line_error(r)
    assert r.stdout == ""


def test_missing_folder_and_unavailable_cuda(tmp_path, lossy):
    r = invoke(tmp_path / "nowhere", "--json")
    assert r.exit_code == 2 and "does not exist" in _one_line_error(r)
    assert json.loads(r.stdout)["ok"] is False
    if not torch.cuda.is_available():
        r = invoke(lossy[1], "--device", "cuda")
        assert r.exit_code == 2 and "CUDA" in _one_line_error(r)


# -- bounded memory ---------------------------------------------------------------------------------


class _LiveLoads:
    """Hooks every tensor read of :class:`LayerwiseModel` (its one loader): tracks the bytes of layer
    tensors still alive (a weakref finalizer per tensor) and the row count of every other read."""

    def __init__(self, monkeypatch):
        import weakref

        from transgqla.model.layerwise import LayerwiseModel

        self.live: dict[int, int] = {}
        self.peak = 0
        self.other_rows: list[tuple[str, int]] = []
        self.layer_loads = 0
        orig = LayerwiseModel._load

        def load(model, name, rows=None, pooled=False):
            t = orig(model, name, rows, pooled)
            if name.startswith("model.layers."):
                self.layer_loads += 1
                if id(t) not in self.live:  # a recycled tensor refilled in place counts once
                    self.live[id(t)] = t.numel() * t.element_size()
                    weakref.finalize(t, self.live.pop, id(t))
                self.peak = max(self.peak, sum(self.live.values()))
            else:
                self.other_rows.append((name, t.shape[0]))
            return t

        monkeypatch.setattr(LayerwiseModel, "_load", load)


def _largest_layer_bytes(*folders: Path, itemsize: int = 4) -> int:
    """The largest single layer of these checkpoints, in compute-dtype bytes."""
    from transgqla.io import SafetensorsCheckpoint

    largest = 0
    for folder in folders:
        with SafetensorsCheckpoint(folder) as ck:
            per: dict[str, int] = {}
            for n in ck.names:
                if n.startswith("model.layers."):
                    layer = n.split(".")[2]
                    per[layer] = per.get(layer, 0) + math.prod(ck.spec(n).shape) * itemsize
            largest = max(largest, *per.values())
    return largest


def test_every_section_holds_at_most_one_layer(lossy, monkeypatch):
    """structure, paths, fidelity (source and GQLA) and decode read the weights layer by layer: at no
    time are two layers' tensors alive, the embedding is read by rows and the heads in chunks."""
    import transgqla.model.layerwise as layerwise
    import transgqla.verify.decode as decode
    import transgqla.verify.token_stats as token_stats

    src, out = lossy
    monkeypatch.setattr(decode, "RESIDENT_BYTES", 0)  # no layer kept across decode steps
    monkeypatch.setattr(layerwise, "HEAD_CHUNK_BYTES", 16 * 64 * 4)  # 16 vocabulary rows of D = 64, float32
    monkeypatch.setattr(token_stats, "STATS_BYTES", 1)  # the smallest chunk: 64 vocabulary rows
    loads = _LiveLoads(monkeypatch)
    report = run_verify(out, source=str(src), **FAST)
    assert report.ok and report.get("decode.tokens").value == FAST["tokens"]
    one_layer = _largest_layer_bytes(out, src)
    assert 0.5 * one_layer < loads.peak <= one_layer, (loads.peak, one_layer)
    vocab_reads = [rows for name, rows in loads.other_rows if name in ("lm_head.weight", "model.embed_tokens.weight")]
    assert vocab_reads and max(vocab_reads) <= 64 < 101  # never the whole [V, D] matrix (V = 101)


def test_decode_reads_a_small_model_once_and_streams_a_large_one(lossy, monkeypatch):
    """Within the resident budget every layer tensor is read once for all steps; with no budget each
    step reads every layer again, holding one at a time; the tokens are the same."""
    import transgqla.verify.decode as decode
    from transgqla.io import SafetensorsCheckpoint

    _, out = lossy
    with SafetensorsCheckpoint(out) as ck:
        n_layer_tensors = sum(n.startswith("model.layers.") for n in ck.names)
    kept = _LiveLoads(monkeypatch)
    resident = run_verify(out, checks=["decode"], **FAST)
    assert kept.layer_loads == n_layer_tensors
    monkeypatch.setattr(decode, "RESIDENT_BYTES", 0)
    streamed = _LiveLoads(monkeypatch)
    again = run_verify(out, checks=["decode"], **FAST)
    assert again.get("decode.tokens").details["tokens"] == resident.get("decode.tokens").details["tokens"]
    assert streamed.layer_loads > FAST["tokens"] * n_layer_tensors
    assert streamed.peak <= _largest_layer_bytes(out) < kept.peak


def test_text_perplexity_equals_eval_ppl(lossy, tmp_path):
    """``verify --text`` and ``eval-ppl`` read, tokenize and window a file the same way: the source's
    and the checkpoint's perplexities agree with eval-ppl's (a short tail is dropped by both)."""
    import shutil

    from transgqla.evaluate import perplexity

    src, out = lossy
    write_char_tokenizer(out)
    shutil.copy(out / "tokenizer.json", src / "tokenizer.json")
    text = tmp_path / "eval.txt"
    text.write_text("A quiet harbour at dawn: gulls, ropes, and the slow creak of boats. " * 5)  # 345 chars
    ppl = run_verify(out, text=text, checks=["fidelity"], **FAST).get("fidelity.perplexity").details
    path = json.loads((out / "config.json").read_text())["gqla"]["decode_path"]
    want_gqla = perplexity(str(out), [str(text)], seqlen=FAST["seqlen"], path=path)
    want_src = perplexity(str(src), [str(text)], seqlen=FAST["seqlen"])
    assert want_gqla.windows == 345 // FAST["seqlen"]
    assert ppl["ppl_gqla"] == pytest.approx(want_gqla.perplexity, rel=1e-5)
    assert ppl["ppl_source"] == pytest.approx(want_src.perplexity, rel=1e-5)


def test_token_stats_chunked_equal_full_vocabulary_float64(monkeypatch):
    """KL, top-1 agreement and NLL reduced over vocabulary chunks equal the plain full-logit float64
    computation (chunks of 64 rows over V = 150, so three chunks, the last one short)."""
    import transgqla.verify.token_stats as ts
    from transgqla.verify.token_stats import token_stats

    monkeypatch.setattr(ts, "STATS_BYTES", 1)  # the smallest chunk: 64 vocabulary rows
    seen: list[int] = []

    g = torch.Generator().manual_seed(0)
    n, d, v = 7, 5, 150
    w_s, w_g = torch.randn(v, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    w_g[:70] = w_s[:70]  # some rows agree, so top-1 agreement is neither 0 nor 1 by accident
    x_s, x_g = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    targets = torch.tensor([3, 64, 149, -1, 0, 127, -1])

    class Head:
        def __init__(self, w):
            self.w = w

        def head_chunks(self, rows):
            for s in range(0, v, rows):
                seen.append(s)
                yield s, self.w[s : s + rows]

    got = token_stats(Head(w_s), Head(w_g), x_s, x_g, targets)
    ls, lg = torch.log_softmax(x_s @ w_s.T, -1), torch.log_softmax(x_g @ w_g.T, -1)
    has = targets >= 0
    assert got.kl == pytest.approx(float((ls.exp() * (ls - lg)).sum()), rel=1e-12)
    assert got.agree == float((ls.argmax(-1) == lg.argmax(-1)).sum())
    assert got.nll_source == pytest.approx(-float(ls[has, targets[has]].sum()), rel=1e-12)
    assert got.nll_gqla == pytest.approx(-float(lg[has, targets[has]].sum()), rel=1e-12)
    assert (got.positions, got.scored) == (n, 5)
    assert seen == [0, 0, 64, 64, 128, 128]  # both heads, chunk by chunk
