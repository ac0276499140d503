"""Trigger-set watermarks: training-time cost and queries needed, measured side by side.

For each generator, plain and marked training of the same CNN on the same data
for the same epochs are timed alternately (plain, marked, plain, marked, ...) so
that machine load affects both alike; the ratio is the median over repetitions
of marked / plain. Then, on the marked models, the number of queries needed
before the binomial test reaches p < 1e-6 is read off the keyed query order.

    .venv/bin/python benchmarks/bench_trigger.py [--dataset mnist5k] [--epochs 3] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from nnmark import Key
from nnmark.data import load_splits
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark
from nnmark.schemes.triggers import GENERATORS
from nnmark.stats import queries_to_significance
from nnmark.train import TrainConfig, seeded_model, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--queries-epochs", type=int, default=15,
                    help="epochs for the queries-needed models (0: skip; the experiment reports them too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "trigger.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits(args.dataset)
    spec = model_spec("cnn", splits.image_shape, splits.num_classes)
    cfg = TrainConfig(epochs=args.epochs, seed=0, progress=False)
    # warm-up (first-call allocations, thread pools)
    train(seeded_model(spec, 0), splits.train, TrainConfig(epochs=1, seed=0, progress=False, max_steps=20))
    results: dict = {"dataset": args.dataset, "epochs_per_run": args.epochs, "reps": args.reps,
                     "threads": torch.get_num_threads(), "generators": {}}
    print(f"{'generator':10s} {'plain s':>8s} {'marked s':>9s} {'ratio':>6s} {'queries to 1e-6':>16s}")
    for gen in GENERATORS:
        scheme = TriggerSetWatermark.create(Key.from_seed(f"bench/{gen}"), None, splits, generator=gen)
        plain_t, marked_t, ratios = [], [], []
        for rep in range(args.reps):
            p = train(seeded_model(spec, rep), splits.train, cfg).seconds
            m = scheme.embed(seeded_model(spec, rep), splits.train, cfg).seconds
            plain_t.append(p)
            marked_t.append(m)
            ratios.append(m / p)
        q, trig_acc = None, None
        if args.queries_epochs > 0:
            model = seeded_model(spec, 0)
            scheme.embed(model, splits.train, TrainConfig(epochs=args.queries_epochs, seed=0, progress=False))
            with torch.no_grad():
                ev = scheme.query(lambda x, model=model: model(x).argmax(1), len(scheme.images))
            q = queries_to_significance(ev["hits"], scheme.null_rate, 1e-6)
            trig_acc = float(ev["hits"].mean())
        results["generators"][gen] = {
            "plain_seconds": plain_t, "marked_seconds": marked_t, "ratios": ratios,
            "median_ratio": statistics.median(ratios), "trigger_accuracy": trig_acc,
            "queries_to_p_1e-6": q, "per_batch": scheme.per_batch, "trigger_weight": scheme.trigger_weight,
        }
        print(f"{gen:10s} {statistics.median(plain_t):8.2f} {statistics.median(marked_t):9.2f} "
              f"{statistics.median(ratios):6.3f} {q!s:>16s}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
