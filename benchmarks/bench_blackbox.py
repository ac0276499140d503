"""Black-box tracing costs side by side, in one run: training the base, registering 10,000 customers, issuing
one copy, tracing one suspect among them (issue 13).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_blackbox.py [--dataset mnist5k] [--m 256] [--steps 300]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_blackbox.py --method tilt --m 2048 [--delta 0.25]

1. the vendor's base CNN trained from scratch (``TrainConfig(epochs=10, seed=0)``; CPU and wall seconds);
2. a Tardos product (``m`` trigger queries, capacity ``--customers``, c = 5) created from it and ``--customers``
   customers registered in its SQLite registry (seconds);
3. one copy issued through the registry (the product's fine-tune, ``--steps`` Adam steps; with ``--method tilt``
   the closed-form output-layer tilt, first copy including the one-off solve, then a second copy): CPU seconds and their
   ratio to the base training's CPU seconds (CPU time of this single-threaded process: the machine is shared, so
   wall time also counts other people's work), the copy's accuracy against the base's;
4. that copy traced among all ``--customers`` codes, with all ``m`` queries (``stop="budget"``), once through a
   local oracle and once through ``nnmark serve``'s HTTP server on 127.0.0.1 (an in-process server thread; tilted
   copies: both show probabilities, since a tilt is read from scores).

Writes ``benchmarks/results/blackbox.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from nnmark import Key
from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct
from nnmark.blackbox.answers import ProbabilityOracle
from nnmark.data import load_splits
from nnmark.io import load_model, save_model
from nnmark.models import model_spec
from nnmark.oracle import LocalOracle
from nnmark.serving.client import HTTPOracle
from nnmark.serving.server import make_server
from nnmark.train import TrainConfig, accuracy, seeded_model, train


def timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def trace_summary(rep) -> dict[str, Any]:
    return {"status": rep.status, "named": rep.named_customers, "p_values": [v.p_value for v in rep.named],
            "queries_used": rep.queries_used, "level": rep.level, "min_p_not_named": rep.min_p_not_named,
            "tracer_seconds": rep.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--m", type=int, default=256, help="trigger queries (code length)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tune steps per copy")
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=10, help="base training epochs")
    ap.add_argument("--method", choices=["finetune", "tilt"], default="finetune")
    ap.add_argument("--delta", type=float, default=0.25, help="tilt: logit units per trigger")
    ap.add_argument("--out", default=None, help="default benchmarks/results/blackbox[_tilt].json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sp = load_splits(args.dataset)
    res: dict[str, Any] = {"dataset": args.dataset, "m": args.m, "steps": args.steps, "customers": args.customers,
                           "base_epochs": args.epochs, "threads": torch.get_num_threads(), "method": args.method}
    with tempfile.TemporaryDirectory(prefix="nnmark-bench-bb-") as tmp:
        work = Path(tmp)
        base = seeded_model(model_spec("cnn", sp.image_shape, sp.num_classes), 0)
        _, wall, cpu = timed(train, base, sp.train, TrainConfig(epochs=args.epochs, seed=0, progress=False))
        res["base"] = {"wall_s": wall, "cpu_s": cpu, "accuracy": accuracy(base, sp.test)}
        base_file = save_model(work / "base.safetensors", base, {"data": args.dataset})

        prod, wall, cpu = timed(BlackBoxProduct.create, work / "shop", base_file, key=Key.from_seed("bench-bb"),
                                m=args.m, capacity=args.customers, colluders=5,
                                issue=BlackBoxIssueConfig(steps=args.steps, method=args.method, delta=args.delta))
        res["create"] = {"wall_s": wall, "cpu_s": cpu}
        names = [f"customer-{i:05d}" for i in range(args.customers)]
        _, wall, cpu = timed(prod.add_customers, names)
        res["register"] = {"customers": len(names), "wall_s": wall, "cpu_s": cpu}

        copy, wall, cpu = timed(prod.issue, names[0])
        model, meta = load_model(copy.model_path)
        res["issue"] = {"wall_s": wall, "cpu_s": cpu, "cpu_ratio_to_base": cpu / res["base"]["cpu_s"],
                        "wall_ratio_to_base": wall / res["base"]["wall_s"], "accuracy": accuracy(model, sp.test),
                        "accuracy_change_points": 100 * (accuracy(model, sp.test) - res["base"]["accuracy"]),
                        "symbol_accuracy": meta["issue"]["symbol_accuracy"]}
        if args.method == "tilt":
            _, wall, cpu = timed(prod.issue, names[1])
            res["issue_second"] = {"wall_s": wall, "cpu_s": cpu, "cpu_ratio_to_base": cpu / res["base"]["cpu_s"]}
        tilt = args.method == "tilt"

        rep, wall, cpu = timed(prod.trace, ProbabilityOracle(model) if tilt else LocalOracle(model), stop="budget")
        res["trace_local"] = {"wall_s": wall, "cpu_s": cpu, **trace_summary(rep)}
        srv = make_server(model, "127.0.0.1", 0, max_batch=64, probabilities=tilt)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            rep, wall, cpu = timed(prod.trace, HTTPOracle(srv.url, budget=args.m, timeout=30.0, scores=tilt),
                                   stop="budget")
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(5)
        res["trace_http"] = {"wall_s": wall, "cpu_s": cpu, **trace_summary(rep)}
        prod.registry.close()
    out = Path(args.out or f"benchmarks/results/blackbox{'_tilt' if tilt else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    b, i = res["base"], res["issue"]
    print(f"base: {b['cpu_s']:.1f} CPU s ({b['wall_s']:.1f} s wall), accuracy {b['accuracy']:.2%}")
    print(f"register {args.customers}: {res['register']['wall_s']:.2f} s")
    print(f"issue one copy: {i['cpu_s']:.1f} CPU s = {i['cpu_ratio_to_base']:.2f}x the base "
          f"(accuracy {i['accuracy']:.2%}, {i['accuracy_change_points']:+.1f} points, "
          f"{i['symbol_accuracy']:.0%} of triggers as taught)")
    if "issue_second" in res:
        print(f"issue a second copy (tilt solved): {res['issue_second']['cpu_s']:.2f} CPU s = "
              f"{res['issue_second']['cpu_ratio_to_base']:.3f}x the base")
    for k in ("trace_local", "trace_http"):
        t = res[k]
        print(f"{k}: {t['wall_s']:.2f} s wall, {t['queries_used']} queries, named {t['named']} "
              f"p {t['p_values']} (level {t['level']:.1e})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
