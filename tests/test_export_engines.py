"""``export --format deepseek`` for the engines (the default target) and the engine-kernel table.

The engine form has no biases, ``kv_lora_rank = r`` and the latent RMSNorm in its linear regime; stock
``DeepseekV3ForCausalLM`` (no remote code) must reproduce the GQLA reference, the norm must really be linear
on the model's own activations (checked against a float64 product of OUT's weights), and bfloat16 compute
must be about as close as the exact constant-coordinate form's. The kernel table is checked on hand cases.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from transgqla.engines import UNIVERSAL, MLAShape, advice, decode_support, fast_kernels, padded_shape, vllm_prefill_ok
from transgqla.export.latent_norm import LATENT_NORM_EPS, LINEAR_HEADROOM_BITS, linear_norm
from transgqla.io import SafetensorsCheckpoint

from conftest import make_source
from helpers import load_decoder, load_tensors, rel_err, run_convert
from test_export import LLAMA3, export_json, ids, invoke, nothing_at, one_line_error


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    """GQLA checkpoints for the engine form: name -> folder (built once)."""
    root = tmp_path_factory.mktemp("engines-src")
    made = {}

    def get(name: str):
        if name not in made:
            family, dtype, extra = {
                "eps5": ("llama", torch.float32, {"rope_parameters": LLAMA3, "rms_norm_eps": 1e-5}),
                "bf16": ("llama", torch.bfloat16, {}),
                "f16": ("llama", torch.float16, {}),
                "qwen2": ("qwen2", torch.float32, {}),
            }[name]
            make_source(root / f"src-{name}", family, dtype=dtype, **extra)
            run_convert(root / f"src-{name}", root / name, kv_lora_rank=24, qk_rope_dim=8)
            made[name] = root / name
        return made[name]

    return get


def stock(dst, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst, dtype=dtype)  # no trust_remote_code
    assert type(model) is DeepseekV3ForCausalLM
    return model.eval()


def test_engine_form_in_stock_transformers(eng, tmp_path):
    out, dst = eng("eps5"), tmp_path / "ds"
    doc = export_json(out, dst, "--path", "absorb", "--format", "deepseek")
    assert doc["ok"] and doc["target"] == "engines" and doc["check"]["greedy_tokens_equal"]
    assert doc["latent_norm"]["form"] == "linear" and doc["latent_norm"]["worst_case_rel_error"] <= 2.0**-25
    assert any("rms_norm_eps 1e-05 -> 1e-06" in w and "compensated exactly" in w for w in doc["warnings"])
    assert doc["residual_stream_scale"] == pytest.approx(math.sqrt(0.1))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 24 and cfg["attention_bias"] is False and cfg["q_lora_rank"] is None
    assert cfg["rms_norm_eps"] == LATENT_NORM_EPS and cfg["n_routed_experts"] >= 2 and cfg["torch_dtype"] == "float32"
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["rope_scaling"]["rope_type"] == cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == 8.0
    with SafetensorsCheckpoint(dst) as ck:
        assert not [n for n in ck.names if n.endswith("bias")]
        assert ck.spec("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").shape == (24 + 8, 64)
    model, ref = stock(dst), load_decoder(out, dtype=torch.float64)
    x = ids()
    with torch.no_grad():
        err = rel_err(model(x).logits, ref.forward(x, ref.new_cache("absorb")))
    assert err < 1e-5, err  # eps 1e-5 -> 1e-6 compensated by the residual-stream scale: measured ~3e-7
    print(f"engine form float32, source eps 1e-5: relative logit error {err:.2e}")


def test_latent_norm_is_linear_on_the_model_activations(eng, tmp_path):
    """kv_a_layernorm's output equals OUT's latent c = W_DKV x (float64) on the model's own inputs."""
    out, dst = eng("eps5"), tmp_path / "ds"
    export_json(out, dst, "--path", "absorb", "--format", "deepseek")
    model, w_dkv = stock(dst), load_tensors(out)["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"][:24].double()
    attn = model.model.layers[1].self_attn
    seen = {}
    attn.kv_a_proj_with_mqa.register_forward_hook(lambda m, a, o: seen.update(x=a[0].double(), pre=o[..., :24].double()))
    attn.kv_a_layernorm.register_forward_hook(lambda m, a, o: seen.update(post=o.double()))
    with torch.no_grad():
        model(ids())
    delta = seen["pre"].pow(2).mean(-1) / LATENT_NORM_EPS
    assert float(delta.max()) <= 2.0**-LINEAR_HEADROOM_BITS
    c = seen["x"] @ w_dkv.T
    assert rel_err(seen["post"], c) < 1e-6


