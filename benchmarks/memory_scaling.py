"""Memory scaling: peak RSS of ``transgqla convert`` must not grow with the number of layers.

    python benchmarks/memory_scaling.py [--workdir DIR] [--layers 2 16 48] [--keep]

Builds (streaming, cached in the work folder; see ``scale.py`` for how the weights are made) one small
but not trivial Llama architecture -- hidden 1024, 8 heads, 2 KV heads, head dim 128, intermediate
2816, vocab 32000, bf16, untied lm_head -- at 2, 16 and 48 layers (~0.18, 0.49 and 1.21 GB), converts
each in a fresh subprocess with the tool's defaults (``--calib none --force --json``), and reports each
run's peak RSS (``os.wait4``), the ratio of the deepest to the shallowest and the growth per extra layer.
48 layers matter: a slow per-layer leak (freed memory kept by a worker thread's malloc arena: +7 MB per
layer before ``malloc_trim``) shows between 16 and 48, not between 2 and 16. For scale, it also measures the
peak RSS of a process that only imports transgqla and torch (the fixed floor every run pays).
Writes ``benchmarks/results/memory-scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import (  # noqa: E402
    DEFAULT_WORKDIR,
    LLAMA3_ROPE,
    RESULTS,
    ensure_checkpoint,
    folder_bytes,
    llama_config,
    plan_specs,
    run_measured,
)

GEOMETRY = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=2816,
                vocab_size=32000, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                max_position_embeddings=131072)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 16, 48])
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument("--results", type=Path, default=RESULTS / "memory-scaling.json")
    args = ap.parse_args(argv)
    work = args.workdir.expanduser().absolute()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    floor = run_measured([sys.executable, "-c", "import torch, transgqla.convert, transgqla.cli.app"], logs / "mem-floor.log")
    print(f"import floor: peak RSS {floor['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    rows = []
    for n in args.layers:
        cfg = llama_config({**GEOMETRY, "num_hidden_layers": n})
        src, out = work / f"src-mem-{n}l", work / f"gqla-mem-{n}l"
        ensure_checkpoint(src, cfg, log=lambda m: print(m, flush=True))
        largest = max(plan_specs(cfg), key=lambda s: s.nbytes)
        cmd = [sys.executable, "-m", "transgqla.cli.app", "convert", str(src), str(out), "--calib", "none", "--force", "--json"]
        r = run_measured(cmd, logs / f"mem-{n}l.log")
        summary = json.loads(r.pop("stdout"))
        row = {
            "layers": n,
            "source_bytes": folder_bytes(src) - (src / "GENERATED.json").stat().st_size,
            "largest_tensor": {"name": largest.name, "bytes": largest.nbytes},
            "output_bytes": folder_bytes(out),
            "settings": {k: summary["settings"][k] for k in ("kv_lora_rank", "qk_rope_head_dim", "freqfold")},
            **r,
        }
        if not args.keep:
            shutil.rmtree(out)
        rows.append(row)
        print(f"{n:>3} layers: source {row['source_bytes'] / 1e9:.2f} GB, wall {r['wall_s']:.1f} s, "
              f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)

    lo, hi = rows[0], rows[-1]
    ratio = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
    per_layer = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / max(1, hi["layers"] - lo["layers"])
    layer_bytes = (hi["source_bytes"] - lo["source_bytes"]) / max(1, hi["layers"] - lo["layers"])
    result = {
        "geometry": GEOMETRY,
        "import_floor_rss_bytes": floor["peak_rss_bytes"],
        "runs": rows,
        "peak_rss_ratio": round(ratio, 4),
        "rss_growth_per_layer_bytes": round(per_layer),
        "source_bytes_per_layer": round(layer_bytes),
    }
    print()
    print(f"{'layers':>6}{'source GB':>11}{'wall s':>9}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['layers']:>6}{r['source_bytes'] / 1e9:>11.2f}{r['wall_s']:>9.1f}{r['peak_rss_bytes'] / 1e6:>13.0f}")
    print(f"peak RSS ratio {hi['layers']}/{lo['layers']} layers: {ratio:.3f}; growth {per_layer / 1e6:+.1f} MB per layer "
          f"(a layer is {layer_bytes / 1e6:.0f} MB of weights); import floor {floor['peak_rss_bytes'] / 1e6:.0f} MB")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
