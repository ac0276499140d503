"""The grid: cells = schemes x attacks (chains included) x budgets x seeds, their artifacts, and the results log.

A cell marks a host with one scheme under the key of one seed (a cached artifact,
:mod:`nnmark.harness.cache`), runs one attack chain at one budget on it with the attacker's data split, and
verifies the attacked model with every verify variant of the scheme. Its record (one JSON line) holds the
marked and attacked test accuracy, the accuracy lost in points, the attack's cost (seconds of wall time,
attacker samples, queries -- the queries as the attack reports them in ``attack.cost``, else 0) and each
verdict (p-value, owned, alpha, statistic/n, the null hypothesis). Cells are identified by the content hash
of everything that determines them, so a rerun of the same config skips what :class:`ResultsLog` already
holds, and a changed cell (another budget, alpha or host) is a new cell.

Keys: the key of seed ``s`` is derived from the marked artifact's recipe (``Key.from_seed`` of its hash), so
it is fixed by the config, reproducible, and different for every scheme, parameter set and seed; it is
written as a key file with a commitment record before the model it marks is stored.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nnmark
from nnmark.harness.cache import ArtifactStore
from nnmark.harness.config import NO_ATTACK, AttackEntry, Plan, SchemeEntry, canonical_json, content_hash

#: in an attack's parameters, ``scheme: same`` means the scheme of the cell (e.g. ``overwrite``)
SAME_SCHEME = "same"

# -- data and hosts --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _splits(dataset_json: str) -> Any:
    from nnmark.components import REGISTRY

    d = json.loads(dataset_json)
    return REGISTRY.get("dataset", d["name"]).load()(**d["params"])


def splits_of(plan: Plan) -> Any:
    """The plan's dataset splits (train / val / test / attacker), loaded once per process."""
    return _splits(canonical_json(plan.dataset))


