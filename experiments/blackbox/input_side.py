"""Black-box tracing through an API that transforms every query: the attack suite's input-side attacks in front
of a served copy, traced over HTTP (issue 13).

    .venv/bin/python experiments/blackbox/input_side.py [--m 256] [--steps 300] [--copies 3]

A Tardos product (mnist5k CNN base, m trigger queries, 10,000 customers registered, c = 5) issues ``--copies``
copies through its registry. Each copy -- and two clean models trained independently, and the base itself --
is wrapped by each input-side attack of :mod:`nnmark.attacks.input_side` (JPEG at quality 50 and 20, Gaussian
noise 0.05 / 0.1, 4 and 2 grey levels, Gaussian smoothing 0.8 px, 3x3 median, and the MagNet autoencoder
detector at 1 % and 5 % false positives, trained on the attacker split, which answers a random label to the
queries it refuses), served by nnmark's HTTP server on 127.0.0.1 (labels and softmax rows), and traced through
that URL with the whole budget (``stop="budget"``; the query count that named each copy is read off the looks),
twice: reading the labels only (an API that shows no scores) and reading soft answers (one that shows them).
Recorded per row: named or not, p-value, queries to name, the fraction of the triggers the API still answers as
taught, the API's test accuracy (the thief's cost), and for MagNet the fraction of triggers and of clean test
images it refuses.

Results: ``experiments/results/blackbox/input_side.json`` (table: ``--summary``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from nnmark import Key  # noqa: E402
from nnmark.attacks.base import build_attack  # noqa: E402
from nnmark.attacks.input_side import GuardedModel  # noqa: E402
from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct  # noqa: E402
from nnmark.data import load_splits  # noqa: E402
from nnmark.io import load_model, save_model  # noqa: E402
from nnmark.models import model_spec  # noqa: E402
from nnmark.serving.client import HTTPOracle  # noqa: E402
from nnmark.serving.server import make_server  # noqa: E402
from nnmark.train import TrainConfig, accuracy, seeded_model, train  # noqa: E402

OUT = Path("experiments/results/blackbox/input_side.json")
TRANSFORMS = [("none", None, {}), ("jpeg q50", "input-jpeg", {"quality": 50}),
              ("jpeg q20", "input-jpeg", {"quality": 20}), ("noise 0.05", "input-noise", {"sigma": 0.05}),
              ("noise 0.1", "input-noise", {"sigma": 0.1}), ("quantise 4", "input-quantize", {"levels": 4}),
              ("quantise 2", "input-quantize", {"levels": 2}), ("gaussian 0.8", "input-smooth", {"sigma": 0.8}),
              ("median 3x3", "input-smooth", {"filter": "median"}), ("magnet 1%", "magnet", {"fpr": 0.01}),
              ("magnet 5%", "magnet", {"fpr": 0.05})]


def traced_over_http(prod: BlackBoxProduct, api: torch.nn.Module) -> dict:
    """Serve ``api`` (labels and softmax rows) and trace it twice: reading labels only, and soft answers."""
    srv = make_server(api, "127.0.0.1", 0, max_batch=64, probabilities=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    out = {}
    try:
        for mode in ("labels", "auto"):
            oracle = HTTPOracle(srv.url, budget=prod.config.m, timeout=60.0, scores=mode == "auto")
            t = time.perf_counter()
            rep = prod.trace(oracle, stop="budget", answers=mode)
            out[mode] = {"named": rep.named_customers, "p": {v.customer: v.p_value for v in rep.named},
                         "queries": {v.customer: v.queries for v in rep.named},
                         "min_p_not_named": rep.min_p_not_named, "level": rep.level, "answers": rep.answers,
                         "answers_read": rep.answers_read, "seconds": time.perf_counter() - t,
                         "queries_used": oracle.queries_used}
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
    return out


def summary() -> None:
    res = json.loads(OUT.read_text())
    print(f"level alpha/(K N) = {res['level']:.2g}; copies {len(res['copies'])}, base accuracy "
          f"{res['base_accuracy']:.2%}")
    for mode in ("labels", "auto"):
        print(f"\nanswers read: {'labels only' if mode == 'labels' else 'soft (the API shows probabilities)'}\n")
        table(res, mode)


def table(res: dict, mode: str) -> None:
    import numpy as np

    print("| API transform | copies named | p (median) | queries to name (median) | triggers answered as taught "
          "(mean) | API accuracy on copies (mean) | clean models named | MagNet refuses triggers / clean |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _, _ in TRANSFORMS:
        rows = [{**r, **r[mode]} for r in res["rows"] if r["transform"] == label]
        singles = [r for r in rows if r["kind"] == "copy"]
        clean = [r for r in rows if r["kind"] == "clean"]
        named = [r for r in singles if r["customer"] in r["named"]]
        ps = [r["p"][r["customer"]] for r in named]
        qs = [r["queries"][r["customer"]] for r in named]
        refuse = res.get("magnet", {}).get(label)
        caught = f"{100 * refuse['triggers']:.1f}% / {100 * refuse['clean']:.1f}%" if refuse else "-"
        print(f"| {label} | {len(named)}/{len(singles)} | {np.median(ps) if ps else float('nan'):.2g} | "
              f"{int(np.median(qs)) if qs else '-'} | {np.mean([r['symbol_accuracy'] for r in singles]):.0%} | "
              f"{np.mean([r['accuracy'] for r in singles]):.2%} | "
              f"{sum(len(r['named']) for r in clean)}/{len(clean)} | "
              f"{caught} |")
    rows = [{**r, **r[mode]} for r in res["rows"]]
    innocent = sum(len(set(r["named"]) - ({r["customer"]} if r["kind"] == "copy" else set())) for r in rows)
    # a copy's own code is among the codes not named when the copy is not named: those rows do not count here
    clear = [r["min_p_not_named"] for r in rows if r["kind"] == "clean" or r["customer"] in r["named"]]
    print(f"\ninnocents named over {len(rows)} traces: {innocent}; smallest p of a code not involved "
          f"({len(clear)} traces whose copy, if any, was named): {min(clear):.2g}; median trace "
          f"{float(np.median([r['seconds'] for r in rows])):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--work", default="/tmp/nnmark-bb-input-side")
    ap.add_argument("--summary", action="store_true", help="print the table of the stored results and exit")
    args = ap.parse_args()
    if args.summary:
        summary()
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sp = load_splits("mnist5k")
    spec = model_spec("cnn", sp.image_shape, 10)

    def trained(name: str, seed: int, epochs: int) -> Path:
        path = work / f"{name}.safetensors"
        if not path.exists():
            model = seeded_model(spec, seed)
            train(model, sp.train, TrainConfig(epochs=epochs, seed=seed, progress=False))
            save_model(path, model, {"data": "mnist5k"})
        return path

    base_file = trained("base", 0, 10)
    prod_dir = work / f"prod_m{args.m}"
    if not (prod_dir / "product.json").exists():
        prod = BlackBoxProduct.create(prod_dir, base_file, key=Key.from_seed("blackbox-input-side"), m=args.m,
                                      capacity=10000, colluders=5, issue=BlackBoxIssueConfig(steps=args.steps))
        prod.add_customers([f"customer-{i:05d}" for i in range(10000)])
    prod = BlackBoxProduct.open(prod_dir)
    names = [f"customer-{i:05d}" for i in range(args.copies)]
    for n in prod.pending_customers(names):
        c = prod.issue(n)
        print("issued", n, c.code_index, flush=True)
    copies = {c.customer: load_model(c.model_path)[0] for c in prod.registry.issued_copies() if c.customer in names}
    suspects = [("copy", n, copies[n]) for n in names]
    suspects += [("clean", f"clean-seed{s}", load_model(trained(f"clean{s}", s, 10))[0]) for s in (1, 2)]
    suspects.append(("clean", "base", load_model(base_file)[0]))
    trig = prod.triggers
    code_of = {c.customer: c.code_index for c in prod.registry.issued_copies()}
    res = {"m": args.m, "steps": args.steps, "base_accuracy": accuracy(suspects[-1][2], sp.test), "rows": [],
           "copies": {n: {"code": code_of[n], "accuracy": accuracy(copies[n], sp.test)} for n in names},
           "magnet": {}}
    detectors = {}
    for label, attack, params in TRANSFORMS:
        if attack == "magnet":  # one detector per setting, trained once on the attacker split, then put in front
            atk = build_attack("magnet", **params)
            guard = atk.attack(suspects[0][2], sp.attacker)
            detectors[label] = guard
            res["magnet"][label] = {"threshold": guard.threshold,
                                    "triggers": float(guard.refused(trig.x).float().mean()),
                                    "clean": float(guard.refused(sp.test.x).float().mean()),
                                    "heldout_fpr": atk.cost.get("heldout_fpr")}
            print(label, res["magnet"][label], flush=True)
        for kind, name, model in suspects:
            if attack is None:
                api = model
            elif attack == "magnet":
                g = detectors[label]
                api = GuardedModel(model, g.detector, g.threshold, 10, seed=0).eval()
            else:
                api = build_attack(attack, **params).attack(model, None)
            with torch.no_grad():
                got = api(trig.x).argmax(1)
            sym = float((got == trig.labels_for(prod.code.codeword(code_of[name]))).float().mean()) \
                if kind == "copy" else None
            row = {"transform": label, "kind": kind, "customer": name, "symbol_accuracy": sym,
                   "accuracy": accuracy(api, sp.test), **traced_over_http(prod, api)}
            res["rows"].append(row)
            res["level"] = row["labels"]["level"]
            for mode in ("labels", "auto"):
                r = row[mode]
                print(label, name, mode, r["answers_read"], "named", r["named"],
                      {k: f"{v:.2g}" for k, v in r["p"].items()}, r["queries"], f"sym {sym}",
                      f"acc {row['accuracy']:.3f}", f"min p not named {r['min_p_not_named']:.2g}", flush=True)
            OUT.write_text(json.dumps(res, indent=1))
    summary()


if __name__ == "__main__":
    main()
