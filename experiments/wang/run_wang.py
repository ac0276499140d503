"""Wang et al. 2020 Tables 3-5, 7 and Figure 4 at CPU scale (MLP 784-64-10 on digits-28,
512 bits in the head's 640 weights; Uchida = the paper's baseline [7]).

    .venv/bin/python experiments/wang/run_wang.py [--dataset digits28] [--epochs 10]

Writes experiments/results/wang/{tables.md, results.json, compression.png}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nnmark.attacks.finetune import FineTune  # noqa: E402
from nnmark.attacks.prune import prune_by_magnitude  # noqa: E402
from nnmark.data import load_splits  # noqa: E402
from nnmark.data.dataset import ImageDataset  # noqa: E402
from nnmark.keys import Key  # noqa: E402
from nnmark.models import model_spec  # noqa: E402
from nnmark.schemes.uchida import Uchida  # noqa: E402
from nnmark.schemes.wang import WangAuto, WangManu  # noqa: E402
from nnmark.train import TrainConfig, accuracy, seeded_model, train  # noqa: E402

OUT = Path("experiments/results/wang")
METHODS = {"uchida": Uchida, "wang-manu": WangManu, "wang-auto": WangAuto}
PAPER_T3 = {"clean": 97.45, "uchida": 97.28, "wang-manu": 97.44, "wang-auto": 97.49}
PAPER_T5 = {256: (100, 100, 100), 512: (98.05, 100, 100), 1024: (79.20, 100, 100), 2048: (65.87, 100, 100),
            4096: (58.84, 100, 100)}


def marked(name, spec, data, cfg, seed, bits=512):
    m = seeded_model(spec, seed)
    s = METHODS[name].create(Key.from_seed(f"exp-{seed}"), m, layer="head", bits=bits, strict_capacity=False)
    s.embed(m, data.train, cfg)
    return s, m


def bit_acc(s, m):
    return 100.0 * float(np.mean(s.extract(m) == s.message))


def p_value(s, m):
    """The verdict's p (Uchida: binomial; Wang: exact block-permutation test, floor ~1e-36)."""
    return float(s.verify(m, alpha=1e-6).p_value)


