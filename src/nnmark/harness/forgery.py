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

Both attempts are reported twice: on the raw statistic (the forged key verified in memory, as if its date did
not matter) and under the commitment rule (:mod:`nnmark.commitment`): every forged key that claims the model
raw is committed now -- after the owner's model was stored -- and verified again with ``suspect_seen_at`` =
that model's storage time, which refuses a key committed after the suspect existed. A scheme is reported
``forgeable`` ("raw" / "committed") per rule; the report's column says which: ``raw only`` means only the
commitment rule stops the forgery, ``YES`` that a forged key survives it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
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
            ident = content_hash({"forgery": fo, "owner": owner, "alpha": plan.alpha, "rule": "raw+commitment",
                                  "transfer": transfer if scheme.access == "black-box" else []})
            out.append({"forgery": ident, "scheme": i, "seed": seed, "owner": owner,
                        "transfer": transfer if scheme.access == "black-box" else [],
                        "artifacts": [owner] + (transfer if scheme.access == "black-box" else [])})
    return out


def forged_key_search(scheme: str, model: Any, tries: int, seed: int, alpha: float, seen_at: str, folder: Path,
                      fit_steps: int = 40, **params: Any) -> tuple[list[float], list[dict[str, Any]]]:
    """``tries`` fresh keys of white-box ``scheme`` built for ``model`` (the attacker's construction, as
    :func:`nnmark.attacks.forgery.key_search`: Wang's secret network fitted to the model), each verified on it
    in memory (alignment off). Every key whose raw p-value is below ``alpha`` is then committed (key file and
    commitment record under ``folder``, written now) and verified again with ``suspect_seen_at=seen_at`` (the
    owner's model's storage time). Returns the raw p-values and, per claiming key, ``{"owned", "status",
    "p_value"}`` under the commitment rule."""
    import torch

    from nnmark.components import get_component
    from nnmark.keys import Key

    cls = get_component("scheme", scheme).load()
    ps: list[float] = []
    committed: list[dict[str, Any]] = []
    for i in range(int(tries)):
        s = cls.create(Key.from_seed(f"nnmark-forger-{scheme}-{seed}-{i}"), model, **params)
        if scheme.startswith("wang"):
            if scheme == "wang-manu":
                s.select(torch.arange(s.width))
            s.training_hook().finalize(model, steps=fit_steps)
        raw = s.verify(model, align=False, alpha=alpha)
        ps.append(float(raw.p_value))
        if raw.owned:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"key-{i}.json"
            s.save(path, log=folder / "commitments.db")
            judged = s.verify(model, align=False, alpha=alpha, suspect_seen_at=seen_at)
            committed.append({"owned": bool(judged.owned), "status": judged.details.get("status"),
                              "p_value": float(judged.p_value)})
    return ps, committed


def run_forgery(plan: Plan, store: ArtifactStore, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one forgery attempt (see the module docs) and return its record."""
    from nnmark.attacks.forgery import adversarial_trigger_forgery, uniformity

    fo = plan.forgery or {}
    entry = plan.schemes[payload["scheme"]]
    owner = payload["owner"]
    model = load_artifact(plan, store, owner)
    rec: dict[str, Any] = {"forgery": payload["forgery"], "scheme": entry.label, "seed": payload["seed"],
                           "alpha": plan.alpha}
    t = time.perf_counter()
    seen = datetime.fromtimestamp(store.meta_path(owner).stat().st_mtime, tz=timezone.utc).isoformat()
    if entry.access == "white-box":
        tries = int(fo.get("tries", DEFAULT_TRIES))
        ps, committed = forged_key_search(entry.name, model, tries, payload["seed"], plan.alpha, seen,
                                          store.root / "forgeries" / payload["forgery"], **entry.params)
        rec.update(kind="key-search", tries=tries, min_p=float(min(ps)), ks_uniformity=uniformity(ps),
                   claims=sum(p < plan.alpha for p in ps), committed_claims=sum(v["owned"] for v in committed),
                   committed_statuses=sorted({str(v["status"]) for v in committed}))
        rec["forgeable_raw"] = rec["claims"] > 0
        rec["forgeable"] = rec["committed_claims"] > 0
    else:
        splits = splits_of(plan)
        n = int(fo.get("triggers", 50))
        forged = adversarial_trigger_forgery(model, splits.attacker.x[:n], int(splits.train.num_classes),
                                             eps=float(fo.get("eps", DEFAULT_EPS)), seed=payload["seed"])
        raw = forged.verify(model, alpha=plan.alpha, queries=n)
        path = store.root / "forgeries" / f"{payload['forgery']}.key"
        forged.save(path, log=path.with_suffix(".commitments.db"))
        judged = forged.verify(model, alpha=plan.alpha, queries=n, suspect_seen_at=seen)
        transfer = [forged.verify(load_artifact(plan, store, r), alpha=plan.alpha, queries=n)
                    for r in payload["transfer"]]
        rec.update(kind="adversarial-triggers", triggers=n, eps=float(fo.get("eps", DEFAULT_EPS)),
                   raw_p=float(raw.p_value), raw_hits=float(raw.statistic),
                   committed_after_model={"status": judged.details.get("status"), "owned": bool(judged.owned)},
                   transfer_p=[float(v.p_value) for v in transfer],
                   transfer_claims=sum(bool(v.owned) for v in transfer))
        rec["min_p"] = rec["raw_p"]
        rec["forgeable_raw"] = bool(raw.owned)
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
            claims, transfer = f"{r['claims']}/{r['tries']}", "-"
            after = (f"{r['committed_claims']}/{r['claims']} still claim ({', '.join(r['committed_statuses'])})"
                     if r.get("claims") and "committed_claims" in r else "-" if "committed_claims" in r
                     else "not checked")
        else:
            attempt = f"adversarial triggers (n {r['triggers']}, eps {r['eps']:g})"
            claims = f"raw: {r['raw_hits']:.0f}/{r['triggers']} hits"
            after = f"{r['committed_after_model']['status']}, owned {r['committed_after_model']['owned']}"
            transfer = f"{r['transfer_claims']}/{len(r['transfer_p'])} claimed"
        lines.append(f"| {r['scheme']} | {r['seed']} | {attempt} | {r['min_p']:.3g} | {claims} | {after} | "
                     f"{transfer} | {forgeable_label(r)} |")
    return "\n".join(lines) + ("\n\nForgeable: YES -- a forged key (a fresh key of the scheme's own construction, "
                               "Wang's secret network fitted to the model; or the model's own adversarial examples as "
                               "a trigger set) claims the owner's model at alpha even under the commitment rule; "
                               "raw only -- forged keys claim it on the raw statistic, and every one of them is "
                               "refused by the commitment rule (committed after the model existed: no evidence); "
                               "no -- no forged key claims it even raw.\n")


def forgeable_label(r: dict[str, Any]) -> str:
    """The forgeable column of a forgery record: ``YES`` (a forged key survives the commitment rule),
    ``raw only`` (forged keys claim on the raw statistic; the commitment rule refuses every one) or ``no``."""
    if r["forgeable"]:
        return "YES"
    raw = r.get("forgeable_raw", r.get("claims", 0) > 0 if r["kind"] == "key-search" else r["raw_p"] < r["alpha"])
    return "raw only" if raw else "no"
