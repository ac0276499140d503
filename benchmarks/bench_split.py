"""Partitioned training: communication per round and the cost of real party processes against the simulation.

For one configuration, runs the protocol in one process (:func:`nnmark.split.protocol.simulate`) and with one
Ray actor per party (:func:`nnmark.split.parties.run_parties`), checks that both end with the same weights,
and reports: bytes received per round by each kind of message (activations, labels, gradients, local-gradients)
and in total, wall time per round of each, and the actors' start-up time. Usage::

    python benchmarks/bench_split.py                      # mnist5k, MLP 784-900x4-10 cut after fc2, 3 owners
    python benchmarks/bench_split.py --data digits --hidden 64,64,64 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

import torch

from nnmark.keys import Key
from nnmark.split.parties import run_parties
from nnmark.split.protocol import SplitConfig, simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--hidden", default="900,900,900,900")
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--defense", default="adversarial")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SplitConfig(data=args.data, arch_overrides={"hidden": [int(h) for h in args.hidden.split(",")],
                                                      "dropout": 0.15},
                      owners=args.owners, epochs=args.epochs, defense=args.defense, strength=10.0, clip=1.0,
                      defenders="multiple" if args.defense == "adversarial" else "none")
    key = Key.from_seed("bench-split")
    t0 = time.perf_counter()
    sim = simulate(cfg, key)
    t_sim = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        res = run_parties(cfg, key, d)
    same = all(torch.equal(v, res.model.state_dict()[k]) for k, v in sim.model.state_dict().items())
    per_kind: dict[str, int] = defaultdict(int)
    for recs in res.messages.values():
        for r in recs:
            if r["round"] >= 0:
                per_kind[r["kind"]] += r["nbytes"]
    rounds = res.rounds
    out = {"config": {"data": cfg.data, "hidden": cfg.arch_overrides["hidden"], "at": cfg.at, "owners": cfg.owners,
                      "batch_size": cfg.batch_size, "defense": cfg.defense},
           "rounds": rounds, "same_weights": same, "accuracy": [sim.accuracy, res.accuracy],
           "bytes_per_round": {k: v / rounds for k, v in sorted(per_kind.items())},
           "total_bytes_per_round": sum(per_kind.values()) / rounds,
           "simulation_s_per_round": t_sim / rounds, "processes_s_per_round": res.train_seconds / rounds,
           "overhead": res.train_seconds / t_sim, "processes_startup_s": res.seconds - res.train_seconds}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
