"""Wang et al. 2020 Tables 3-6, 8 and Figure 4, CNN half, at CPU scale: the Zhang CNN
(conv32-conv32-pool-conv64-conv64-pool-dense256-dense256) on mnist5k (3,000 training,
1,000 test images), 512 bits in conv4 -- its 64x64x3x3 weight read through the filter
mean, 576 values -- for Uchida (summed BCE, lambda 0.01: nnmark's default on a conv
filter-mean carrier), the projection regulariser
(mu 2), Wang MANU and AUTO (lambda 0.05, decoys, finalized secret net). Adam 1e-3,
batch 64, 10 epochs (the paper: VGG16 / CIFAR-10, SGD, 150 epochs).

One part a run, each well under 15 minutes on one core (models and keys are cached in
``runs/wang_cnn/``, which git ignores)::

    .venv/bin/python experiments/wang/run_wang_cnn.py train --seed 0     # clean + 4 marked (seed 0)
    .venv/bin/python experiments/wang/run_wang_cnn.py train --seed 1
    .venv/bin/python experiments/wang/run_wang_cnn.py train --seed 2
    .venv/bin/python experiments/wang/run_wang_cnn.py attacks            # FTAL, other dataset, pruning, histograms
    .venv/bin/python experiments/wang/run_wang_cnn.py capacity --bits 256 1024
    .venv/bin/python experiments/wang/run_wang_cnn.py capacity --bits 2048 4096
    .venv/bin/python experiments/wang/run_wang_cnn.py uchida-strength --strength 0.02
    .venv/bin/python experiments/wang/run_wang_cnn.py uchida-strength --strength 0.05
    .venv/bin/python experiments/wang/run_wang_cnn.py report             # tables_cnn.md, *.png

Results (JSON per part, tables, figures) go to ``experiments/results/wang/cnn/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nnmark.attacks.finetune import FineTune  # noqa: E402
from nnmark.attacks.prune import prune_by_magnitude  # noqa: E402
from nnmark.data import load_splits  # noqa: E402
from nnmark.io import load_model, save_model  # noqa: E402
from nnmark.keys import Key  # noqa: E402
from nnmark.models import model_spec  # noqa: E402
from nnmark.schemes import SCHEMES, load_scheme  # noqa: E402
from nnmark.schemes.base import Scheme  # noqa: E402
from nnmark.train import TrainConfig, accuracy, seeded_model, train  # noqa: E402

OUT = Path("experiments/results/wang/cnn")
CACHE = Path("runs/wang_cnn")
LAYER, BITS, EPOCHS, ALPHA = "conv4", 512, 10, 1e-6
METHODS = ["uchida", "projection", "wang-manu", "wang-auto"]
ALPHAS = [10, 20, 30, 40, 50, 60, 70, 80, 90]
ORDERS = {"ascending": "smallest", "random": "random", "descending": "largest"}
# the paper's VGG16 / CIFAR-10 numbers (its second host: a conv layer carrier, 1,728 weights)
PAPER = {
    "table3": {"clean": 83.65, "uchida": 82.62, "wang-manu": 83.41, "wang-auto": 83.21},
    "table4": {"uchida": (98.83, 63.87), "wang-manu": (100, 100), "wang-auto": (100, 100)},
    "table6": {256: (100, 100, 100), 512: (100, 100, 100), 1024: (100, 100, 100), 2048: (93.75, 100, 100),
               4096: (81.05, 100, 100)},
    "table8": {("wang-auto", "wang-manu"): 0.9791, ("wang-auto", "uchida"): 0.9123, ("wang-auto", "clean"): 0.9899,
               ("wang-manu", "uchida"): 0.8335, ("wang-manu", "clean"): 0.9939, ("uchida", "clean"): 0.8640},
}


def cfg(seed: int) -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=64, lr=1e-3, seed=seed, progress=False)


def make(name: str, model: torch.nn.Module, seed: int, bits: int = BITS, **extra: Any) -> Scheme:
    strict = bits <= 576
    return SCHEMES[name].create(Key.from_seed(f"wang-cnn-{seed}-{bits}"), model, layer=LAYER, bits=bits,
                                strict_capacity=strict, **extra)


def check(s: Scheme, m: torch.nn.Module, alpha: float = ALPHA) -> dict[str, Any]:
    """BER, matched bits and p of ``m`` under scheme ``s`` (Wang: exact block-permutation test)."""
    t = time.perf_counter()
    v = s.verify(m, alpha=alpha)
    return {"ber": v.details["ber"], "matched": int(v.statistic), "p": v.p_value, "owned": v.owned,
            "verify_s": time.perf_counter() - t}


def ber_only(s: Scheme, m: torch.nn.Module) -> float:
    return float(np.mean(s.extract(m) != s.message))


def cached(tag: str) -> tuple[torch.nn.Module, Scheme | None]:
    model, _ = load_model(CACHE / f"{tag}.safetensors")
    key = CACHE / f"{tag}.key"
    return model, (load_scheme(key) if key.exists() else None)


def save_json(name: str, obj: Any) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------- parts
def part_train(seed: int, methods: list[str]) -> None:
    """Table 3 (one seed): clean and marked CNNs, accuracy, BER and p at 512 bits.
    ``methods``: the marked models to (re)train; others are kept from an earlier run
    (``clean`` is trained when listed or when there is no earlier run)."""
    data = load_splits("mnist5k")
    spec = model_spec("cnn", data.train.image_shape, 10)
    CACHE.mkdir(parents=True, exist_ok=True)
    old = OUT / f"train-seed{seed}.json"
    res: dict[str, Any] = json.loads(old.read_text()) if old.exists() else {}
    res.update({"seed": seed, "epochs": EPOCHS})
    if "clean" in methods or "clean" not in res:
        m = seeded_model(spec, seed)
        t = time.perf_counter()
        train(m, data.train, cfg(seed))
        res["clean"] = {"acc": 100 * accuracy(m, data.test), "train_s": time.perf_counter() - t}
        save_model(CACHE / f"clean-{seed}.safetensors", m, {"data": "mnist5k"})
        print("clean", res["clean"], flush=True)
    for name in [n for n in METHODS if n in methods]:
        m = seeded_model(spec, seed)
        s = make(name, m, seed)
        t = time.perf_counter()
        s.embed(m, data.train, cfg(seed))
        r = {"acc": 100 * accuracy(m, data.test), "train_s": time.perf_counter() - t, **check(s, m)}
        if name.startswith("wang"):
            r["watermark_loss"] = s.watermark_loss(m)
            r["selected"] = int(len(s.selection)) if name == "wang-manu" else s.width
        res[name] = r
        tag = f"{name}-{seed}"
        save_model(CACHE / f"{tag}.safetensors", m, {"data": "mnist5k"})
        (CACHE / f"{tag}.key").unlink(missing_ok=True)
        s.save(CACHE / f"{tag}.key")
        print(name, r, flush=True)
    save_json(f"train-seed{seed}.json", res)


def part_attacks() -> None:
    """Table 4 (FTAL 10% / another dataset), Figure 4 (layer removal), global pruning,
    Table 8 (histograms), and the plain Wang decoder on clean CNNs."""
    data = load_splits("mnist5k")
    other = load_splits("digits28")
    ftal_data = data.attacker.take_fraction(0.1 * len(data.train) / len(data.attacker))  # 10% of training size
    res: dict[str, Any] = {"ftal_images": len(ftal_data)}
    seeds = [s for s in range(3) if (CACHE / f"clean-{s}.safetensors").exists()]
    # Table 4: FTAL with 10% of the training data (every seed); other dataset (seed 0)
    t4: dict[str, Any] = {}
    for name in METHODS:
        for seed in seeds:
            m, s = cached(f"{name}-{seed}")
            assert s is not None
            ft = FineTune("FTAL", epochs=10, batch_size=32, lr=1e-3, seed=seed).attack(m, ftal_data)
            t4.setdefault(name, {}).setdefault("ftal", []).append(
                {"acc": 100 * accuracy(ft, data.test), **check(s, ft)})
            if seed == 0:
                dd = FineTune("RTAL", epochs=10, batch_size=32, lr=1e-3).attack(m, other.train)
                t4[name]["other_dataset"] = {"acc_digits28": 100 * accuracy(dd, other.test), **check(s, dd)}
        print("t4", name, t4[name].get("other_dataset"), [r["ber"] for r in t4[name]["ftal"]], flush=True)
    res["table4"] = t4
    # Figure 4: remove alpha% of conv4's weights; global magnitude pruning (seed 0)
    fig4: dict[str, Any] = {}
    glob: dict[str, Any] = {}
    clean0, _ = cached("clean-0")
    for name in METHODS:
        m, s = cached(f"{name}-0")
        assert s is not None
        for lab, order in ORDERS.items():
            row = []
            for a in ALPHAS:
                p = copy.deepcopy(m)
                prune_by_magnitude(p, a / 100, order=order, scope="layer", layers=[LAYER], seed=0)
                row.append({"ber": ber_only(s, p), "acc": 100 * accuracy(p, data.test)})
            fig4[f"{name}/{lab}"] = row
        p = copy.deepcopy(m)
        prune_by_magnitude(p, 0.6, order="smallest", scope="layer", layers=[LAYER])
        fig4[f"{name}/ascending60"] = {"acc": 100 * accuracy(p, data.test), **check(s, p)}
        row = []
        for a in ALPHAS:
            p = copy.deepcopy(m)
            prune_by_magnitude(p, a / 100, order="smallest", scope="global")
            row.append({"ber": ber_only(s, p), "acc": 100 * accuracy(p, data.test)})
        glob[name] = row
        print("fig4", name, fig4[f"{name}/ascending60"], flush=True)
    row = []
    for a in ALPHAS:
        p = copy.deepcopy(clean0)
        prune_by_magnitude(p, a / 100, order="smallest", scope="global")
        row.append({"acc": 100 * accuracy(p, data.test)})
    glob["clean"] = row
    res["figure4"] = fig4
    res["global_pruning"] = glob
    # Table 8: histogram correlation (Eq. 2) of all conv4 weights, seed 0
    ws = {"clean": clean0.conv4.weight.detach().numpy().ravel()}
    for name in METHODS:
        ws[name] = cached(f"{name}-0")[0].conv4.weight.detach().numpy().ravel()
    res["table8"] = {w: {a: {b: hist_corr(ws[a], ws[b], w) for b in ws} for a in ws} for w in (0.01, 0.1)}
    res["conv4_weight_std"] = {k: float(v.std()) for k, v in ws.items()}
    # the paper's plain decoder (no decoys, no finalize) reads its message from clean CNNs
    spec = model_spec("cnn", data.train.image_shape, 10)
    m = seeded_model(spec, 50)
    plain = make("wang-auto", m, 50, decoys=0, finalize_steps=0)
    plain.embed(m, data.train, cfg(50))
    res["plain_decoder"] = {"marked_matched": int((plain.extract(m) == plain.message).sum()),
                            "clean_matched": [int((plain.extract(cached(f"clean-{s}")[0]) == plain.message).sum())
                                              for s in seeds],
                            "bits": BITS}
    print("plain decoder", res["plain_decoder"], flush=True)
    save_json("attacks.json", res)


def part_capacity(bits_list: list[int]) -> None:
    """Table 6 (capacity, seed 0): accuracy and bits correct for 256..4096 bits in conv4's
    576 filter means (beyond 576 the linear read-outs cannot hold the message)."""
    data = load_splits("mnist5k")
    spec = model_spec("cnn", data.train.image_shape, 10)
    for bits in bits_list:
        res: dict[str, Any] = {"bits": bits}
        for name in METHODS:
            m = seeded_model(spec, 0)
            s = make(name, m, 0, bits=bits)
            s.embed(m, data.train, cfg(0))
            res[name] = {"acc": 100 * accuracy(m, data.test), **check(s, m)}
            print(bits, name, res[name], flush=True)
        save_json(f"capacity-{bits}.json", res)


def part_uchida_strength(strength: float) -> None:
    """Uchida at another lambda (seeds 0-2): fidelity, BER, and BER after FTAL 10% and
    after removing conv4's 60% smallest weights."""
    data = load_splits("mnist5k")
    spec = model_spec("cnn", data.train.image_shape, 10)
    ftal_data = data.attacker.take_fraction(0.1 * len(data.train) / len(data.attacker))
    res: dict[str, Any] = {"strength": strength, "runs": []}
    for seed in range(3):
        m = seeded_model(spec, seed)
        s = make("uchida", m, seed, strength=strength)
        s.embed(m, data.train, cfg(seed))
        ft = FineTune("FTAL", epochs=10, batch_size=32, lr=1e-3, seed=seed).attack(m, ftal_data)
        p = copy.deepcopy(m)
        prune_by_magnitude(p, 0.6, order="smallest", scope="layer", layers=[LAYER])
        r = {"seed": seed, "acc": 100 * accuracy(m, data.test), **check(s, m), "ftal_ber": ber_only(s, ft),
             "prune60_ber": ber_only(s, p)}
        res["runs"].append(r)
        print(r, flush=True)
    save_json(f"uchida-strength-{strength:g}.json", res)


