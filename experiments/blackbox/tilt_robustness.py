"""Which removal attacks a tilted black-box copy (``BlackBoxIssueConfig(method="tilt")``) survives.

    .venv/bin/python experiments/blackbox/tilt_robustness.py --prod /tmp/nnmark-blackbox-exp/prod_m2048t

Reads the product made by ``run.py --method tilt --tag t`` (its first ``--copies`` issued copies), and for one
copy and a weight average of three applies each attack of the suite below (the attacker split of mnist5k is the
thief's data), then traces the result through its probabilities among the product's 10,000 codes with one look
at all m queries (named at p <= alpha / N = 1e-10; alpha = 1e-6 for the whole registry). Results:
``experiments/results/blackbox/tilt_robustness.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from nnmark.attacks.base import build_attack  # noqa: E402
from nnmark.attacks.collusion import combine_models  # noqa: E402
from nnmark.blackbox import BlackBoxProduct  # noqa: E402
from nnmark.blackbox.answers import ProbabilityOracle  # noqa: E402
from nnmark.io import load_model  # noqa: E402
from nnmark.train import accuracy  # noqa: E402

ATTACKS = [
    ("none", None, {}),
    ("FTAL 1 epoch, lr 1e-5", "ftal", {"epochs": 1, "lr": 1e-5}),
    ("FTAL 1 epoch, lr 1e-4", "ftal", {"epochs": 1, "lr": 1e-4}),
    ("FTAL 3 epochs, lr 1e-4", "ftal", {"epochs": 3, "lr": 1e-4}),
    ("FTAL 3 epochs, lr 1e-3", "ftal", {"epochs": 3, "lr": 1e-3}),
    ("FTLL 3 epochs, lr 1e-3", "ftll", {"epochs": 3, "lr": 1e-3}),
    ("RTLL 3 epochs", "rtll", {"epochs": 3, "lr": 1e-3}),
    ("prune 30 %", "prune", {"fraction": 0.3}),
    ("prune 50 %", "prune", {"fraction": 0.5}),
    ("prune 70 %", "prune", {"fraction": 0.7}),
    ("quantise weights 8 bits", "quantize", {"bits": 8}),
    ("quantise weights 6 bits", "quantize", {"bits": 6}),
    ("int8 post-training", "int8-ptq", {}),
    ("input JPEG 50", "input-jpeg", {"quality": 50}),
    ("input noise 0.05", "input-noise", {"sigma": 0.05}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prod", default="/tmp/nnmark-blackbox-exp/prod_m2048t")
    ap.add_argument("--out", default="experiments/results/blackbox/tilt_robustness.json")
    args = ap.parse_args()
    prod = BlackBoxProduct.open(args.prod)
    sp = prod.splits
    copies = sorted(prod.registry.issued_copies(), key=lambda c: c.customer)
    models = {c.customer: load_model(c.model_path)[0] for c in copies[:3]}
    names = list(models)
    suspects = {f"single ({names[0]})": ([names[0]], models[names[0]]),
                "average of 3": (names, combine_models([models[n] for n in names], [1 / 3] * 3))}
    rows = []
    for label, (colluders, model) in suspects.items():
        for att_name, kind, params in ATTACKS:
            torch.manual_seed(0)
            attacked = model if kind is None else build_attack(kind, **params).attack(model, sp.attacker)
            rep = prod.trace(ProbabilityOracle(attacked), looks=[prod.config.m])
            p = {v.customer: v.p_value for v in rep.named}
            row = {"suspect": label, "attack": att_name, "accuracy": accuracy(attacked, sp.test),
                   "named": sorted(rep.named_customers), "colluders": colluders,
                   "colluders_named": sum(c in p for c in colluders),
                   "innocents_named": sorted(set(rep.named_customers) - set(colluders)),
                   "max_colluder_p": max(p.get(c, 1.0) for c in colluders), "min_p_not_named": rep.min_p_not_named}
            rows.append(row)
            print(row, flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"product": str(args.prod), "m": prod.config.m, "issue": prod.config.issue,
                               "rows": rows}, indent=1))
    print("\n| suspect | attack | accuracy | colluders named | largest colluder p | smallest p not named |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['suspect']} | {r['attack']} | {r['accuracy']:.1%} | {r['colluders_named']}/{len(r['colluders'])} "
              f"| {r['max_colluder_p']:.2g} | {r['min_p_not_named']:.2g} |")
    print(f"\ninnocents named: {sum(len(r['innocents_named']) for r in rows)}; "
          f"accuracy range {np.min([r['accuracy'] for r in rows]):.3f}-{np.max([r['accuracy'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
