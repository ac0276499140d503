"""The false-alarm study: every verifier of the plan against models it must not claim.

Suspects of each scheme: clean hosts of every ``false_alarm.clean_seeds`` x ``false_alarm.architectures``
(zoo presets and a user's ``module:factory`` nn.Modules nnmark does not ship), hosts marked with the same
scheme under other keys (``other_keys``, their own host seeds), and the grid's hosts marked with the other
schemes -- except, for each owner key, the other-scheme host of its own seed (same initialisation, see
:func:`shares_initialisation`). Verifiers: the owner key of every grid seed, with every verify variant.
A *false alarm* is a verdict ``owned`` on such a suspect; a verifier that refuses the suspect (e.g. a
white-box key on an architecture without its carrier layer: a :class:`~nnmark.errors.NNMarkError`) issues
no verdict and is counted apart.

The figure (:func:`false_alarm_rate`): the empirical false-positive rate k/n over the n distinct suspect models
that got a verdict (k: those claimed by any owner key), with
its exact two-sided Clopper-Pearson interval (95% by default), beside the nominal alpha. With k = 0 the
interval's upper end is 1 - (0.025)^(1/n) (n = 30: 0.116) -- what n models can show, not alpha itself; the
verdicts' own alpha is a per-test guarantee of the schemes' exact nulls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nnmark.harness.cache import ArtifactStore
from nnmark.harness.config import Plan, content_hash
from nnmark.harness.grid import clean_recipe, load_artifact, load_owner_scheme, marked_recipe, verdict_row

OTHER_KEY_SEED = 500


def suspects(plan: Plan, scheme_index: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(description, recipe)`` of every suspect scheme ``scheme_index`` must not claim."""
    fa = plan.false_alarm or {}
    scheme = plan.schemes[scheme_index]
    out = []
    for arch in fa.get("architectures", []):
        for seed in fa.get("clean_seeds", []):
            out.append(({"kind": "clean", "arch": arch, "seed": seed},
                        clean_recipe(plan, seed, arch, fa.get("epochs"))))
    for i in range(fa.get("other_keys", 0)):
        seed = OTHER_KEY_SEED + i
        out.append(({"kind": "other-key", "arch": plan.host["arch"], "seed": seed, "scheme": scheme.label},
                    marked_recipe(plan, scheme, seed, key_label="other")))
    for j, other in enumerate(plan.schemes):
        if j != scheme_index:
            for seed in plan.seeds:
                out.append(({"kind": "other-scheme", "arch": plan.host["arch"], "seed": seed, "scheme": other.label},
                            marked_recipe(plan, other, seed)))
    return out


def shares_initialisation(suspect: dict[str, Any], owner_seed: int) -> bool:
    """``True`` when the suspect is a grid host marked with another scheme from the owner's own host seed: it
    starts from the same random initialisation as the owner's model, which the white-box schemes' nulls
    ("a model initialised independently of the key") exclude, so it is no negative for that owner key.
    (It was counted once: wang-manu claimed the zhang-noise host of its own seed at p 9.1e-4 on mnist5k.)"""
    return suspect.get("kind") == "other-scheme" and suspect.get("seed") == owner_seed


def checks(plan: Plan) -> list[dict[str, Any]]:
    """One check a (scheme, owner seed, suspect): the payload :func:`run_check` takes, with its id and the
    artifacts it needs."""
    out = []
    for i, scheme in enumerate(plan.schemes):
        for owner_seed in plan.seeds:
            owner = marked_recipe(plan, scheme, owner_seed)
            for desc, recipe in suspects(plan, i):
                if shares_initialisation(desc, owner_seed):
                    continue
                ident = content_hash({"owner": owner, "suspect": recipe, "variants": scheme.variants,
                                      "alpha": plan.alpha, "references": plan.references})
                out.append({"check": ident, "scheme": i, "owner_seed": owner_seed, "suspect": desc,
                            "suspect_recipe": recipe, "artifacts": [owner, recipe]})
    return out


