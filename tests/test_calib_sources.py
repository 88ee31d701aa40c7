"""Calibration sources (transgqla/calib/sources.py): a fake local Hugging Face cache (never the
network), self-generated text checked against stock transformers, mixing, and ``auto``."""

from __future__ import annotations

import json
import re

import pytest
import torch

from transgqla.calib import self_text
from transgqla.calib.sources import calibration_windows, hf_text, resolve_auto, self_generated
from transgqla.errors import InputError
from transgqla.text.pipeline import load_tokenizer, token_windows

from helpers import run_convert
from test_calibration import WORDS, make_tokenizer, tiny_text


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache; ``add(repo, files)`` puts a dataset snapshot in it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo: str, files: dict[str, str]):
        root = cache / f"datasets--{repo.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(commit)
        snap = root / "snapshots" / commit
        for rel, text in files.items():
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).write_text(text)
        return snap

    return add


def _jsonl(texts):
    return "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n"


def test_hf_dataset_is_read_from_the_local_cache_by_config_and_split(hub_cache):
    hub_cache("someone/corpus", {
        "small/train-00000-of-00002.jsonl": _jsonl(["alpha one", "alpha two"]),
        "small/train-00001-of-00002.jsonl": _jsonl(["alpha three"]),
        "small/test-00000-of-00001.jsonl": _jsonl(["beta"]),
        "large/train.jsonl": _jsonl(["gamma"]),
        "README.md": "not data",
    })
    assert hf_text("hf:someone/corpus:small") == "alpha one\n\nalpha two\n\nalpha three"
    assert hf_text("hf:someone/corpus:small:test") == "beta"
    assert hf_text("hf:someone/corpus:large:train") == "gamma"
    with pytest.raises(InputError, match="no data files for config small split validation"):
        hf_text("hf:someone/corpus:small:validation")


def test_hf_dataset_not_cached_or_malformed_is_one_clear_error(hub_cache):
    with pytest.raises(InputError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        hf_text("hf:nobody/absent")
    with pytest.raises(InputError, match="expected hf:OWNER/NAME"):
        hf_text("hf:justaname")
    hub_cache("someone/bad", {"train.jsonl": '{"content": "no text field"}\n'})
    with pytest.raises(InputError, match="'text' field"):
        hf_text("hf:someone/bad")


def test_sources_mix_with_an_even_budget_interleaved(source_factory, tmp_path, hub_cache):
    src, _ = source_factory("llama", layers=1)
    make_tokenizer(src)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(tiny_text(3000, seed=1))
    b.write_text(tiny_text(3000, seed=2))
    hub_cache("someone/corpus", {"train.jsonl": _jsonl([tiny_text(3000, seed=3)])})
    tok = load_tokenizer(src)
    got = calibration_windows([str(a), "hf:someone/corpus", str(b)], src, 32, 32 * 6)
    assert got.sources == [str(a), "hf:someone/corpus", str(b)] and got.windows.shape == (6, 32)
    wa = token_windows(a.read_text(), tok, 32, 64)
    wh = token_windows(tiny_text(3000, seed=3), tok, 32, 64)
    wb = token_windows(b.read_text(), tok, 32, 64)
    assert torch.equal(got.windows, torch.stack([wa[0], wh[0], wb[0], wa[1], wh[1], wb[1]]))


def test_self_generated_text_is_seeded_and_sampled_from_the_model(source_factory):
    src, model = source_factory("llama", layers=2, hidden=64, n_heads=4, n_kv=2, head_dim=16)
    make_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    tokens = self_generated(src, 3, 20, seed=5)
    assert tokens.shape == (3, 20) and tokens.dtype == torch.int64
    assert torch.equal(tokens, self_generated(src, 3, 20, seed=5))
    assert not torch.equal(tokens, self_generated(src, 3, 20, seed=6))
    bos = cfg.get("bos_token_id")
    if bos is not None:
        assert (tokens[:, 0] == bos).all()
    # Every sampled token lies in the top-k of stock transformers' next-token logits for its prefix.
    with torch.no_grad():
        logits = model(tokens).logits
    prompt_lens = [len(self_text.PROMPTS[i].split()) + (bos is not None) for i in range(3)]
    for i in range(3):
        for t in range(max(1, prompt_lens[i]), 20):
            top = logits[i, t - 1].topk(self_text.TOP_K).indices
            assert tokens[i, t] in top, (i, t)


def test_self_generated_greedy_equals_stock_generate_streamed_or_resident(source_factory):
    """``top_k=1`` is greedy decoding: the tokens after each window's opening are exactly what stock
    transformers' ``generate`` picks, whether every layer stays resident or each is re-read per step."""
    src, model = source_factory("llama", layers=3, hidden=64, n_heads=4, n_kv=2, head_dim=16)
    make_tokenizer(src)
    streamed = self_generated(src, 2, 24, top_k=1, resident_bytes=0, quiet=True)
    resident = self_generated(src, 2, 24, top_k=1, quiet=True)
    assert torch.equal(streamed, resident)
    bos = json.loads((src / "config.json").read_text()).get("bos_token_id")
    for i in range(2):
        opening = (bos is not None) + len(self_text.PROMPTS[i].split())
        opening = max(1, opening)
        with torch.no_grad():
            prefix = streamed[i:i + 1, :opening]
            stock = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=24 - opening,
                                   min_new_tokens=24 - opening, do_sample=False, pad_token_id=0)
        assert torch.equal(stock[0], streamed[i]), i


