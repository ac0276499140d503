"""Tracing a suspect among ~17,400 registered customers (issue 4): wall time and peak memory.

A product with two AG(2,11) codebooks side by side (132 x 132 = 17,424 identity codes) is
created from a base CNN; 17,424 customers are registered in its SQLite registry and every
one of them is given a code: a few get real fingerprinted copies (files on disk, SHA-256 in
the registry), the rest hold reserved codes (no file is written for them: 17,424 model
files of 3.5 MB would fill the disk, and issuing is measured in ``bench_fingerprint.py``).
Each suspect -- one issued copy, and the weight average of two -- is then traced by the
real command, ``nnmark fingerprint trace SUSPECT --product DIR --json``, in its own process:
the figures are that process's wall time and peak resident memory (Python, torch and all),
plus the time of ``Product.trace`` alone inside a warm process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trace_registry.py [--customers 17424]

Writes ``benchmarks/results/trace_registry.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnmark.attacks.collusion import average_models
from nnmark.data import load_splits
from nnmark.fingerprint import Product
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import TrainConfig, seeded_model, train


def traced_in_subprocess(suspect: Path, product: Path) -> dict:
    """Run the CLI trace in a child process under GNU time: wall time, peak RSS, report."""
    cmd = [sys.executable, "-m", "nnmark.cli", "fingerprint", "trace", str(suspect), "--product", str(product),
           "--json"]
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr)
    wall, peak_kb = proc.stderr.strip().splitlines()[-1].split()[1:3]
    report = json.loads(proc.stdout)
    return {"wall_s": float(wall), "peak_rss_mb": int(peak_kb) / 1024, "status": report["status"],
            "named": [a["customer"] for a in report["accused"]], "ambiguous": len(report.get("ambiguous", []))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=17_424)
    ap.add_argument("--issued", type=int, default=4, help="customers given real copies")
    ap.add_argument("--out", default="benchmarks/results/trace_registry.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {"customers": args.customers, "code": "ag:11x2"}
    with tempfile.TemporaryDirectory(prefix="nnmark-trace-") as tmp:
        work = Path(tmp)
        data = load_splits("mnist5k")
        base = seeded_model(model_spec("cnn", data.train.image_shape, 10), 0)
        train(base, data.train, TrainConfig(epochs=3, seed=0, progress=False))
        save_model(work / "base.safetensors", base, {"data": "mnist5k"})
        prod = Product.create(work / "product", work / "base.safetensors", key=Key.from_seed("bench-trace"),
                              code="ag:11x2")
        names = [f"customer-{i:05d}" for i in range(args.customers)]
        t = time.perf_counter()
        prod.add_customers(names)
        res["register_s"] = time.perf_counter() - t
        t = time.perf_counter()
        copies = [prod.issue(n) for n in names[: args.issued]]
        res["issue_s_per_copy"] = (time.perf_counter() - t) / args.issued
        t = time.perf_counter()
        for n in names[args.issued:]:
            prod.registry.reserve_code(n)
        res["reserve_s_per_code"] = (time.perf_counter() - t) / max(1, args.customers - args.issued)
        res["codes_held"] = len(prod.registry.assigned_codes(include_reserved=True))
        single = Path(copies[0].model_path)
        a, _ = load_model(copies[0].model_path)
        b, _ = load_model(copies[1].model_path)
        pair = save_model(work / "avg2.safetensors", average_models([a, b]), {"data": "mnist5k"})
        res["expected"] = {"single": [copies[0].customer], "average of 2": [copies[0].customer, copies[1].customer]}
        prod.trace(single)  # warm-up (loads the base model, builds the codebooks)
        res["in_process"] = {}
        for label, path in (("single", single), ("average of 2", pair)):
            t = time.perf_counter()
            rep = prod.trace(path)
            res["in_process"][label] = {"trace_s": time.perf_counter() - t, "status": rep.status,
                                        "named": rep.named}
        prod.registry.close()
        res["cli"] = {label: traced_in_subprocess(path, work / "product")
                      for label, path in (("single", single), ("average of 2", pair))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
