"""Interrupt latency: SIGTERM a calibrated conversion in the middle of its work, time the exit.

    python benchmarks/interrupt_latency.py [--after 90] [--source demo:smollm2-135m] [--pythonpath DIR]

Starts ``transgqla convert SOURCE OUT`` (the defaults: calibrated on builtin:calib, method gqla) in a
subprocess, sends SIGTERM ``--after`` seconds later (by then a layer's calibration pass or method
math is running) and prints how long the process took to exit, its exit code (130 expected) and
its last stderr line (the one-line ``--resume`` message). ``--pythonpath`` runs another checkout's
library (e.g. an older commit cloned elsewhere) for a side-by-side figure. The partial output is
deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--after", type=float, default=90.0, help="seconds before SIGTERM (default 90)")
    ap.add_argument("--source", default="demo:smollm2-135m")
    ap.add_argument("--pythonpath", default=None, help="PYTHONPATH for the child (another checkout's library)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="transgqla-interrupt-"))
    out = work / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    cmd = [sys.executable, "-m", "transgqla.cli.app", "convert", args.source, str(out), "--device", args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=args.after)
        print(f"the conversion ended by itself after {time.monotonic() - t0:.1f} s; choose a smaller --after")
        return 1
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)
    t1 = time.monotonic()
    _, err = proc.communicate()
    latency = time.monotonic() - t1
    lines = err.strip().splitlines()
    shutil.rmtree(work, ignore_errors=True)
    print(f"SIGTERM at {t1 - t0:.1f} s; exit code {proc.returncode} after {latency:.1f} s")
    print(f"last stderr line: {lines[-1] if lines else ''}")
    return 0 if proc.returncode == 130 else 1


if __name__ == "__main__":
    raise SystemExit(main())
