"""``--kv-budget`` and ``--qk-rope-dim auto`` (transgqla/kv_budget.py, transgqla/calib/split_search.py): the rule
for which splits exist, the one-line errors of impossible budgets, and a search whose errors are the converted
layers' own output errors against a plain float64 source attention on stock transformers hidden states."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from transgqla.calib.split_search import probe_layers, report_line
from transgqla.convert import ConvertRequest, plan_conversion, plan_fingerprint
from transgqla.errors import InputError
from transgqla.io import SafetensorsCheckpoint
from transgqla.kv_budget import split_candidates
from transgqla.mathx.gqla_layer import ConvertedAttention
from transgqla.mathx.rope import inv_freq
from transgqla.settings import resolve_settings
from transgqla.source_checkpoint import read_attention
from transgqla.source_geometry import read_geometry

from helpers import load_tensors, run_convert
from test_calibration import _dense_error, make_tokenizer, tiny_text


def _geometry(n_kv: int, head_dim: int, hidden: int, heads: int):
    return read_geometry({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
                          "num_attention_heads": heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
                          "num_hidden_layers": 2, "intermediate_size": 2 * hidden, "vocab_size": 100,
                          "rms_norm_eps": 1e-5, "rope_theta": 10000.0})


def test_candidates_are_the_even_divisors_of_head_dim_that_leave_a_latent():
    llama8b = _geometry(8, 128, 4096, 32)
    assert split_candidates(llama8b, 576) == [32, 64, 128]  # 544+32, 512+64, 448+128 (TransMLA's pair)
    smol = _geometry(3, 64, 576, 9)
    assert split_candidates(smol, 128) == [16, 32, 64]
    assert split_candidates(smol, 40) == [16, 32]  # r = 40 - 64 < 1
    assert split_candidates(smol, 384) == [16, 32, 64]  # r = 384 - d_R <= 2 n_g d - d_R: full rank
    assert split_candidates(smol, 385) == []
    assert probe_layers(30) == [5, 15, 25] and probe_layers(2) == [0, 1] and probe_layers(1) == [0]


def test_budget_resolution():
    smol = _geometry(3, 64, 576, 9)
    s = resolve_settings(smol, kv_budget=192, qk_rope_dim=32, dtype="bfloat16", calib="x", method="gqla")
    assert (s.kv_lora_rank, s.qk_rope_head_dim, s.kv_budget, s.split_candidates) == (160, 32, 192, None)
    s = resolve_settings(smol, kv_budget=192, kv_lora_rank=176, dtype="bfloat16", calib="x", method="gqla")
    assert (s.kv_lora_rank, s.qk_rope_head_dim) == (176, 16)
    s = resolve_settings(smol, kv_budget=128, qk_rope_dim="auto", dtype="bfloat16", calib="x", method="gqla")
    assert s.split_candidates == [16, 32, 64] and s.kv_lora_rank + s.qk_rope_head_dim == 128
    # auto without a budget keeps the default rule's (here the matched recipe's 96 + 32)
    s = resolve_settings(smol, qk_rope_dim="auto", dtype="bfloat16", calib="x", method="gqla")
    assert s.kv_budget == 128 and s.split_candidates == [16, 32, 64]
    # a recipe named explicitly pins d_R, and says so
    s = resolve_settings(smol, kv_budget=160, qk_rope_dim="auto", recipe="smollm2-135m", dtype="bfloat16",
                         calib="x", method="gqla")
    assert (s.kv_lora_rank, s.qk_rope_head_dim, s.split_candidates) == (128, 32, None)
    assert "pins qk_rope_head_dim = 32" in report_line(s.split_search)
    # one candidate: no search, and the report says why
    s = resolve_settings(smol, kv_budget=20, qk_rope_dim="auto", dtype="bfloat16", calib="x", method="gqla")
    assert s.split_candidates is None and (s.kv_lora_rank, s.qk_rope_head_dim) == (4, 16)
    assert "only split" in report_line(s.split_search)


@pytest.mark.parametrize("kw, message", [
    (dict(kv_budget=2), "at least 3"),
    (dict(kv_budget=500, qk_rope_dim="auto"), "cannot be split"),
    (dict(kv_budget=128, kv_lora_rank=100, qk_rope_dim=32), "give two of the three"),
    (dict(kv_budget=128, kv_lora_rank=127), "d_R must be even"),
    (dict(kv_budget=64, qk_rope_dim=64), "needs latent rank 0"),
    (dict(kv_budget=128, qk_rope_dim="auto", kv_lora_rank=96), "drop --kv-lora-rank"),
    (dict(qk_rope_dim="auto", kv_lora_rank=96), "--kv-budget N"),
    (dict(kv_budget=128, qk_rope_dim="auto", method="pca", calib="none"), "needs calibration"),
])
def test_impossible_budgets_are_input_errors(kw, message):
    smol = _geometry(3, 64, 576, 9)
    kw = {"calib": "x", "method": "gqla", **kw}
    with pytest.raises(InputError, match=message):
        resolve_settings(smol, dtype="bfloat16", **kw)


def _one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "1000", "--qk-rope-dim", "auto"], "cannot be split"),
    (["--qk-rope-dim", "wide"], "even integer or 'auto'"),
    (["--kv-budget", "24", "--kv-lora-rank", "20", "--qk-rope-dim", "8"], "give two of the three"),
    (["--qk-rope-dim", "auto", "--calib", "none"], "needs calibration"),
])
def test_cli_refuses_impossible_budgets_in_one_line(source_factory, tmp_path, args, message):
    src, _ = source_factory("llama", layers=1)
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), *args])
    assert r.exit_code != 0 and message in _one_line_error(r)
    assert not (tmp_path / "out" / "config.json").exists()


def test_fixed_budget_splits_as_asked(source_factory, tmp_path):
    src, _ = source_factory("llama", layers=1)
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--kv-budget", "24", "--qk-rope-dim", "8",
                                 "--calib", "none", "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["settings"]
    assert (s["kv_lora_rank"], s["qk_rope_head_dim"], s["kv_budget"], s["split_search"]) == (16, 8, 24, None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (16, 8)


def test_auto_split_errors_are_the_converted_layers_errors(source_factory, tmp_path):
    """The search scores each candidate by the closed-form layer's output error; with the whole calibration
    set inside the search's windows, that is exactly what a conversion fixed at that split reports, and the
    chosen split's written layers have that error against a float64 source attention fed the hidden states
    of stock transformers."""
    src, model = source_factory("llama", n_kv=2, n_heads=4, head_dim=16, layers=3)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text())
    common = dict(calib=[str(text)], calib_tokens=512, calib_seqlen=64, method="gqla", refine=0)
    auto = run_convert(src, tmp_path / "auto", kv_budget=24, qk_rope_dim="auto", **common)
    report = auto.plan.settings.split_search
    assert set(report["candidates"]) == {"20+4", "16+8", "8+16"} and report["probe_layers"] == [0, 1, 2]
    assert report["chosen"] == min(report["candidates"], key=report["candidates"].get)
    chosen_rope = report["chosen_qk_rope_head_dim"]
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["qk_rope_head_dim"] == chosen_rope and cfg["kv_lora_rank"] == 24 - chosen_rope
    assert cfg["gqla"]["conversion"]["split_search"]["chosen"] == report["chosen"]
    # deterministic: planning again (as --resume does) finds the same split and the same plan fingerprint
    again = plan_conversion(ConvertRequest(source=str(src), out=tmp_path / "auto", kv_budget=24, qk_rope_dim="auto",
                                           **common))
    assert again.settings == auto.plan.settings and plan_fingerprint(again) == plan_fingerprint(auto.plan)
    again.checkpoint.close()
    for label, errors in report["layer_errors"].items():
        rank, rope = (int(v) for v in label.split("+"))
        fixed = run_convert(src, tmp_path / label, kv_lora_rank=rank, qk_rope_dim=rope, **common)
        assert errors == pytest.approx([r["attn_output_rel_error"] for r in fixed.layer_reports], rel=1e-4)
    # the chosen split's written layers against stock transformers hidden states and a float64 source
    windows = auto.plan.windows[:2]
    with torch.no_grad():
        hidden = model.double()(windows, output_hidden_states=True).hidden_states
    tensors = {k: v.double() for k, v in load_tensors(tmp_path / "auto").items()}
    ckpt = SafetensorsCheckpoint(src)
    rows = torch.arange(63, -1, -4).flip(0)
    for layer in report["probe_layers"]:
        with torch.no_grad():
            x = model.model.layers[layer].input_layernorm(hidden[layer])
        prefix = f"model.layers.{layer}.self_attn."
        conv = ConvertedAttention({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                                   and "o_proj" not in k}, {})
        dense = _dense_error(read_attention(ckpt, auto.plan.geo, layer), conv, x, tensors[prefix + "o_proj.weight"],
                             inv_freq(16, 10000.0), rows, chosen_rope, 24 - chosen_rope)
        assert dense == pytest.approx(report["layer_errors"][report["chosen"]][layer], rel=1e-3)
    ckpt.close()


def test_rope_candidates_fall_back_to_the_best_orthogonal_component():
    """At d_R = head_dim (one slot per frequency) every principal component near a frequency can lie in the
    span of those already chosen; the fallback then offers the most energetic unit component orthogonal to
    them, within that span plus the frequency's own pairs (checked against random components of the span)."""
    from transgqla.calib.rope_search import _candidates
    from transgqla.mathx.rorope import pair_energy

    n_g, d, f = 3, 16, 2
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n_g * d, 4 * n_g * d, generator=g, dtype=torch.float64)
    gram = a @ a.T / a.shape[1]
    cost = torch.rand(n_g, d // 2, generator=g, dtype=torch.float64) + 0.5
    first = _candidates(gram, cost, n_g, d, f, 1, [])
    chosen: list[torch.Tensor] = []
    for u in first:  # every usual candidate is now in the span of the chosen components
        for w in chosen:
            u = u - (u * w).sum() * w
        if u.norm() > 1e-9:
            chosen.append(u / u.norm())
    (fallback,) = _candidates(gram, cost, n_g, d, f, 1, chosen)
    assert float(fallback.norm()) == pytest.approx(1.0, abs=1e-12)
    assert max(abs(float((fallback * w).sum())) for w in chosen) < 1e-10
    energy = pair_energy(gram, n_g, d, list(range(d // 2)))
    e = lambda u: float(u.reshape(-1) @ energy @ u.reshape(-1))  # noqa: E731
    pairs = []
    for i in range(n_g):
        p = torch.zeros(n_g, d // 2, dtype=torch.float64)
        p[i, f] = 1.0
        pairs.append(p)
    span = chosen + pairs
    for _ in range(200):
        u = sum(float(c) * v for c, v in zip(torch.randn(len(span), generator=g, dtype=torch.float64), span))
        for w in chosen:
            u = u - (u * w).sum() * w
        if u.norm() > 1e-6:
            assert e(u / u.norm()) <= e(fallback) + 1e-10
