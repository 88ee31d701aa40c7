"""The vLLM runs on a CUDA GPU, prepared (not yet run: no GPU has been lent to this project's vLLM work).

    TRANSGQLA_VLLM_PYTHON=/path/to/cuda-vllm/bin/python python benchmarks/gpu_vllm.py [--workdir DIR] [--quick]

One script for a machine with one NVIDIA GPU and a CUDA build of vLLM (``pip install vllm`` beside this package:
the plugin registers itself), so the first GPU run works: it builds benchmarks/vllm_serve.py's Llama-3-8B-shaped
2-layer model and its exports (bfloat16, 512 + 64), then runs, each in one vLLM process (all runs of the job one
after the other, :mod:`transgqla.vllm_plugin.run`), with the same KV memory:

1. the source (GQA, FlashAttention);
2. the DeepSeek export on **FlashMLA** and on **FlashAttention-3 MLA** (``attention_config.backend``);
3. the MiMo export with K != V on vLLM's **diff-KV** backend against ``--equal-kv`` on the ordinary one;
4. the plugin on both paths at ``s_q = 1`` and at ``s_q = 2`` (n-gram speculative decoding with one proposed
   token: every decode step scores two query tokens), and ``auto`` (``transgqla plan``'s pick for this GPU);
5. SGLang, if ``--sglang-python`` is given: the DeepSeek export, greedy tokens against vLLM's. SGLang has an open
   issue of coercing unscaled MLA configs onto YaRN RoPE under transformers 5; the export writes
   ``rope_scaling: null`` with ``rope_parameters.rope_type: default``, and this step checks that SGLang's tokens
   equal vLLM's (a YaRN coercion would move them).

It prints KV tokens, concurrency and prefill/decode tokens/s per run (benchmarks/vllm_serve.py's table), checks
that every run's greedy tokens on a fixed prompt equal the plugin's absorb tokens where the path is the same
model, and writes everything to ``--results`` (default ``benchmarks/results/gpu-vllm.json``). Planned: under 8
minutes on one H200 (each engine start ~30 s with CUDA graphs off: ``enforce_eager``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vllm_serve  # noqa: E402  (the model builders, the runner call and the table)

PROMPT = [1, 5, 9, 33, 12, 7, 80, 3, 41, 2, 17, 99]
NGRAM = {"method": "ngram", "num_speculative_tokens": 1, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


def runs(src: Path, out: Path, made: dict[str, Path]) -> list[dict]:
    def backend(name: str) -> dict:
        return {"attention_config": {"backend": name}}

    plugin = lambda path: {"hf_overrides": {"gqla_decode_path": path}}  # noqa: E731
    return [
        {"name": "source (GQA)", "model": str(src)},
        {"name": "deepseek, FlashMLA", "model": str(made["deepseek"]), "llm_kwargs": backend("FLASHMLA")},
        {"name": "deepseek, FA3 MLA", "model": str(made["deepseek"]), "llm_kwargs": backend("FLASH_ATTN_MLA")},
        {"name": "mimo K != V, diff-KV", "model": str(made["mimo"]), "llm_kwargs": backend("FLASH_ATTN_DIFFKV"),
         "isolate": True},
        {"name": "mimo --equal-kv", "model": str(made["mimo-equal-kv"])},
        {"name": "plugin absorb s_q=1", "model": str(out), **plugin("absorb")},
        {"name": "plugin absorb s_q=2", "model": str(out), **plugin("absorb"),
         "llm_kwargs": {"speculative_config": NGRAM}},
        {"name": "plugin gqa s_q=1", "model": str(out), **plugin("gqa")},
        {"name": "plugin gqa s_q=2", "model": str(out), **plugin("gqa"), "llm_kwargs": {"speculative_config": NGRAM}},
        {"name": "plugin auto", "model": str(out), **plugin("auto")},
    ]


def sglang_tokens(python: str, model: Path, workdir: Path) -> dict:
    """Greedy tokens of the DeepSeek export in SGLang's offline engine (its own interpreter)."""
    script = workdir / "sglang_run.py"
    script.write_text(
        "import json, sys\nimport sglang as sgl\n"
        "eng = sgl.Engine(model_path=sys.argv[1], skip_tokenizer_init=True, mem_fraction_static=0.3)\n"
        f"out = eng.generate(input_ids=[{PROMPT}], sampling_params={{'temperature': 0, 'max_new_tokens': 16}})\n"
        "print('RESULT', json.dumps(out[0]['output_ids']))\n")
    proc = subprocess.run([python, str(script), str(model)], capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {"tokens": json.loads(line[7:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/transgqla-gpu-vllm"))
    ap.add_argument("--results", type=Path, default=HERE / "results" / "gpu-vllm.json")
    ap.add_argument("--kv-mib", type=int, default=2048)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="no throughput runs (tokens and capacities only)")
    ap.add_argument("--vllm-python", default=os.environ.get("TRANSGQLA_VLLM_PYTHON", sys.executable))
    ap.add_argument("--sglang-python", default="")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, out = vllm_serve.build_8b(args.workdir)
    made = vllm_serve.exports(out, args.workdir, "8b", small_latent=False)
    job = runs(src, out, made)
    probe = vllm_serve.run_vllm(args.vllm_python, [{**job[0], "kv_cache_memory_bytes": args.kv_mib << 20,
                                                    "max_model_len": args.context, "dtype": "bfloat16"}],
                                args.workdir, "gpu-probe")
    batch = max(1, probe[0].get("kv_cache_tokens", 0) // 2048)
    for r in job:
        r.update(kv_cache_memory_bytes=args.kv_mib << 20, max_model_len=args.context, dtype="bfloat16",
                 prompts=[PROMPT], max_tokens=16, logprobs=1)
        if not args.quick:
            r["bench"] = {"prompt_len": 1024, "decode_tokens": 128, "batches": [1, batch]}
    results = vllm_serve.run_vllm(args.vllm_python, job, args.workdir, "gpu")
    print(vllm_serve.table("Llama-3-8B-shaped, 2 layers, on " + os.environ.get("GPU_NAME", "the GPU"), results, batch,
                           args.context))
    ref = next((r["tokens"][0] for r in results if r["name"] == "plugin absorb s_q=1" and "tokens" in r), None)
    same = {r["name"]: r.get("tokens", [None])[0] == ref for r in results if r["name"] != "source (GQA)"}
    print("greedy tokens equal to the plugin's absorb path:", same)
    doc = {"runs": results, "tokens_equal_plugin_absorb": same, "batch": batch}
    if args.sglang_python:
        doc["sglang"] = sglang_tokens(args.sglang_python, made["deepseek"], args.workdir)
        doc["sglang"]["equal_vllm"] = doc["sglang"].get("tokens") == ref
        print("SGLang, DeepSeek export:", doc["sglang"])
    args.results.write_text(json.dumps(doc, indent=1) + "\n")
    ok = all(same.values()) and all("error" not in r for r in results if "diff-KV" not in r["name"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
