"""Cost of issuing fingerprinted copies against training the base model, and memory over many issues.

In one run (one torch thread): train the mnist5k CNN base model (15 epochs, the CLI's default),
then issue copies through :class:`nnmark.fingerprint.Product` (AG(2,7) code in conv4):

- ``--copies`` copies with each issue mode (``activation``: the default, the activation-weighted correction
  alone; ``carrier``: the earlier default, 45-step fine-tune of conv4 + minimum-norm correction; ``all``;
  ``none``: minimum-norm correction only) -> median seconds per copy and the ratio to the base training time;
- ``--rss-copies`` copies in a row (default issuing) -> resident memory after each issue;
- tracing a copy's file (load, extract, decode, registry look-ups) -> seconds and peak RSS.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fingerprint.py [--copies 8] [--rss-copies 100]

Writes ``benchmarks/results/fingerprint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nnmark.data import load_splits
from nnmark.fingerprint import IssueConfig, Product
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import TrainConfig, accuracy, seeded_model, train


def rss_mb() -> float:
    """Current resident set size (MB) from /proc."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--rss-copies", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/fingerprint.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-fp-"))
    data = load_splits("mnist5k")
    base = seeded_model(model_spec("cnn", data.image_shape, 10), 0)
    t = time.perf_counter()
    rec = train(base, data.train, TrainConfig(epochs=args.epochs, seed=0, progress=False))
    t_base = time.perf_counter() - t
    base_acc = accuracy(base, data.test)
    save_model(work / "base.safetensors", base, {"data": "mnist5k"})
    print(f"base: {t_base:.1f} s, {rec.steps} steps, accuracy {base_acc:.4f}", flush=True)
    result: dict = {"machine": platform.platform(), "threads": 1, "base_train_s": t_base, "base_steps": rec.steps,
                    "base_accuracy": base_acc, "modes": {}}
    modes = {"activation": IssueConfig(), "carrier": IssueConfig(train="carrier", correction="min-norm"),
             "all": IssueConfig(train="all", lr=1e-4, correction="min-norm"),
             "none": IssueConfig(train="none", correction="min-norm")}
    for mode, cfg in modes.items():
        prod = Product.create(work / mode, work / "base.safetensors", key=Key.from_seed(f"bench-{mode}"),
                              issue=cfg)
        names = [f"m{i}" for i in range(args.copies)]
        prod.add_customers(names)
        secs, accs, rss = [], [], []
        for n in names:
            t = time.perf_counter()
            copy = prod.issue(n)
            secs.append(time.perf_counter() - t)
            rss.append(rss_mb())
            accs.append(accuracy(load_model(copy.model_path)[0], data.test))
        med = statistics.median(secs)
        result["modes"][mode] = {"issue_s_median": med, "issue_s_max": max(secs), "ratio_to_base": med / t_base,
                                 "accuracy_min": min(accs), "accuracy_max": max(accs),
                                 "max_drop_points": 100 * (base_acc - min(accs)), "rss_mb": rss}
        print(f"{mode}: {med:.2f} s per copy = {med / t_base:.4f} x base; accuracy {min(accs):.4f}..{max(accs):.4f}",
              flush=True)
    # memory over many copies in a row
    prod = Product.create(work / "rss", work / "base.safetensors", key=Key.from_seed("bench-rss"),
                          code="ag:11", issue=IssueConfig())
    names = [f"r{i:03d}" for i in range(args.rss_copies)]
    prod.add_customers(names)
    series = []
    t = time.perf_counter()
    for n in names:
        prod.issue(n)
        series.append(rss_mb())
    elapsed = time.perf_counter() - t
    result["rss_series_mb"] = series
    result["rss_after_first_mb"] = series[0]
    result["rss_after_10_mb"] = series[min(9, len(series) - 1)]
    result["rss_after_last_mb"] = series[-1]
    result["rss_copies"] = len(series)
    result["rss_copies_seconds"] = elapsed
    print(f"RSS over {len(series)} copies: first {series[0]:.1f} MB, 10th {result['rss_after_10_mb']:.1f} MB, "
          f"last {series[-1]:.1f} MB ({elapsed:.1f} s)", flush=True)
    # tracing a file
    path = prod.registry.issued_copies("r005")[0].model_path
    t = time.perf_counter()
    for _ in range(5):
        report = prod.trace(path)
    result["trace_file_s"] = (time.perf_counter() - t) / 5
    result["trace_named"] = report.named
    result["peak_rss_mb"] = peak_rss_mb()
    print(f"trace a file: {result['trace_file_s'] * 1e3:.1f} ms; peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
