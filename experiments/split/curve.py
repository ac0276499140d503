"""The accuracy-privacy trade-off of the MLP cut as one plot and one table, beside the floors and the paper.

Reads ``experiments/results/split/mlp.jsonl`` (written by ``tradeoff.py``) and writes ``curve.md`` and
``curve.png`` next to it. Each family is a line over its strength: multiple defenders with lambda ramped
(0 -> lambda over the first half of training), multiple defenders at a constant lambda, NoPeek (its weight),
Gaussian and Laplace noise (sigma / b); one panel per attacker budget (15 and 30 epochs; a training attacked
twice appears in both). Horizontal lines: the mean-image floor and the label floor (the class template of the
label the server receives, :func:`nnmark.split.metrics.floor_scores`; recomputed here from the data for rows
written before it was recorded). Stars: the paper's Table II (best of its 8 attackers per setting).

    python experiments/split/curve.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "results" / "split"
# SecureMark-DL Table II (MNIST, 20 owners): accuracy, best attacker SSIM (Attack 3) and its MSE
PAPER = {"no defender": (97.67, 0.832, 0.018), "single defender": (96.85, 0.805, 0.023),
         "multiple defenders": (95.71, 0.499, 0.070)}
COLLAPSED = 50.0  # runs below this accuracy (chance 10%) have collapsed: in the table, not on the curves
FAMILIES = ["none", "adversarial, lambda ramped", "adversarial, constant lambda", "nopeek", "gaussian", "laplace"]


def family(cfg: dict[str, Any]) -> str | None:
    """The curve a run's configuration belongs to (``None``: a variant shown only in the table)."""
    d = cfg["defense"]
    if d in ("none", "nopeek", "gaussian", "laplace"):
        return d
    if d != "adversarial" or cfg.get("defenders", "multiple") != "multiple" or cfg.get("clip") is not None:
        return None
    if cfg.get("defender_steps", 1) > 1 or cfg.get("warm_rounds"):
        return None
    return "adversarial, lambda ramped" if cfg.get("ramp_rounds") else "adversarial, constant lambda"


def variant(cfg: dict[str, Any]) -> str:
    """A short description of the run's defence settings."""
    parts = [cfg["defense"]]
    if cfg["defense"] == "adversarial":
        parts.append(cfg.get("defenders", "multiple"))
    for key, label in (("warm_rounds", "warm"), ("ramp_rounds", "ramp"), ("clip", "clip")):
        if cfg.get(key):
            parts.append(f"{label} {cfg[key]:g}")
    if cfg.get("defender_steps", 1) > 1:
        parts.append(f"{cfg['defender_steps']} defender steps")
    return ", ".join(parts)


