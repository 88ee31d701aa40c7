"""Quality benchmark: in-domain and cross-domain perplexity of converted SmolLM2-135M-Instruct, side by side.

    python benchmarks/quality.py [--budgets 96+32,160+32] [--variants transmla,gqla+refine50,gqla+refine50+auto]
                                 [--calib-domains docs,prose,self,docs+self,prose+self,mixed]
                                 [--calib-tokens 16384] [--eval-tokens 8192]
                                 [--workdir DIR] [--out benchmarks/results/quality-cross-domain.json]

Two offline text domains, each split into disjoint calibration and evaluation halves:
* ``docs``: CPython's documentation (``builtin:calib`` / ``builtin:eval``, transgqla/text/docs.py);
* ``prose``: general English, Debian's fortunes (``builtin:prose-calib`` / ``builtin:prose-eval``,
  transgqla/prose.py; ``apt-get install fortunes``).
Every conversion is calibrated on a choice of texts (``CALIB``) and evaluated on both domains: a domain whose
calibration half it has not seen gives a cross-domain figure, one it has seen the in-domain figure. ``self``
(``--calib self``, the model's own text) has seen neither, ``docs+self`` and ``prose+self`` one, ``mixed``
(both built-in texts, as ``--calib auto`` picks offline) both. With a ``self`` choice, what generating the
text costs is measured once, beside F. A variant is a method (``transmla``, ``gqla``) with optional
``+refineN`` (``--refine N``) and ``+auto`` (``--kv-budget r+d_R --qk-rope-dim auto``: the split of the budget
searched; the row records the split chosen). Each conversion runs in its own process (wall time and peak RSS
are that process's); perplexity uses non-overlapping 512-token windows (``transgqla eval-ppl``). F, the cost
of one calibration forward pass (what refinement may add at most), is measured in this process on the same
tokens, one thread as the converter's layer math. Wall and CPU seconds are both recorded: on a machine shared
with other work, CPU seconds are the figure to compare.
Rows are written to the JSON file as they finish, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = {"docs": ("builtin:calib", "builtin:eval"), "prose": ("builtin:prose-calib", "builtin:prose-eval")}
# Calibration choices and the evaluation domains each has seen: one domain (the other is the cross-domain
# figure), the model's own text (--calib self: both evaluation domains are out of domain), a domain mixed
# with it, or both built-in texts mixed (what --calib auto picks offline; nothing is out of domain).
CALIB = {"docs": (["builtin:calib"], {"docs"}), "prose": (["builtin:prose-calib"], {"prose"}),
         "self": (["self"], set()), "docs+self": (["builtin:calib", "self"], {"docs"}),
         "prose+self": (["builtin:prose-calib", "self"], {"prose"}),
         "mixed": (["builtin:prose-calib", "builtin:calib"], {"docs", "prose"})}
SOURCE = "demo:smollm2-135m"
GQA_CACHE = 384  # SmolLM2-135M: 2 n_g d = 2 * 3 * 64 values per token per layer


def run_measured(cmd: list[str]) -> tuple[dict, float, int, float]:
    """Run ``cmd``; return its JSON stdout, wall seconds, peak RSS bytes (ru_maxrss of the child) and CPU
    seconds (user + system: on a shared machine far steadier than wall time)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads(out), wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def _one_thread_seconds(work) -> tuple[float, float]:
    """Wall and CPU seconds of ``work()`` on one torch thread, as the converter's layer math runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        work()
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)


def forward_seconds(calib_text: str, tokens: int) -> tuple[float, float]:
    """F: one layer-by-layer calibration forward pass of the source over the calibration windows."""
    from transgqla.calib.runner import LayerwiseCalibration
    from transgqla.demo import materialize_demo
    from transgqla.io import SafetensorsCheckpoint
    from transgqla.text.pipeline import load_tokenizer, read_sources, token_windows

    folder = materialize_demo()
    config = json.loads((folder / "config.json").read_text())
    windows = token_windows(read_sources([calib_text]), load_tokenizer(folder), 512, tokens)

    def forward() -> None:
        runner = LayerwiseCalibration(SafetensorsCheckpoint(folder), config, windows)
        for layer in range(int(config["num_hidden_layers"])):
            runner.advance(layer)
    return _one_thread_seconds(forward)


def generation_seconds(tokens: int) -> tuple[float, float]:
    """What ``--calib self`` costs: the source writing ``tokens`` tokens of 512-token windows, one thread."""
    from transgqla.calib.self_text import self_generated
    from transgqla.demo import materialize_demo

    folder = materialize_demo()
    return _one_thread_seconds(lambda: self_generated(folder, max(1, tokens // 512), 512, quiet=True))


def markdown_table(result: dict) -> str:
    """The rows as a markdown table (cross- and in-domain ratios against the source)."""
    lines = ["| KV budget | variant | split | calibrated on | ppl docs | ppl prose | cross-domain ratio | in-domain ratio "
             "| convert wall (s) | convert CPU (s) | peak RSS (GB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        seen = CALIB[r["calib"]][1]
        unseen = [r["ratio"][d] for d in DOMAINS if d not in seen]
        cross = f"{max(unseen):.2f}" if unseen else "-"  # the worse unseen domain
        own = f"{max(r['ratio'][d] for d in seen):.2f}" if seen else "-"
        lines.append(f"| {r['budget']} ({100 * r['cache_share']:.0f}%) | {r['variant']} | {r.get('split', r['budget'])} | "
                     f"{r['calib']} | {r['ppl']['docs']:.2f} | {r['ppl']['prose']:.2f} | {cross} | {own} | "
                     f"{r['convert_s']} | {r.get('convert_cpu_s', '-')} | {r['peak_rss_gb']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="96+32,160+32")
    ap.add_argument("--variants", default="transmla,gqla+refine50")
    ap.add_argument("--calib-domains", default="docs,prose")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/transgqla-quality")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality-cross-domain.json"))
    ap.add_argument("--skip-forward", action="store_true", help="Do not measure F.")
    ap.add_argument("--source-from", help="Reuse the source perplexities of an earlier result JSON (same texts).")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "transgqla.cli.app"]
    dest = Path(args.out)

    def ppl(model: str, domain: str) -> float:
        doc, *_ = run_measured(exe + ["eval-ppl", model, "--text", DOMAINS[domain][1], "--seqlen", "512",
                                        "--max-tokens", str(args.eval_tokens), "--device", "cpu", "--json"])
        return doc["perplexity"]

    if args.source_from:
        source_ppl = json.loads(Path(args.source_from).read_text())["source_ppl"]
    else:
        source_ppl = {d: ppl(SOURCE, d) for d in DOMAINS}
    result: dict = {"model": SOURCE, "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
                    "domains": DOMAINS, "source_ppl": source_ppl, "rows": []}
    print(f"source perplexity {result['source_ppl']}", flush=True)
    if not args.skip_forward:
        wall, cpu = forward_seconds(DOMAINS["docs"][0], args.calib_tokens)
        result["forward_pass"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"calibration forward pass F: {result['forward_pass']}", flush=True)
        if any("self" in CALIB[c][0] for c in args.calib_domains.split(",")):
            wall, cpu = generation_seconds(args.calib_tokens)
            result["self_generation"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                         "tokens": args.calib_tokens,
                                         "cpu_per_F": round(cpu / result["forward_pass"]["cpu_s"], 2)}
            print(f"--calib self, {args.calib_tokens} tokens: {result['self_generation']}", flush=True)

    def save() -> None:
        result["load_avg"] = os.getloadavg()
        dest.write_text(json.dumps(result, indent=2) + "\n")

    for budget in args.budgets.split(","):
        rank, rope = (int(v) for v in budget.split("+"))
        for calib in args.calib_domains.split(","):
            for variant in args.variants.split(","):
                method, *options = variant.split("+")
                refine = next((o[len("refine"):] for o in options if o.startswith("refine")), "0")
                out = work / f"{variant}-{rank}-{rope}-{calib}"
                shape = (["--kv-budget", str(rank + rope), "--qk-rope-dim", "auto"] if "auto" in options
                         else ["--kv-lora-rank", str(rank), "--qk-rope-dim", str(rope)])
                cmd = exe + ["convert", SOURCE, str(out), *shape, "--force", "--json", "--device", "cpu",
                             "--method", method, "--calib-tokens", str(args.calib_tokens), "--refine", refine]
                for text in CALIB[calib][0]:
                    cmd += ["--calib", text]
                if method == "transmla":
                    cmd += ["--freqfold", "4"]
                summary, wall, rss, cpu = run_measured(cmd)
                ppls = {d: ppl(str(out), d) for d in DOMAINS}
                s = summary["settings"]
                row = {"budget": budget, "cache_share": round((rank + rope) / GQA_CACHE, 3), "variant": variant,
                       "calib": calib, "split": f"{s['kv_lora_rank']}+{s['qk_rope_head_dim']}",
                       "ppl": ppls, "ratio": {d: ppls[d] / result["source_ppl"][d] for d in DOMAINS},
                       "convert_s": round(wall, 1), "convert_cpu_s": round(cpu, 1), "peak_rss_gb": round(rss / 1e9, 2)}
                if s.get("split_search"):
                    row["split_search"] = s["split_search"]["candidates"]
                result["rows"].append(row)
                save()
                print(json.dumps(row), flush=True)
    save()
    print()
    print(markdown_table(result))
    print(f"\nwritten {dest}")


if __name__ == "__main__":
    main()
