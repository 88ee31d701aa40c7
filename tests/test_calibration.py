"""Calibration statistics and methods, each against a dense float64 computation written here, and an
end-to-end calibrated conversion of a tiny random model from a tiny text."""

import json

import pytest
import torch

from transgqla.calib.runner import LayerwiseCalibration
from transgqla.io import SafetensorsCheckpoint
from transgqla.mathx.attention_stats import group_output_metric, group_query_metric, rotation_stats
from transgqla.mathx.lowrank import factorize, factorize_metric, psd_sqrt
from transgqla.mathx.moments import InputMoment, augment
from transgqla.mathx.rope import inv_freq

from helpers import run_convert

WORDS = ("the of and to in is that for it as with was on be by at this from or an are not have but "
         "which one all were when we there can their has more if will other about so what up out").split()


def make_tokenizer(folder, vocab=101):
    """A word-level tokenizer small enough for the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_map = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS[: vocab - 1])}}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def tiny_text(n_words=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
    return " ".join(WORDS[i] for i in idx)


def test_input_moment_from_samples_is_the_augmented_second_moment():
    x = torch.randn(50, 7, dtype=torch.float64)
    xa = torch.cat((x, torch.ones(50, 1, dtype=torch.float64)), 1)
    dense = sum(torch.outer(r, r) for r in xa) / 50
    assert torch.allclose(InputMoment.from_samples(x).dense, dense)
    w = torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(InputMoment.from_samples(x).gram(w), (xa @ w.T).T @ (xa @ w.T) / 50)


def test_runner_moment_matches_transformers_hidden_states(source_factory, tmp_path):
    src, model = source_factory("llama", n_kv=2, layers=3)
    config = json.loads((src / "config.json").read_text())
    windows = torch.randint(0, 101, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    runner = LayerwiseCalibration(SafetensorsCheckpoint(src), config, windows, micro_batch=2)
    for layer in range(3):
        x = model.model.layers[layer].input_layernorm(hidden[layer]).double().reshape(-1, 64)
        xa = torch.cat((x, torch.ones(x.shape[0], 1, dtype=torch.float64)), 1)
        ref = xa.T @ xa / x.shape[0]
        got = runner.statistics(layer).moment.dense
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), layer
        runner.advance(layer)


def test_group_metrics_match_dense_definitions():
    torch.manual_seed(0)
    n_h, n_g, d, dim = 4, 2, 6, 10
    x = torch.randn(200, dim, dtype=torch.float64)
    wq = torch.randn(n_h * d, dim, dtype=torch.float64)
    bq = torch.randn(n_h * d, dtype=torch.float64)
    moment = InputMoment.from_samples(x)
    got = group_query_metric(augment(wq, bq).reshape(n_h, d, -1), moment, n_g)
    q = (x @ wq.T + bq).reshape(200, n_h, d)
    for g in range(n_g):
        ref = sum(q[:, h].T @ q[:, h] / 200 for h in (2 * g, 2 * g + 1))
        assert torch.allclose(got[g], ref)
    wo = torch.randn(dim, n_h * d, dtype=torch.float64)
    out = group_output_metric(wo, n_g, d)
    for g in range(n_g):
        ref = sum(wo[:, h * d:(h + 1) * d].T @ wo[:, h * d:(h + 1) * d] for h in (2 * g, 2 * g + 1))
        assert torch.allclose(out[g], ref)


def test_rotation_stats_match_a_brute_force_sum():
    torch.manual_seed(1)
    b, n_h, n_g, L, d = 2, 4, 2, 7, 8
    q = torch.randn(b, n_h, L, d, dtype=torch.float64)
    k = torch.randn(b, n_g, L, d, dtype=torch.float64)
    probs = torch.softmax(torch.randn(b, n_h, L, L, dtype=torch.float64).masked_fill(~torch.ones(L, L).tril().bool(), -1e30), -1)
    freqs = inv_freq(d, 10.0)
    phase, cost = rotation_stats(q, k, probs, freqs)
    half = d // 2
    for g in range(n_g):
        for i in range(half):
            num, den = 0j, 0.0
            for bb in range(b):
                for h in range(g * 2, g * 2 + 2):
                    for t in range(L):
                        for s in range(L):
                            w = probs[bb, h, t, s] * (q[bb, h, t, i] ** 2 + q[bb, h, t, i + half] ** 2) * (k[bb, g, s, i] ** 2 + k[bb, g, s, i + half] ** 2)
                            num += float(w) * complex(torch.cos((s - t) * freqs[i]), torch.sin((s - t) * freqs[i]))
                            den += float(w)
            assert abs(phase[g, i] - num / den) < 1e-9
            assert abs(cost[g, i] - den * (1 - abs(num / den) ** 2)) < 1e-7 * den


def test_metric_factorization_beats_plain_pca_in_its_metric_and_hits_the_bound():
    torch.manual_seed(2)
    k, bsz, dim, rank = 3, 4, 20, 5
    w = torch.randn(k * bsz, dim + 1, dtype=torch.float64)
    x = torch.randn(500, dim, dtype=torch.float64) @ torch.randn(dim, dim, dtype=torch.float64)
    moment = InputMoment.from_samples(x)
    a = torch.randn(k, bsz, bsz, dtype=torch.float64)
    metric = a @ a.transpose(1, 2)
    roots = psd_sqrt(metric, ridge=0.0)

    def metric_error(up, down):
        diff = (w - up @ down).reshape(k, bsz, -1)
        ld = torch.einsum("kij,kjc->kic", roots, diff).reshape(k * bsz, -1)
        return float(torch.trace(moment.gram(ld)))

    weighted = factorize_metric(w, moment, rank, roots)
    plain = factorize(w, moment, rank)
    lw = torch.einsum("kij,kjc->kic", roots, w.reshape(k, bsz, -1)).reshape(k * bsz, -1)
    eig = torch.linalg.eigvalsh(moment.gram(lw)).flip(0)
    assert metric_error(weighted.up, weighted.down) == pytest.approx(float(eig[rank:].sum()), rel=1e-8)
    assert metric_error(weighted.up, weighted.down) < metric_error(plain.up, plain.down)


def test_calibrated_gqla_lowers_attention_error_versus_pca(source_factory, tmp_path):
    src, _ = source_factory("llama", n_kv=2, n_heads=4, head_dim=16, layers=2)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text())
    common = dict(kv_lora_rank=20, qk_rope_dim=8, freqfold="4", calib=[str(text)], calib_tokens=2048, calib_seqlen=64)
    ours = run_convert(src, tmp_path / "gqla", method="gqla", **common)
    base = run_convert(src, tmp_path / "transmla", method="transmla", **common)
    e_ours = [r["attn_output_rel_error"] for r in ours.layer_reports]
    e_base = [r["attn_output_rel_error"] for r in base.layer_reports]
    assert sum(e_ours) < sum(e_base), (e_ours, e_base)
    cfg = json.loads((tmp_path / "gqla" / "config.json").read_text())
    assert cfg["gqla"]["conversion"]["method"] == "gqla" and cfg["gqla"]["conversion"]["calib"] == str(text)


def test_greedy_rope_search_gives_the_same_bits_on_one_or_two_threads():
    """Candidates are scored concurrently; the chosen basis must not depend on it."""
    from transgqla.calib.rope_search import AttentionErrorModel, greedy_rope_basis

    g = torch.Generator().manual_seed(4)
    s, n_h, n_g, length, d, hidden = 2, 4, 2, 24, 16, 32
    q = torch.randn(s, n_h, length, d, generator=g, dtype=torch.float64)
    k = torch.randn(s, n_g, length, d, generator=g, dtype=torch.float64)
    v = torch.randn(s, n_g, length, d, generator=g, dtype=torch.float64)
    wo = torch.randn(hidden, n_h * d, generator=g, dtype=torch.float64)
    freqs = inv_freq(d, 10000.0, None).double()
    phase = torch.polar(torch.ones(n_g, d // 2, dtype=torch.float64), torch.rand(n_g, d // 2, generator=g, dtype=torch.float64))
    model = AttentionErrorModel(q, k, v, wo, freqs, phase, d**-0.5)
    kf = k.permute(0, 2, 1, 3).reshape(-1, n_g * d)
    key_gram = kf.T @ kf / kf.shape[0]
    cost = torch.rand(n_g, d // 2, generator=g, dtype=torch.float64) + 0.5
    one, err1 = greedy_rope_basis(model, key_gram, cost, n_g, d, 8, threads=1)
    two, err2 = greedy_rope_basis(model, key_gram, cost, n_g, d, 8, threads=2)
    assert torch.equal(one, two) and err1 == err2
    assert torch.allclose(one.T @ one, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert err1 < model.error(model.scores)  # filling the slots well beats rotating nothing
