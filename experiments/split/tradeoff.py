"""Accuracy-privacy trade-off of partitioned training (SecureMark-DL Tables I-II, NoPeek and noise baselines).

Each named run trains with :func:`nnmark.split.protocol.simulate` (every party in one process; the same
computation as separate processes) and is attacked with :func:`nnmark.split.evaluation.privacy_report`.
Results are appended, one JSON object per run, to ``experiments/results/split/<suite>.jsonl``; runs already
there are skipped (rerun-safe). Usage::

    python experiments/split/tradeoff.py mlp            # MLP 784-900x4-10 cut after fc2, 4 owners
    python experiments/split/tradeoff.py cnn            # CNN cut at pool1 / pool2
    python experiments/split/tradeoff.py mlp --only none,multi-l10
    python experiments/split/tradeoff.py mlp --label-attackers a1,a4 --only multi-l100-ramp-a30l   # + label-aware

A name's suffix ``-a15`` / ``-a30`` / ``-a30l`` marks a training already listed under the bare name, attacked
again (same key, so the same weights); ``-a30l`` rows are run with ``--label-attackers a1,a4``.
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
MLP = {"arch": "mlp", "arch_overrides": {"hidden": [900, 900, 900, 900], "dropout": 0.15}, "at": "fc2",
       "owners": 4, "epochs": 10}
ALL8 = ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"]
FOUR = ["a1", "a3", "a4", "a8"]
TWO = ["a1", "a4"]  # the only attackers that were ever best on this cut


def mlp_runs() -> dict[str, tuple[dict, list[str]]]:
    adv = {**MLP, "defense": "adversarial"}
    runs = {"none": (MLP, ALL8),
            "single-l1": ({**adv, "defenders": "single", "strength": 1.0}, ALL8),
            "single-l10": ({**adv, "defenders": "single", "strength": 10.0}, FOUR),
            "single-l3": ({**adv, "defenders": "single", "strength": 3.0}, FOUR),
            "single-l30-ramp": ({**adv, "defenders": "single", "strength": 30.0, "ramp_rounds": 115}, FOUR),
            "multi-l1": ({**adv, "strength": 1.0}, FOUR),
            "multi-l3": ({**adv, "strength": 3.0}, FOUR),
            "multi-l10": ({**adv, "strength": 10.0}, ALL8),
            "multi-l30": ({**adv, "strength": 30.0}, FOUR),
            "multi-l30-ramp": ({**adv, "strength": 30.0, "ramp_rounds": 115}, FOUR),
            "multi-l30-warm": ({**adv, "strength": 30.0, "warm_rounds": 69}, FOUR),
            "multi-l30-clip": ({**adv, "strength": 30.0, "clip": 1.0}, FOUR),
            "multi-l30-dsteps3": ({**adv, "strength": 30.0, "defender_steps": 3}, FOUR),
            "multi-l100-clip": ({**adv, "strength": 100.0, "clip": 1.0}, FOUR),
            "multi-l10-clip-dsteps3": ({**adv, "strength": 10.0, "clip": 1.0, "defender_steps": 3}, FOUR),
            "all-l10-clip": ({**adv, "defenders": "all", "strength": 10.0, "clip": 1.0}, FOUR),
            "multi-l20": ({**adv, "strength": 20.0}, FOUR),
            "multi-l20-ramp": ({**adv, "strength": 20.0, "ramp_rounds": 115}, FOUR),
            "multi-l60-ramp": ({**adv, "strength": 60.0, "ramp_rounds": 115}, FOUR),
            "multi-l100-ramp": ({**adv, "strength": 100.0, "ramp_rounds": 230}, FOUR),
            "multi-l10-dsteps5": ({**adv, "strength": 10.0, "defender_steps": 5}, FOUR),
            "all-l10": ({**adv, "defenders": "all", "strength": 10.0}, FOUR),
            "all-l30-ramp": ({**adv, "defenders": "all", "strength": 30.0, "ramp_rounds": 115}, FOUR),
            "multi-l30-ramp-dsteps3": ({**adv, "strength": 30.0, "ramp_rounds": 115, "defender_steps": 3}, FOUR),
            "artificial": ({**MLP, "defense": "artificial"}, FOUR),
            "nopeek-l0.5": ({**MLP, "defense": "nopeek", "strength": 0.5}, FOUR),
            "nopeek-l2": ({**MLP, "defense": "nopeek", "strength": 2.0}, FOUR),
            "gaussian-0.5": ({**MLP, "defense": "gaussian", "strength": 0.5}, FOUR),
            "gaussian-2": ({**MLP, "defense": "gaussian", "strength": 2.0}, FOUR),
            "laplace-1": ({**MLP, "defense": "laplace", "strength": 1.0}, FOUR)}
    # the same trainings attacked with the other attacker budget (15 / 30 epochs), to compare like with like
    runs["none-a15"] = (MLP, FOUR)
    runs["multi-l30-ramp-a30"] = runs["multi-l30-ramp"]
    # towards the label floor (30-epoch attackers, run with --label-attackers a1,a4): longer / stronger ramps,
    # more defender steps, warm start + ramp
    for name in ("multi-l100-ramp", "multi-l30-ramp", "multi-l30-ramp-dsteps3", "multi-l60-ramp", "gaussian-2",
                 "laplace-1", "nopeek-l0.5", "none"):
        runs[f"{name}-a30l"] = (runs[name][0], TWO)
    runs["multi-l60-warm-ramp-a30l"] = ({**adv, "strength": 60.0, "warm_rounds": 46, "ramp_rounds": 115}, TWO)
    runs["multi-l10-ramp-a30l"] = ({**adv, "strength": 10.0, "ramp_rounds": 115}, TWO)
    runs["nopeek-l1-a30l"] = ({**MLP, "defense": "nopeek", "strength": 1.0}, TWO)
    runs["gaussian-4-a30l"] = ({**MLP, "defense": "gaussian", "strength": 4.0}, TWO)
    runs["laplace-2-a30l"] = ({**MLP, "defense": "laplace", "strength": 2.0}, TWO)
    return runs


def cnn_runs() -> dict[str, tuple[dict, list[str]]]:
    base = {"arch": "cnn", "arch_overrides": {"channels": [16, 16, 32, 32], "dense": [128, 128], "dropout": 0.3},
            "owners": 4, "epochs": 6}
    runs = {}
    for at in ("pool1", "pool2"):
        b = {**base, "at": at}
        runs[f"{at}-none"] = (b, ["m1", "m2", "m3", "m5"])
        runs[f"{at}-multi-l30-ramp"] = ({**b, "defense": "adversarial", "strength": 30.0, "ramp_rounds": 69},
                                        ["m1", "m2", "m3", "m5"])
        runs[f"{at}-nopeek-l2"] = ({**b, "defense": "nopeek", "strength": 2.0}, ["m1", "m2", "m3", "m5"])
    return runs


def training_name(name: str) -> str:
    """The run whose training (and key) a re-attack row reuses: the name without its attack suffix."""
    for suffix in ("-a15", "-a30l", "-a30"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("suite", choices=["mlp", "cnn"])
    ap.add_argument("--only", default="")
    ap.add_argument("--attack-epochs", type=int, default=30)
    ap.add_argument("--label-attackers", default="", help="attackers also trained reading the labels (name+y)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.suite}.jsonl"
    done = set()
    if path.exists():
        done = {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}
    runs = mlp_runs() if args.suite == "mlp" else cnn_runs()
    only = [s for s in args.only.split(",") if s]
    unknown = [n for n in only if n not in runs]
    if unknown:
        raise SystemExit(f"unknown runs: {', '.join(unknown)}")
    for name in only or list(runs):  # in the order given
        overrides, attackers = runs[name]
        if name in done:
            continue
        cfg = SplitConfig.from_dict(overrides)
        t0 = time.perf_counter()
        res = simulate(cfg, Key.from_seed(f"split-experiment/{training_name(name)}"))
        t1 = time.perf_counter()
        rep = privacy_report(res.model, cfg, attackers, attack=AttackConfig(epochs=args.attack_epochs),
                             unsplit=name.endswith("none") or name == "multi-l10",
                             label_attackers=[a for a in args.label_attackers.split(",") if a])
        row = {"name": name, "config": cfg.to_dict(), "accuracy": res.accuracy, "rounds": res.rounds,
               "attack_epochs": args.attack_epochs,
               "train_seconds": round(t1 - t0, 1), "attack_seconds": round(time.perf_counter() - t1, 1),
               "reports": res.reports, **rep}
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        b, bl, lab = rep.get("best", {}), rep["best_with_labels"], rep["floor"]["label"]["best"]
        print(f"{name}: acc {res.accuracy:.3f} best {b.get('attacker')} ssim {b.get('ssim', float('nan')):.3f} "
              f"(floor {rep['floor']['ssim']:.3f}, label floor {lab['ssim']:.3f}; with labels {bl['attacker']} "
              f"{bl['ssim']:.3f}) mse {b.get('mse', float('nan')):.4f} "
              f"[{t1 - t0:.0f}+{time.perf_counter() - t1:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
