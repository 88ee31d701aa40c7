"""GPU check: a 2-layer Llama-3-8B-geometry calibrated conversion, verified and scored on one device.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--small] [--workdir DIR] [--results FILE]

One prepared script for a machine with a GPU (planned: under 8 minutes on one H200), and its
CPU-sized twin (``--device cpu --small``) that runs anywhere, so the GPU run works the first time.
Each step is the real CLI in a subprocess (``python -m transgqla.cli.app ... --json``), timed:

1. the source: benchmarks/scale.py's synthetic checkpoint (8B geometry cut to 2 layers; ``--small``:
   a 2-layer model of hidden 512) plus a word-level tokenizer built here from the built-in
   calibration text (the machine may have no network, and the synthetic model has no tokenizer);
2. ``convert SRC OUT --calib builtin:calib --device D`` (method gqla, 512 + 64; ``--small``: 64 + 32,
   fewer calibration tokens), its per-layer progress lines shown as they come;
3. ``verify OUT --source SRC --device D`` (structure, absorb-vs-gqa paths, fidelity to the source,
   greedy decode on both paths);
4. ``eval-ppl`` of the source and of OUT on both decode paths, on the built-in eval text.

Prints one line per step and a summary, and writes every figure to ``--results`` (default
``benchmarks/results/gpu-check-<device>[-small].json``). The exit code is 0 only if every step ran and
verify passed. The random source is not a language model: perplexities are large and only say that
the three runs agree (the paths must give the same value; the conversion's must be close to the source's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale  # noqa: E402  (benchmarks/scale.py: the synthetic checkpoint generator)

SMALL = dict(num_hidden_layers=2, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             intermediate_size=1024, vocab_size=32000, tie_word_embeddings=False, rope_theta=500000.0,
             rope_scaling=scale.LLAMA3_ROPE, max_position_embeddings=131072)
FLAGS = {
    "8b": ["--kv-lora-rank", "512", "--qk-rope-dim", "64"],
    "small": ["--kv-lora-rank", "64", "--qk-rope-dim", "32", "--calib-tokens", "2048", "--calib-seqlen", "256"],
}
TOKENIZER_VOCAB = 30000  # below both geometries' vocab_size


def write_tokenizer(folder: Path, vocab: int) -> int:
    """A word-level tokenizer of the built-in calibration text's most frequent words (plus [UNK])."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    from transgqla.text.builtin import builtin_text

    pre = pre_tokenizers.Whitespace()
    counts = Counter(w for w, _ in pre.pre_tokenize_str(builtin_text("calib") + "\n" + builtin_text("eval")))
    words = [w for w, _ in counts.most_common(vocab - 1)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.save(str(folder / "tokenizer.json"))
    return len(words) + 1


def run_cli(args: list[str], log: Path, stream_stderr: bool = False) -> dict[str, Any]:
    """``transgqla ARGS --json`` in a subprocess: (seconds, exit code, parsed stdout, stderr lines)."""
    cmd = [sys.executable, "-m", "transgqla.cli.app", *args, "--json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        stderr_lines = []
        for line in proc.stderr:  # progress lines as they come
            stderr_lines.append(line.rstrip("\n"))
            err.write(line)
            if stream_stderr:
                print("    " + line.rstrip("\n"), flush=True)
        stdout = proc.stdout.read()
        proc.wait()
    seconds = time.perf_counter() - t0
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        doc = None
    return {"cmd": " ".join(cmd[3:]), "seconds": round(seconds, 2), "exit_code": proc.returncode, "json": doc,
            "stderr_tail": stderr_lines[-5:]}


def gpu_info(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="a 2-layer hidden-512 model instead of the 8B geometry")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "transgqla-gpu-check")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--calib-tokens", type=int, default=None, help="override the calibration tokens")
    args = ap.parse_args(argv)
    kind = "small" if args.small else "8b"
    tag = f"gpu-check-{args.device}{'-small' if args.small else ''}"
    results = args.results or HERE / "results" / f"{tag}.json"
    work = args.workdir.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    geometry = dict(SMALL) if args.small else {**scale.GEOMETRIES["8b"], "num_hidden_layers": 2}
    src, out = work / f"src-{kind}", work / f"gqla-{kind}"
    doc: dict[str, Any] = {"geometry": kind, "device": args.device, "machine": gpu_info(args.device), "steps": {}}
    total = time.perf_counter()

    def step(name: str, result: dict[str, Any]) -> dict[str, Any]:
        doc["steps"][name] = result
        print(f"[{name}] exit {result['exit_code']} in {result['seconds']:.1f} s", flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(doc, indent=2) + "\n")  # partial figures survive a timeout
        return result

    print(f"1. source ({kind} geometry, 2 layers) in {src}", flush=True)
    t0 = time.perf_counter()
    scale.ensure_checkpoint(src, scale.llama_config(geometry), log=lambda m: print("    " + m, flush=True))
    doc["tokenizer_vocab"] = write_tokenizer(src, TOKENIZER_VOCAB)
    doc["source_seconds"] = round(time.perf_counter() - t0, 2)

    print(f"2. convert --calib builtin:calib --device {args.device}", flush=True)
    flags = list(FLAGS[kind])
    if args.calib_tokens:
        flags += ["--calib-tokens", str(args.calib_tokens)]
    conv = step("convert", run_cli(["convert", str(src), str(out), "--calib", "builtin:calib", "--device", args.device,
                                    "--force", *flags], work / "convert.log", stream_stderr=True))
    if conv["exit_code"] != 0:
        print("convert failed:\n" + "\n".join(conv["stderr_tail"]), flush=True)
        return 1
    summary = conv["json"]
    doc["conversion"] = {k: summary.get(k) for k in ("settings", "cache_values_per_token", "worst_layer_errors", "seconds")}

    print(f"3. verify --device {args.device}", flush=True)
    ver = step("verify", run_cli(["verify", str(out), "--source", str(src), "--device", args.device], work / "verify.log"))
    checks = {c["name"]: {"status": c.get("status"), "value": c.get("value")} for c in (ver["json"] or {}).get("checks", [])}
    doc["verify_checks"] = checks

    print(f"4. eval-ppl --device {args.device}: source, absorb, gqa", flush=True)
    ppl = {}
    for label, model, path in (("source", src, None), ("absorb", out, "absorb"), ("gqa", out, "gqa")):
        extra = ["--path", path] if path else []
        r = step(f"eval-ppl-{label}", run_cli(["eval-ppl", str(model), "--text", "builtin:eval", "--max-tokens", "8192",
                                               "--device", args.device, *extra], work / f"ppl-{label}.log"))
        ppl[label] = (r["json"] or {}).get("perplexity")
    doc["perplexity"] = ppl
    doc["total_seconds"] = round(time.perf_counter() - total, 1)
    results.write_text(json.dumps(doc, indent=2) + "\n")

    ok = all(s["exit_code"] == 0 for s in doc["steps"].values())
    print(f"\nsummary ({kind}, {args.device}, {doc['machine'].get('gpu', 'cpu')}):")
    print(f"  convert {conv['seconds']:.1f} s (tool's own {summary.get('seconds')} s), settings "
          f"{summary['settings']['kv_lora_rank']} + {summary['settings']['qk_rope_head_dim']}, method {summary['settings']['method']}")
    print(f"  verify {ver['seconds']:.1f} s, exit {ver['exit_code']}: "
          + ", ".join(f"{n} {c['status']}" for n, c in checks.items()))
    print(f"  perplexity source {ppl['source']}, absorb {ppl['absorb']}, gqa {ppl['gqa']}")
    if ppl["absorb"] and ppl["gqa"]:
        print(f"  absorb/gqa perplexity ratio {ppl['absorb'] / ppl['gqa']:.6f}")
    print(f"  total {doc['total_seconds']} s; figures in {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