def test_linear_norm_bound_holds_for_every_input():
    torch.manual_seed(3)
    r, d = 32, 48
    w = torch.randn(r, d, dtype=torch.float64) * 0.3
    bound = float(torch.linalg.matrix_norm(w, ord=2)) * math.sqrt(d)
    norm = linear_norm(bound, r, "F32")
    assert math.log2(norm.alpha) == int(math.log2(norm.alpha))  # a power of two: alpha * W stays exact
    u = torch.randn(4096, d, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)  # every RMSNorm output has |u| = sqrt(D)
    u[0] = torch.linalg.svd(w).Vh[0] * math.sqrt(d)  # the worst case
    c = u @ w.T
    a = norm.alpha * c
    out = norm.weight * a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS)
    worst = float(((out - norm.scale * c).norm(dim=-1) / (norm.scale * c).norm(dim=-1)).max())
    assert worst <= norm.worst_rel_error * 1.01 and norm.worst_rel_error <= 2.0**-25


def test_bfloat16_compute_as_close_as_the_exact_form(eng, tmp_path):
    out = eng("bf16")
    ref = load_decoder(out, dtype=torch.float64)
    x = ids()
    want = ref.forward(x, ref.new_cache("absorb"))
    errs = {}
    for target in ("engines", "transformers"):
        dst = tmp_path / target
        export_json(out, dst, "--path", "absorb", "--format", "deepseek", "--target", target)
        with torch.no_grad():
            errs[target] = rel_err(stock(dst, torch.bfloat16)(x).logits, want)
    # measured 6.1e-3 (engines) against 5.5e-3 (exact form): bf16 compute dominates both
    assert errs["engines"] < 1.5 * errs["transformers"] + 1e-3, errs
    print(f"bfloat16 compute: engine form {errs['engines']:.2e}, exact form {errs['transformers']:.2e}")


def test_float16_refused_for_engines(eng, tmp_path):
    dst = tmp_path / "ds"
    r = invoke("export", eng("f16"), dst, "--path", "absorb", "--format", "deepseek")
    assert r.exit_code == 3 and "float16 cannot hold" in one_line_error(r) and nothing_at(dst)


def test_attention_biases_refused_for_engines(eng, tmp_path):
    dst = tmp_path / "ds"
    r = invoke("export", eng("qwen2"), dst, "--path", "absorb", "--format", "deepseek")
    line = one_line_error(r)
    assert r.exit_code == 3 and "Qwen2 attention biases (q_proj.bias" in line
    assert "--path gqa --format mimo" in line and "--target transformers" in line and nothing_at(dst)


# ---------------------------------------------------------------------------------------- kernel table


def test_universal_shape_runs_on_every_kernel():
    shape = MLAShape(*UNIVERSAL)
    assert all(v.accepted for v in decode_support(shape)) and vllm_prefill_ok(shape) and advice(shape) == ""


@pytest.mark.parametrize("shape, fast, prefill", [
    ((256, 64, 128, 128), ["FlashAttention-3 MLA"], True),
    ((256, 64, 64, 128), ["FlashAttention-3 MLA", "FlashInfer MLA"], True),
    ((264, 32, 128, 128), ["FlashAttention-3 MLA"], False),  # d_R 32: FA3 takes it, vLLM's prefill does not
    ((260, 64, 128, 128), [], True),  # r % 8 != 0
    ((576, 64, 128, 128), [], True),  # r > 512
    ((512, 128, 128, 128), [], False),
    ((96, 32, 64, 64), [], False),  # the demo at 96 + 32
])
def test_kernel_rules(shape, fast, prefill):
    s = MLAShape(*shape)
    assert fast_kernels(s) == fast and vllm_prefill_ok(s) is prefill
    assert (advice(s) == "") is bool(fast and prefill)


@pytest.mark.parametrize("shape", [(96, 32, 64, 64), (24, 8, 16, 16), (128, 64, 128, 128), (300, 16, 192, 200), (512, 32, 64, 64)])
def test_advice_pads_without_shrinking(shape):
    s = MLAShape(*shape)
    p = padded_shape(s)
    assert p.rank >= s.rank and p.d_rope >= s.d_rope and p.d_nope >= s.d_nope and p.d_v >= s.d_v
    assert p.d_rope % s.d_rope == 0  # pair p moves to slot p * d_R' / d_R: same frequency
    assert fast_kernels(p) and vllm_prefill_ok(p) and "zero padding" in advice(s)


