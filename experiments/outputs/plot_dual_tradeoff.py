"""PSNR-robustness curve of dual-mark hosts: batches of 16 read at p < 1e-6 after each attack against the PSNR
of marked vs unmarked outputs, one point per mark_hosts.py result file (with a companion).

    .venv/bin/python experiments/outputs/plot_dual_tradeoff.py experiments/results/outputs/round6/eval_dual3.json \
        experiments/results/outputs/round6/marks_colourise_w32_grey_dual3_f0.14.json \
        experiments/results/outputs/round6/eval_dual3_f0.2.json \
        --out experiments/results/outputs/round6/dual_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ATTACKS = {"jpeg50": "JPEG 50", "noise0.05": "noise 0.05", "crop0.25": "crop 1/4", "resize0.5": "resize x0.5"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--task", default="colourise")
    ap.add_argument("--test", default="soft", choices=("binomial", "soft"))
    ap.add_argument("--verdict", default="union", help="own, companion, union, joint, union3 or own_or_joint")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    points = []
    for f in args.files:
        t = json.loads(Path(f).read_text())["tasks"][args.task]
        rob = t["robustness"]
        key = f"{args.verdict}_batch16_frac_p_lt_1e-6"
        points.append((t["fidelity"]["psnr_marked_vs_unmarked"], {a: 16 * rob[a][args.test][key] for a in ATTACKS}))
    points.sort()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (a, label), (style, marker, dy) in zip(ATTACKS.items(), (("--", "s", 0.25), ("-", "o", -0.25),
                                                                  ("-", "^", 0.0), ("-", "v", 0.0)), strict=True):
        # equal counts would hide each other: JPEG and noise are drawn a quarter batch apart
        ax.plot([p for p, _ in points], [v[a] + dy for _, v in points], ls=style, marker=marker, label=label)
    ax.axvline(35.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("PSNR marked vs unmarked output (dB)")
    ax.set_ylabel("batches of 16 with p < 1e-6 (of 16)")
    ax.set_title(f"{args.task}, own + companion mark, {args.verdict} verdict ({args.test} test)", fontsize=9)
    ax.set_ylim(-0.5, 16.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for p, v in points:
        print(f"{p:.1f} dB: " + ", ".join(f"{ATTACKS[a]} {v[a]:.0f}" for a in ATTACKS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
