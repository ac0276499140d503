"""The forgery study: an attacker without the key tries to make the owner's marked model "verify" under a key
of its own (ambiguity attacks, :mod:`nnmark.attacks.forgery`).

For every scheme and grid seed, on the owner's marked host:

- white-box schemes: a key search -- ``tries`` fresh keys of the scheme's own construction, each verified on
  the model; the smallest p-value reached, and a Kolmogorov-Smirnov test of the tries' p-values against the
  uniform law (an honest null gives uniform p-values, so the search reaches about 1/tries);
- trigger sets: the model's own targeted adversarial examples of the attacker's images as a trigger set. Its
  raw statistic claims the model (the model answers them as the forger chose); the record then shows what
  refuses the claim for real: the forged key committed now, verified with ``suspect_seen_at`` = when the
  owner's model was stored, is refused by the commitment rule; and how far the forged set transfers to the
  clean hosts of the false-alarm study (independently trained models it must not claim).

A scheme is reported *forgeable* when a key search reaches p < alpha with some fresh key (the raw statistic is
forgeable; the commitment rule is not re-checked for key searches), or when forged triggers claim the model
and survive the commitment rule.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from nnmark.harness.cache import ArtifactStore
from nnmark.harness.config import Plan, content_hash
from nnmark.harness.grid import clean_recipe, load_artifact, marked_recipe, splits_of

DEFAULT_TRIES = 100
DEFAULT_EPS = 0.1


def forgery_checks(plan: Plan) -> list[dict[str, Any]]:
    """One payload a (scheme, seed), with its id and the artifacts it needs."""
    fo = plan.forgery or {}
    out = []
    fa = plan.false_alarm or {}
    transfer = [clean_recipe(plan, s, plan.host["arch"], fa.get("epochs")) for s in fa.get("clean_seeds", [])[:5]]
    for i, scheme in enumerate(plan.schemes):
        for seed in plan.seeds:
            owner = marked_recipe(plan, scheme, seed)
            ident = content_hash({"forgery": fo, "owner": owner, "alpha": plan.alpha,
                                  "transfer": transfer if scheme.access == "black-box" else []})
            out.append({"forgery": ident, "scheme": i, "seed": seed, "owner": owner,
                        "transfer": transfer if scheme.access == "black-box" else [],
                        "artifacts": [owner] + (transfer if scheme.access == "black-box" else [])})
    return out


def run_forgery(plan: Plan, store: ArtifactStore, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one forgery attempt (see the module docs) and return its record."""
    from nnmark.attacks.forgery import adversarial_trigger_forgery, key_search, uniformity

    fo = plan.forgery or {}
    entry = plan.schemes[payload["scheme"]]
    owner = payload["owner"]
    model = load_artifact(plan, store, owner)
    rec: dict[str, Any] = {"forgery": payload["forgery"], "scheme": entry.label, "seed": payload["seed"],
                           "alpha": plan.alpha}
    t = time.perf_counter()
    if entry.access == "white-box":
        tries = int(fo.get("tries", DEFAULT_TRIES))
        res = key_search(entry.name, model, tries, seed=payload["seed"], **entry.params)
        rec.update(kind="key-search", tries=tries, min_p=res["min_p"], ks_uniformity=uniformity(res["p_values"]),
                   claims=sum(p < plan.alpha for p in res["p_values"]))
        rec["forgeable"] = rec["claims"] > 0
    else:
        splits = splits_of(plan)
        n = int(fo.get("triggers", 50))
        forged = adversarial_trigger_forgery(model, splits.attacker.x[:n], int(splits.train.num_classes),
                                             eps=float(fo.get("eps", DEFAULT_EPS)), seed=payload["seed"])
        raw = forged.verify(model, alpha=plan.alpha, queries=n)
        path = store.root / "forgeries" / f"{payload['forgery']}.key"
        forged.save(path, log=path.with_suffix(".commitments.db"))
        seen = datetime.fromtimestamp(store.meta_path(owner).stat().st_mtime, tz=timezone.utc).isoformat()
        judged = forged.verify(model, alpha=plan.alpha, queries=n, suspect_seen_at=seen)
        transfer = [forged.verify(load_artifact(plan, store, r), alpha=plan.alpha, queries=n)
                    for r in payload["transfer"]]
        rec.update(kind="adversarial-triggers", triggers=n, eps=float(fo.get("eps", DEFAULT_EPS)),
                   raw_p=float(raw.p_value), raw_hits=float(raw.statistic),
                   committed_after_model={"status": judged.details.get("status"), "owned": bool(judged.owned)},
                   transfer_p=[float(v.p_value) for v in transfer],
                   transfer_claims=sum(bool(v.owned) for v in transfer))
        rec["min_p"] = rec["raw_p"]
        rec["forgeable"] = bool(judged.owned)
    rec["seconds"] = time.perf_counter() - t
    return rec


def forgery_markdown(records: list[dict[str, Any]]) -> str:
    """The forgery table as Markdown."""
    if not records:
        return "No forgery study in this config.\n"
    lines = ["| scheme | seed | attempt | smallest p reached | claims at alpha | after the commitment rule | "
             "transfer to clean hosts | forgeable |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["scheme"], r["seed"])):
        if r["kind"] == "key-search":
            attempt = f"key search, {r['tries']} keys (KS uniformity p {r['ks_uniformity']:.2f})"
            claims, after, transfer = f"{r['claims']}/{r['tries']}", "-", "-"
        else:
            attempt = f"adversarial triggers (n {r['triggers']}, eps {r['eps']:g})"
            claims = f"raw: {r['raw_hits']:.0f}/{r['triggers']} hits"
            after = f"{r['committed_after_model']['status']}, owned {r['committed_after_model']['owned']}"
            transfer = f"{r['transfer_claims']}/{len(r['transfer_p'])} claimed"
        lines.append(f"| {r['scheme']} | {r['seed']} | {attempt} | {r['min_p']:.3g} | {claims} | {after} | "
                     f"{transfer} | {'YES' if r['forgeable'] else 'no'} |")
    return "\n".join(lines) + ("\n\nForgeable -- key search: some fresh key of the attacker's (made with the scheme's "
                               "own construction, Wang's secret network fitted to the model as the forgery helper "
                               "does) claims the owner's model at alpha: the raw statistic can be forged, and only the "
                               "commitment rule (a key committed after the model existed is no evidence) refuses "
                               "it -- not re-checked for key searches here. Adversarial triggers: the forged set, "
                               "committed after the model, still claims it under the commitment rule.\n")