def new_host(arch: str, splits: Any, seed: int, arch_params: dict[str, Any] | None = None,
             paths: list[str] | None = None) -> nn.Module:
    """An untrained host of ``arch`` for ``splits``' images, its weights initialised from ``seed``: a zoo
    preset (:func:`nnmark.models.model_spec`) or a user's ``module:factory(in_shape, num_classes)``."""
    from nnmark.harness.config import resolve_architecture
    from nnmark.models import model_spec
    from nnmark.train import seeded_model

    shape, classes = tuple(splits.train.image_shape), int(splits.train.num_classes)
    found = resolve_architecture(arch, paths)
    if isinstance(found, str):
        return seeded_model(model_spec(found, shape, classes, **(arch_params or {})), seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = found(shape, classes, **(arch_params or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"architecture {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def train_config(host: dict[str, Any], seed: int, epochs: int | None = None) -> Any:
    from nnmark.train import TrainConfig

    return TrainConfig(epochs=host["epochs"] if epochs is None else epochs, batch_size=host["batch_size"],
                       optimizer=host["optimizer"], lr=host["lr"], weight_decay=host["weight_decay"], seed=seed,
                       progress=False)


def clean_recipe(plan: Plan, seed: int, arch: str | None = None, epochs: int | None = None) -> dict[str, Any]:
    """What determines a clean (unmarked) host."""
    host = dict(plan.host, arch=arch or plan.host["arch"])
    if epochs is not None:
        host["epochs"] = epochs
    if arch is not None and arch != plan.host["arch"]:
        host["arch_params"] = {}
    return {"kind": "clean", "dataset": plan.dataset, "host": host, "seed": seed, "nnmark": nnmark.__version__}


def marked_recipe(plan: Plan, scheme: SchemeEntry, seed: int, key_label: str = "owner") -> dict[str, Any]:
    """What determines a marked host: the clean recipe plus the scheme, its parameters and the key's label."""
    return {**clean_recipe(plan, seed), "kind": "marked", "scheme": scheme.name, "params": scheme.params,
            "key": f"{key_label}-{seed}"}


def key_of(recipe: dict[str, Any]) -> Any:
    """The scheme key of a marked recipe (derived from its content hash; the same recipe, the same key)."""
    from nnmark.keys import Key

    return Key.from_seed(f"nnmark-harness/{content_hash(recipe)}")


def build_artifact(plan: Plan, store: ArtifactStore, recipe: dict[str, Any]) -> bool:
    """Build the clean or marked host of ``recipe`` unless the store has it; ``True`` on a cache hit."""
    from nnmark.components import REGISTRY
    from nnmark.train import accuracy, train

    def build() -> tuple[nn.Module, dict[str, Any]]:
        splits = splits_of(plan)
        host = recipe["host"]
        model = new_host(host["arch"], splits, recipe["seed"], host.get("arch_params"), plan.paths)
        t = time.perf_counter()
        if recipe["kind"] == "clean":
            train(model, splits.train, train_config(host, recipe["seed"]))
            info: dict[str, Any] = {}
        else:
            cls = REGISTRY.get("scheme", recipe["scheme"]).load()
            scheme = cls.create(key_of(recipe), model, splits, **recipe["params"])
            scheme.embed(model, splits.train, train_config(host, recipe["seed"]))
            scheme.save(store.key_path(recipe), log=store.commitment_log(recipe))
            info = {"key_id": scheme.key.key_id}
        info.update({"test_accuracy": accuracy(model, splits.test), "train_seconds": time.perf_counter() - t})
        return model, info

    return store.build_once(recipe, build)


def load_artifact(plan: Plan, store: ArtifactStore, recipe: dict[str, Any]) -> nn.Module:
    """The stored host of ``recipe`` (eval mode)."""
    splits = splits_of(plan)
    host = recipe["host"]
    model = new_host(host["arch"], splits, recipe["seed"], host.get("arch_params"), plan.paths)
    model.load_state_dict(store.state(recipe), strict=True)
    return model.eval()


def load_owner_scheme(plan: Plan, store: ArtifactStore, recipe: dict[str, Any]) -> Any:
    """The scheme of a marked recipe from its committed key file, calibrated on the plan's clean reference
    hosts when it needs a measured null."""
    from nnmark.schemes import load_scheme

    scheme = load_scheme(store.key_path(recipe), expect=recipe["scheme"], log=store.commitment_log(recipe))
    if scheme.needs_references():
        scheme.calibrate([load_artifact(plan, store, clean_recipe(plan, s)) for s in plan.references])
    return scheme


def needs_references(plan: Plan, scheme: SchemeEntry) -> bool:
    """Whether ``scheme`` with its parameters verifies against a null measured on clean reference hosts."""
    from nnmark.components import REGISTRY
    from nnmark.keys import Key

    cls = REGISTRY.get("scheme", scheme.name).load()
    if not hasattr(cls, "needs_references"):
        return False
    try:
        model = new_host(plan.host["arch"], splits_of(plan), 0, plan.host.get("arch_params"), plan.paths)
        return bool(cls.create(Key.from_seed("probe"), model, splits_of(plan), **scheme.params).needs_references())
    except Exception:  # noqa: BLE001 - a scheme that cannot be probed is built (and reports) in its cell
        return False


# -- cells -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One grid cell: a scheme, an attack row at one budget, a seed."""

    scheme: SchemeEntry
    attack: AttackEntry
    budget: Any
    seed: int

    def steps(self) -> list[dict[str, Any]]:
        return self.attack.steps_for(self.budget)

    def ident(self, plan: Plan) -> str:
        """Content hash of everything the cell's record depends on."""
        return content_hash({"marked": marked_recipe(plan, self.scheme, self.seed), "variants": self.scheme.variants,
                             "steps": self.steps(), "alpha": plan.alpha, "references": plan.references})


def cells(plan: Plan) -> list[Cell]:
    """Every cell of the plan, scheme-major (scheme, seed, attack, budget)."""
    return [Cell(s, a, b, seed) for s in plan.schemes for seed in plan.seeds for a in plan.attacks for b in a.budgets]


def verdict_row(verdict: Any, variant: dict[str, Any]) -> dict[str, Any]:
    """The parts of a verdict a results row keeps."""
    n = int(verdict.n)
    return {"verify": variant, "p_value": float(verdict.p_value), "owned": bool(verdict.owned),
            "alpha": float(verdict.alpha), "statistic": float(verdict.statistic), "n": n,
            "score": float(verdict.statistic) / n if n else None, "status": verdict.details.get("status"),
            "null_hypothesis": verdict.null_hypothesis}


def _scheme_assignments(params: dict[str, Any]) -> list[str]:
    """A scheme's parsed parameters as ``KEY=VALUE`` strings (``None``: left to the scheme's default)."""
    out = []
    for k, v in sorted(params.items()):
        if v is None:
            continue
        out.append(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    return out


def resolve_same_scheme(steps: list[dict[str, Any]], scheme: SchemeEntry) -> list[dict[str, Any]]:
    """Steps with ``scheme: same`` (an attack that embeds a scheme of its own, e.g. ``overwrite``) set to the
    cell's scheme and, unless the step gives them, its parameters."""
    out = []
    for step in steps:
        params = dict(step["params"])
        if params.get("scheme") == SAME_SCHEME:
            params["scheme"] = scheme.name
            params.setdefault("scheme_params", _scheme_assignments(scheme.params))
        out.append({"name": step["name"], "params": params})
    return out


def uses_data(attack: Any) -> bool:
    """Whether ``attack`` is handed the attacker's data: it needs data, or its budget (fine-tuning epochs after
    pruning or quantising, say) is set above zero."""
    budget = getattr(attack, "budget", None)
    return bool(attack.needs_data or (budget and getattr(attack, budget, None) not in (None, 0)))


def verify_variants(scheme: Any, target: nn.Module, entry: SchemeEntry, alpha: float) -> list[dict[str, Any]]:
    """A verdict row for each verify variant of ``entry``; a verifier that refuses the suspect (another
    architecture, no carrier tensor: an :class:`~nnmark.errors.NNMarkError`) gives a row with ``refused`` and
    ``owned`` False -- the owner cannot claim that model with this key."""
    from nnmark.errors import NNMarkError

    rows = []
    for v in entry.variants:
        try:
            rows.append(verdict_row(scheme.verify(target, alpha=alpha, **v), v))
        except NNMarkError as exc:
            rows.append({"verify": v, "refused": f"{type(exc).__name__}: {exc}"[:300], "owned": False,
                         "p_value": None, "alpha": alpha, "score": None})
    return rows


def run_attack_chain(steps: list[dict[str, Any]], model: nn.Module, attacker_data: Any, seed: int,
                     attacks_out: list[Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Run the chain's attacks in order (step ``j`` seeded ``seed * 100 + j``); returns the attacked model and
    the cost: ``seconds`` (wall time), ``data_n`` (attacker samples used: the attack's ``cost["samples"]``, else
    the split's size for an attack that needs data; the same split counted once over the chain), ``queries``
    (summed from each attack's ``cost["queries"]``)."""
    from nnmark.attacks import build_attack

    seconds, queries, data_n, reported = 0.0, 0, 0, []
    for j, step in enumerate(steps):
        attack = build_attack(step["name"], **step["params"], seed=seed * 100 + j)
        t = time.perf_counter()
        model = attack.attack(model, attacker_data if uses_data(attack) else None)
        seconds += time.perf_counter() - t
        if attacks_out is not None:
            attacks_out.append(attack)
        cost = getattr(attack, "cost", None)
        if isinstance(cost, dict):
            reported.append({"attack": step["name"], **{k: v for k, v in cost.items()
                                                         if isinstance(v, (int, float, str, bool))}})
            queries += int(cost.get("queries", 0) or 0)
        used = cost.get("samples") if isinstance(cost, dict) and "samples" in cost else \
            (len(attacker_data) if uses_data(attack) else 0)
        data_n = max(data_n, int(used or 0))
    return model, {"seconds": seconds, "data_n": data_n, "queries": queries, "reported": reported}


def run_cell(plan: Plan, store: ArtifactStore, cell: Cell) -> dict[str, Any]:
    """Run one cell (its marked host must exist or is built here) and return its record."""
    from nnmark.train import accuracy

    start = time.perf_counter()
    recipe = marked_recipe(plan, cell.scheme, cell.seed)
    record: dict[str, Any] = {"cell": cell.ident(plan), "scheme": cell.scheme.label, "scheme_name": cell.scheme.name,
                              "access": cell.scheme.access, "attack": cell.attack.label, "budget": cell.budget,
                              "budget_param": cell.attack.budget_param, "seed": cell.seed, "steps": cell.steps(),
                              "variants": list(cell.scheme.variants),
                              "marked_artifact": store.address(recipe), "pid": os.getpid()}
    if cell.attack.applies_to is not None and cell.scheme.access not in cell.attack.applies_to:
        record.update(status="n/a", reason=f"attack applies to {', '.join(cell.attack.applies_to)} schemes only",
                      seconds=time.perf_counter() - start)
        return record
    try:
        hit = build_artifact(plan, store, recipe)
        record["host_cache"] = "hit" if hit else "built"
        splits = splits_of(plan)
        scheme = load_owner_scheme(plan, store, recipe)
        marked = load_artifact(plan, store, recipe)
        record["accuracy_marked"] = accuracy(marked, splits.test)
        if cell.attack.label == NO_ATTACK or not cell.steps():
            attacked, cost = marked, {"seconds": 0.0, "data_n": 0, "queries": 0, "reported": []}
        else:
            ran: list[Any] = []
            attacked, cost = run_attack_chain(resolve_same_scheme(cell.steps(), cell.scheme), marked,
                                              splits.attacker, cell.seed, ran)
            rival = next((a.attacker_scheme for a in ran if getattr(a, "attacker_scheme", None) is not None), None)
            if rival is not None:  # an overwrite: can the attacker's own key claim the models?
                record["attacker_claim"] = {
                    "key_id": rival.key.key_id,
                    "on_attacked": verdict_row(rival.verify(attacked, alpha=plan.alpha), {}),
                    "on_owner_original": verdict_row(rival.verify(marked, alpha=plan.alpha), {})}
        record["accuracy_attacked"] = accuracy(attacked, splits.test)
        record["accuracy_lost_points"] = 100.0 * (record["accuracy_marked"] - record["accuracy_attacked"])
        record["cost"] = cost
        record["verdicts"] = verify_variants(scheme, attacked, cell.scheme, plan.alpha)
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing cell is recorded (and reported), not fatal to the grid
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=6)
    record["seconds"] = time.perf_counter() - start
    return record


# -- results log -----------------------------------------------------------------------------------------


class ResultsLog:
    """``results.jsonl``: one JSON record a finished cell, appended and fsynced under an exclusive ``flock`` of
    the log (runs sharing a folder append one at a time; a kill loses at most the line being written; a torn last
    line is ignored on reading and cut off before the next append)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "cell" in rec:
                out.append(rec)
        return out

    def finished(self) -> set[str]:
        """Ids of the cells recorded so far, except those that ended in an error (a rerun tries them again;
        the report keeps each cell's latest record)."""
        return {r["cell"] for r in self.records() if r.get("status") != "error"}

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with open(self.path, "ab+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # another run on the same folder appends to the same log
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line from a killed writer: drop it
                    fh.seek(0)
                    text = fh.read()
                    fh.seek(0)
                    fh.truncate()
                    fh.write(text[: text.rfind(b"\n") + 1])
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
