"""Black-box traitor tracing on the mnist5k CNN: a Tardos product with 10,000 registered customers.

    .venv/bin/python experiments/blackbox/run.py [--m 256] [--steps 300] [--copies 5] [--workers 2]
    .venv/bin/python experiments/blackbox/run.py --m 768 --steps 600 --trigger-batch 64 --distill 1 --soft --tag d

Stages (results appended to experiments/results/blackbox/results.json):
1. base model (mnist5k CNN, 10 epochs, seed 0; its training time is the unit of issuing cost);
2. a black-box product (m triggers, capacity 10,000, c = 5), 10,000 customers registered, ``--copies`` of them
   issued through the registry (fine-tuned copies; seconds and accuracy of each);
3. suspects traced through the product's trigger queries (a LocalOracle: the same queries an API would get),
   each with the whole budget (stop="budget") so that the query count at which each colluder is named is read
   off the sequential looks: single copies; weight averages of every pair, triple and 5-subset; single copies
   and pairs fine-tuned (FTAL, attacker split) and pruned (30 %, 50 %); clean models (other seeds); oracles that
   answer uniformly at random; every suspect again under 3 other vendors' keys (nobody may be named).

With ``--soft`` every suspect is traced twice: through an API that shows probabilities (soft answers,
:mod:`nnmark.blackbox.answers`; the primary verdict, also the one under the other vendors' keys) and through one
that shows labels only (``hard``). Copies and products are cached under ``--work``: a rerun reuses them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from nnmark import Key  # noqa: E402
from nnmark.attacks.base import build_attack  # noqa: E402
from nnmark.attacks.collusion import combine_models  # noqa: E402
from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct, ScoreNull, make_triggers, trace_oracle  # noqa: E402
from nnmark.blackbox.answers import ProbabilityOracle, answer_weights, base_reference  # noqa: E402
from nnmark.codes.tardos import TardosCode  # noqa: E402
from nnmark.data import load_splits  # noqa: E402
from nnmark.io import load_model, save_model  # noqa: E402
from nnmark.models import model_spec  # noqa: E402
from nnmark.oracle import LocalOracle  # noqa: E402
from nnmark.train import TrainConfig, accuracy, seeded_model, train  # noqa: E402

OUT = Path("experiments/results/blackbox")


class RandomOracle:
    """Answers every query with a uniformly random label, or (``soft``) random probabilities (Dirichlet(1) rows):
    an API that randomises."""

    def __init__(self, seed: int, classes: int = 10, soft: bool = False) -> None:
        self.rng, self.classes, self.queries_used, self.soft = np.random.default_rng(seed), classes, 0, soft

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.queries_used += len(x)
        if self.soft:
            return torch.from_numpy(self.rng.dirichlet(np.ones(self.classes), size=len(x)))
        return torch.from_numpy(self.rng.integers(0, self.classes, size=len(x)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/nnmark-blackbox-exp")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--trigger-batch", type=int, default=32)
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--soft", action="store_true", help="trace through probabilities too (primary verdict)")
    ap.add_argument("--tag", default="", help="suffix of the product directory and the results file")
    ap.add_argument("--other-keys", type=int, default=3)
    ap.add_argument("--issue-only", action="store_true", help="stop after issuing and measuring the copies")
    ap.add_argument("--method", choices=["finetune", "tilt"], default="finetune",
                    help="how copies are made (nnmark.blackbox.tilt: a closed-form tilt of the output layer)")
    ap.add_argument("--delta", type=float, default=0.5, help="tilt: logit units per trigger")
    ap.add_argument("--ridge", type=float, default=1.0, help="tilt: weight of the clean logits' change")
    ap.add_argument("--sizes", default="2,3,5", help="coalition sizes of the weight averages")
    ap.add_argument("--max-groups", type=int, default=0,
                    help="at most this many coalitions per size (a seeded sample of them; 0: all)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    res_path = OUT / f"results_m{args.m}{args.tag}.json"
    results: dict = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        res_path.write_text(json.dumps(results, indent=1))

    sp = load_splits("mnist5k")
    spec = model_spec("cnn", sp.image_shape, 10)
    base_file, base_info = work / "base.safetensors", work / "base.json"
    if not base_file.exists():
        base = seeded_model(spec, 0)
        t = time.perf_counter()
        train(base, sp.train, TrainConfig(epochs=10, seed=0, progress=False))
        info = {"train_seconds": time.perf_counter() - t, "accuracy": accuracy(base, sp.test)}
        base_info.write_text(json.dumps(info))
        save_model(base_file, base, {"data": "mnist5k"})
    results["base"] = json.loads(base_info.read_text())
    base, _ = load_model(base_file)
    print("base", results["base"], flush=True)

    prod_dir = work / f"prod_m{args.m}{args.tag}"
    if not (prod_dir / "product.json").exists():
        cfg = BlackBoxIssueConfig(steps=args.steps, lr=args.lr, trigger_batch=args.trigger_batch, distill=args.distill,
                                  method=args.method, delta=args.delta, ridge=args.ridge)
        prod = BlackBoxProduct.create(prod_dir, base_file, key=Key.from_seed("blackbox-experiment"), m=args.m,
                                      capacity=10000, colluders=5, issue=cfg)
        t = time.perf_counter()
        prod.add_customers([f"customer-{i:05d}" for i in range(10000)])
        results["register_10000_seconds"] = time.perf_counter() - t
        save()
    prod = BlackBoxProduct.open(prod_dir)
    results["issue_config"] = prod.config.issue
    names = [f"customer-{i:05d}" for i in range(args.copies)]
    todo = prod.pending_customers(names)
    if todo:
        from nnmark.blackbox.commands import issue_many

        t = time.perf_counter()
        outs = issue_many(prod_dir, todo, workers=args.workers)
        results.setdefault("issue_wall_seconds", []).append({"copies": len(todo), "workers": args.workers,
                                                             "seconds": time.perf_counter() - t})
        assert not [o for o in outs if o.error], outs
        save()
    copies = {c.customer: c for c in prod.registry.issued_copies()}
    models = {n: load_model(copies[n].model_path)[0] for n in names}
    code_of = {n: copies[n].code_index for n in names}
    if len(results.get("copies", [])) < len(names):
        trig = prod.triggers
        rows = []
        for n in names:
            mdl = models[n]
            with torch.no_grad():
                got = mdl(trig.x).argmax(1)
            sym = float((got == trig.labels_for(prod.code.codeword(code_of[n]))).float().mean())
            bits = prod.code.codeword(code_of[n])
            w, _ = answer_weights(ProbabilityOracle(mdl)(trig.x), trig.a, trig.b, reference=prod.reference)
            soft_agree = float(np.mean(np.sign(w) == np.where(bits, 1, -1)))
            meta = load_model(copies[n].model_path)[1]
            rows.append({"customer": n, "code": code_of[n], "accuracy": accuracy(mdl, sp.test), "symbol_accuracy": sym,
                         "soft_sign_agreement": soft_agree,
                         "issue_seconds": meta.get("issue", {}).get("seconds"),
                         "issue_cpu_seconds": meta.get("issue", {}).get("cpu_seconds")})
            print(rows[-1], flush=True)
        results["copies"] = rows
        save()
    if args.issue_only:
        return

    holders = prod.holders()
    others = [(f"other-vendor-{i}", TardosCode.from_key(Key.from_seed(f"other-vendor-{i}").child("blackbox/code"),
                                                         m=args.m, n_codes=10000, colluders=5),
               make_triggers(Key.from_seed(f"other-vendor-{i}").child("blackbox/triggers"), sp, args.m))
              for i in range(args.other_keys)]
    traces = results.setdefault("traces", [])
    done = {t["suspect"] for t in traces}

    modes = ("soft", "hard") if args.soft else ("hard",)

    def verdicts(label: str, oracle_factory, colluders: list[str], soft: bool) -> dict:
        t = time.perf_counter()
        rep = prod.trace(oracle_factory(soft), stop="budget")
        sec = time.perf_counter() - t
        # every colluder's own p-value over all m answers (one look, not adjusted for the K looks of the trace)
        trig = prod.triggers
        w, _ = answer_weights(oracle_factory(soft)(trig.x), trig.a, trig.b, reference=prod.reference if soft else None)
        full = ScoreNull(prod.code.biases, weights=w)
        col_p_full = {c: float(full.p_value(prod.code.scores(weights=w, codes=[code_of[c]]))[0]) for c in colluders}
        named = rep.named_customers
        col_codes = {code_of[c] for c in colluders}
        return {"named": named, "colluders_named": sorted(set(named) & set(colluders)),
                "innocents_named": sorted(set(named) - set(colluders)),
                "colluder_p": {c: float(next((v.p_value for v in rep.named if v.customer == c), np.nan))
                               for c in colluders},
                "colluder_queries": {v.customer: v.queries for v in rep.named if v.customer in colluders},
                "colluder_p_all_queries": col_p_full,
                "min_p_innocent": float(min([v.p_value for v in rep.suspects if v.code not in col_codes] + [1.0])),
                "answers": rep.answers, "answers_read": rep.answers_read, "seconds": sec, "level": rep.level}

    def run(label: str, oracle_factory, colluders: list[str], kind: str) -> None:
        """``oracle_factory(soft)``: a fresh oracle showing probabilities (soft) or labels."""
        if label in done:
            return
        row = {"suspect": label, "kind": kind, "coalition": len(colluders)}
        for mode in modes:
            row[mode] = verdicts(label, oracle_factory, colluders, mode == "soft")
        row.update(row[modes[0]])  # the primary verdict (soft when traced so) at the top level
        # the same suspect under other vendors' keys: no registry code of theirs may be named
        row["other_keys_named"] = []
        for oname, ocode, otrig in others:
            oref = None if prod.reference is None else base_reference(prod.base_model, otrig)
            orep = trace_oracle(oracle_factory(modes[0] == "soft"), ocode, otrig, holders=holders,
                                alpha=prod.config.alpha, stop="budget", reference=oref)
            row["other_keys_named"] += [f"{oname}:{c}" for c in orep.named_customers]
            row.setdefault("other_keys_min_p", []).append(orep.min_p_not_named)
        traces.append(row)
        done.add(label)
        save()
        for mode in modes:
            r = row[mode]
            print(label, mode, "named", r["named"], "p", {k: f"{v:.2g}" for k, v in r["colluder_p"].items()},
                  "q", r["colluder_queries"],
                  "p(all m)", {k: f"{v:.2g}" for k, v in r["colluder_p_all_queries"].items()},
                  "innocent min p", f"{r['min_p_innocent']:.2g}", f"{r['seconds']:.1f}s", flush=True)
        print("   other keys named", row["other_keys_named"], flush=True)

    def local(model):
        return lambda soft: ProbabilityOracle(model) if soft else LocalOracle(model)

    for n in names:
        run(f"single:{n}", local(models[n]), [n], "single")
    for k in [int(v) for v in args.sizes.split(",") if v.strip()]:
        groups = list(itertools.combinations(names, k))
        if args.max_groups and len(groups) > args.max_groups:
            pick = np.sort(np.random.default_rng(k).choice(len(groups), size=args.max_groups, replace=False))
            groups = [groups[i] for i in pick]
        for group in groups:
            avg = combine_models([models[g] for g in group], [1.0 / k] * k)
            results.setdefault("average_accuracy", {})[",".join(group)] = accuracy(avg, sp.test)
            run(f"average{k}:" + ",".join(group), local(avg), list(group), f"average{k}")
    ft = build_attack("ftal", epochs=3, lr=1e-3)
    for group in [names[:1], names[1:2], names[:2], names[2:4]] + ([names[4:7]] if len(names) >= 7 else []):
        src = combine_models([models[g] for g in group], [1.0 / len(group)] * len(group))
        run("ftal3:" + ",".join(group), local(ft.attack(src, sp.attacker)), list(group), f"ftal-{len(group)}")
        for frac in (0.3, 0.5):
            pr = build_attack("prune", fraction=frac)
            run(f"prune{frac}:" + ",".join(group), local(pr.attack(src)), list(group), f"prune-{len(group)}")
    for seed in (1, 2):
        clean_file = work / f"clean{seed}.safetensors"
        if not clean_file.exists():
            cm = seeded_model(spec, seed)
            train(cm, sp.train, TrainConfig(epochs=2, seed=seed, progress=False))
            save_model(clean_file, cm, {"data": "mnist5k"})
        run(f"clean:seed{seed}", local(load_model(clean_file)[0]), [], "clean")
    run("clean:base", local(base), [], "clean")
    for seed in range(20):
        run(f"random:{seed}", lambda soft, seed=seed: RandomOracle(seed, soft=soft), [], "random")
    if "base_cpu_seconds" not in results:  # the issuing cost's unit, in CPU seconds (the machine's load varies)
        cpu = time.process_time()
        train(seeded_model(spec, 0), sp.train, TrainConfig(epochs=10, seed=0, progress=False))
        results["base_cpu_seconds"] = time.process_time() - cpu
        save()
    print("done", flush=True)


if __name__ == "__main__":
    main()
