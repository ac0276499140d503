"""Markdown rows and the PSNR-robustness plot for round 8 (per-output refinement) from mark_hosts.py files.

    .venv/bin/python experiments/outputs/refine_tables.py experiments/results/outputs/round8/refine_*.json \
        --plot experiments/results/outputs/figures/refine_tradeoff.png

Files are read in name order. Each row: task, file, budget, PSNR vs unmarked (min), task drop, own bit accuracy,
share of single outputs at p < 1e-6, seconds per output, then batches of 16 at p < 1e-6 (clean / JPEG 50 /
noise 0.05 / crop 1/4 / x0.5) for the own mark (binomial) and, for files with a companion mark, the union verdict
under the binomial and the soft test. The plot draws, per task, the union (soft) batches per attack against the
budget, for the default recipe (owner seed `owner-{task}`, companion weight 1.5, random distortions rather than the
named threats); files with a crop term (`--refine-crop-weight`) add their crop batches as stars.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = ("none", "jpeg50", "noise0.05", "crop0.25", "resize0.5")


def batches(rob: dict, test: str | None) -> list[int]:
    """Batches of 16 (of 16) at p < 1e-6 per attack: own binomial when ``test`` is None, else the union."""
    if test is None:
        return [round(16 * rob[a]["batch16_frac_p_lt_1e-6"]) for a in ATTACKS]
    return [round(16 * rob[a][test]["union_batch16_frac_p_lt_1e-6"]) if test in rob[a] else -1 for a in ATTACKS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    print(
        "| task (file) | budget dB | PSNR (min) | task drop dB | bit acc. | single p<1e-6 | s / output "
        "| own, binomial | union, binomial | union, soft |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    # task -> budget -> union (soft) batches; a later file (sorted by name) of the same budget replaces an earlier
    # one, so a rerun such as `_offsets` supersedes the file it reran
    curves: dict[str, dict[float, list[int]]] = {}
    # task -> [(budget, crop batches, crop weight, steps)] for the default recipe with the crop term
    crop_term: dict[str, list[tuple[float, int, float, int]]] = {}
    for f in sorted(args.files):
        d = json.loads(Path(f).read_text())
        a = d["args"]
        for task, t in d["tasks"].items():
            fid, rob, ref = t["fidelity"], t["robustness"], t["embed"].get("refine", {})
            budget = a.get("refine_psnr") or a.get("head_psnr")
            dual = "binomial" in rob["none"]
            row = [
                f"{task} (`{Path(f).name}`)",
                f"{budget:g}",
                f"{fid['psnr_marked_vs_unmarked']:.2f} ({fid['psnr_marked_vs_unmarked_min']:.2f})",
                f"{fid['task_psnr_drop']:.2f}",
                f"{rob['none']['bit_acc']:.3f}",
                f"{rob['none']['single_frac_p_lt_1e-6']:.2f}",
                f"{ref.get('seconds_per_output', float('nan')):.2f}",
                "/".join(map(str, batches(rob, None))),
            ]
            row += ["/".join(map(str, batches(rob, test))) if dual else "-" for test in ("binomial", "soft")]
            print("| " + " | ".join(row) + " |")
            default_recipe = (
                a.get("owner", "owner-{task}") == "owner-{task}"
                and a.get("companion_weight") == 1.5
                and not a.get("refine_threats")
            )
            soft = batches(rob, "soft") if dual else []
            if dual and default_recipe and a.get("refine_crop_weight", 0.0) > 0:
                crop_term.setdefault(task, []).append(
                    (float(budget), soft[ATTACKS.index("crop0.25")], a["refine_crop_weight"], a["refine_steps"])
                )
            elif dual and default_recipe:
                curves.setdefault(task, {})[float(budget)] = soft
    if args.plot and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
        for ax, (task, by_budget) in zip(axes[0], sorted(curves.items()), strict=True):
            pts = sorted(by_budget.items())
            for i, name in enumerate(ATTACKS):
                ax.plot([p for p, _ in pts], [b[i] for _, b in pts], marker="o", label=name)
            for j, (p, c, w, st) in enumerate(sorted(crop_term.get(task, []))):
                ax.plot(
                    [p + 0.12 * j],
                    [c],
                    marker="*",
                    markersize=11,
                    color="black",
                    linestyle="none",
                    label="crop 1/4, crop term" if j == 0 else None,
                )
                ax.annotate(
                    f"w{w:g}" + ("" if st == 200 else f", {st}"),
                    (p + 0.12 * j, c),
                    fontsize=6,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
            ax.set_title(f"{task}: refined, two marks, union (soft)")
            ax.set_xlabel("PSNR marked vs unmarked, every output (dB)")
            ax.set_ylabel("batches of 16 at p < 1e-6 (of 16)")
            ax.set_ylim(-0.5, 16.5)
            ax.grid(alpha=0.3)
        for ax in axes[0]:
            ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
