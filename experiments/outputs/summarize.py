"""Markdown tables from experiments/results/outputs/*.json (marks, trade-off, FPR study, peer benchmark).

    .venv/bin/python experiments/outputs/summarize.py > experiments/results/outputs/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

RES = Path("experiments/results/outputs")
ATTACKS = ("none", "jpeg50", "noise0.05", "crop0.25", "resize0.5")


def marks_table(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    a = d["args"]
    out = [f"`{path.name}` (n = {a['n']}, host epochs {a['host_epochs']}, mark epochs {a['mark_epochs']}, "
           f"fidelity {a['fidelity']}, PSNR target {a['psnr_target']}, strength {a['strength']}); "
           "256 outputs on test photos", "",
           "| task / host | PSNR marked vs unmarked (min) | SSIM | task PSNR unmarked -> marked | "
           "mark cost x host training |", "|---|---|---|---|---|"]
    for task, t in d["tasks"].items():
        f = t["fidelity"]
        out.append(f"| {task} / {t['host']} | {f['psnr_marked_vs_unmarked']:.1f} "
                   f"({f['psnr_marked_vs_unmarked_min']:.1f}) | {f['ssim_marked_vs_unmarked']:.3f} | "
                   f"{f['task_psnr_unmarked']:.2f} -> "
                   f"{f['task_psnr_marked']:.2f} | {t['cost_multiple']:.1f} |")
    out += ["", "| task | attack | bit accuracy | single: p < 1e-6 | single: p < 1e-3 | batch of 16: max p "
            "| batches with p < 1e-6 |", "|---|---|---|---|---|---|---|"]
    for task, t in d["tasks"].items():
        for name in ATTACKS:
            r = t["robustness"][name]
            out.append(f"| {task} | {name} | {r['bit_acc']:.3f} | {r['single_frac_p_lt_1e-6']:.3f} | "
                       f"{r['single_frac_p_lt_1e-3']:.3f} | {r['batch16_max_p']:.2g} | "
                       f"{r['batch16_frac_p_lt_1e-6']:.2f} |")
    return out + [""]


def tpr_table(path: Path, fpr: Path) -> list[str]:
    """TPR at FPR 1e-3 (nominal alpha 1e-3; the measured pooled FPR from ``fpr``) and at FPR 1e-6 (alpha 1e-6:
    the binomial null bounds the FPR by the test's exact size, 3.1e-7 for 48 bits; not measurable on 10,000
    negatives)."""
    d = json.loads(path.read_text())
    measured = ""
    if fpr.exists():
        r = json.loads(fpr.read_text())["pooled_over_keys"].get("0.001")
        if r:
            measured = f" (measured pooled FPR {r['fpr']:.1e} [{r['ci99'][0]:.1e}, {r['ci99'][1]:.1e}], 99% CI)"
    out = [f"TPR, `{path.name}`: share of marked test outputs claimed at FPR 1e-3{measured} and at FPR 1e-6 "
           "(binomial bound)", "",
           "| task | attack | single @1e-3 | single @1e-6 | batch of 16 @1e-3 | batch of 16 @1e-6 |",
           "|---|---|---|---|---|---|"]
    for task, t in d["tasks"].items():
        for name in ATTACKS:
            r = t["robustness"][name]
            b3 = r.get("batch16_frac_p_lt_1e-3")
            out.append(f"| {task} | {name} | {r['single_frac_p_lt_1e-3']:.3f} | {r['single_frac_p_lt_1e-6']:.3f} | "
                       f"{'-' if b3 is None else f'{b3:.2f}'} | {r['batch16_frac_p_lt_1e-6']:.2f} |")
    return out + [""]


def fpr_table(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    out = [f"`{path.name}`: {d['n']} negatives ({', '.join(f'{k} {v}' for k, v in d['negatives'].items())})", "",
           "| key | read-out | alpha | claims | measured FPR [99% CI] | exact size of the test | inside |",
           "|---|---|---|---|---|---|---|"]
    for kid, k in d["keys"].items():
        for ro in ("calibrated", "raw_decoder"):
            for a, r in k[ro].items():
                out.append(f"| {kid[:8]} | {ro} | {a} | {r['claims']}/{r['n']} | {r['fpr']:.2e} "
                           f"[{r['ci99'][0]:.1e}, {r['ci99'][1]:.1e}] | {r['exact_size']:.2e} | "
                           f"{'yes' if r['size_inside_ci'] else 'NO'} |")
    out += ["", "| key | bits | max bias | mean bias | max abs corr | rms corr |", "|---|---|---|---|---|---|"]
    for kid, k in d["keys"].items():
        b = k["calibrated_bits"]
        out.append(f"| {kid[:8]} | calibrated | {b['max_bias']:.3f} | {b['mean_abs_bias']:.3f} | "
                   f"{b['max_abs_corr']:.3f} | {b['rms_corr']:.3f} |")
    b = d["raw_decoder_bits"]
    out.append(f"| any | raw decoder | {b['max_bias']:.3f} | {b['mean_abs_bias']:.3f} | {b['max_abs_corr']:.3f} | "
               f"{b['rms_corr']:.3f} |")
    out += ["", "| pooled over keys | claims | FPR [99% CI] |", "|---|---|---|"]
    for a, r in d["pooled_over_keys"].items():
        out.append(f"| alpha {a} | {r['claims']}/{r['n']} | {r['fpr']:.2e} [{r['ci99'][0]:.1e}, {r['ci99'][1]:.1e}] |")
    return out + [""]


def main() -> None:
    lines = []
    for p in sorted(RES.glob("marks*.json")):
        lines += marks_table(p)
    if (RES / "marks.json").exists():
        lines += tpr_table(RES / "marks.json", RES / "fpr.json")
    if (RES / "fpr.json").exists():
        lines += fpr_table(RES / "fpr.json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
