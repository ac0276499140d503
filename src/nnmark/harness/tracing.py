"""The fingerprint tracer as a row of the grid: one fingerprinted product, coalitions of its customers, attacks.

The config's ``fingerprint`` section::

    fingerprint:
      customers: 8            # customers issued a copy of the product (default 8)
      code: ag:7              # the product's code family (nnmark.fingerprint.product.parse_code)
      coalitions: [1, 2, 3]   # coalition sizes; a coalition of k > 1 averages its k copies (collusion ``average``)
      attacks: [none, permute, split, {name: ftal, params: {epochs: 5}}]   # the grid's attack-row format
      verify: [{align: true}, {align: false}]   # the tracer with the alignment defence on / off
      clean: 5                # clean hosts of the false-alarm study traced too (nobody may be named)

The product's base is the plan's clean host of the first grid seed; its key is derived from the product's
recipe, so the same config builds the same product (stored once under ``artifacts/fingerprint/<hash>``; a
product left half-built by a killed run is rebuilt). For every grid seed and coalition size the coalition is
drawn from the customers with that seed, its copies are averaged, each attack row runs on the average, and the
tracer (:meth:`nnmark.fingerprint.Product.trace`) is asked who made the copy, with each verify variant.

A trace record says whether the tracer named *exactly* the coalition, named only colluders (a subset), or named
an innocent customer -- a false alarm. The tracer's own guarantee (its decision rule): whatever the coalition
does with its copies, the probability that any innocent customer is named is at most the product's ``alpha``
(family-wise over the customers tested, per trace); the clean-host traces check the same rule on models made
from no copy at all. A suspect the tracer refuses (another architecture) is recorded as naming nobody.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnmark.harness.cache import ArtifactStore
from nnmark.harness.claims import Claims, LogTail
from nnmark.harness.config import NO_ATTACK, AttackEntry, ConfigError, Plan, content_hash

FINGERPRINT_KEYS = ("customers", "code", "coalitions", "attacks", "verify", "clean")
MAX_CUSTOMERS = 64
DONE_MARK = "harness-built.json"


def parse_fingerprint(raw: Any) -> dict[str, Any] | None:
    """Validate a config's ``fingerprint`` section (see the module docs); :class:`ConfigError` on a problem.
    The attack rows are parsed as the grid's (registered names, declared parameters, budgets)."""
    from nnmark.fingerprint.product import parse_code
    from nnmark.harness.config import _attack, _unknown

    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("fingerprint must be a mapping")
    _unknown("fingerprint", raw, FINGERPRINT_KEYS)
    customers = raw.get("customers", 8)
    if not isinstance(customers, int) or isinstance(customers, bool) or not 1 <= customers <= MAX_CUSTOMERS:
        raise ConfigError(f"fingerprint customers must be an integer in 1..{MAX_CUSTOMERS}, got {customers!r}")
    code = raw.get("code", "ag:7")
    try:
        parse_code(str(code))
    except Exception as exc:  # noqa: BLE001 - the code parser's own message names the known forms
        raise ConfigError(f"fingerprint code: {exc}") from None
    sizes = raw.get("coalitions", [1, 2, 3])
    if not isinstance(sizes, list) or not sizes or not all(
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= customers for k in sizes):
        raise ConfigError(f"fingerprint coalitions: a non-empty list of sizes in 1..{customers}, got {sizes!r}")
    attacks = [_attack(e, i) for i, e in enumerate(raw.get("attacks") or [NO_ATTACK])]
    labels = [a.label for a in attacks]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"fingerprint: two attacks share a label ({', '.join(labels)})")
    variants = raw.get("verify") or [{"align": True}]
    if isinstance(variants, Mapping):
        variants = [variants]
    if not isinstance(variants, list) or not all(
            isinstance(v, Mapping) and set(v) <= {"align"} and isinstance(v.get("align", True), bool)
            for v in variants):
        raise ConfigError("fingerprint verify: a list of mappings with only 'align' (true / false)")
    clean = raw.get("clean", 0)
    if not isinstance(clean, int) or isinstance(clean, bool) or clean < 0:
        raise ConfigError(f"fingerprint clean must be an integer >= 0, got {clean!r}")
    return {"customers": customers, "code": str(code), "coalitions": list(sizes),
            "attacks": [attack_to_dict(a) for a in attacks], "verify": [dict(v) for v in variants], "clean": clean}


def attack_to_dict(a: AttackEntry) -> dict[str, Any]:
    return {"label": a.label, "steps": [s.to_dict() for s in a.steps], "budgets": list(a.budgets),
            "budget_step": a.budget_step, "budget_param": a.budget_param}


def attack_from_dict(d: Mapping[str, Any]) -> AttackEntry:
    from nnmark.harness.config import AttackStep

    return AttackEntry(d["label"], tuple(AttackStep(s["name"], dict(s["params"])) for s in d["steps"]),
                       tuple(d["budgets"]), d["budget_step"], d["budget_param"])


