"""The export checks that fit large models: hashes for byte-identical exports, layer by layer otherwise.

The layer-by-layer check must agree with the whole-model check where both run, and must fail when a
single layer of the export is wrong (the last one, where a prefix check would not look) or when the
``lm_head`` differs; the manifest check must fail on one flipped byte.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from transgqla.export import ExportRequest, run_export
from transgqla.export import check as check_mod
from transgqla.export.check import deepseek_candidate, manifest_check, mimo_candidate, run_check

from test_export import export_json, gqla  # noqa: F401 (fixture)


@pytest.mark.parametrize("fmt, path, flags", [("deepseek", "absorb", ()), ("mimo", "gqa", ()), ("gqla", "gqa", ("--fold-kv",)),
                                              ("deepseek", "absorb", ("--target", "transformers"))])
def test_layerwise_agrees_with_full(gqla, tmp_path, fmt, path, flags):
    out = gqla("qwen2") if fmt != "deepseek" else gqla("llama")
    full = export_json(out, tmp_path / "a", "--path", path, "--format", fmt, *flags, "--check", "full")["check"]
    layer = export_json(out, tmp_path / "b", "--path", path, "--format", fmt, *flags, "--check", "layerwise")["check"]
    assert full["mode"] == "full" and layer["mode"] == "layerwise" and layer["ok"]
    assert len(layer["per_layer_rel_error"]) == 2 and layer["rel_logit_error"] < 1e-5 and full["rel_logit_error"] < 1e-5
    assert "lm_head bytes equal OUT's" in layer["notes"]


def _tamper(folder, name, fn):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("fmt, path, candidate", [("deepseek", "absorb", deepseek_candidate), ("mimo", "gqa", mimo_candidate)])
def test_layerwise_catches_a_wrong_last_layer_and_head(gqla, tmp_path, fmt, path, candidate):
    out = gqla("llama")
    dst = tmp_path / "dst"
    export_json(out, dst, "--path", path, "--format", fmt)
    out_cfg = json.loads((out / "config.json").read_text())
    dst_cfg = json.loads((dst / "config.json").read_text())

    def check():
        return run_check(out, out_cfg, dst, dst_cfg, candidate, 1e-4, mode="layerwise")

    assert check().ok
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    dst = bad
    # swap two query heads of the last layer: every shape still fits, the model is wrong
    q = "model.layers.1.self_attn.q_proj.weight"
    _tamper(bad, q, lambda w: torch.cat((w[w.shape[0] // 4 :], w[: w.shape[0] // 4])))
    result = check()
    assert not result.ok and result.per_layer[0] < 1e-5 and result.per_layer[1] > 1e-3
    _tamper(bad, q, lambda w: torch.cat((w[-(w.shape[0] // 4) :], w[: -(w.shape[0] // 4)])))  # undo
    assert check().ok
    _tamper(bad, "lm_head.weight", lambda w: w * 1.01)
    result = check()
    assert not result.ok and "lm_head bytes differ" in result.notes[-1]


def test_auto_goes_layerwise_above_the_limit(gqla, tmp_path, monkeypatch):
    monkeypatch.setattr(check_mod, "FULL_CHECK_BYTES", 1000)
    doc = export_json(gqla("llama"), tmp_path / "d", "--path", "gqa", "--format", "mimo")
    assert doc["check"]["mode"] == "layerwise" and doc["ok"]


def test_manifest_check_catches_a_flipped_byte(gqla, tmp_path):
    out, dst = gqla("llama"), tmp_path / "same"
    r = run_export(ExportRequest(out, dst, path="absorb"))
    assert r.ok and r.check.mode == "manifest"
    files = sorted(p.name for p in dst.glob("*.safetensors")) + ["model.safetensors.index.json"]
    assert manifest_check(out, dst, "transgqla-manifest.json", files).ok
    shard = dst / files[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    result = manifest_check(out, dst, "transgqla-manifest.json", files)
    assert not result.ok and files[0] in result.notes[0]
