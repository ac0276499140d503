"""Model-level collusion experiment (SecureMark-DL Figs. 6-9 and Table III analogue) on the mnist5k CNN.

A vendor trains the CNN once (the base), creates a product per code -- AG(2,7) = (49,7,1), 56 codes, and
AG(2,11) = (121,11,1), 132 codes, both carried by conv4's 576 filter means -- and issues ``--copies``
fingerprinted copies with the default issuing (the activation-weighted closed-form correction of conv4 alone,
fingerprint level ``--scale`` 2; ``--train carrier --correction min-norm --scale 1`` is the earlier default:
45 Adam steps at 3e-2 on conv4 with mu = 2,000, then the minimum-norm correction) and traces with the
structural decoder (``--decoder threshold``: the paper's tau = 0.85 with a gain estimate). For K colluders
(random coalitions among the issued customers, ``--trials`` each) it averages their weights and traces the
result through :meth:`nnmark.fingerprint.Product.trace`:

- ``average``: the plain weight average;
- ``average+ft``: then fine-tuning all layers, Adam 1e-3, 5 epochs on 10 % of the vendor's training-set size
  (300 images from the disjoint attacker split);
- ``average+prune{a}``: then pruning the smallest a % of all conv/linear weights (global) and sparse
  fine-tuning on the same 300 images for 5 epochs.

Reported per (code, attack, K): detection (mean fraction of colluders named), exact (coalition named exactly),
false alarm (fraction of trials naming any innocent), refused, and the attacked model's test accuracy. Plus the
overhead table: base training time, issuing time per copy, extraction and tracing time.

Usage (about 10 min on one core):
    OMP_NUM_THREADS=1 .venv/bin/python experiments/securemark/collusion_models.py [--copies 16] [--trials 3]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnmark.attacks import Average, Prune, build_attack
from nnmark.data import load_splits
from nnmark.fingerprint import IssueConfig, Product
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import TrainConfig, accuracy, seeded_model, train


def attacked(name: str, avg, att_data, seed: int):
    if name == "average":
        return avg
    if name == "average+ft":
        return build_attack("ftal", epochs=5, seed=seed).attack(avg, att_data)
    frac = int(name.removeprefix("average+prune")) / 100
    return Prune(frac, finetune_epochs=5, seed=seed).attack(avg, att_data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,3,4,6,8,10,12,15")
    ap.add_argument("--attacks", default="average,average+ft,average+prune50,average+prune80")
    ap.add_argument("--codes", default="ag:7,ag:11")
    ap.add_argument("--train", default="none", choices=["none", "carrier", "all"],
                    help="issuing fine-tune before the correction (default none: the correction alone)")
    ap.add_argument("--correction", default="activation", choices=["activation", "min-norm"])
    ap.add_argument("--decoder", default="structural", choices=["structural", "threshold"])
    ap.add_argument("--scale", type=float, default=2.0, help="fingerprint level s in X theta = s F (product default)")
    ap.add_argument("--layers", default="conv4", help="carrier layers, comma-separated (code split in proportion)")
    ap.add_argument("--out", default="experiments/results/securemark")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_splits("mnist5k")
    att_data = data.attacker.take_fraction(min(1.0, 0.1 * len(data.train) / len(data.attacker)))
    work = Path(tempfile.mkdtemp(prefix="fp-exp-"))
    t0 = time.perf_counter()
    base = seeded_model(model_spec("cnn", data.image_shape, 10), 0)
    rec = train(base, data.train, TrainConfig(epochs=15, seed=0, progress=False))
    t_base = time.perf_counter() - t0
    base_acc = accuracy(base, data.test)
    save_model(work / "base.safetensors", base, {"data": "mnist5k"})
    print(f"base: {base_acc:.4f} in {t_base:.1f} s ({rec.steps} steps)", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    attacks = args.attacks.split(",")
    rows, overhead, fidelity = [], [], []
    rng = np.random.default_rng(0)
    for code in args.codes.split(","):
        prod = Product.create(work / code.replace(":", ""), work / "base.safetensors", key=Key.from_seed(code),
                              code=code, issue=IssueConfig(train=args.train, correction=args.correction),
                              decoder=args.decoder, scale=args.scale, layers=tuple(args.layers.split(",")))
        names = [f"c{i:03d}" for i in range(args.copies)]
        prod.add_customers(names)
        models, issue_s = {}, []
        for n in names:
            t = time.perf_counter()
            path = prod.issue(n).model_path
            issue_s.append(time.perf_counter() - t)
            models[n] = load_model(path)[0]
        accs = [accuracy(m, data.test) for m in models.values()]
        fidelity.append({"code": code, "base": base_acc, "mean": float(np.mean(accs)), "min": float(np.min(accs)),
                         "max": float(np.max(accs))})
        t = time.perf_counter()
        for m in list(models.values())[:5]:
            prod.carrier.extract(m)
        t_extract = (time.perf_counter() - t) / 5
        t = time.perf_counter()
        for n in names[:5]:
            prod.trace(prod.registry.issued_copies(n)[0].model_path)
        t_trace = (time.perf_counter() - t) / 5
        overhead.append({"code": code, "base_train_s": t_base, "issue_s_first": issue_s[0],
                         "issue_s_median": statistics.median(issue_s),
                         "ratio": statistics.median(issue_s) / t_base, "extract_ms": 1e3 * t_extract,
                         "trace_file_ms": 1e3 * t_trace})
        print(f"{code}: copies {np.mean(accs):.4f} (min {np.min(accs):.4f}); issue {statistics.median(issue_s):.2f} s",
              flush=True)
        for K in sizes:
            if K > len(names):
                continue
            for trial in range(args.trials):
                coal = sorted(rng.choice(names, K, replace=False).tolist())
                avg = Average().attack([models[n] for n in coal])
                for a in attacks:
                    m = attacked(a, avg, att_data, seed=trial)
                    rep = prod.trace(m)
                    named = set(rep.named)
                    rows.append({"code": code, "attack": a, "colluders": K, "trial": trial,
                                 "detection": len(named & set(coal)) / K, "exact": float(named == set(coal)),
                                 "false_alarm": float(bool(named - set(coal))), "refused": float(not named),
                                 "status": rep.status, "accuracy": accuracy(m, data.test),
                                 "gain": np.nan if rep.evidence["gain"] is None else rep.evidence["gain"]})
            print(f"  K={K} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    with (out / "collusion_models.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_markdown(out, rows, overhead, fidelity, args)
    plot(out, rows)
    shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


def summarise(rows):
    keys = sorted({(r["code"], r["attack"], r["colluders"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    out = []
    for code, attack, K in keys:
        sel = [r for r in rows if (r["code"], r["attack"], r["colluders"]) == (code, attack, K)]
        out.append({"code": code, "attack": attack, "K": K, "n": len(sel),
                    **{k: float(np.nanmean([r[k] for r in sel])) if not all(np.isnan(r[k]) for r in sel)
                       else float("nan") for k in
                       ("detection", "exact", "false_alarm", "refused", "accuracy", "gain")}})
    return out


def write_markdown(out: Path, rows, overhead, fidelity, args) -> None:
    s = summarise(rows)
    lines = ["# Model-level collusion tracing (mnist5k CNN, conv4 filter means)", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python experiments/securemark/collusion_models.py "
             f"--codes {args.codes} --sizes {args.sizes} --copies {args.copies} --trials {args.trials} "
             f"--train {args.train} --correction {args.correction} "
             f"--decoder {args.decoder} --scale {args.scale} --layers {args.layers}`", "",
             f"{args.copies} copies issued per code, {args.trials} random coalitions per K and attack. "
             "detection = mean fraction of colluders named; false alarm = trials naming any innocent.", "",
             "## Fidelity of issued copies (test accuracy)", "", "| code | base | copies mean | min | max |",
             "|---|---|---|---|---|"]
    lines += [f"| {f['code']} | {f['base']:.4f} | {f['mean']:.4f} | {f['min']:.4f} | {f['max']:.4f} |"
              for f in fidelity]
    lines += ["", "## Overhead (Table III analogue; one busy CPU core)", "",
              "| code | base training (s) | first copy (s) | issuing a copy (s, median) | ratio | extraction (ms) "
              "| trace file (ms) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {o['code']} | {o['base_train_s']:.1f} | {o['issue_s_first']:.2f} | {o['issue_s_median']:.2f} | "
              f"{o['ratio']:.4f} | "
              f"{o['extract_ms']:.2f} | {o['trace_file_ms']:.1f} |" for o in overhead]
    lines += ["", "## Detection / false alarm vs colluders", "",
              "| code | attack | K | detection | exact | false alarm | refused | accuracy | gain |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['code']} | {r['attack']} | {r['K']} | {r['detection']:.2f} | {r['exact']:.2f} | "
              f"{r['false_alarm']:.2f} | {r['refused']:.2f} | {r['accuracy']:.4f} | {r['gain']:.3f} |" for r in s]
    (out / "collusion_models.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(rows)
    codes = sorted({r["code"] for r in s})
    fig, axes = plt.subplots(1, len(codes), figsize=(6 * len(codes), 4), squeeze=False)
    for ax, code in zip(axes[0], codes, strict=True):
        for attack in sorted({r["attack"] for r in s}):
            sel = [r for r in s if r["code"] == code and r["attack"] == attack]
            ks = [r["K"] for r in sel]
            ax.plot(ks, [r["detection"] for r in sel], "o-", label=f"{attack} detection")
            ax.plot(ks, [r["false_alarm"] for r in sel], "x--", label=f"{attack} false alarm")
        ax.set_title(f"{code} on mnist5k CNN conv4")
        ax.set_xlabel("colluders K")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "collusion_models.png", dpi=120)


if __name__ == "__main__":
    main()