def points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (training, attack budget): the row with label-aware attackers when there is one."""
    from tradeoff import training_name

    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["config"].get("data", "mnist5k") != "mnist5k" or "best" not in r:
            continue
        key = (training_name(r["name"]), int(r.get("attack_epochs", 30)))
        if key not in best or "best_with_labels" in r:
            best[key] = r
    out = []
    for (train, epochs), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        c = r["config"]
        aware = {k: v for k, v in r["attackers"].items() if k.endswith("+y")}
        out.append({"training": train, "epochs": epochs, "family": family(c), "variant": variant(c),
                    "strength": c["strength"], "accuracy": 100 * r["accuracy"], "ssim": r["best"]["ssim"],
                    "mse": r["best"]["mse"], "attacker": r["best"]["attacker"],
                    "aware": max(aware.items(), key=lambda kv: kv[1]["ssim"]) if aware else None,
                    "predicted_floor": r["floor"].get("predicted_label", {}).get("best"),
                    "predicted_accuracy": r.get("predicted_accuracy")})
    return out


def table(pts: list[dict[str, Any]], fl: dict[str, Any]) -> str:
    lab = fl["label"]
    base = {p["epochs"]: p["accuracy"] for p in pts if p["family"] == "none"}
    lines = [
        "| training | defence | strength | accuracy | vs none | attack epochs | best attacker | its SSIM | its MSE | "
        "label-aware best (SSIM / MSE) | predicted-label floor | best with the labels | above the label floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate(FAMILIES)}
    for p in sorted(pts, key=lambda p: (p["epochs"], order.get(p["family"] or "", 99), p["strength"])):
        aware = f"{p['aware'][0]} {p['aware'][1]['ssim']:.3f} / {p['aware'][1]['mse']:.4f}" if p["aware"] else ""
        pf = p["predicted_floor"]
        pred = f"{pf['ssim']:.3f} ({pf['template'][6:]})" if pf else ""
        diff = p["accuracy"] - base.get(p["epochs"], p["accuracy"])
        top = max(p["ssim"], lab["best"]["ssim"], p["aware"][1]["ssim"] if p["aware"] else 0.0)
        top_s = f"{top:.3f}" if p["aware"] else f">= {top:.3f}"
        lines.append(f"| {p['training']} | {p['variant']} | {p['strength']:g} | {p['accuracy']:.1f} | {diff:+.1f} | "
                     f"{p['epochs']} | {p['attacker']} | {p['ssim']:.3f} | {p['mse']:.4f} | {aware} | {pred} | "
                     f"{top_s} | {top - lab['best']['ssim']:+.3f} |")
    head = (f"Floors on the 500 targets (no activations used): mean image SSIM {fl['ssim']:.3f} (MSE {fl['mse']:.4f}); "
            f"label floor: class mean {lab['class_mean']['ssim']:.3f} (MSE {lab['class_mean']['mse']:.4f}), class "
            f"medoid {lab['class_medoid']['ssim']:.3f} (MSE {lab['class_medoid']['mse']:.4f}); best of the two "
            f"{lab['best']['ssim']:.3f}. \"best with the labels\": the best of the activations-only attackers, the "
            "label-aware ones (decoders reading activation + one-hot label; only in the rows run with them, "
            "elsewhere a lower bound) and the label templates; \"above the label floor\": that minus "
            f"{lab['best']['ssim']:.3f}. Predicted-label floor: the templates of the class the server part "
            "predicts (template in brackets). "
            "Paper, Table II (best of 8 attackers): " + "; ".join(f"{k} {a:.2f}% SSIM {s:.3f} (MSE {m:.3f})"
                                                                  for k, (a, s, m) in PAPER.items()) + ".")
    return head + "\n\n" + "\n".join(lines) + "\n"


def plot(pts: list[dict[str, Any]], fl: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    styles = {"none": ("k", "s"), "adversarial, lambda ramped": ("tab:red", "o"),
              "adversarial, constant lambda": ("tab:orange", "v"), "nopeek": ("tab:blue", "^"),
              "gaussian": ("tab:green", "D"), "laplace": ("tab:purple", "P")}
    for ax, epochs in zip(axes, (15, 30), strict=True):
        mine = [p for p in pts if p["epochs"] == epochs and p["accuracy"] >= COLLAPSED]
        for fam in FAMILIES:
            fp = sorted((p for p in mine if p["family"] == fam), key=lambda p: p["strength"])
            if not fp:
                continue
            colour, marker = styles[fam]
            line = [*(p for p in mine if p["family"] == "none" and fam != "none"), *fp]  # each curve starts undefended
            ax.plot([p["accuracy"] for p in line], [p["ssim"] for p in line], color=colour, lw=1)
            ax.plot([p["accuracy"] for p in fp], [p["ssim"] for p in fp], marker=marker, color=colour, ls="",
                    label=fam)
            for p in fp:
                if fam != "none":
                    ax.annotate(f"{p['strength']:g}", (p["accuracy"], p["ssim"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=colour)
        for p in mine:
            if p["family"] is None:
                ax.plot(p["accuracy"], p["ssim"], "x", color="grey")
                ax.annotate(p["training"], (p["accuracy"], p["ssim"]), textcoords="offset points", xytext=(4, -8),
                            fontsize=6, color="grey")
            if p["aware"]:
                ax.plot(p["accuracy"], p["aware"][1]["ssim"], "o", mfc="none", color="tab:brown",
                        label="label-aware attacker" if "label-aware attacker" not in
                        ax.get_legend_handles_labels()[1] else None)
        for name, (acc, s, _) in PAPER.items():
            ax.plot(acc, s, "*", color="gold", mec="k", ms=11,
                    label="paper Table II" if name == "no defender" else None)
        ax.axhline(fl["ssim"], color="grey", ls=":", label=f"mean-image floor {fl['ssim']:.3f}")
        ax.axhline(fl["label"]["class_mean"]["ssim"], color="tab:brown", ls="--",
                   label=f"label floor, class mean {fl['label']['class_mean']['ssim']:.3f}")
        ax.axhline(fl["label"]["best"]["ssim"], color="tab:brown", ls="-.",
                   label=f"label floor, best template {fl['label']['best']['ssim']:.3f}")
        ax.axhline(0.30, color="tab:red", ls=":", lw=0.8, label="issue target 0.30")
        ax.set_xlim(86, 98.5)
        ax.set_title(f"MLP cut after fc2, mnist5k, attackers trained {epochs} epochs")
        ax.set_xlabel("test accuracy (%)  [collapsed runs (chance accuracy) only in the table]")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best attacker SSIM (activations only)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = [json.loads(line) for line in (OUT / "mlp.jsonl").read_text().splitlines() if line.strip()]
    from nnmark.split.evaluation import data_floors

    fl = data_floors("mnist5k", int(rows[0].get("n_targets", 500)))
    pts = points(rows)
    (OUT / "curve.md").write_text(table(pts, fl))
    plot(pts, fl, OUT / "curve.png")
    print(table(pts, fl))


if __name__ == "__main__":
    main()
