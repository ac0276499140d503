"""Attack quality against the partition point (SecureMark-DL Figure 4) on LFW faces, mnist5k and sklearn digits.

The zoo CNN (conv16-conv16-pool1-conv32-conv32-pool2-fc128-fc128-head, dropout 0.3) is cut after ``pool1``,
``pool2`` and ``fc1`` (the zoo CNN has no third pooling layer; ``fc1``, the first dense layer, is the next,
deeper cut). Each cut is trained by 4 owners without defence and with multiple defenders (one deconvolution
or vector defender kind per owner) under the ramped lambda that worked best on the MLP (0 -> 30 over the
first half of the rounds; on the faces also ramped lambda 10 at pool1 / pool2), then attacked by every
learning attacker that fits the cut's activations (:func:`nnmark.split.evaluation.privacy_report`; maps:
``m1 m2 m3 m5``, vectors: ``a1 a3 a4 a8``).

Datasets (:mod:`nnmark.split.datasets`; train / attacker / test images):
``lfw-faces`` (face / non-face, 80 / 60 / 40; batch 5 per owner, 40 epochs = 160 rounds; attackers train 60
epochs of batch 16), ``mnist5k`` (3,000 / 500 / 1,000; batch 32, 6 epochs = 138 rounds; attackers 15 epochs
of batch 64, as in ``cnn.jsonl``) and ``digits`` (8x8, 1,077 / 180 / 360; batch 32, 10 epochs = 80 rounds;
attackers 30 epochs of batch 64). Rows go to ``experiments/results/split/partition_points.jsonl``
(rerun-safe: runs already there are skipped); ``--report`` writes the Markdown table ``partition_points.md``
and the figure ``partition_points.png``. Usage::

    python experiments/split/partition_points.py [--only lfw-faces/pool1-none,...]
    python experiments/split/partition_points.py --report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nnmark.keys import Key
from nnmark.split.attackers import AttackConfig
from nnmark.split.evaluation import privacy_report
from nnmark.split.protocol import SplitConfig, simulate

OUT = Path(__file__).resolve().parents[1] / "results" / "split"
CUTS = ("pool1", "pool2", "fc1")
CNN = {"arch": "cnn", "arch_overrides": {"channels": [16, 16, 32, 32], "dense": [128, 128], "dropout": 0.3},
       "owners": 4}
DATA = {"lfw-faces": ({"batch_size": 5, "epochs": 40}, AttackConfig(epochs=60, batch_size=16)),
        "mnist5k": ({"batch_size": 32, "epochs": 6}, AttackConfig(epochs=15, batch_size=64)),
        "digits": ({"batch_size": 32, "epochs": 10}, AttackConfig(epochs=30, batch_size=64))}
DEFENCES = {"none": {}, "multi-l30-ramp": {"defense": "adversarial", "strength": 30.0},
            "multi-l10-ramp": {"defense": "adversarial", "strength": 10.0}}


def runs() -> dict[str, tuple[dict, AttackConfig, list[str]]]:
    """``data/cut-defence`` -> (SplitConfig overrides, attacker training, attacker names)."""
    out = {}
    for data, (train, attack) in DATA.items():
        for at in CUTS:
            attackers = ["a1", "a3", "a4", "a8"] if at.startswith("fc") else ["m1", "m2", "m3", "m5"]
            for name, defence in DEFENCES.items():
                if name == "multi-l10-ramp" and (data != "lfw-faces" or at == "fc1"):
                    continue  # the weaker defence only where lambda 30 cost accuracy
                cfg = {**CNN, **train, "data": data, "at": at, **defence}
                if defence:
                    cfg["ramp_rounds"] = _rounds(cfg) // 2
                out[f"{data}/{at}-{name}"] = (cfg, attack, attackers)
    return out


def _rounds(overrides: dict) -> int:
    from nnmark.split.protocol import total_rounds

    return total_rounds(SplitConfig.from_dict(overrides))


def measure(only: list[str]) -> None:
    path = OUT / "partition_points.jsonl"
    done = {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()} \
        if path.exists() else set()
    for name, (overrides, attack, attackers) in runs().items():
        if name in done or (only and name not in only):
            continue
        cfg = SplitConfig.from_dict(overrides)
        t0 = time.perf_counter()
        res = simulate(cfg, Key.from_seed(f"split-partition/{name}"))
        t1 = time.perf_counter()
        rep = privacy_report(res.model, cfg, attackers, attack=attack)
        row = {"name": name, "config": cfg.to_dict(), "accuracy": res.accuracy, "rounds": res.rounds,
               "attack": {"epochs": attack.epochs, "batch_size": attack.batch_size},
               "train_seconds": round(t1 - t0, 1), "attack_seconds": round(time.perf_counter() - t1, 1), **rep}
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        b = rep["best"]
        print(f"{name}: acc {res.accuracy:.3f} best {b['attacker']} ssim {b['ssim']:.3f} "
              f"(floor {rep['floor']['ssim']:.3f}) mse {b['mse']:.4f} reprint {b['reprint_accuracy']:.2f} "
              f"[{t1 - t0:.0f}+{time.perf_counter() - t1:.0f} s]", flush=True)


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in map(json.loads, (OUT / "partition_points.jsonl").read_text().splitlines())}
    from scipy.stats import binomtest

    from nnmark.split.datasets import load_split_data
    from nnmark.split.evaluation import data_floors

    floors = {d: data_floors(d, next(r["n_targets"] for n, r in rows.items() if n.startswith(f"{d}/")))
              for d in DATA if any(n.startswith(f"{d}/") for n in rows)}
    lines = ["| data | cut | defence | accuracy (95% CI) | best attacker | its SSIM | mean-image SSIM | "
             "label floor SSIM (class mean / medoid) | its MSE | mean-image MSE | DPD | "
             "reprint acc (judge on clean test) |", "|" + "---|" * 12]
    order = list(runs())
    for name, r in sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        data, rest = name.split("/")
        at, defence = rest.split("-", 1)
        b, f = r["best"], r["floor"]
        n = len(load_split_data(data).test)
        ci = binomtest(round(r["accuracy"] * n), n).proportion_ci(0.95)  # Clopper-Pearson over the test images
        acc = f"{100 * r['accuracy']:.1f} ({100 * ci.low:.0f}-{100 * ci.high:.0f}, n={n})"
        lab = floors[data]["label"]
        lines.append(f"| {data} | {at} | {defence} | {acc} | {b['attacker']} | {b['ssim']:.3f} | "
                     f"{f['ssim']:.3f} | {lab['class_mean']['ssim']:.3f} / {lab['class_medoid']['ssim']:.3f} | "
                     f"{b['mse']:.4f} | {f['mse']:.4f} | {b['dpd']:.3f} | "
                     f"{b['reprint_accuracy']:.2f} ({r['judge_accuracy']:.2f}) |")
    (OUT / "partition_points.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    label_floors = floors
    metrics = [("accuracy", "task accuracy"), ("ssim", "best attacker SSIM"), ("mse", "its MSE"),
               ("reprint_accuracy", "reprint accuracy")]
    fig, axes = plt.subplots(len(DATA), len(metrics), figsize=(15, 6.5), squeeze=False)
    for i, data in enumerate(DATA):
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            for defence, style in zip(DEFENCES, ("o-", "s--", "^-."), strict=True):
                xs, ys = [], []
                for k, at in enumerate(CUTS):
                    r = rows.get(f"{data}/{at}-{defence}")
                    if r:
                        xs.append(k)
                        ys.append(r["accuracy"] if metric == "accuracy" else r["best"][metric])
                if xs:
                    ax.plot(xs, ys, style, label="no defence" if defence == "none"
                            else f"multiple defenders, ramped λ {DEFENCES[defence]['strength']:g}")
            if metric in ("ssim", "mse"):
                floors = [rows[f"{data}/{at}-none"]["floor"][metric] for at in CUTS if f"{data}/{at}-none" in rows]
                if floors:
                    ax.axhline(floors[0], color="grey", ls=":", label="mean image (no information)")
                if data in label_floors:
                    ax.axhline(label_floors[data]["label"]["best"][metric], color="tab:brown", ls="-.",
                               label="label floor (best class template)")
            ax.set_xticks(range(len(CUTS)), CUTS)
            ax.set_title(f"{data}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == 0 and j == 1:
                ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(OUT / "partition_points.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report:
        report()
    else:
        measure([s for s in args.only.split(",") if s])


if __name__ == "__main__":
    main()
