"""Calibrated conversion against its floor, side by side in one run.

    python benchmarks/calib_speed.py [--models demo,8b-2l] [--calib-tokens 16384] [--workdir DIR] [--no-stock]

For each model, each measurement in its own subprocess (wall time; CPU time = user + sys and peak RSS from
``os.wait4``), in this order:

  F        the calibration floor: the same calibration tokens (``builtin:calib``, the default ``--calib-tokens``
           at 512 tokens a window, as ``convert`` cuts them) pushed layer by layer through the source with the
           project's own runner (``calib.runner.LayerwiseCalibration.advance``), nothing else;
  F_stock  (sanity reference) the same tokens through stock transformers decoder layers (one layer's weights
           loaded at a time, SDPA attention, the same micro-batches of 4 windows);
  C        the default calibrated conversion, ``transgqla convert SRC OUT --force --json`` (``--calib auto`` ->
           ``builtin:calib``, method ``gqla``, the recipe's rank and RoPE dims);
  F        again, to show how much the machine's load moved during C.

and prints C, F (mean of the two), C/F for wall and CPU time, peak RSS, and C/F_stock. Models:

  demo     ``demo:smollm2-135m`` (SmolLM2-135M, all 30 layers);
  8b-2l    the Llama-3-8B geometry cut to 2 layers (``benchmarks/scale.py --geometry 8b --layers 2
           --generate-only``), with the demo's ``tokenizer.json`` copied in (its 49152 ids fit the 128256-row
           embedding; checked).

Results go to ``benchmarks/results/calib-speed.json``. Internal: ``_floor SRC TOKENS`` and ``_stock SRC TOKENS``
are the F and F_stock runs themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MICRO_BATCH = 4  # windows per forward, as the runner's default


def calib_windows(src: Path, tokens: int):
    """The token windows ``convert`` calibrates on by default: ``builtin:calib``, 512-token windows."""
    from transgqla.text.pipeline import load_tokenizer, read_sources, token_windows

    return token_windows(read_sources(["builtin:calib"]), load_tokenizer(src), 512, tokens)


def floor_run(src: Path, tokens: int) -> dict:
    """F: the project's layer-by-layer runner, every layer, no statistics, no conversion."""
    import torch

    from transgqla.calib.runner import LayerwiseCalibration
    from transgqla.io import SafetensorsCheckpoint

    config = json.loads((src / "config.json").read_text())
    windows = calib_windows(src, tokens)
    t0 = time.perf_counter()
    runner = LayerwiseCalibration(SafetensorsCheckpoint(src), config, windows)
    for layer in range(int(config["num_hidden_layers"])):
        runner.advance(layer)
    return {"layers_s": time.perf_counter() - t0, "tokens": int(windows.numel()), "threads": torch.get_num_threads()}


def stock_run(src: Path, tokens: int) -> dict:
    """F_stock: the same tokens through transformers' own decoder layers, one layer's weights at a time."""
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from transgqla.io import SafetensorsCheckpoint

    cfg = AutoConfig.from_pretrained(src)
    cfg._attn_implementation = "sdpa"
    ckpt = SafetensorsCheckpoint(src)
    windows = calib_windows(src, tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        h = ckpt.read("model.embed_tokens.weight")[windows].float()
        rotary = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(windows.shape[1])[None]
        cos_sin = rotary(h[:1], pos)
        for layer in range(cfg.num_hidden_layers):
            block = LlamaDecoderLayer(cfg, layer)
            prefix = f"model.layers.{layer}."
            block.load_state_dict({k: ckpt.read(prefix + k).float() for k in block.state_dict()})
            block.eval()
            for i in range(0, h.shape[0], MICRO_BATCH):
                out = block(h[i:i + MICRO_BATCH], position_embeddings=cos_sin, position_ids=pos,
                            attention_mask=None)
                h[i:i + MICRO_BATCH] = out[0] if isinstance(out, tuple) else out
    return {"layers_s": time.perf_counter() - t0, "tokens": int(windows.numel())}


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + sys) and peak RSS (bytes) of the child, its JSON stdout."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({log}): {' '.join(cmd)}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "minor_faults": usage.ru_minflt, "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "out": json.loads(out) if out.strip() else None}


