"""Partitioned training: communication per round and the cost of real party processes against the simulation.

For one configuration, runs the protocol in one process (:func:`nnmark.split.protocol.simulate`) and with one
Ray actor per party (:func:`nnmark.split.parties.run_parties`), checks that both end with the same weights,
and reports: bytes received per round by each kind of message (activations, labels, gradients, local-gradients)
and in total, wall time per round of each, and the actors' start-up time. Usage::

    python benchmarks/bench_split.py                      # mnist5k, MLP 784-900x4-10 cut after fc2, 3 owners
    python benchmarks/bench_split.py --data digits --hidden 64,64,64 --epochs 1
    python benchmarks/bench_split.py --startup            # what a minimal real-process run costs (below)

``--startup``: the smallest real-process run (digits, MLP 64x3 cut after fc2, 3 owners, batch 160 = 2 rounds):
Ray start, the run (four actors started, 2 rounds, model assembled), a second run on the started Ray, Ray
shutdown; then, for comparison, ``owners + 1`` bare ``torch.distributed`` processes (gloo on loopback: spawn,
init, one all-reduce of a (32, 64) tensor, one send/recv). Reports seconds and the load average.
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


def _gloo_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.ones(32, 64)
    dist.all_reduce(x)
    if rank == 0:
        dist.send(x, 1)
    elif rank == 1:
        dist.recv(x, 0)
    dist.barrier()
    dist.destroy_process_group()


def startup(owners: int) -> dict:
    """Seconds of a minimal real-process run over Ray, and of bare gloo processes (module doc)."""
    import os
    import socket

    import ray
    import torch.multiprocessing as mp

    cfg = SplitConfig(data="digits", arch_overrides={"hidden": [64, 64, 64], "dropout": 0.1}, owners=owners,
                      epochs=1, batch_size=160, lr=1e-2, defense="adversarial", strength=1.0)
    key = Key.from_seed("bench-split/startup")
    out: dict = {"load_average_before": os.getloadavg()}
    t = time.perf_counter()
    sim = simulate(cfg, key)
    out["simulation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=owners + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out["ray_init_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = run_parties(cfg, key, d, keep_ray=True)
        out["ray_run_s"] = time.perf_counter() - t
        out["ray_run_train_s"] = res.train_seconds
        out["same_accuracy"] = res.accuracy == sim.accuracy
        t = time.perf_counter()
        run_parties(cfg, key, f"{d}/again", keep_ray=True)
        out["ray_second_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    out["ray_shutdown_s"] = time.perf_counter() - t
    out["rounds"] = res.rounds
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = time.perf_counter()
    mp.start_processes(_gloo_worker, args=(owners + 1, port), nprocs=owners + 1, start_method="spawn", join=True)
    out["gloo_bare_processes_s"] = time.perf_counter() - t
    out["load_average_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--hidden", default="900,900,900,900")
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--defense", default="adversarial")
    ap.add_argument("--startup", action="store_true", help="time a minimal real-process run instead (module doc)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.startup:
        print(json.dumps(startup(args.owners), indent=1))
        return
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
