"""Trigger-set watermarks: fidelity, ownership and robustness (Zhang et al. Tables 2-5 at CPU scale).

For each dataset, seed and trigger generator: train a plain CNN and a marked CNN
the same way (same seed, same epochs), verify the marked model with a few
queries, attack it (fine-tuning, pruning) with attacker data disjoint from the
owner's, and verify again. Results are appended to a JSON-lines file as they come
(a rerun skips what is done), then summarised into markdown tables and a plot.

    .venv/bin/python experiments/trigger/run.py --config experiments/trigger/config.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from nnmark import Key
from nnmark.attacks import build_attack
from nnmark.data import load_splits
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark
from nnmark.stats import queries_to_significance
from nnmark.train import TrainConfig, accuracy, seeded_model, train

OUT = Path(__file__).resolve().parents[1] / "results" / "trigger"


def run_one(ds: str, dcfg: dict, seed: int, generator: str, cfg: dict, clean_cache: dict) -> dict:
    splits = load_splits(ds)
    spec = model_spec(dcfg["arch"], splits.image_shape, splits.num_classes)
    tcfg = TrainConfig(epochs=dcfg["epochs"], seed=seed, progress=False)
    if (ds, seed) not in clean_cache:
        clean = seeded_model(spec, seed)
        rec = train(clean, splits.train, tcfg)
        clean_cache[(ds, seed)] = (clean, rec.seconds)
    clean, clean_s = clean_cache[(ds, seed)]
    key = Key.from_seed(f"experiment/{ds}/{seed}/{generator}")
    marked = seeded_model(spec, seed)
    opt = {k: dcfg.get(k, cfg[k]) for k in ("triggers", "per_batch", "trigger_weight")}
    scheme = TriggerSetWatermark.create(key, marked, splits, generator=generator, n=opt["triggers"],
                                        labels=cfg["labels"], per_batch=opt["per_batch"],
                                        trigger_weight=opt["trigger_weight"])
    rec = scheme.embed(marked, splits.train, tcfg)
    row = {"dataset": ds, "seed": seed, "generator": generator, **opt,
           "clean_acc": accuracy(clean, splits.test), "marked_acc": accuracy(marked, splits.test),
           "clean_seconds": clean_s, "marked_seconds": rec.seconds, "null_rate": scheme.null_rate}
    full = scheme.query(lambda x: marked(x).argmax(1), len(scheme.images))
    row["trigger_acc"] = float(full["hits"].mean())
    row["queries_to_1e-6"] = queries_to_significance(full["hits"], scheme.null_rate, 1e-6)
    v = scheme.verify(marked, queries=cfg["queries"])
    row["marked"] = {"hits": v.statistic, "n": v.n, "p": v.p_value}
    n_att = min(cfg["attack_queries"], len(scheme.images))
    v = scheme.verify(clean, queries=n_att)
    row["clean"] = {"hits": v.statistic, "n": v.n, "p": v.p_value}
    att = splits.attacker.take_fraction(cfg["attacker_fraction"] * len(splits.train) / len(splits.attacker),
                                        seed=seed)
    for label, a in cfg["attacks"].items():
        params = {k: v for k, v in a.items() if k != "name"}
        if a["name"] != "prune":
            params["seed"] = seed
        stolen = build_attack(a["name"], **params).attack(marked, att)
        v = scheme.verify(stolen, queries=n_att)
        row[label] = {"hits": v.statistic, "n": v.n, "p": v.p_value, "acc": accuracy(stolen, splits.test)}
    return row


def summarise(rows: list[dict], cfg: dict) -> str:
    overrides = {d: {k: v for k, v in c.items() if k not in ("arch", "epochs")} for d, c in cfg["datasets"].items()}
    lines = ["# Trigger-set watermarks at CPU scale", "",
             f"Triggers: {cfg['triggers']} per key, labels {cfg['labels']}, {cfg['per_batch']} trigger samples "
             f"per 64-sample batch, trigger loss weight {cfg['trigger_weight']}; per-dataset overrides: "
             f"{overrides}. "
             f"Epochs: { {d: c['epochs'] for d, c in cfg['datasets'].items()} }. Attacker data: "
             f"{cfg['attacker_fraction']:.0%} of the owner's training-set size, disjoint from it. "
             f"Seeds: {cfg['seeds']}. Mean ± std over seeds.", ""]
    lines += ["## Fidelity (test accuracy, %)", "",
              "| dataset | generator | clean | marked | marked − clean | trigger acc | queries to p<1e-6 |",
              "|---|---|---|---|---|---|---|"]
    keyf = sorted({(r["dataset"], r["generator"]) for r in rows})
    for ds, g in keyf:
        rs = [r for r in rows if r["dataset"] == ds and r["generator"] == g]
        c = np.array([r["clean_acc"] for r in rs]) * 100
        m = np.array([r["marked_acc"] for r in rs]) * 100
        t = np.array([r["trigger_acc"] for r in rs]) * 100
        q = [r["queries_to_1e-6"] for r in rs]
        lines.append(f"| {ds} | {g} | {c.mean():.2f} ± {c.std():.2f} | {m.mean():.2f} ± {m.std():.2f} | "
                     f"{(m - c).mean():+.2f} ± {(m - c).std():.2f} | {t.mean():.1f} | {q} |")
    attacks = list(cfg["attacks"])
    lines += ["", f"## Ownership: trigger hits of min({cfg['attack_queries']}, triggers) queries "
              "(hits per seed; worst p-value over seeds)", "",
              "Marked: hits of " + str(cfg["queries"]) + " queries. Clean: an independently trained model "
              "(same seed as the marked model's init) queried with the marked model's key.", "",
              "| dataset | generator | marked | clean | " + " | ".join(attacks) + " |",
              "|---|---|---|---|" + "---|" * len(attacks)]
    for ds, g in keyf:
        rs = [r for r in rows if r["dataset"] == ds and r["generator"] == g]

        def cell(col: str, rs: list = rs) -> str:
            hits = "/".join(str(r[col]["hits"]) for r in rs)
            return f"{hits} (p ≤ {max(r[col]['p'] for r in rs):.0e})"

        lines.append(f"| {ds} | {g} | {cell('marked')} | {cell('clean')} | "
                     + " | ".join(cell(a) for a in attacks) + " |")
    lines += ["", "## Accuracy after the attacks (%, mean over seeds)", "",
              "| dataset | generator | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for ds, g in keyf:
        rs = [r for r in rows if r["dataset"] == ds and r["generator"] == g]
        lines.append(f"| {ds} | {g} | " + " | ".join(
            f"{100 * np.mean([r[a]['acc'] for r in rs]):.1f}" for a in attacks) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["marked", *cfg["attacks"]]
    dss = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], dss, strict=True):
        gens = sorted({r["generator"] for r in rows if r["dataset"] == ds})
        width = 0.8 / len(gens)
        for i, g in enumerate(gens):
            rs = [r for r in rows if r["dataset"] == ds and r["generator"] == g]
            vals = [np.mean([r[c]["hits"] / r[c]["n"] for r in rs]) for c in cols]
            ax.bar(np.arange(len(cols)) + i * width, vals, width, label=g)
        ax.axhline(rows[0]["null_rate"] or 0.1, color="k", ls=":", lw=1, label="null rate")
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_ylabel("trigger hit rate")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", default=None, help="comma-separated datasets to run")
    ap.add_argument("--generators", default=None, help="comma-separated generators to run")
    ap.add_argument("--no-summary", action="store_true", help="only append runs (for parallel workers)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded machine)")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    done = {(r["dataset"], r["seed"], r["generator"]) for r in rows}
    clean_cache: dict = {}
    torch.set_num_threads(args.threads)
    for ds, dcfg in cfg["datasets"].items():
        if args.only and ds not in args.only.split(","):
            continue
        # generator-major order: each generator's seeds complete before the next starts
        for g in cfg["generators"]:
            if args.generators and g not in args.generators.split(","):
                continue
            for seed in cfg["seeds"]:
                if (ds, seed, g) in done:
                    continue
                t0 = time.perf_counter()
                row = run_one(ds, dcfg, seed, g, cfg, clean_cache)
                rows.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{ds} seed {seed} {g}: clean {row['clean_acc']:.4f} marked {row['marked_acc']:.4f} "
                      f"trigger {row['trigger_acc']:.2f} FTAL {row['FTAL']['hits']} RTLL {row['RTLL']['hits']} "
                      f"prune70 {row['prune70']['hits']} ({time.perf_counter() - t0:.0f} s)", flush=True)
        clean_cache.clear()
    if args.no_summary:
        return
    (out / "summary.md").write_text(summarise(rows, cfg))
    plot(rows, cfg, out / "hits.png")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
