"""Calibration statistics and methods, each against a dense float64 computation written here, and an
end-to-end calibrated conversion of a tiny random model from a tiny text."""

import json
import math
from dataclasses import replace

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


def test_runner_advances_with_the_attention_its_statistics_computed(source_factory):
    """With attention-weighted statistics, advance() reuses that pass's attention output: the hidden states
    still match transformers' layer by layer."""
    src, model = source_factory("llama", n_kv=2, layers=3)
    config = json.loads((src / "config.json").read_text())
    windows = torch.randint(0, 101, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    runner = LayerwiseCalibration(SafetensorsCheckpoint(src), config, windows, micro_batch=2)
    for layer in range(2):
        runner.statistics(layer, attention_weighted=True)
        assert runner._attention_out is not None and runner._attention_out[0] == layer
        runner.advance(layer)
        assert runner._attention_out is None
        assert torch.allclose(runner.h, hidden[layer + 1].float(), rtol=1e-4, atol=1e-5), layer


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


def _random_layer(seed: int, bias: bool = False, n_h=4, n_g=2, d=16, hidden=72, s=2, length=24):
    """A random source attention layer, sample inputs and o_proj; float64."""
    from transgqla.mathx.gqla_layer import SourceAttention

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    src = SourceAttention(rnd(n_h * d, hidden), rnd(n_g * d, hidden), rnd(n_g * d, hidden), n_h, n_g, d,
                          *((rnd(n_h * d), rnd(n_g * d), rnd(n_g * d)) if bias else ()))
    x = rnd(s, length, hidden, scale=1.0) + rnd(hidden, scale=1.0)  # a mean, so the bias column matters
    return src, x, rnd(hidden, n_h * d), inv_freq(d, 10000.0)


def _dense_error(src, conv, x, wo, freqs, rows, rope_dim, rank):
    """The converted layer's output error against the source on query ``rows``, with the format's own
    decoder (model/attention.py) and a plain float64 source attention."""
    from transgqla.mathx.attention_stats import source_attention_parts
    from transgqla.model.attention import KVCache, attention
    from transgqla.model.geometry import GQLAGeometry

    n_h, n_g, d = src.n_heads, src.n_groups, src.head_dim
    _, _, probs = source_attention_parts(x, src.wq, src.bq, src.wk, src.bk, n_h, n_g, d, freqs)
    v = torch.nn.functional.linear(x, src.wv, src.bv).view(x.shape[0], x.shape[1], n_g, d).transpose(1, 2)
    ref = (probs @ v.repeat_interleave(n_h // n_g, 1)).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ wo.T
    cfg = {"hidden_size": x.shape[-1], "num_hidden_layers": 1, "num_attention_heads": n_h, "num_key_value_heads": n_g,
           "qk_nope_head_dim": d, "qk_rope_head_dim": rope_dim, "v_head_dim": d, "kv_lora_rank": rank, "rope_theta": 10000.0}
    params = {**{k: t.double() for k, t in conv.tensors.items()}, "o_proj.weight": wo}
    got = attention(x, params, GQLAGeometry.from_config(cfg), torch.arange(x.shape[1]), KVCache("absorb"), 0, "absorb")
    return float((got - ref)[:, rows].pow(2).sum() / ref[:, rows].pow(2).sum())


def _sample_attention(src, x, wo, freqs, stride):
    from transgqla.calib.methods import SampleAttention, source_scale
    from transgqla.calib.output_probe import OutputProbe
    from transgqla.mathx.attention_stats import source_attention_parts

    n_g, d = src.n_groups, src.head_dim
    q, k, probs = source_attention_parts(x, src.wq, src.bq, src.wk, src.bk, src.n_heads, n_g, d, freqs)
    v = torch.nn.functional.linear(x, src.wv, src.bv).view(x.shape[0], x.shape[1], n_g, d).transpose(1, 2)
    probe = OutputProbe(q, k, v, wo, freqs, source_scale(src), stride=stride)
    return SampleAttention(x, q, k, v, probs, probe, source_scale(src))


@pytest.mark.parametrize("stride", [1, 3])
def test_greedy_search_error_is_the_converted_layers_error(stride):
    """The incremental score model, on the probe's rows, equals the output error of the layer built from
    the chosen basis and phases at full rank, run through the format's decoder."""
    from transgqla.calib.rope_search import AttentionErrorModel, greedy_rope_basis
    from transgqla.mathx.gqla_layer import LayerObjective, LayerSettings, convert_attention, max_rank

    src, x, wo, freqs = _random_layer(4, bias=True)
    n_g, d, rope_dim = src.n_groups, src.head_dim, 8
    sa = _sample_attention(src, x, wo, freqs, stride)
    g = torch.Generator().manual_seed(5)
    phase = torch.polar(torch.ones(n_g, d // 2, dtype=torch.float64), torch.rand(n_g, d // 2, generator=g, dtype=torch.float64))
    model = AttentionErrorModel(sa.q, sa.k, sa.v, wo, freqs, phase, sa.scale, probe=sa.probe)
    moment = InputMoment.from_samples(x.reshape(-1, x.shape[-1]))
    key_gram = moment.gram(augment(src.wk, src.bk))
    cost = torch.rand(n_g, d // 2, generator=g, dtype=torch.float64) + 0.5
    start = model.current_error()
    basis, err = greedy_rope_basis(model, key_gram, cost, n_g, d, rope_dim)
    assert torch.allclose(basis.T @ basis, torch.eye(rope_dim, dtype=torch.float64), atol=1e-12)
    assert err < start  # filling the slots well beats rotating nothing
    again, err2 = greedy_rope_basis(AttentionErrorModel(sa.q, sa.k, sa.v, wo, freqs, phase, sa.scale, stride=stride),
                                    key_gram, cost, n_g, d, rope_dim)
    assert torch.equal(basis, again) and err == err2  # deterministic
    rank = max_rank(n_g, d, rope_dim, x.shape[-1])
    conv = convert_attention(src, moment, LayerSettings(rank, rope_dim, 4), LayerObjective(rope_basis=basis, nope_phase=phase))
    dense = _dense_error(src, conv, x, wo, freqs, sa.probe.rows, rope_dim, rank)
    assert err == pytest.approx(dense, rel=2e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_latent_scorer_matches_the_format_decoder(bias):
    """A candidate's probe error (shared RoPE scores + its latent) equals the assembled layer's error in the
    format's decoder, at a rank that truncates."""
    from transgqla.calib.methods import LatentScorer
    from transgqla.mathx.gqla_layer import LayerSettings, assemble, factorize_latent, split_keys

    src, x, wo, freqs = _random_layer(6, bias=bias)
    sa = _sample_attention(src, x, wo, freqs, stride=2)
    moment = InputMoment.from_samples(x.reshape(-1, x.shape[-1]))
    settings = LayerSettings(12, 8, 4)
    split = split_keys(src, moment, settings)
    fac, e_k, e_v = factorize_latent(split, moment, settings)
    err = LatentScorer(sa, split, freqs).error(fac)
    conv = assemble(src, split, fac, settings, e_k, e_v)
    dense = _dense_error(src, conv, x, wo, freqs, sa.probe.rows, 8, 12)
    assert 1e-3 < dense and err == pytest.approx(dense, rel=2e-4)


@pytest.mark.parametrize("balance", [0.25, 1.0, 8.0])
def test_shared_gram_factorization_matches_the_direct_one(balance):
    """MetricLatent (one Gram for every balance, residuals from the Gram) against factorize_metric, which
    forms L W for the balance and the residual W - B A explicitly."""
    import math

    from transgqla.mathx.metric_latent import MetricLatent, block_apply

    torch.manual_seed(7)
    n_g, d, dim, rank = 2, 4, 30, 6
    w = torch.randn(2 * n_g * d, dim + 1, dtype=torch.float64)
    x = torch.randn(400, dim, dtype=torch.float64) @ torch.randn(dim, dim, dtype=torch.float64)
    moment = InputMoment.from_samples(x)
    a, b = torch.randn(2, n_g, d, d, dtype=torch.float64)
    km, vm = a @ a.transpose(1, 2), b @ b.transpose(1, 2)
    latent = MetricLatent(w, moment, km, vm)
    got = latent.factorize(rank, balance)
    rk, rv = psd_sqrt(km), psd_sqrt(vm)
    rk, rv = rk / torch.diagonal(rk, dim1=-2, dim2=-1).mean(), rv / torch.diagonal(rv, dim1=-2, dim2=-1).mean()
    e_k = float(torch.trace(moment.gram(block_apply(rk, w[: n_g * d]))))
    e_v = float(torch.trace(moment.gram(block_apply(rv, w[n_g * d:]))))
    roots = torch.cat((rk * math.sqrt(e_v / e_k * balance), rv))
    ref = factorize_metric(w, moment, rank, roots)
    assert torch.allclose(got.up @ got.down, ref.up @ ref.down, atol=1e-9)
    assert got.captured == pytest.approx(ref.captured, rel=1e-10)
    assert torch.allclose(got.row_residual, ref.row_residual, rtol=1e-7, atol=1e-9)
    assert latent.key_energy == pytest.approx(float(torch.trace(moment.gram(w[: n_g * d]))), rel=1e-10)
    assert latent.value_energy == pytest.approx(float(torch.trace(moment.gram(w[n_g * d:]))), rel=1e-10)


def test_grid_descent_finds_the_local_minimum_with_few_evaluations():
    from transgqla.calib.methods import BALANCE_GRID, grid_descent

    for target in (0.1, 0.3, 1.0, 1.9, 3.0, 9.0):
        calls = []

        def score(b):
            calls.append(b)
            return abs(math.log(b / target)), b

        best, (err, payload) = grid_descent(BALANCE_GRID, 1.0, score)
        assert best == payload == min(BALANCE_GRID, key=lambda b: abs(math.log(b / target)))
        assert len(calls) == len(set(calls)) and len(calls) <= len(BALANCE_GRID) - 1


def test_layer_search_makes_no_tensor_off_its_inputs_device():
    """Every tensor the searches create follows its inputs' device: with the default device set to
    ``meta``, a tensor made without ``device=`` lands on meta and mixing it with the CPU inputs fails."""
    from transgqla.calib.methods import LatentScorer, grid_descent
    from transgqla.calib.rope_search import AttentionErrorModel, greedy_rope_basis
    from transgqla.mathx.gqla_layer import LayerObjective, LayerSettings, assemble, factorize_latent, split_keys

    src, x, wo, freqs = _random_layer(8, bias=True)
    n_g, d = src.n_groups, src.head_dim
    moment = InputMoment.from_samples(x.reshape(-1, x.shape[-1]))
    sa = _sample_attention(src, x, wo, freqs, stride=2)
    phase = torch.polar(torch.ones(n_g, d // 2, dtype=torch.float64), torch.linspace(0, 1, n_g * d // 2, dtype=torch.float64).view(n_g, -1))
    key_gram = moment.gram(augment(src.wk, src.bk))
    metric = torch.eye(d, dtype=torch.float64).expand(n_g, d, d)
    settings = LayerSettings(12, 8, 4)
    cost = torch.ones(n_g, d // 2, dtype=torch.float64)
    torch.set_default_device("meta")
    try:
        model = AttentionErrorModel(sa.q, sa.k, sa.v, wo, freqs, phase, sa.scale, probe=sa.probe)
        basis, _ = greedy_rope_basis(model, key_gram, cost, n_g, d, 8)
        obj = LayerObjective(rope_basis=basis, nope_phase=phase, key_metric=metric, value_metric=metric)
        split = split_keys(src, moment, settings, obj)
        scorer = LatentScorer(sa, split, freqs)

        def score(balance):
            fac = factorize_latent(split, moment, settings, replace(obj, kv_balance=balance))[0]
            return scorer.error(fac), fac

        _, (_, fac) = grid_descent((0.5, 1.0, 2.0), 1.0, score)
        conv = assemble(src, split, fac, settings, 1.0, 1.0)
    finally:
        torch.set_default_device("cpu")
    assert all(t.device.type == "cpu" for t in conv.tensors.values())


def test_calibrated_bytes_do_not_depend_on_the_layer_worker(source_factory, tmp_path, monkeypatch):
    """gqla with calibration, layer math in the writer's thread (0 workers) or on the background worker (1):
    identical bytes, and identical again on a second run."""
    from transgqla import convert as convert_module
    from transgqla.io import SafetensorsCheckpoint as Ckpt

    src, _ = source_factory("qwen2", n_kv=2, n_heads=4, head_dim=16, layers=2)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text())
    outs = []
    for workers in ("0", "1", "1"):
        monkeypatch.setenv(convert_module.LAYER_WORKERS_ENV, workers)
        outs.append(tmp_path / f"w{len(outs)}")
        run_convert(src, outs[-1], method="gqla", kv_lora_rank=20, qk_rope_dim=8, calib=[str(text)],
                    calib_tokens=1024, calib_seqlen=64)
    ref = Ckpt(outs[0])
    for out in outs[1:]:
        other = Ckpt(out)
        assert other.names == ref.names
        for name in ref.names:
            assert other.read_bytes(name) == ref.read_bytes(name), (out, name)