def product_recipe(plan: Plan) -> dict[str, Any]:
    """What determines the product: its base host (the clean host of the first grid seed), customers, code."""
    from nnmark.harness.grid import clean_recipe

    fp = plan.fingerprint or {}
    return {"kind": "product", "base": clean_recipe(plan, plan.seeds[0]), "customers": fp["customers"],
            "code": fp["code"]}


def customer_names(n: int) -> list[str]:
    return [f"customer-{i:02d}" for i in range(n)]


def build_product(plan: Plan, store: ArtifactStore) -> Any:
    """The plan's product (built once: base host trained or taken from the cache, every customer issued)."""
    from nnmark.fingerprint import Product

    recipe = product_recipe(plan)
    h = content_hash(recipe)
    root = store.root / "fingerprint" / h
    if (root / DONE_MARK).exists():
        return Product.open(root / "product")
    with store.lock(recipe):  # one builder at a time: a concurrent run waits here, then opens what was built
        if (root / DONE_MARK).exists():
            return Product.open(root / "product")
        return _build_product(plan, store, recipe, root)


def _build_product(plan: Plan, store: ArtifactStore, recipe: dict[str, Any], root: Path) -> Any:
    from nnmark.fingerprint import Product
    from nnmark.harness.grid import build_artifact, load_artifact
    from nnmark.io import save_model
    from nnmark.keys import Key

    h = content_hash(recipe)
    if root.exists():  # left half-built by a killed run (whose lock the kernel released)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    build_artifact(plan, store, recipe["base"])
    base = load_artifact(plan, store, recipe["base"])
    if not hasattr(base, "spec"):
        raise ConfigError("the fingerprint product needs a zoo architecture as host (its copies are model files)")
    save_model(root / "base.safetensors", base, {"data": plan.dataset["name"]})
    prod = Product.create(root / "product", root / "base.safetensors", key=Key.from_seed(f"nnmark-harness/{h}"),
                          code=recipe["code"], data=plan.dataset["name"])
    names = customer_names(recipe["customers"])
    prod.add_customers(names)
    for n in names:
        prod.issue(n)
    (root / DONE_MARK).write_text(json.dumps({"recipe": recipe, "finished_at": time.time()}))
    return prod


def trace_cells(plan: Plan) -> list[dict[str, Any]]:
    """Every trace of the plan: coalitions (seed x size x attack x budget), then the clean hosts."""
    from nnmark.harness.grid import clean_recipe

    fp = plan.fingerprint or {}
    base = product_recipe(plan)
    out = []
    for seed in plan.seeds:
        for k in fp["coalitions"]:
            for a in fp["attacks"]:
                entry = attack_from_dict(a)
                for b in entry.budgets:
                    steps = entry.steps_for(b)
                    out.append({"kind": "coalition", "seed": seed, "size": k, "attack": entry.label, "budget": b,
                                "steps": steps})
    fa = plan.false_alarm or {}
    for s in (fa.get("clean_seeds") or range(3000, 3000 + fp["clean"]))[: fp["clean"]]:
        out.append({"kind": "clean", "seed": s, "size": 0, "attack": NO_ATTACK, "budget": None, "steps": [],
                    "clean": clean_recipe(plan, s, plan.host["arch"], fa.get("epochs"))})
    for c in out:
        c["trace"] = content_hash({"product": base, "cell": c, "verify": fp["verify"], "dataset": plan.dataset})
    return out


def coalition_of(names: list[str], size: int, seed: int) -> list[str]:
    """The ``size`` colluders of grid seed ``seed`` (drawn without replacement, seeded by seed and size)."""
    rng = np.random.default_rng([seed, size, 7919])
    return sorted(rng.choice(names, size, replace=False).tolist())


