"""Tables of the partitioned-training experiments: ``experiments/results/split/<suite>.jsonl`` -> markdown.

    python experiments/split/summarize.py mlp > experiments/results/split/mlp.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "results" / "split"


def main() -> None:
    suite = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    rows = [json.loads(line) for line in (OUT / f"{suite}.jsonl").read_text().splitlines() if line.strip()]
    from nnmark.split.evaluation import data_floors

    base = next((r["accuracy"] for r in rows if r["name"].endswith("none")), None)
    floors: dict[tuple[str, int], dict] = {}
    print("| run | defence | lambda / scale | accuracy | vs none (points) | best attacker | its SSIM | its MSE | "
          "its DPD | reprint acc | mean-image SSIM | label floor SSIM (class mean / medoid) | "
          "label-aware best SSIM | attack epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, b = r["config"], r.get("best", {})
        extra = []
        if c.get("clip") is not None:
            extra.append(f"clip {c['clip']:g}")
        if c.get("ramp_rounds"):
            extra.append(f"ramp {c['ramp_rounds']}")
        if c.get("warm_rounds"):
            extra.append(f"warm {c['warm_rounds']}")
        if c.get("defender_steps", 1) > 1:
            extra.append(f"{c['defender_steps']} defender steps")
        defence = c["defense"] + (f" ({c['defenders']})" if c["defense"] in ("adversarial", "artificial") else "")
        if extra:
            defence += ", " + ", ".join(extra)
        diff = "" if base is None else f"{100 * (r['accuracy'] - base):+.1f}"
        fk = (c.get("data", "mnist5k"), int(r.get("n_targets", 500)))
        if fk not in floors:
            floors[fk] = data_floors(*fk)["label"]
        lab = floors[fk]
        aware = [v["ssim"] for k, v in r["attackers"].items() if k.endswith("+y")]
        print(f"| {r['name']} | {defence} | {c['strength']:g} | {100 * r['accuracy']:.1f} | {diff} | "
              f"{b.get('attacker', '')} | {b.get('ssim', float('nan')):.3f} | {b.get('mse', float('nan')):.4f} | "
              f"{b.get('dpd', float('nan')):.3f} | {b.get('reprint_accuracy', float('nan')):.3f} | "
              f"{r['floor']['ssim']:.3f} | {lab['class_mean']['ssim']:.3f} / {lab['class_medoid']['ssim']:.3f} | "
              f"{f'{max(aware):.3f}' if aware else ''} | {r.get('attack_epochs', 30)} |")
    print()
    print("Per attacker (SSIM / MSE):")
    print()
    names = sorted({a for r in rows for a in r["attackers"]})
    print("| run | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r['attackers'][a]['ssim']:.3f} / {r['attackers'][a]['mse']:.3f}" if a in r["attackers"] else ""
                 for a in names]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
