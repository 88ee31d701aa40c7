"""Per-layer conversion math at Llama-3-8B's attention geometry: time and accuracy of the precisions.

    python benchmarks/layer_math.py [--repeats 3] [--hidden 4096 --heads 32 --groups 8 --head-dim 128 --rank 512 --rope 64]

One layer (random bf16 q/k/v like the scale benchmark's, data-free moment) is converted, on one torch
thread, three ways, side by side in one run:

  f64/f64  float64 arithmetic and a float64 eigensolve (what every conversion did before);
  f64/f32  float64 arithmetic, float32 eigensolve (calibrated conversions now);
  f32/f32  float32 arithmetic and eigensolve (data-free conversions now).

For each it prints the best-of-``--repeats`` wall time, its ratio to f64/f64, and what the precision
costs: the relative difference of ``kv_b_proj @ kv_a_proj`` (the map the model computes; the factors
themselves may rotate inside the latent) from f64/f64's, written in bf16 and before rounding, next to
what bf16 rounding alone changes; the same for ``q_proj``; the fraction of bf16 elements that differ
at all; and the key/value energy the factorization captures. Writes
``benchmarks/results/layer-math.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transgqla.mathx import lowrank
from transgqla.mathx.gqla_layer import LayerSettings, SourceAttention, convert_attention
from transgqla.mathx.moments import InputMoment

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"f64/f64": (torch.float64, torch.float64), "f64/f32": (torch.float64, torch.float32),
            "f32/f32": (torch.float32, torch.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--freqfold", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    d, hid = args.head_dim, args.hidden
    w = {k: (torch.randn(n * d, hid, generator=g) * 0.02).bfloat16()
         for k, n in (("q", args.heads), ("k", args.groups), ("v", args.groups))}
    gamma = (1 + 0.5 * torch.rand(hid, generator=g)).bfloat16()
    eigen_before = lowrank.EIGEN_DTYPE
    rows, outputs, exact = {}, {}, {}
    try:
        for name, (work, eigen) in VARIANTS.items():
            lowrank.EIGEN_DTYPE = eigen
            settings = LayerSettings(args.rank, args.rope, args.freqfold, work_dtype=work)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                src = SourceAttention(w["q"].to(work), w["k"].to(work), w["v"].to(work), args.heads, args.groups, d)
                conv = convert_attention(src, InputMoment.data_free(gamma), settings)
                out = {k: v.to(torch.bfloat16) for k, v in conv.tensors.items()}
                best = min(best, time.perf_counter() - t0)
            outputs[name] = out
            exact[name] = {k: v.double() for k, v in conv.tensors.items()}
            rows[name] = {"seconds": round(best, 3), "kv_energy_captured": conv.report["kv_energy_captured"],
                          "key_nope_rel_error": conv.report["key_nope_rel_error"],
                          "value_rel_error": conv.report["value_rel_error"]}
    finally:
        lowrank.EIGEN_DTYPE = eigen_before
    ref = outputs["f64/f64"]

    def function_of(out):  # what the model computes from the latent: kv_b_proj @ kv_a_proj (basis-free)
        r = args.rank
        return out["kv_b_proj.weight"].double() @ out["kv_a_proj_with_mqa.weight"][:r].double()

    for name, out in outputs.items():
        diff_elems = sum(int((out[k].view(torch.int16) != ref[k].view(torch.int16)).sum()) for k in ref)
        total = sum(t.numel() for t in ref.values())
        rows[name]["ratio_to_f64"] = round(rows[name]["seconds"] / rows["f64/f64"]["seconds"], 3)
        rows[name]["bf16_elements_differing"] = diff_elems / total
        rows[name]["latent_map_rel_diff"] = float((function_of(out) - function_of(ref)).norm() / function_of(ref).norm())
        # the same before rounding to bf16 (the math alone), and what bf16 rounding alone does to f64/f64's
        exact_ref = function_of(exact["f64/f64"])
        rows[name]["latent_map_rel_diff_unrounded"] = float((function_of(exact[name]) - exact_ref).norm() / exact_ref.norm())
        rows[name]["latent_map_bf16_rounding"] = float((function_of(out) - function_of(exact[name])).norm() / exact_ref.norm())
        rows[name]["q_proj_rel_diff"] = float((out["q_proj.weight"].double() - ref["q_proj.weight"].double()).norm()
                                              / ref["q_proj.weight"].double().norm())
    print(f"one layer, hidden {hid}, {args.heads} heads / {args.groups} groups of {d}, r {args.rank} + d_R {args.rope}, "
          f"1 torch thread, best of {args.repeats}")
    print("B A = kv_b_proj @ kv_a_proj (the map the model uses); diffs are relative to f64/f64's")
    print(f"{'variant':<9}{'seconds':>9}{'ratio':>7}{'captured':>11}{'B A diff':>11}{'(unrounded)':>13}"
          f"{'bf16 rounding':>15}{'q diff':>10}{'bf16 elems differ':>19}")
    for name, r in rows.items():
        print(f"{name:<9}{r['seconds']:>9.3f}{r['ratio_to_f64']:>7.2f}{r['kv_energy_captured']:>11.6f}"
              f"{r['latent_map_rel_diff']:>11.2e}{r['latent_map_rel_diff_unrounded']:>13.2e}"
              f"{r['latent_map_bf16_rounding']:>15.2e}{r['q_proj_rel_diff']:>10.2e}{r['bf16_elements_differing']:>18.2%}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer-math.json").write_text(json.dumps({"args": vars(args), "variants": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS / 'layer-math.json'}")


if __name__ == "__main__":
    main()
