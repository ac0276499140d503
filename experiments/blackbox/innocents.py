"""Innocents' p-values among 10,000 registered customers are valid (never too small) and nearly uniform.

    .venv/bin/python experiments/blackbox/innocents.py --prod /tmp/nnmark-blackbox-exp/prod_m512d

For a few suspects of a product made by ``run.py`` (a weight average of 2 and of 3 copies, a clean model, an API
that answers random probabilities), read the answers to all m triggers (soft and hard), compute the one-look
p-value of every code of the capacity that none of the suspect's colluders holds, and test them against the
uniform law: one-sided KS (``P[p <= x] <= x``: what validity needs) and two-sided KS (uniformity itself; the
grid's rounding and the Chernoff bound make p-values conservative, so two-sided rejections in the conservative
direction are expected where the Chernoff bound is used). Writes ``experiments/results/blackbox/innocents_<prod>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

torch.set_num_threads(1)

from nnmark.attacks.collusion import combine_models  # noqa: E402
from nnmark.blackbox import BlackBoxProduct, ScoreNull  # noqa: E402
from nnmark.blackbox.answers import ProbabilityOracle, answer_weights  # noqa: E402
from nnmark.io import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prod", default="/tmp/nnmark-blackbox-exp/prod_m512d")
    ap.add_argument("--clean", default="/tmp/nnmark-blackbox-exp/clean1.safetensors")
    ap.add_argument("--max-work", type=float, default=None,
                    help="the exact DP's budget (default nnmark's; raise it for m > 512 soft answers, which otherwise "
                    "fall back to the conservative Chernoff bound)")
    args = ap.parse_args()
    prod = BlackBoxProduct.open(args.prod)
    trig, code = prod.triggers, prod.code
    copies = sorted(prod.registry.issued_copies(), key=lambda c: c.customer)
    models = [load_model(c.model_path)[0] for c in copies]
    rng = np.random.default_rng(0)
    suspects = {
        "average2": (combine_models(models[:2], [0.5, 0.5]), [c.code_index for c in copies[:2]]),
        "average3": (combine_models(models[2:5], [1 / 3] * 3), [c.code_index for c in copies[2:5]]),
        **({"average5": (combine_models(models[5:10], [0.2] * 5), [c.code_index for c in copies[5:10]])}
           if len(models) >= 10 else {}),
        "clean": (load_model(args.clean)[0], []),
        "random-probabilities": (None, []),
    }
    out = {}
    for name, (model, colluders) in suspects.items():
        if model is None:
            probs = rng.dirichlet(np.ones(10), size=trig.m)
        else:
            probs = ProbabilityOracle(model)(trig.x).numpy()
        for mode in ("auto", "labels"):
            w, kind = answer_weights(probs, trig.a, trig.b, mode=mode, reference=prod.reference)
            null = ScoreNull(code.biases, weights=w, **({"max_work": args.max_work} if args.max_work else {}))
            p = null.p_value(code.scores(weights=w))
            keep = np.ones(code.n_codes, dtype=bool)
            keep[colluders] = False
            inn = p[keep]
            row = {"answers": kind, "method": null.method, "innocents": int(keep.sum()),
                   "ks_one_sided_p": float(stats.kstest(inn, "uniform", alternative="greater").pvalue),
                   "ks_two_sided_p": float(stats.kstest(inn, "uniform").pvalue),
                   "min_p": float(inn.min()), "fraction_below_0.01": float((inn <= 0.01).mean()),
                   "fraction_below_0.1": float((inn <= 0.1).mean()), "median_p": float(np.median(inn))}
            out[f"{name}:{kind}"] = row
            print(name, row, flush=True)
    path = Path("experiments/results/blackbox") / f"innocents_{Path(args.prod).name}.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
