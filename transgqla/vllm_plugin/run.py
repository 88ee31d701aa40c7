"""Run checkpoints in stock vLLM and report what it did: ``python -m transgqla.vllm_plugin.run JOB.json OUT.json``.

Why a script: vLLM lives in its own interpreter (it pins ``transformers<5.20``; the project's tests run on a
newer one), so the tests and ``benchmarks/vllm_serve.py`` write a job, run this with the vLLM interpreter
(``TRANSGQLA_VLLM_PYTHON``) and read the result. Every run of the job is one engine start-up, in this one
process, one after the other (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no worker processes, no ``__main__`` guard
needed); a run that fails records its first error line and the next one goes on.

A job: ``{"runs": [RUN, ...]}``; a RUN: ``name``, ``model`` (a folder), and optionally ``hf_overrides``,
``dtype`` (default float32), ``max_model_len`` (256), ``kv_cache_memory_bytes`` (the KV cache's size, the same
for every run so that capacities compare; default: ``gpu_memory_utilization`` 0.05), ``tensor_parallel_size``,
``prompts`` (lists of token ids; the checkpoints may have no tokenizer), ``max_tokens`` (16), ``logprobs`` (5),
``compilation_config`` (e.g. ``{"custom_ops": ["-rotary_embedding"]}``), ``isolate`` (run in a child process: for
a run that may fail mid-generation), ``bench`` (``{"prompt_len": L, "batches": [1, N], "decode_tokens": K}``:
prefill and decode tokens/s), ``llm_kwargs`` (passed to ``LLM``: ``speculative_config``, ``attention_config``...),
``env`` (variables set before the engine starts).

Result per run: ``tokens`` (greedy, per prompt), ``logprobs`` (per generated token, ``{id: logprob}`` of the top
ones, raw: before any sampling processing), ``kv_cache_tokens`` and ``max_concurrency`` as vLLM states them
(``max_model_len`` tokens per request), ``architecture``, ``startup_seconds``, ``bench``, or ``error``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _engine_config(llm) -> Any:
    engine = llm.llm_engine
    return getattr(engine, "vllm_config", None) or engine.engine_core.engine_core.vllm_config


def _bench(llm, bench: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Prefill tokens/s (``max_tokens=1``) and decode tokens/s (the extra time of ``decode_tokens`` more) per
    batch; prompts are fixed pseudo-random ids, distinct per sequence (no prefix-cache hits)."""
    from vllm import SamplingParams

    L, k = int(bench.get("prompt_len", 128)), int(bench.get("decode_tokens", 32))
    out: dict[str, Any] = {"prompt_len": L, "decode_tokens": k, "batches": {}}
    for batch in bench.get("batches", [1]):
        prompts = [{"prompt_token_ids": [(17 * (i + 1) + 31 * j * j + i * j) % (vocab - 1) + 1 for j in range(L)]}
                   for i in range(int(batch))]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        many = SamplingParams(temperature=0, max_tokens=k + 1, ignore_eos=True)
        llm.generate(prompts[:1], one, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(prompts, many, use_tqdm=False)
        t2 = time.perf_counter()
        prefill, decode = t1 - t0, max((t2 - t1) - (t1 - t0), 1e-9)
        out["batches"][str(batch)] = {"prefill_seconds": prefill, "prefill_tokens_per_s": batch * L / prefill,
                                      "decode_seconds": decode, "decode_tokens_per_s": batch * k / decode}
    return out


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    kwargs: dict[str, Any] = dict(model=spec["model"], skip_tokenizer_init=True, dtype=spec.get("dtype", "float32"),
                                  max_model_len=int(spec.get("max_model_len", 256)), enforce_eager=True, seed=0,
                                  tensor_parallel_size=int(spec.get("tensor_parallel_size", 1)))
    if spec.get("kv_cache_memory_bytes"):
        kwargs["kv_cache_memory_bytes"] = int(spec["kv_cache_memory_bytes"])
    else:
        kwargs["gpu_memory_utilization"] = float(spec.get("gpu_memory_utilization", 0.05))
    for key in ("hf_overrides", "compilation_config"):
        if spec.get(key):
            kwargs[key] = spec[key]
    kwargs.update(spec.get("llm_kwargs") or {})  # e.g. speculative_config (s_q = 2), attention_config (a kernel)
    os.environ.update({k: str(v) for k, v in (spec.get("env") or {}).items()})
    llm = None
    try:
        llm = LLM(**kwargs)
        cfg = _engine_config(llm)
        result: dict[str, Any] = {
            "name": spec.get("name"), "model": spec["model"], "startup_seconds": time.perf_counter() - start,
            "architecture": (cfg.model_config.architectures or [None])[0],
            "use_mla": bool(cfg.model_config.use_mla),
            "kv_cache_tokens": getattr(cfg.cache_config, "kv_cache_size_tokens", None),
            "max_concurrency": getattr(cfg.cache_config, "kv_cache_max_concurrency", None),
            "max_model_len": cfg.model_config.max_model_len,
        }
        prompts = spec.get("prompts") or []
        if prompts:
            params = SamplingParams(temperature=0, max_tokens=int(spec.get("max_tokens", 16)), ignore_eos=True,
                                    logprobs=int(spec.get("logprobs", 5)))
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
            result["logprobs"] = [[{str(t): float(lp.logprob) for t, lp in step.items()}
                                   for step in o.outputs[0].logprobs] for o in outs]
        if spec.get("bench"):
            result["bench"] = _bench(llm, spec["bench"], int(cfg.model_config.get_vocab_size()))
        return result
    finally:  # also after a failed start-up: the next run needs a clean distributed state
        del llm
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def _isolated(spec: dict[str, Any], out_path: str) -> dict[str, Any]:
    """Run ``spec`` in a child process (an engine that fails mid-generation leaves state that breaks the next
    engine of the same process: vLLM's parallel groups)."""
    import subprocess

    one_job, one_out = out_path + ".one.json", out_path + ".one.out.json"
    if os.path.exists(one_out):
        os.remove(one_out)
    with open(one_job, "w") as fh:
        json.dump({"runs": [{**spec, "isolate": False}]}, fh)
    subprocess.run([sys.executable, "-m", "transgqla.vllm_plugin.run", one_job, one_out], check=False,
                   start_new_session=True)  # its shutdown signals its process group, not this one
    try:
        with open(one_out) as fh:
            return json.load(fh)["runs"][0]
    except (OSError, ValueError, IndexError):
        return {"name": spec.get("name"), "model": spec["model"], "error": "the isolated run wrote no result"}


def main(argv: list[str]) -> int:
    job_path, out_path = argv[1], argv[2]
    job = json.loads(open(job_path).read())
    results = []
    for spec in job["runs"]:
        try:
            if spec.get("isolate") and len(job["runs"]) > 1:  # may fail mid-run: its own process keeps the rest clean
                results.append(_isolated(spec, out_path))
            else:
                results.append(run_one(spec))
        except Exception as exc:  # the finding is the error: record its first line, go on with the next run
            traceback.print_exc()
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
            error = f"{type(exc).__name__}: {lines[0]}"[:500]
            results.append({"name": spec.get("name"), "model": spec["model"], "error": error})
        with open(out_path, "w") as fh:  # after every run: a crash keeps what finished
            json.dump({"runs": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
