"""Summarise experiments/results/blackbox/results_m*.json as markdown (what RESULTS.md quotes), and plot the
queries-vs-coalition-size curve of the runs traced with soft answers.

    .venv/bin/python experiments/blackbox/summary.py            # every results_m*.json
    .venv/bin/python experiments/blackbox/summary.py --plot     # also curve_<stem>.png next to them
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path("experiments/results/blackbox")


def _table(rows_by_kind: dict[str, list[dict]], mode: str | None) -> tuple[list[str], int, int]:
    """Markdown rows for one answer mode (``None``: the top-level, primary verdict)."""
    out, innocent, other = [], 0, 0
    for kind, rows in rows_by_kind.items():
        sub = [t.get(mode, t) if mode else t for t in rows]
        innocent += sum(len(s["innocents_named"]) for s in sub)
        if mode is None:
            other += sum(len(t["other_keys_named"]) for t in rows)
        ncol = sum(t["coalition"] for t in rows)
        named = sum(len(s["colluders_named"]) for s in sub)
        full = [p for s in sub for p in s.get("colluder_p_all_queries", {}).values()]
        allq = [max(s["colluder_queries"].values()) for t, s in zip(rows, sub, strict=True)
                if t["coalition"] and len(s["colluders_named"]) == t["coalition"]]
        ps = f"{np.median(full):.2g} [{min(full):.2g}, {max(full):.2g}]" if full else "-"
        q = f"{int(np.median(allq))}" if allq else "-"
        inn = [s["min_p_innocent"] for s in sub]
        below = sum(1 for p in full if p < 1e-6)
        out.append(f"| {kind} | {len(rows)} | {named}/{ncol} | {below}/{ncol} | {q} | {ps} | {min(inn):.2g} | "
                   f"{sum(len(s['innocents_named']) for s in sub)} |")
    return out, innocent, other


def curve(r: dict) -> dict[str, list[tuple[int, float]]]:
    """``{kind: [(queries, fraction of colluders named by then), ...]}`` over the trace schedule (primary mode)."""
    sched = sorted({q for t in r.get("traces", []) for q in t.get("colluder_queries", {}).values() if q})
    m = max([*sched, 1])
    looks = [n for n in (32, 64, 128, 256, 512, 768, 1024) if n < m] + [m]
    out: dict[str, list[tuple[int, float]]] = {}
    for kind in dict.fromkeys(t["kind"] for t in r.get("traces", [])):
        rows = [t for t in r["traces"] if t["kind"] == kind and t["coalition"]]
        if not rows:
            continue
        total = sum(t["coalition"] for t in rows)
        out[kind] = [(n, sum(1 for t in rows for q in t["colluder_queries"].values() if q <= n) / total)
                     for n in looks]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    for path in sorted(RESULTS.glob("results_m*.json")):
        r = json.loads(path.read_text())
        if "copies" not in r:
            continue
        base = r["base"]
        acc = [c["accuracy"] for c in r["copies"]]
        sym = [c["symbol_accuracy"] for c in r["copies"]]
        cpu = [c["issue_cpu_seconds"] for c in r["copies"] if c.get("issue_cpu_seconds")]
        print(f"### {path.stem}: issue {r.get('issue_config', {})}")
        line = (f"base accuracy {base['accuracy']:.3f}; copies {np.mean(acc):.4f} on average "
                f"({100 * (np.mean(acc) - base['accuracy']):+.2f} points, min {min(acc):.3f}); symbols answered as "
                f"taught {min(sym):.0%}-{max(sym):.0%}")
        soft = [c["soft_sign_agreement"] for c in r["copies"] if "soft_sign_agreement" in c]
        if soft:
            line += f" (sign of the soft answer right {min(soft):.0%}-{max(soft):.0%})"
        if cpu and r.get("base_cpu_seconds"):
            line += (f"; issuing {np.mean(cpu):.0f} CPU s per copy = {np.mean(cpu) / r['base_cpu_seconds']:.2f}x the "
                     f"base training ({r['base_cpu_seconds']:.0f} CPU s)")
        print(line + "\n")
        avg_acc = r.get("average_accuracy", {})
        if avg_acc:
            print(f"weight averages' accuracy {min(avg_acc.values()):.3f}-{max(avg_acc.values()):.3f}\n")
        groups: dict[str, list[dict]] = defaultdict(list)
        for t in r.get("traces", []):
            groups[t["kind"]].append(t)
        modes = [m for m in ("soft", "hard") if r.get("traces") and m in r["traces"][0]] or [None]
        total = sum(len(rows) for rows in groups.values()) * (1 + len(r["traces"][0].get("other_keys_min_p", []))
                                                              if r.get("traces") else 0)
        innocents = 0
        for mode in modes:
            print(f"answers read: {mode or 'labels'}\n")
            print("| suspects | traced | colluders named (p <= level) | colluders p < 1e-6 (one look at m) | "
                  "queries to name all (median) | colluder p over all m, median [min, max] | smallest innocent p | "
                  "innocents named |")
            print("|---|---|---|---|---|---|---|---|")
            lines, inn, _ = _table(groups, mode)
            innocents += inn
            print("\n".join(lines) + "\n")
        other = sum(len(t["other_keys_named"]) for t in r.get("traces", []))
        other_p = [p for t in r.get("traces", []) for p in t.get("other_keys_min_p", [])]
        lvl = r["traces"][0]["level"] if r.get("traces") else float("nan")
        secs = [t["seconds"] for t in r.get("traces", [])]
        print(f"{total} traces with the primary answers (each suspect under the product key and "
              f"{len(r['traces'][0].get('other_keys_min_p', [])) if r.get('traces') else 0} other vendors' keys), "
              f"plus {len(r.get('traces', [])) if len(modes) > 1 else 0} with labels: {innocents + other} innocents "
              f"named; smallest p under other keys {min(other_p + [1.0]):.2g}; level alpha/(K N) = {lvl:.3g}; "
              f"tracing time among 10,000 customers {np.median(secs) if secs else float('nan'):.1f} s median per "
              f"suspect (all m queries, K looks)\n")
        cur = curve(r)
        if cur:
            kinds = list(cur)
            print("| queries | " + " | ".join(kinds) + " |")
            print("|---|" + "---|" * len(kinds))
            for i, (n, _) in enumerate(cur[kinds[0]]):
                print(f"| {n} | " + " | ".join(f"{cur[k][i][1]:.0%}" for k in kinds) + " |")
            print()
        if args.plot and cur:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 3.2))
            for kind, pts in cur.items():
                ax.plot([n for n, _ in pts], [f for _, f in pts], marker="o", label=kind)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("trigger queries")
            ax.set_ylabel("colluders named")
            ax.set_title(f"{path.stem}: named at p <= {lvl:.2g}")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(RESULTS / f"curve_{path.stem}.png", dpi=120)


if __name__ == "__main__":
    main()
