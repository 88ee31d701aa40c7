"""Bounded-memory benchmark: peak RSS and wall time of ``verify`` and of every ``export`` at 8B geometry.

    python benchmarks/bounded_memory.py [--layers N] [--workdir DIR] [--keep-source] [--skip-exports] [--tokenizer FILE]

What it does (each step a fresh subprocess; peak RSS from ``os.wait4``, i.e. that process's own
``ru_maxrss``; the address space of each capped with ``RLIMIT_AS`` so that an unbounded command fails
with an allocation error instead of pushing the machine into the OOM killer):

1. ``benchmarks/scale.py --geometry 8b --generate-only`` (``--layers N`` for a quick run): the
   synthetic Llama-3-8B checkpoint (bf16, 16 GB at 32 layers), cached in the work folder. It has no
   tokenizer, so verify's fidelity runs on fixed ids (4 windows of 128); ``--tokenizer`` copies one in
   (e.g. the demo's ``tokenizer.json``: its ids fit the 128256 vocabulary) so that verify scores real
   text (two 512-token windows, twice the tokens) as on a real model;
2. ``transgqla convert SRC OUT --kv-lora-rank 512 --qk-rope-dim 64 --calib none`` (data-free);
3. ``transgqla verify OUT --json`` (every section; fidelity against SRC, recorded in OUT's config),
   address space capped at ``--verify-cap-gb`` (default 22, as on a 24 GiB machine);
4. each ``transgqla export`` form in :data:`EXPORTS` into a scratch folder (deleted right after),
   capped at ``--export-cap-gb`` (default 8: an export that loads whole models fails fast here).

Prints one table (wall s, peak RSS GB, exit code, verdict) with the 3 GB target beside each and writes
the figures to ``benchmarks/results/bounded-memory-8b[-Nl].json``. OUT is deleted at the end, the
source too unless ``--keep-source``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_WORKDIR = Path("/work/tmp-bench")
TARGET_GB = 3.0
CONVERT_FLAGS = ["--kv-lora-rank", "512", "--qk-rope-dim", "64", "--calib", "none"]
#: (label, export flags): every form ``transgqla export`` writes on this branch.
EXPORTS: list[tuple[str, list[str]]] = [
    ("export absorb (gqla)", ["--path", "absorb"]),
    ("export gqa (gqla)", ["--path", "gqa"]),
    ("export gqa --fold-kv", ["--path", "gqa", "--fold-kv"]),
    ("export deepseek", ["--path", "absorb", "--format", "deepseek"]),
]


def _cap(gb: float):
    limit = int(gb * 2**30)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(label: str, cmd: list[str], log: Path, cap_gb: float) -> dict[str, Any]:
    """Run ``cmd`` (address space capped at ``cap_gb`` GiB); wall s, peak RSS, exit code, stdout."""
    print(f"{label}: {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}", flush=True)
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=HERE.parent, preexec_fn=_cap(cap_gb))
        out = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if rc else []
    r = {
        "label": label, "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "exit_code": rc,
        "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1), "cap_gib": cap_gb,
        "loadavg_after": round(os.getloadavg()[0], 2), "stderr_tail": tail[0][-300:] if tail else "",
    }
    print(f"  {r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, exit {rc} {r['stderr_tail']}", flush=True)
    r["stdout"] = out.decode(errors="replace")
    return r


def _verify_summary(stdout: str) -> dict[str, Any]:
    try:
        doc = json.loads(stdout)
    except ValueError:
        return {"parsed": False}
    return {"ok": doc.get("ok"), "seconds": doc.get("seconds"), "failed": doc.get("failed"),
            "checks": {c["name"]: [c["status"], c.get("value")] for c in doc.get("checks", [])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="cut the 8B geometry to N layers (quick run)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"scratch folder (default {DEFAULT_WORKDIR})")
    ap.add_argument("--keep-source", action="store_true", help="keep the generated source for a later run")
    ap.add_argument("--skip-exports", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json to copy into the source (real-text fidelity)")
    ap.add_argument("--verify-cap-gb", type=float, default=22.0)
    ap.add_argument("--export-cap-gb", type=float, default=8.0)
    args = ap.parse_args(argv)

    work = args.workdir.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    tag = "8b" if args.layers is None else f"8b-{args.layers}l"
    src, out, dst = work / f"src-{tag}", work / f"bm-gqla-{tag}", work / f"bm-export-{tag}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    gen = [sys.executable, str(HERE / "scale.py"), "--geometry", "8b", "--generate-only", "--workdir", str(work)]
    subprocess.run(gen + ([] if args.layers is None else ["--layers", str(args.layers)]), check=True, cwd=HERE.parent)
    if args.tokenizer is not None:
        shutil.copy(args.tokenizer, src / "tokenizer.json")
    elif (src / "tokenizer.json").is_file():
        (src / "tokenizer.json").unlink()  # left by an earlier --tokenizer run
    print(f"source {src}: tokenizer {'yes' if (src / 'tokenizer.json').is_file() else 'no'}; "
          f"free disk {shutil.disk_usage(work).free / 1e9:.1f} GB", flush=True)

    cli = [sys.executable, "-m", "transgqla.cli.app"]
    runs = [run("convert", cli + ["convert", str(src), str(out), *CONVERT_FLAGS, "--force", "--json"], logs / "bm-convert.log", args.verify_cap_gb)]
    if runs[0]["exit_code"] == 0:
        v = run("verify", cli + ["verify", str(out), "--json"], logs / "bm-verify.log", args.verify_cap_gb)
        v["verify"] = _verify_summary(v["stdout"])
        runs.append(v)
        if not args.skip_exports:
            for label, flags in EXPORTS:
                e = run(label, cli + ["export", str(out), str(dst), *flags, "--force", "--json"], logs / f"bm-{label.replace(' ', '_')}.log", args.export_cap_gb)
                shutil.rmtree(dst, ignore_errors=True)
                runs.append(e)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep_source:
        shutil.rmtree(src, ignore_errors=True)

    print(f"\n{'step':<24} {'wall s':>8} {'peak RSS GB':>12} {'target GB':>10} {'exit':>5}  verdict")
    for r in runs:
        gb = r["peak_rss_bytes"] / 1e9
        verdict = "-" if r["label"] == "convert" else ("within target" if gb <= TARGET_GB and r["exit_code"] == 0 else "OVER / FAILED")
        target = "-" if r["label"] == "convert" else f"{TARGET_GB:.1f}"
        print(f"{r['label']:<24} {r['wall_s']:>8.1f} {gb:>12.2f} {target:>10} {r['exit_code']:>5}  {verdict}")
    for r in runs:
        r.pop("stdout", None)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bounded-memory-{tag}.json"
    path.write_text(json.dumps({
        "geometry": tag, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "target_gb": TARGET_GB, "runs": runs,
    }, indent=2) + "\n")
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