def source_folder(model: str, work: Path) -> Path:
    from transgqla.demo import materialize_demo

    demo = materialize_demo()
    if model == "demo":
        return demo
    if model != "8b-2l":
        raise SystemExit(f"unknown model {model!r}; choose demo or 8b-2l")
    subprocess.run([sys.executable, str(HERE / "scale.py"), "--geometry", "8b", "--layers", "2", "--generate-only",
                    "--workdir", str(work)], check=True, stdout=subprocess.DEVNULL)
    src = work / "src-8b-2l"
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    from tokenizers import Tokenizer

    tok_vocab = Tokenizer.from_file(str(demo / "tokenizer.json")).get_vocab_size()
    if tok_vocab > vocab:
        raise SystemExit(f"the demo tokenizer's {tok_vocab} ids do not fit the {vocab}-row embedding")
    shutil.copy(demo / "tokenizer.json", src / "tokenizer.json")
    return src


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_floor"], ["_stock"]):
        run = floor_run if argv[0] == "_floor" else stock_run
        print(json.dumps(run(Path(argv[1]), int(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,8b-2l")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "transgqla-calib-speed")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock transformers reference")
    args = ap.parse_args(argv)
    work = args.workdir.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    me, tokens = [sys.executable, str(Path(__file__).resolve())], str(args.calib_tokens)
    rows = []
    for model in args.models.split(","):
        src = source_folder(model, work)
        out = work / f"gqla-{model}"
        print(f"{model}: {src}", flush=True)
        row: dict = {"model": model, "source": str(src)}
        row["F1"] = measured(me + ["_floor", str(src), tokens], work / f"{model}-F1.log")
        print(f"  F  {row['F1']['wall_s']} s", flush=True)
        if not args.no_stock:
            row["F_stock"] = measured(me + ["_stock", str(src), tokens], work / f"{model}-Fstock.log")
            print(f"  F_stock {row['F_stock']['wall_s']} s", flush=True)
        cmd = [sys.executable, "-m", "transgqla.cli.app", "convert", str(src), str(out), "--force", "--json",
               "--calib-tokens", tokens]
        row["C"] = measured(cmd, work / f"{model}-C.log")
        summary = row["C"].pop("out") or {}
        row["C"]["settings"] = {k: summary.get("settings", {}).get(k) for k in ("method", "kv_lora_rank", "qk_rope_head_dim", "calib")}
        print(f"  C  {row['C']['wall_s']} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        row["F2"] = measured(me + ["_floor", str(src), tokens], work / f"{model}-F2.log")
        print(f"  F  {row['F2']['wall_s']} s (again)", flush=True)
        f_wall = (row["F1"]["wall_s"] + row["F2"]["wall_s"]) / 2
        f_cpu = (row["F1"]["cpu_s"] + row["F2"]["cpu_s"]) / 2
        row["C_over_F_wall"] = round(row["C"]["wall_s"] / f_wall, 2)
        row["C_over_F_cpu"] = round(row["C"]["cpu_s"] / f_cpu, 2)
        if "F_stock" in row:
            row["C_over_F_stock_wall"] = round(row["C"]["wall_s"] / row["F_stock"]["wall_s"], 2)
        rows.append(row)
    print()
    print("| model | C wall (s) | F wall (s) | C/F wall | C cpu (s) | F cpu (s) | C/F cpu | C peak RSS (GB) | F peak RSS (GB) | F_stock wall (s) | C/F_stock |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["F1"], r["F2"]
        print(f"| {r['model']} | {r['C']['wall_s']} | {f[0]['wall_s']} / {f[1]['wall_s']} | {r['C_over_F_wall']} | "
              f"{r['C']['cpu_s']} | {f[0]['cpu_s']} / {f[1]['cpu_s']} | {r['C_over_F_cpu']} | {r['C']['peak_rss_gb']} | "
              f"{max(x['peak_rss_gb'] for x in f)} | {r.get('F_stock', {}).get('wall_s', '-')} | {r.get('C_over_F_stock_wall', '-')} |")
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / "calib-speed.json"
    dest.write_text(json.dumps({"calib_tokens": args.calib_tokens, "rows": rows, "load_avg": os.getloadavg(),
                                "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"\nwrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