# ------------------------------------------------------------------------------- report
def hist_corr(a: np.ndarray, b: np.ndarray, width: float) -> float:
    """Eq. 2: Pearson correlation of the two histograms, bins of ``width`` on a common grid."""
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    edges = np.arange(math.floor(lo / width) * width, hi + width, width)
    h1, _ = np.histogram(a, edges)
    h2, _ = np.histogram(b, edges)
    return float(np.corrcoef(h1, h2)[0, 1]) if len(edges) > 2 else 1.0


def ms(xs: list[float]) -> str:
    a = np.asarray(xs, dtype=float)
    return f"{a.mean():.2f} ± {a.std():.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def part_report() -> None:
    seeds = sorted(int(p.stem[len("train-seed"):]) for p in OUT.glob("train-seed*.json"))
    runs = [json.loads((OUT / f"train-seed{s}.json").read_text()) for s in seeds]
    lines = [f"# Wang et al. 2020, CNN half at CPU scale: Zhang CNN on mnist5k, {EPOCHS} epochs, {BITS} bits in "
             "conv4 (576 filter means)", "",
             "Paper column: VGG16 on CIFAR-10 (first conv, 1,728 weights, 150 epochs) -- another host and data set; "
             "compare trends, not values. Bits correct = 100·(1 − BER). Wang p: exact block-permutation test "
             "(8 blocks x 8! orders, p ≥ 1.1e-36); Uchida (λ 0.01) / projection p: binomial. One image = 0.1 "
             "point.", "",
             f"## Table 3 - fidelity (test accuracy %, mean ± std over seeds {seeds}) and extraction at 512 bits", "",
             "| method | acc | Δ vs clean (points) | bits correct | p (max over seeds) | paper acc | "
             "train s / run |", "|---|---|---|---|---|---|---|"]
    clean = [r["clean"]["acc"] for r in runs]
    lines.append(f"| clean | {ms(clean)} | - | - | - | {PAPER['table3']['clean']} | "
                 f"{np.mean([r['clean']['train_s'] for r in runs]):.0f} |")
    for name in METHODS:
        acc = [r[name]["acc"] for r in runs]
        delta = np.mean(acc) - np.mean(clean)
        bits = ms([100 * (1 - r[name]["ber"]) for r in runs])
        p = max(r[name]["p"] for r in runs)
        per_seed = ", ".join(f"{a - c:+.1f}" for a, c in zip(acc, clean, strict=True))
        lines.append(f"| {name} | {ms(acc)} | {delta:+.2f} (per seed {per_seed}) | {bits} | {p:.2g} | "
                     f"{PAPER['table3'].get(name, '-')} | {np.mean([r[name]['train_s'] for r in runs]):.0f} |")
    extra_uchida = []
    for path in sorted(OUT.glob("uchida-strength-*.json")):
        u = json.loads(path.read_text())
        acc = [r["acc"] for r in u["runs"]]
        per_seed = ", ".join(f"{a - c:+.1f}" for a, c in zip(acc, clean, strict=True))
        lines.append(f"| uchida λ={u['strength']:g} | {ms(acc)} | {np.mean(acc) - np.mean(clean):+.2f} (per seed "
                     f"{per_seed}) | {ms([100 * (1 - r['ber']) for r in u['runs']])} | "
                     f"{max(r['p'] for r in u['runs']):.2g} | - | - |")
        ftal = ", ".join(f"{100 * r['ftal_ber']:.1f}%" for r in u["runs"])
        pr60 = ", ".join(f"{100 * r['prune60_ber']:.1f}%" for r in u["runs"])
        extra_uchida.append(f"Uchida λ={u['strength']:g}: BER after FTAL 10% {ftal}; after removing 60% of "
                            f"conv4 {pr60} (seeds 0-2).")
    manu = [r["wang-manu"].get("selected") for r in runs]
    lines += ["", f"MANU selected {manu} of 576 carrier values (converged: std of the last 5 per-epoch values "
              "< 0.01). Wang watermark loss L2 (Eq. 1): "
              + ", ".join(f"{n} {np.mean([r[n]['watermark_loss'] for r in runs]):.2g}"
                          for n in ("wang-manu", "wang-auto")) + "."]
    for line in extra_uchida:
        lines += ["", line]
    att_path = OUT / "attacks.json"
    if att_path.exists():
        att = json.loads(att_path.read_text())
        t4 = att["table4"]
        lines += ["", f"## Table 4 - fine-tuning: bits correct (%) and p (SD: FTAL, all layers, 10 epochs on "
                  f"{att['ftal_images']} attacker images = 10% of the training set, mean ± std over seeds; "
                  "DD: fresh 10-way head, all layers, 10 epochs on digits-28 (another dataset), seed 0)", "",
                  "| method | SD bits correct | SD p (max) | SD acc | DD bits correct | DD p | DD acc (digits-28) "
                  "| paper SD / DD |", "|---|---|---|---|---|---|---|---|"]
        for name in METHODS:
            f = t4[name]["ftal"]
            o = t4[name]["other_dataset"]
            paper = PAPER["table4"].get(name, ("-", "-"))
            lines.append(f"| {name} | {ms([100 * (1 - r['ber']) for r in f])} | {max(r['p'] for r in f):.2g} | "
                         f"{ms([r['acc'] for r in f])} | {100 * (1 - o['ber']):.2f} | {o['p']:.2g} | "
                         f"{o['acc_digits28']:.2f} | {paper[0]} / {paper[1]} |")
        fig4 = att["figure4"]
        lines += ["", "## Figure 4 - bits correct (%) / test accuracy (%) after removing alpha% of conv4's weights "
                  "(seed 0)", "", "| method/order | " + " | ".join(f"{a}%" for a in ALPHAS) + " |",
                  "|---|" + "---|" * len(ALPHAS)]
        for name in METHODS:
            for lab in ORDERS:
                row = fig4[f"{name}/{lab}"]
                lines.append(f"| {name}/{lab} | " + " | ".join(
                    f"{100 * (1 - r['ber']):.0f}/{r['acc']:.0f}" for r in row) + " |")
        lines += ["", "Removing the 60% smallest weights of conv4 (the issue's target: BER ≤ 5%):", "",
                  "| method | BER % | p | acc |", "|---|---|---|---|"]
        for name in METHODS:
            r = fig4[f"{name}/ascending60"]
            lines.append(f"| {name} | {100 * r['ber']:.2f} | {r['p']:.2g} | {r['acc']:.2f} |")
        glob = att["global_pruning"]
        lines += ["", "## Global magnitude pruning (all conv/linear weights ranked together): bits correct / "
                  "accuracy (%)", "", "| method | " + " | ".join(f"{a}%" for a in ALPHAS) + " |",
                  "|---|" + "---|" * len(ALPHAS)]
        lines.append("| clean (acc) | " + " | ".join(f"{r['acc']:.0f}" for r in glob["clean"]) + " |")
        for name in METHODS:
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * (1 - r['ber']):.0f}/{r['acc']:.0f}" for r in glob[name]) + " |")
        t8 = att["table8"]
        for w, tab in t8.items():
            keys = list(tab)
            lines += ["", f"## Table 8 - histogram correlation (Eq. 2) of conv4's 36,864 weights, bins {w} "
                      f"(seed 0; weight std {att['conv4_weight_std']['clean']:.3f})", "",
                      "| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for a in keys:
                lines.append(f"| {a} | " + " | ".join(f"{tab[a][b]:.4f}" for b in keys) + " |")
        lines += ["", "Paper (VGG16, bins 0.1): " + ", ".join(
            f"{a}/{b} {v}" for (a, b), v in PAPER["table8"].items())]
        pdx = att["plain_decoder"]
        lines += ["", f"Plain Wang decoder (no decoys, no finalize; the paper's version), {pdx['bits']} bits: "
                  f"reads {pdx['marked_matched']} bits from its marked CNN and {pdx['clean_matched']} from the "
                  "clean CNNs (seeds 0-2): a binomial p-value would accuse them."]
        plot_fig4(fig4, glob)
    caps = sorted(int(p.stem.split("-")[1]) for p in OUT.glob("capacity-*.json"))
    if caps:
        lines += ["", "## Table 6 - capacity (seed 0): accuracy AO (%) / bits correct AW (%) / p; paper AW "
                  "(VGG16: [7], MANU, AUTO) in brackets", "",
                  "| bits | " + " | ".join(METHODS) + " | paper |", "|---|" + "---|" * (len(METHODS) + 1)]
        rows = {b: json.loads((OUT / f"capacity-{b}.json").read_text()) for b in caps}
        if 512 not in rows and runs and runs[0]["seed"] == 0:
            rows[512] = {n: runs[0][n] for n in METHODS}
        for b in sorted(rows):
            cells = [f"{rows[b][n]['acc']:.2f} / {100 * (1 - rows[b][n]['ber']):.2f} / {rows[b][n]['p']:.2g}"
                     for n in METHODS]
            lines.append(f"| {b}{' *' if b > 576 else ''} | " + " | ".join(cells) + f" | {PAPER['table6'][b]} |")
        lines += ["", "\\* more bits than conv4's 576 filter means: a linear read-out of rank 576 cannot realise "
                  "every message, and random messages only up to about 2 x 576 sign constraints (Cover's "
                  "perceptron capacity), so Uchida / projection lose bits (their binomial p stays exact and tiny); the "
                  "Wang networks 'read' any length by memorising the message: their bits say nothing there, their "
                  "block-permutation p says whether the blocks still rank the true unit order first. "
                  "The 512 row comes from Table 3."]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tables_cnn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_fig4(fig4: dict[str, Any], glob: dict[str, Any]) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), sharey=True)
    for ax, lab in zip(axes[:3], ORDERS, strict=True):
        for name in METHODS:
            ax.plot(ALPHAS, [100 * (1 - r["ber"]) for r in fig4[f"{name}/{lab}"]], marker="o", label=name)
        ax.set_title(f"conv4: remove {lab} |w|")
        ax.set_xlabel("compression rate alpha (%)")
    for name in METHODS:
        axes[3].plot(ALPHAS, [100 * (1 - r["ber"]) for r in glob[name]], marker="o", label=name)
    axes[3].set_title("global magnitude pruning")
    axes[3].set_xlabel("fraction of all weights removed (%)")
    axes[0].set_ylabel("bits correct (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "compression_cnn.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["train", "attacks", "capacity", "uchida-strength", "report"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["clean", *METHODS], help="train: which models")
    ap.add_argument("--bits", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--strength", type=float, default=0.01, help="uchida-strength: lambda")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    if args.part == "train":
        part_train(args.seed, args.methods)
    elif args.part == "attacks":
        part_attacks()
    elif args.part == "capacity":
        part_capacity(args.bits)
    elif args.part == "uchida-strength":
        part_uchida_strength(args.strength)
    else:
        part_report()
    print(f"{args.part}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
