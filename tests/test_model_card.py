"""Every ``convert`` and ``export`` output carries a ``README.md`` model card: what it is, its source (id and
hashes), the settings and measured figures, the cache per token on each path, how to load and serve it; listed in
the manifest and deterministic (the same command, the same bytes)."""

from __future__ import annotations

import hashlib
import json

from test_export import export_json, gqla  # noqa: F401 (fixture)


def test_conversion_card(gqla):
    out = gqla("llama")
    card = (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    src = cfg["gqla"]["source"]
    assert src["fingerprint"] in card and src["source"] in card and "## Load and serve" in card
    assert "| absorb (latent + RoPE key) | 32 |" in card and "| gqa (RoPE key per group) | 80 |" in card
    assert "| kv_lora_rank | 24 |" in card and "key_nope_rel_error" in card and "trust_remote_code=True" in card
    manifest = json.loads((out / "transgqla-manifest.json").read_text())["files"]
    assert manifest["README.md"] == hashlib.sha256((out / "README.md").read_bytes()).hexdigest()


def test_export_cards_are_deterministic_and_say_what_was_checked(gqla, tmp_path):
    out = gqla("llama")
    a, b = tmp_path / "a", tmp_path / "b"
    for dst in (a, b):
        export_json(out, dst, "--path", "absorb", "--format", "deepseek", "--kernel-shape", "512+64")
    card = (a / "README.md").read_text()
    assert (a / "README.md").read_bytes() == (b / "README.md").read_bytes()
    assert "deepseek export (absorb path)" in card and "zero-padded to r + d_R = 512 + 64" in card
    assert "greedy tokens: 16 of 16 equal" in card and "-rotary_embedding" in card
    assert json.loads((a / "transgqla-manifest.json").read_text())["files"]["README.md"]
    export_json(out, tmp_path / "m", "--path", "gqa", "--format", "mimo", "--equal-kv")
    assert "values zero-padded to the key's head size" in (tmp_path / "m" / "README.md").read_text()