def run_check(plan: Plan, store: ArtifactStore, payload: dict[str, Any]) -> dict[str, Any]:
    """Verify one suspect with one owner key (every variant); a refusal is recorded as such."""
    from nnmark.errors import NNMarkError

    scheme_entry = plan.schemes[payload["scheme"]]
    rec: dict[str, Any] = {"check": payload["check"], "scheme": scheme_entry.label, "owner_seed": payload["owner_seed"],
                           "suspect": payload["suspect"], "alpha": plan.alpha}
    t = time.perf_counter()
    scheme = load_owner_scheme(plan, store, marked_recipe(plan, scheme_entry, payload["owner_seed"]))
    suspect = load_artifact(plan, store, payload["suspect_recipe"])
    rows = []
    for v in scheme_entry.variants:
        try:
            rows.append(verdict_row(scheme.verify(suspect, alpha=plan.alpha, **v), v))
        except (NNMarkError, ValueError, RuntimeError, KeyError) as exc:
            rows.append({"verify": v, "refused": f"{type(exc).__name__}: {exc}"[:300]})
    rec["verdicts"] = rows
    rec["seconds"] = time.perf_counter() - t
    return rec


class FalseAlarmLog:
    """``false_alarm.jsonl`` (or ``forgery.jsonl``): one record a finished check, identified by its ``key``
    field (appended, fsynced; torn lines ignored)."""

    def __init__(self, path: str | Path, key: str = "check") -> None:
        self.path = Path(path)
        self.key = key

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and self.key in rec:
                out.append(rec)
        return out

    def finished(self) -> set[str]:
        return {r[self.key] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        from nnmark.harness.grid import ResultsLog

        ResultsLog(self.path).append(record)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval of a binomial rate from ``k`` events in ``n`` trials."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def false_alarm_rate(records: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per scheme and verify variant: checks and verdicts issued, refusals, and -- over the distinct suspect
    models that got at least one verdict (``models``) -- the false alarms ``k`` (models claimed by any owner
    key), the empirical rate k/models with its Clopper-Pearson interval, the nominal alpha, the smallest p-value
    seen, and the suspects by kind. Counting models, not (key, model) pairs, keeps the interval honest when
    several owner keys test the same models."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        suspect = json.dumps(rec["suspect"], sort_keys=True)
        for row in rec.get("verdicts", []):
            key = (rec["scheme"], json.dumps(row.get("verify", {}), sort_keys=True))
            g = groups.setdefault(key, {"scheme": rec["scheme"], "verify": row.get("verify", {}), "checks": 0,
                                        "verdicts": 0, "refused": 0, "alpha": rec["alpha"], "min_p": 1.0,
                                        "kinds": {}, "architectures": set(), "accused": [], "_models": {}})
            g["checks"] += 1
            if "refused" in row:
                g["refused"] += 1
                continue
            if suspect not in g["_models"]:
                kind = rec["suspect"]["kind"]
                g["kinds"][kind] = g["kinds"].get(kind, 0) + 1
                g["architectures"].add(rec["suspect"]["arch"])
            g["verdicts"] += 1
            g["min_p"] = min(g["min_p"], row["p_value"])
            g["_models"][suspect] = g["_models"].get(suspect, False) or bool(row["owned"])
            if row["owned"]:
                g["accused"].append({**rec["suspect"], "owner_seed": rec.get("owner_seed"), "p": row["p_value"]})
    out = []
    for g in groups.values():
        models = g.pop("_models")
        n, k = len(models), sum(models.values())
        lo, hi = clopper_pearson(k, n, confidence)
        g.update({"models": n, "false_alarms": k, "rate": k / n if n else None, "ci_low": lo, "ci_high": hi,
                  "confidence": confidence, "architectures": sorted(g["architectures"])})
        out.append(g)
    return sorted(out, key=lambda g: (g["scheme"], json.dumps(g["verify"], sort_keys=True)))
