"""Wall time and peak memory of `nnmark demo`, run as a user would (a subprocess).

Peak memory is the largest resident set of the demo process and of the model
servers it starts (getrusage of waited-for children).

    .venv/bin/python benchmarks/bench_demo.py [--dataset mnist5k]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "demo.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nnmark.cli", "demo", "--dataset", args.dataset, "--json"],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"demo failed: {proc.stderr.strip().splitlines()[-1:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    demo = json.loads(proc.stdout)
    res = {"dataset": args.dataset, "wall_seconds": wall, "peak_rss_mb": peak_mb,
           "all_as_expected": demo["all_as_expected"], "clean_accuracy": demo["clean_accuracy"],
           "marked_accuracy": demo["marked_accuracy"],
           "verdicts": {r["model"]: {k: r["verdict"][k] for k in ("owned", "statistic", "n", "p_value")}
                        for r in demo["models"]}}
    print(f"demo on {args.dataset}: {wall:.1f} s wall, peak RSS {peak_mb:.0f} MB, "
          f"all verdicts as expected: {demo['all_as_expected']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
