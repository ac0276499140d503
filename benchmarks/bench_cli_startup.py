"""How long the command line takes to answer before doing any work.

Times ``nnmark --help`` (should not import torch), ``nnmark verify --help`` and, as the
reference for what importing the numerical stack costs, ``python -c "import torch, scipy.stats"``
-- each run ``--reps`` times in fresh processes, alternated so that machine load hits all alike.
Prints a table and one JSON line (median and spread in seconds).

    .venv/bin/python benchmarks/bench_cli_startup.py --reps 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    nnmark = str(BIN / "nnmark")
    cases = {
        "nnmark --help": [nnmark, "--help"],
        "nnmark verify --help": [nnmark, "verify", "--help"],
        "import torch, scipy.stats": [sys.executable, "-c", "import torch, scipy.stats"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, cmd in cases.items():
            times[name].append(_time(cmd))
    print(f"{'command':28s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": round(med, 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4)}
        print(f"{name:28s} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f}")
    ratio = out["nnmark --help"]["median_s"] / out["import torch, scipy.stats"]["median_s"]
    print(f"nnmark --help / importing torch+scipy: {ratio:.3f}")
    print(json.dumps({"reps": args.reps, "results": out, "help_over_imports": round(ratio, 4)}))


if __name__ == "__main__":
    main()