def test_self_generation_holds_one_streamed_layer_at_a_time(source_factory, monkeypatch):
    """Bounded memory: with no resident budget, each step reads every layer and hands it back before
    the next is read, so one layer's weights are live at a time whatever the model size."""
    from transgqla.model.layerwise import LayerwiseModel

    src, _ = source_factory("llama", layers=3, hidden=64, n_heads=4, n_kv=2, head_dim=16)
    make_tokenizer(src)
    live, peak, reads = set(), [0], [0]
    layer, recycle = LayerwiseModel.layer, LayerwiseModel.recycle

    def counted_layer(self, i):
        dec = layer(self, i)
        live.add(id(dec))
        reads[0] += 1
        peak[0] = max(peak[0], len(live))
        return dec

    def counted_recycle(self, dec):
        live.discard(id(dec))
        recycle(self, dec)

    monkeypatch.setattr(LayerwiseModel, "layer", counted_layer)
    monkeypatch.setattr(LayerwiseModel, "recycle", counted_recycle)
    tokens = self_generated(src, 2, 10, resident_bytes=0, quiet=True)
    assert tokens.shape == (2, 10) and peak[0] == 1 and not live
    assert reads[0] == 3 * 9  # the prefill of the common opening (BOS), then 8 decode steps: each reads 3 layers


def test_self_generation_prints_plain_progress(source_factory, capsys):
    src, _ = source_factory("llama", layers=1)
    make_tokenizer(src)
    capsys.readouterr()  # the fixture's own output
    self_generated(src, 2, 12)
    lines = capsys.readouterr().err.strip().splitlines()
    assert 2 <= len(lines) <= 12 and all(line.startswith("transgqla: --calib self: ") for line in lines)
    assert re.match(r"transgqla: --calib self: (\d+)/\1 steps, \d+ s$", lines[-1]), lines[-1]  # ends done


def test_self_source_in_a_mix_records_its_seed(source_factory, tmp_path):
    src, _ = source_factory("llama", layers=1)
    make_tokenizer(src)
    text = tmp_path / "a.txt"
    text.write_text(" ".join(WORDS[:50] * 40))
    got = calibration_windows(["self", str(text)], src, 16, 64)
    assert got.sources == ["self:seed=0", str(text)] and got.windows.shape == (4, 16)


def test_self_calibrated_conversion_records_the_seed_and_the_windows(source_factory, tmp_path):
    """The calibration record names what each source resolved to (``self`` with its seed), and the hash
    is that of the text ``self_generated`` writes, so the conversion can be reproduced."""
    import hashlib

    src, _ = source_factory("llama", layers=1, hidden=64, n_heads=4, n_kv=2, head_dim=16)
    make_tokenizer(src)
    run_convert(src, tmp_path / "out", calib=["self"], calib_tokens=64, calib_seqlen=16, kv_lora_rank=16, refine=0)
    calib = json.loads((tmp_path / "out" / "config.json").read_text())["gqla"]["conversion"]["calibration"]
    tokens = self_generated(src, 4, 16, quiet=True)
    assert calib["text_sources"] == ["self:seed=0"] and calib["windows"] == [4, 16]
    assert calib["windows_sha256"] == hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()


def test_auto_prefers_a_cached_general_dataset_then_the_builtin_mix(source_factory, hub_cache, capsys, monkeypatch,
                                                                    tmp_path):
    from transgqla.text import prose

    src, _ = source_factory("llama", layers=1)
    assert resolve_auto(src) is None  # no tokenizer: data-free
    make_tokenizer(src)
    monkeypatch.setenv(prose.FORTUNE_DIR_ENV, str(tmp_path / "absent"))
    assert resolve_auto(src) == ["builtin:calib"]
    (tmp_path / "fortunes").mkdir()
    monkeypatch.setenv(prose.FORTUNE_DIR_ENV, str(tmp_path / "fortunes"))
    assert resolve_auto(src) == ["builtin:prose-calib", "builtin:calib"]
    hub_cache("Salesforce/wikitext", {"wikitext-2-raw-v1/train-00000-of-00001.jsonl": _jsonl(["text"])})
    assert resolve_auto(src) == ["hf:Salesforce/wikitext:wikitext-2-raw-v1:train"]
    assert "calibrating on hf:Salesforce/wikitext" in capsys.readouterr().err
