"""``transgqla plan``: the roofline formulas against hand-computed cases (DESIGN.md section 7).

Hand arithmetic, Llama-3-8B at 512 + 64 (32 heads, 8 groups, d = 128, bf16 cache, context T = 8192):
absorb FLOPs per byte = 2*32*(2*512 + 64) / ((512 + 64)*2) = 69632/1152 = 60.44 per query token; gqa
= 2*(32/8)/2 = 4. Cache bytes per token per layer: absorb 576*2 = 1152, gqa 8*(192 + 128)*2 = 5120.
"""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from cli.plan_cmd import register
from transgqla.errors import InputError
from transgqla.plan import GPUS, Shape, Workload, gpu_from, plan, shape_from_config
from transgqla.plan_bench import bench

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "hidden_act": "silu"}
T = 8192


@pytest.fixture
def llama():
    return shape_from_config(LLAMA3_8B)  # the llama3-8b-paper recipe: 512 + 64


def test_source_config_takes_the_recipe_ranks(llama):
    assert (llama.rank, llama.d_rope, llama.d_nope, llama.d_v) == (512, 64, 128, 128)
    # Llama-3-8B has 8.03 B parameters; as GQLA at 512 + 64 its q_proj is 192 rows per head instead of 128,
    # k/v become kv_a (576 x 4096) and kv_b (8 * 256 x 512): +3.4 M per layer, 8.14 B in all
    assert llama.weight_params == 8_030_261_248 + 32 * (32 * 64 * 4096 + 576 * 4096 + 8 * 256 * 512 - 2 * 1024 * 4096)


def test_h100_absorb_memory_bound_wins_by_4_44(llama):
    for sq in (1, 2, 4):
        doc = plan(llama, GPUS["h100"], Workload(sq=sq, context=T))
        a, g = doc["paths"]["absorb"], doc["paths"]["gqa"]
        assert a["flops_per_byte"] == pytest.approx(69632 / 1152 * sq) and g["flops_per_byte"] == pytest.approx(4 * sq)
        assert a["bound"] == g["bound"] == "memory"
        assert a["attention_seconds_per_token_per_layer"] == pytest.approx(T * 1152 / 3.35e12 / sq)
        assert doc["recommended"] == "absorb" and doc["speedup"] == pytest.approx(5120 / 1152)
        assert a["kv_bytes_per_token"] == 32 * 1152 and g["kv_bytes_per_token"] == 32 * 5120


def test_h20_gqa_overtakes_from_sq_3(llama):
    picks = {sq: plan(llama, GPUS["h20"], Workload(sq=sq, context=T))["recommended"] for sq in (1, 2, 3, 4)}
    assert picks == {1: "absorb", 2: "absorb", 3: "gqa", 4: "gqa"}
    doc = plan(llama, GPUS["h20"], Workload(sq=1, context=T))
    assert doc["paths"]["absorb"]["bound"] == "compute"
    assert doc["paths"]["absorb"]["attention_seconds_per_token_per_layer"] == pytest.approx(2 * 32 * T * 1088 / 148e12)
    assert doc["paths"]["gqa"]["attention_seconds_per_token_per_layer"] == pytest.approx(T * 5120 / 4.0e12)


def test_paper_regime_128_heads_gqa_wins_3x_on_h20():
    shape = Shape(n_heads=128, n_groups=8, rank=512, d_rope=64, d_nope=128, d_v=128, n_layers=1, weight_params=0)
    doc = plan(shape, GPUS["h20"], Workload(sq=2, context=T))
    # absorb: 2*128*1088 FLOPs per cached token per query token over 148e12; gqa: 5120 bytes per step of 2 tokens
    want = (2 * 128 * 1088 / 148e12) / (5120 / 4.0e12 / 2)
    assert doc["recommended"] == "gqa" and doc["speedup"] == pytest.approx(want) and 2.9 < want < 3.0


def test_tensor_parallel_splits_gqa_cache_not_absorb(llama):
    doc = plan(llama, GPUS["h20"], Workload(sq=1, tp=8, context=T))
    a, g = doc["paths"]["absorb"], doc["paths"]["gqa"]
    assert a["kv_values_per_token_per_layer"] == 576 and g["kv_values_per_token_per_layer"] == 320  # one group per rank
    # 4 heads per rank: 2*4*1088/1152 = 7.6 FLOPs per byte, under H20's ridge: absorb turns memory-bound on its
    # replicated cache, while each rank reads one group's 640 bytes per token
    assert a["bound"] == "memory" and a["attention_seconds_per_token_per_layer"] == pytest.approx(T * 1152 / 4.0e12)
    assert g["attention_seconds_per_token_per_layer"] == pytest.approx(T * 640 / 4.0e12)
    assert doc["recommended"] == "gqa"


def test_concurrent_tokens_from_memory_left_after_weights(llama):
    doc = plan(llama, GPUS["h100"], Workload(context=T))
    free = 80e9 * 0.9 - llama.weight_params * 2
    assert doc["paths"]["absorb"]["concurrent_tokens"] == int(free // (32 * 1152))


def test_gqla_config_read_as_is():
    cfg = dict(LLAMA3_8B, model_type="gqla", kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=128, v_head_dim=128)
    s = shape_from_config(cfg)
    assert (s.rank, s.d_rope, s.n_groups) == (256, 32, 8)


def test_gpu_choice():
    assert gpu_from("H20", None, None, None).ridge == pytest.approx(37, abs=0.1)
    assert gpu_from(None, 100.0, 2.0, None).ridge == 50
    assert gpu_from("h100", None, 2.0, None).tbps == 2.0
    with pytest.raises(InputError, match="unknown GPU"):
        gpu_from("v100", None, None, None)
    with pytest.raises(InputError, match="--tflops and --tbps"):
        gpu_from(None, 100.0, None, None)


def test_cli_json_document(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    app = typer.Typer(add_completion=False)

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    r = CliRunner().invoke(app, ["plan", str(tmp_path), "--gpu", "h20", "--sq", "2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["recommended"] in ("absorb", "gqa") and doc["paths"]["absorb"]["bound"] in ("memory", "compute")
    assert {"flops_per_byte", "bound", "kv_bytes_per_token"} <= set(doc["paths"]["gqa"])
    r = CliRunner().invoke(app, ["plan", str(tmp_path), "--tp", "5"])
    assert r.exit_code == 2 and "--tp 5 must divide" in r.stderr


def test_bench_runs_both_paths_on_cpu():
    shape = Shape(n_heads=4, n_groups=2, rank=16, d_rope=8, d_nope=16, d_v=16, n_layers=1, weight_params=0)
    out = bench(shape, Workload(sq=2, context=64, batch=2), "cpu", repeats=2)
    assert out["dtype"] == "float32" and all(t > 0 for t in out["seconds_per_step_per_layer"].values())
