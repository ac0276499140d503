"""Summarise experiments/results/blackbox/results_m*.json as markdown (what RESULTS.md quotes).

    .venv/bin/python experiments/blackbox/summary.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    for path in sorted(Path("experiments/results/blackbox").glob("results_m*.json"), key=lambda p: int(p.stem[9:])):
        r = json.loads(path.read_text())
        if "copies" not in r:
            continue
        m = path.stem[9:]
        base = r["base"]
        acc = [c["accuracy"] for c in r["copies"]]
        sym = [c["symbol_accuracy"] for c in r["copies"]]
        cpu = [c["issue_cpu_seconds"] for c in r["copies"] if c.get("issue_cpu_seconds")]
        print(f"### m = {m}")
        line = (f"base accuracy {base['accuracy']:.3f}; copies {np.mean(acc):.3f} on average "
                f"({np.mean(acc) - base['accuracy']:+.3f}, min {min(acc):.3f}); symbols answered as taught "
                f"{min(sym):.0%}-{max(sym):.0%}")
        if cpu and r.get("base_cpu_seconds"):
            line += (f"; issuing {np.mean(cpu):.0f} CPU s per copy = {np.mean(cpu) / r['base_cpu_seconds']:.2f}x the "
                     f"base training ({r['base_cpu_seconds']:.0f} CPU s)")
        print(line + "\n")
        groups = defaultdict(list)
        for t in r.get("traces", []):
            groups[t["kind"]].append(t)
        print("| suspects | traced | colluders named (p <= level) | queries to name all (median) | "
              "colluder p over all m, median [min, max] | innocents named | other keys named |")
        print("|---|---|---|---|---|---|---|")
        total, innocent, other = 0, 0, 0
        for kind, rows in groups.items():
            total += len(rows) * 4  # own key + 3 other vendors' keys
            innocent += sum(len(t["innocents_named"]) for t in rows)
            other += sum(len(t["other_keys_named"]) for t in rows)
            ncol = sum(t["coalition"] for t in rows)
            named = sum(len(t["colluders_named"]) for t in rows)
            full = [p for t in rows for p in t.get("colluder_p_all_queries", {}).values()]
            allq = [max(t["colluder_queries"].values()) for t in rows
                    if t["coalition"] and len(t["colluders_named"]) == t["coalition"]]
            ps = f"{np.median(full):.2g} [{min(full):.2g}, {max(full):.2g}]" if full else "-"
            q = f"{int(np.median(allq))}" if allq else "-"
            print(f"| {kind} | {len(rows)} | {named}/{ncol} | {q} | {ps} | "
                  f"{sum(len(t['innocents_named']) for t in rows)} | {sum(len(t['other_keys_named']) for t in rows)} |")
        lvl = r["traces"][0]["level"] if r.get("traces") else float("nan")
        secs = [t["seconds"] for t in r.get("traces", [])]
        print(f"\n{total} traces in all (each suspect under the product key and 3 other vendors' keys): "
              f"{innocent + other} innocents named; level alpha/(K N) = {lvl:.3g}; tracing time among 10,000 "
              f"customers {np.median(secs):.1f} s median per suspect (all m queries, K looks)\n")


if __name__ == "__main__":
    main()
