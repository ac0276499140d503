"""Capacity of output-wu (Wu et al. Tables IV-V analogue): watermark size against fidelity and reliability.

    for s in 8 32; do .venv/bin/python experiments/outputs/wu_measure.py --task sr2 --steps 1000 \
        --negatives 500 --no-other-key --param wm_size=$s \
        --out experiments/results/outputs/wu_sr2_binary_wm$s.json; done
    .venv/bin/python experiments/outputs/figures_capacity.py experiments/results/outputs/wu_sr2_binary_wm8.json \
        experiments/results/outputs/wu_sr2_binary.json experiments/results/outputs/wu_sr2_binary_wm32.json \
        --out experiments/results/outputs/figures

Reads wu_measure.py results (one per watermark size) and writes ``capacity.md`` and ``capacity.png``: per
watermark side (pixels of the 32 px output; the paper's 32..256 of 256 px are 1/8..1 of the side), the task
PSNR of the marked host against the ground truth (the paper's PSNR column) and of the unmarked host, the PSNR of
marked against unmarked outputs, the watermark's bit error rate (binary: sign of the extraction) or PSNR
(colour), the detection rate at the calibrated alpha = 0.01 threshold and the held-out claim rate. Beside them
the paper's super-resolution row (x4, 256 px) and HiDDeN's published bit errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Wu et al. Table IV / V, super-resolution row: watermark side -> (PSNR vs ground truth, BER_w) / (PSNR, PSNR_w)
PAPER_SR_BINARY = {32: (23.28, 0.0040), 64: (20.42, 0.0092), 96: (21.88, 0.0183), 128: (23.15, 0.0197),
                   256: (22.07, 0.0232)}
PAPER_SR_COLOUR = {32: (22.49, 33.82), 64: (20.03, 31.71), 96: (20.94, 29.25), 128: (20.90, 26.38),
                   256: (20.54, 25.22)}
#: HiDDeN (Zhu et al. 2018), 30 bits in 128x128 images, robust model: bit error rate per distortion
HIDDEN_BER = {"JPEG": 0.0096, "crop": 0.06, "dropout": 0.008}


def row(path: Path) -> dict:
    d = json.loads(path.read_text())
    params = dict(kv.split("=", 1) for kv in d["args"].get("param", []))
    size = int(d["args"]["size"])
    wm = int(params.get("wm_size", size // 2))
    det = d["detection"]["0.01"]
    channels = 1 if d["args"]["watermark"] == "binary" else 3
    return {"file": path.name, "watermark": d["args"]["watermark"], "wm_side": wm, "image_side": size,
            "wm_values": wm * wm * channels,
            # a --load run re-measures a saved folder: its --steps is not what the folder was trained with
            "steps": "see its training run" if d["args"].get("load") else d["args"]["steps"],
            "task_psnr_marked": d["task_psnr_marked"], "task_psnr_unmarked": d["task_psnr_unmarked"],
            "psnr_vs_unmarked": d["fidelity_marked_vs_unmarked"]["psnr_mean"],
            "ber": d.get("watermark_ber"), "wm_psnr": d.get("watermark_psnr_db"),
            "tpr": det["tpr"]["rate"], "fpr": det["fpr_eval_all"]["rate"], "fpr_ci95": det["fpr_eval_all"]["ci95"],
            "fpr_n": det["fpr_eval_all"]["n"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="experiments/results/outputs/figures")
    args = ap.parse_args()
    rows = sorted((row(Path(p)) for p in args.results), key=lambda r: (r["watermark"], r["wm_side"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# output-wu capacity (written by figures_capacity.py)", "",
             "| watermark | side (of 32 px) | values | steps | task PSNR marked / unmarked | PSNR vs unmarked | "
             "BER_w / PSNR_w | detected at alpha 0.01 | held-out claimed [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ber']:.4f}" if r["ber"] is not None else f"{r['wm_psnr']:.1f} dB"
        lines.append(f"| {r['watermark']} | {r['wm_side']} | {r['wm_values']} | {r['steps']} | "
                     f"{r['task_psnr_marked']:.2f} / {r['task_psnr_unmarked']:.2f} | {r['psnr_vs_unmarked']:.1f} | "
                     f"{rel} | {r['tpr']:.3f} | {r['fpr']:.4f} [{r['fpr_ci95'][0]:.4f}, {r['fpr_ci95'][1]:.4f}] "
                     f"(n {r['fpr_n']}) |")
    lines += ["", "Paper (Wu et al., super-resolution x4 at 256 px; PSNR of marked outputs vs ground truth):", "",
              "| side (of 256 px) | binary: PSNR / BER_w | colour: PSNR / PSNR_w |", "|---|---|---|"]
    for s in PAPER_SR_BINARY:
        b, c = PAPER_SR_BINARY[s], PAPER_SR_COLOUR[s]
        lines.append(f"| {s} | {b[0]:.2f} / {b[1]:.4f} | {c[0]:.2f} / {c[1]:.2f} dB |")
    lines += ["", "HiDDeN (30 bits at 128x128, robust model), published bit errors: "
              + ", ".join(f"{k} {v:.2%}" for k, v in HIDDEN_BER.items()), ""]
    (out / "capacity.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind in sorted({r["watermark"] for r in rows}):
        rs = [r for r in rows if r["watermark"] == kind]
        xs = [r["wm_side"] / r["image_side"] for r in rs]
        ax[0].plot(xs, [r["psnr_vs_unmarked"] for r in rs], "o-", label=f"{kind}: marked vs unmarked")
        ax[0].plot(xs, [r["task_psnr_marked"] for r in rs], "s--", label=f"{kind}: task PSNR (vs truth)")
        ax[1].plot(xs, [r["ber"] if r["ber"] is not None else float("nan") for r in rs], "o-", label=f"{kind} BER_w")
    ax[0].plot([s / 256 for s in PAPER_SR_BINARY], [v[0] for v in PAPER_SR_BINARY.values()], "k^:",
               label="paper SR x4: task PSNR (binary)")
    ax[1].plot([s / 256 for s in PAPER_SR_BINARY], [v[1] for v in PAPER_SR_BINARY.values()], "k^:",
               label="paper SR x4 BER_w")
    for a in ax:
        a.set_xlabel("watermark side / image side")
        a.legend(fontsize=7)
    ax[0].set_ylabel("PSNR (dB)")
    ax[1].set_ylabel("bit error rate of the extracted watermark")
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=110)
    (out / "capacity.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