def test_rope_wider_than_64_needs_a_reconversion():
    assert "--qk-rope-dim 64" in advice(MLAShape(512, 128, 128, 128))


def test_8b_recipes_give_the_universal_shape():
    """Every built-in recipe for 8-KV-head, head_dim-128 sources lands on (512, 64, 128, 128)."""
    from transgqla.recipe_book import builtin_recipes

    eight_b = [r for r in builtin_recipes() if r.match.get("num_key_value_heads") == 8 and r.match.get("head_dim") == 128]
    assert eight_b
    for recipe in eight_b:
        d = recipe.match["head_dim"]  # GQLA keeps d_nope = d_v = the source head dim
        shape = MLAShape(recipe.settings["kv_lora_rank"], recipe.settings["qk_rope_head_dim"], d, d)
        assert (shape.rank, shape.d_rope, shape.d_nope, shape.d_v) == UNIVERSAL, recipe.name


def test_half_precision_keeps_eps_change_when_the_stream_is_large(tmp_path):
    """bfloat16 weights and a residual stream far above eps (embedding std 0.2): the eps change moves the norms by
    ~1e-4, less than re-rounding would; no rescale, the embedding is copied byte for byte."""
    make_source(tmp_path / "src", "llama", dtype=torch.bfloat16, rms_norm_eps=1e-5, initializer_range=0.2)
    run_convert(tmp_path / "src", tmp_path / "out", kv_lora_rank=24, qk_rope_dim=8)
    doc = export_json(tmp_path / "out", tmp_path / "ds", "--path", "absorb", "--format", "deepseek")
    assert doc["ok"] and doc["residual_stream_scale"] == 1.0
    assert any("-> 1e-06 in every norm" in w for w in doc["warnings"])
    with SafetensorsCheckpoint(tmp_path / "out") as a, SafetensorsCheckpoint(tmp_path / "ds") as b:
        assert a.read_bytes("model.embed_tokens.weight") == b.read_bytes("model.embed_tokens.weight")


def test_half_precision_rescales_a_small_stream(tmp_path, monkeypatch):
    """bfloat16 weights, embedding std 0.02 (mean square 4e-4, like random 8B-shaped checkpoints): the eps change
    would move the first norm by ~1.1e-2, more than bfloat16 rounding, so the stream is rescaled (re-rounded),
    and that is measurably closer to the GQLA reference than the eps change alone."""
    import transgqla.export.deepseek as ds
    from transgqla.export import ExportRequest, run_export

    make_source(tmp_path / "src", "llama", dtype=torch.bfloat16, rms_norm_eps=1e-5)
    out = tmp_path / "out"
    run_convert(tmp_path / "src", out, kv_lora_rank=24, qk_rope_dim=8)
    doc = export_json(out, tmp_path / "ds", "--path", "absorb", "--format", "deepseek")
    assert doc["ok"] and doc["residual_stream_scale"] == pytest.approx(math.sqrt(0.1))
    assert any("re-rounded to half precision" in w for w in doc["warnings"])
    rescaled = doc["check"]["rel_logit_error"]
    monkeypatch.setattr(ds, "rescale_pays", lambda *a: False)  # the eps change alone, for comparison
    alone = run_export(ExportRequest(out, tmp_path / "ds2", format="deepseek", device="cpu", tolerance=1.0))
    assert alone.details["residual_stream_scale"] == 1.0
    print(f"bf16, small stream: rescaled {rescaled:.2e}, eps change alone {alone.check.rel_error:.2e}")
    assert rescaled < alone.check.rel_error


def test_rescale_rule():
    from transgqla.export.latent_norm import eps_shift, rescale_pays

    assert rescale_pays(1e-5, {"F32"}, None) and not rescale_pays(1e-5, {"BF16"}, None)
    assert eps_shift(1e-5, 1.8e-2) == pytest.approx(2.45e-4, rel=3e-2)  # the demo: keep the eps change
    assert not rescale_pays(1e-5, {"BF16"}, 1.8e-2)
    assert eps_shift(1e-5, 4e-4) == pytest.approx(1.1e-2, rel=2e-2) and rescale_pays(1e-5, {"BF16"}, 4e-4)
