"""Training-time overhead and extraction time of the white-box schemes.

Trains the Zhang CNN on mnist5k for a fixed number of steps, plain and with each
scheme's hook (512 bits in conv4's 576 filter means), interleaved over rounds so
that machine load hits all alike; reports the median time per step and the ratio
marked / plain, plus the time to extract (and verify) one model.

    .venv/bin/python benchmarks/bench_whitebox.py [--steps 40] [--rounds 3]

Writes ``benchmarks/results/whitebox.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nnmark.data import load_splits
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes.projection import ProjectionRegularizer
from nnmark.schemes.uchida import Uchida
from nnmark.schemes.wang import WangAuto, WangManu
from nnmark.train import TrainConfig, seeded_model, train


def make(name: str, model: torch.nn.Module):
    key = Key.from_seed("bench")
    if name == "uchida":
        return Uchida.create(key, model, layer="conv4", bits=512)
    if name == "projection":
        return ProjectionRegularizer.create(key, model, layer="conv4", bits=512)
    if name == "wang-auto":
        return WangAuto.create(key, model, layer="conv4", bits=512)
    s = WangManu.create(key, model, layer="conv4", bits=512)
    s.select(torch.arange(0, s.width, 2))  # time the embedding phase (half the carrier selected)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/whitebox.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_splits("mnist5k")
    spec = model_spec("cnn", data.train.image_shape, 10)
    cfg = TrainConfig(epochs=100, batch_size=64, max_steps=args.steps, progress=False)
    names = ["plain", "uchida", "projection", "wang-auto", "wang-manu"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            model = seeded_model(spec, 0)
            hooks = [] if n == "plain" else [make(n, model).training_hook()]
            t = time.perf_counter()
            train(model, data.train, cfg, hooks=hooks)
            times[n].append((time.perf_counter() - t) / args.steps)
    plain = statistics.median(times["plain"])
    result = {"host": "cnn (Zhang) on mnist5k, batch 64", "bits": 512, "layer": "conv4 (576 filter means)",
              "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
              "machine": platform.processor() or platform.machine(),
              "seconds_per_step": {n: statistics.median(v) for n, v in times.items()},
              "ratio_marked_over_plain": {n: statistics.median(v) / plain for n, v in times.items() if n != "plain"}}
    model = seeded_model(spec, 0)
    ext = {}
    for n in names[1:]:
        s = make(n, model)
        t = time.perf_counter()
        s.extract(model)
        ext[f"{n}_extract_s"] = time.perf_counter() - t
        t = time.perf_counter()
        s.verify(model)  # Wang: every order of every block (8 x 8! re-readings), whatever the model
        ext[f"{n}_verify_s"] = time.perf_counter() - t
        if n.startswith("wang"):  # the secret network's finalize pass after embedding (once per mark)
            t = time.perf_counter()
            s.training_hook().finalize(model)
            ext[f"{n}_finalize_s"] = time.perf_counter() - t
    result["extraction"] = ext
    # the one-off finalize pass against a 10-epoch training of the host (the experiments' setting)
    epoch_steps = -(-len(data.train) // 64)
    result["wang_finalize_over_10_epochs"] = {
        n: ext[f"{n}_finalize_s"] / (10 * epoch_steps * plain) for n in ("wang-auto", "wang-manu")}
    result["note"] = ("wang verify = exact block-permutation test (8 blocks x 8! = 40,320 orders each, the same cost "
                      "for any model); wang finalize = 300 secret-network-only steps after training")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