def hist_corr(a, b, width=0.1):
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    edges = np.arange(np.floor(lo / width) * width, hi + width, width)
    h1, _ = np.histogram(a, edges)
    h2, _ = np.histogram(b, edges)
    return float(np.corrcoef(h1, h2)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits28")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_splits(args.dataset)
    spec = model_spec("mlp", data.train.image_shape, 10)
    cfg = lambda seed: TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, seed=seed, progress=False)  # noqa: E731
    res: dict = {"dataset": args.dataset, "epochs": args.epochs}
    # Table 3: fidelity over 3 seeds
    t3 = {"clean": []}
    models = {}
    for seed in range(3):
        c = seeded_model(spec, seed)
        train(c, data.train, cfg(seed))
        t3["clean"].append(100 * accuracy(c, data.test))
        models[("clean", seed)] = c
        for name in METHODS:
            s, m = marked(name, spec, data, cfg(seed), seed)
            t3.setdefault(name, []).append(100 * accuracy(m, data.test))
            t3.setdefault(name + "-bits", []).append(bit_acc(s, m))
            t3.setdefault(name + "-p", []).append(p_value(s, m))
            models[(name, seed)] = (s, m)
    res["table3"] = t3
    # Table 4: fine-tuning same domain (attacker split, 10 epochs) and different domain (5-class head)
    t4 = {}
    keep = data.attacker.y < 5
    dd = ImageDataset(data.attacker.x[keep], data.attacker.y[keep], 5, "attacker-0to4")
    for name in METHODS:
        s, m = models[(name, 0)]
        sd = FineTune("FTAL", epochs=10, batch_size=32).attack(m, data.attacker)
        m5 = copy.deepcopy(m)
        # different domain: a new 5-way head replaces the 10-way one (the marked head is the carrier, so
        # we keep its first 5 rows as the paper "extends" the output layer), then all layers are trained
        head = torch.nn.Linear(m5.head.in_features, 5)
        with torch.no_grad():
            head.weight.copy_(m5.head.weight[:5])
            head.bias.copy_(m5.head.bias[:5])
        m5.head = head
        train(m5, dd, TrainConfig(epochs=10, batch_size=32, progress=False))
        # read the mark from the 5 kept rows, the other 5 as left by the owner
        back = copy.deepcopy(m)
        with torch.no_grad():
            back.head.weight[:5] = m5.head.weight
        t4[name] = {"SD": bit_acc(s, sd), "DD": bit_acc(s, back), "SD_p": p_value(s, sd), "DD_p": p_value(s, back)}
    res["table4"] = t4
    # Figure 4: remove alpha% of the head weights, ascending / random / descending |w|
    fig4 = {}
    alphas = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    for name in METHODS:
        s, m = models[(name, 0)]
        for order, lab in (("smallest", "ascending"), ("random", "random"), ("largest", "descending")):
            row = []
            for a in alphas:
                p = copy.deepcopy(m)
                prune_by_magnitude(p, a / 100, order=order, scope="layer", layers=["head"])
                row.append((bit_acc(s, p), 100 * accuracy(p, data.test)))
            fig4[f"{name}/{lab}"] = row
        p = copy.deepcopy(m)
        prune_by_magnitude(p, 0.6, order="smallest", scope="layer", layers=["head"])
        fig4[f"{name}/ascending60_p"] = p_value(s, p)
    res["figure4"] = {"alphas": alphas, "curves": {k: v for k, v in fig4.items() if not k.endswith("_p")},
                      "p60": {k.split("/")[0]: v for k, v in fig4.items() if k.endswith("_p")}}
    # Table 5: capacity
    t5 = {}
    for bits in (256, 512, 1024, 2048, 4096):
        for name in METHODS:
            s, m = marked(name, spec, data, cfg(0), 0, bits=bits)
            t5.setdefault(bits, {})[name] = (100 * accuracy(m, data.test), bit_acc(s, m))
    res["table5"] = t5
    # Table 7: histogram correlation of the head's weights (bins of 0.1, Eq. 2)
    ws = {"clean": models[("clean", 0)].head.weight.detach().numpy().ravel()}
    for name in METHODS:
        ws[name] = models[(name, 0)][1].head.weight.detach().numpy().ravel()
    res["table7"] = {a: {b: hist_corr(ws[a], ws[b]) for b in ws} for a in ws}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    write_tables(res)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, lab in zip(axes, ("ascending", "random", "descending"), strict=True):
        for name in METHODS:
            ax.plot(alphas, [r[0] for r in fig4[f"{name}/{lab}"]], marker="o", label=name)
        ax.set_title(f"remove {lab} |w|")
        ax.set_xlabel("compression rate alpha (%)")
    axes[0].set_ylabel("bits correct (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "compression.png", dpi=110)


def write_tables(res: dict) -> None:
    t3 = res["table3"]
    lines = [f"# Wang et al. 2020 at CPU scale: MLP 784-64-10 on {res['dataset']}, {res['epochs']} epochs, "
             "512 bits in the head's 640 weights", "",
             "## Table 3 - fidelity (test accuracy %, mean ± std over 3 seeds) and bits correct", "",
             "| method | ours acc | ours bits correct | p (largest of 3 seeds) | paper acc (MNIST) |",
             "|---|---|---|---|---|"]
    for name in ["clean", *METHODS]:
        acc = np.array(t3[name])
        bits = f"{np.mean(t3[name + '-bits']):.2f}" if name != "clean" else "-"
        p = f"{max(t3[name + '-p']):.2g}" if name != "clean" else "-"
        lines.append(f"| {name} | {acc.mean():.2f} ± {acc.std():.2f} | {bits} | {p} | {PAPER_T3[name]} |")
    lines += ["", "## Table 4 - bits correct (%) after fine-tuning (SD: FTAL 10 epochs on the attacker's 10%; "
              "DD: new 5-class head on the attacker's digits 0-4, all layers, 10 epochs)", "",
              "| method | SD ours | SD p | DD ours | DD p | SD paper | DD paper |", "|---|---|---|---|---|---|---|"]
    paper4 = {"uchida": (98.83, 63.87), "wang-manu": (100, 100), "wang-auto": (100, 100)}
    for name, r in res["table4"].items():
        lines.append(f"| {name} | {r['SD']:.2f} | {r['SD_p']:.2g} | {r['DD']:.2f} | {r['DD_p']:.2g} | "
                     f"{paper4[name][0]} | {paper4[name][1]} |")
    lines += ["", "## Figure 4 - bits correct (%) / accuracy (%) after removing alpha% of the head's weights",
              "", "| method/order | " + " | ".join(f"{a}%" for a in res["figure4"]["alphas"]) + " |",
              "|---|" + "---|" * len(res["figure4"]["alphas"])]
    for k, row in res["figure4"]["curves"].items():
        lines.append(f"| {k} | " + " | ".join(f"{b:.0f}/{a:.0f}" for b, a in row) + " |")
    lines += ["", "p after removing the 60% smallest head weights: " + ", ".join(
        f"{n} {v:.2g}" for n, v in res["figure4"]["p60"].items())]
    lines += ["", "## Table 5 - capacity: accuracy (AO %) / bits correct (AW %); paper AW in brackets", "",
              "| bits | uchida | wang-manu | wang-auto |", "|---|---|---|---|"]
    for bits, r in res["table5"].items():
        p = PAPER_T5[int(bits)]
        cells = [f"{r[n][0]:.2f} / {r[n][1]:.2f} ({p[i]})" for i, n in enumerate(METHODS)]
        lines.append(f"| {bits} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 7 - histogram correlation of the head's weights (Eq. 2, bins 0.1)", "",
              "| | " + " | ".join(res["table7"]) + " |", "|---|" + "---|" * len(res["table7"])]
    for a, row in res["table7"].items():
        lines.append(f"| {a} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    (OUT / "tables.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