def run_trace(plan: Plan, store: ArtifactStore, prod: Any, cell: dict[str, Any]) -> dict[str, Any]:
    """Run one trace cell and return its record (see the module docs)."""
    from nnmark.attacks import build_attack
    from nnmark.harness.grid import build_artifact, load_artifact, run_attack_chain, splits_of
    from nnmark.io import load_model
    from nnmark.train import accuracy

    fp = plan.fingerprint or {}
    start = time.perf_counter()
    splits = splits_of(plan)
    names = customer_names(fp["customers"])
    rec: dict[str, Any] = {k: cell[k] for k in ("trace", "kind", "seed", "size", "attack", "budget", "steps")}
    rec["alpha"] = prod.config.alpha
    if cell["kind"] == "clean":
        build_artifact(plan, store, cell["clean"])
        model, coalition = load_artifact(plan, store, cell["clean"]), []
    else:
        coalition = coalition_of(names, cell["size"], cell["seed"])
        copies = [load_model(prod.registry.issued_copies(n)[0].model_path)[0] for n in coalition]
        model = build_attack("average", seed=cell["seed"]).attack(copies) if len(copies) > 1 else copies[0]
    rec["coalition"] = coalition
    rec["accuracy_copy"] = accuracy(model, splits.test)
    if cell["steps"]:
        model, rec["cost"] = run_attack_chain(cell["steps"], model, splits.attacker, cell["seed"])
    else:
        rec["cost"] = {"seconds": 0.0, "data_n": 0, "queries": 0, "reported": []}
    rec["accuracy_attacked"] = accuracy(model, splits.test)
    rec["accuracy_lost_points"] = 100.0 * (rec["accuracy_copy"] - rec["accuracy_attacked"])
    rec["verdicts"] = []
    for v in fp["verify"]:
        prod.align = bool(v.get("align", True))
        try:
            rep = prod.trace(model)
            named = list(rep.named)
            row: dict[str, Any] = {"verify": v, "status": rep.status, "named": named,
                                   "p_values": {a.customer: a.p_value for a in rep.accused},
                                   "max_z_not_named": (rep.evidence.get("own") or {}).get("max_z_not_named")}
        except Exception as exc:  # noqa: BLE001 - the tracer refusing a suspect is a result: nobody named
            named, row = [], {"verify": v, "status": "refused", "named": [],
                              "refused": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            prod.align = True
        innocents = sorted(set(named) - set(coalition))
        row.update(exact=bool(coalition) and set(named) == set(coalition), innocents_named=innocents,
                   colluders_named=sorted(set(named) & set(coalition)))
        rec["verdicts"].append(row)
    rec["seconds"] = time.perf_counter() - start
    return rec


def run_tracing(plan: Plan, store_root: Path, out: Path, progress: Any = None, claims: Claims | None = None
                ) -> dict[str, int]:
    """Run what the plan's tracer study still lacks (``out/fingerprint.jsonl``, one record a trace, resumable);
    in this process, each trace under its claim (``claims``, default ``out/locks``: a trace another run holds
    is come back to at the end and its record read). Returns ``{"traces": ..., "ran": ...}``."""
    import torch

    from nnmark.harness.falsealarm import FalseAlarmLog

    log = FalseAlarmLog(out / "fingerprint.jsonl", key="trace")
    done = log.finished()
    todo = [c for c in trace_cells(plan) if c["trace"] not in done]
    if not todo:
        return {"traces": len(done), "ran": 0}
    torch.set_num_threads(1)
    store = ArtifactStore(store_root)
    prod = build_product(plan, store)
    claims = claims or Claims(out / "locks")
    recorded = LogTail(log.path, "trace")
    queue, ran = list(todo), 0
    try:
        while queue:
            locked = []
            for c in queue:
                if c["trace"] in recorded:
                    continue
                if not claims.try_claim(c["trace"]):
                    locked.append(c)
                    continue
                try:
                    if c["trace"] not in recorded:
                        if progress:
                            progress("traces", ran, len(todo))
                        log.append(run_trace(plan, store, prod, c))
                        ran += 1
                finally:
                    claims.release(c["trace"])
            if locked:
                time.sleep(0.25)
            queue = locked
    finally:
        claims.release_all()
    if progress:
        progress("traces", len(todo), len(todo))
    return {"traces": len(done) + len(todo), "ran": ran}


def tracing_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row a (coalition size, attack, budget, verify variant): traces, exact, any colluder named, innocents
    named, accuracy lost (mean points); clean hosts under size 0."""
    groups: dict[tuple[Any, ...], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in records:
        for v in r["verdicts"]:
            key = (r["size"], r["attack"], json.dumps(r["budget"]), json.dumps(v["verify"], sort_keys=True))
            groups.setdefault(key, []).append((r, v))
    rows = []
    for (size, attack, budget, variant), entries in sorted(groups.items(), key=lambda kv: kv[0]):
        rows.append({"size": size, "attack": attack if budget == "null" else f"{attack} [{json.loads(budget)}]",
                     "verify": variant, "traces": len(entries), "exact": sum(v["exact"] for _, v in entries),
                     "colluder_named": sum(bool(v["colluders_named"]) for _, v in entries),
                     "innocents": sum(len(v["innocents_named"]) for _, v in entries),
                     "refused": sum(v["status"] == "refused" for _, v in entries),
                     "loss": float(np.mean([r["accuracy_lost_points"] for r, _ in entries]))})
    return rows


def tracing_markdown(records: list[dict[str, Any]]) -> str:
    """The tracer table as Markdown."""
    if not records:
        return "No fingerprint tracer study in this config.\n"
    lines = ["| colluders | attack | tracer | traces | exactly the coalition named | a colluder named | "
             "innocents named | refused | accuracy lost (pts) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in tracing_table(records):
        who = "clean host" if r["size"] == 0 else str(r["size"])
        lines.append(f"| {who} | {r['attack']} | {r['verify']} | {r['traces']} | {r['exact']} | "
                     f"{r['colluder_named']} | {r['innocents']} | {r['refused']} | {r['loss']:.2f} |")
    n = sum(len(r["verdicts"]) for r in records)
    bad = sum(len(v["innocents_named"]) for r in records for v in r["verdicts"])
    alpha = records[0]["alpha"]
    return "\n".join(lines) + (f"\n\nInnocent customers named: {bad} over {n} traces. The tracer's rule: per trace, "
                               f"any innocent named with probability <= {alpha:g}, whatever the coalition did; a "
                               "coalition of k > 1 averaged its copies (collusion `average`) before the attack.\n")
