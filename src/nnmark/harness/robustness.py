"""Per scheme, the cheapest attack in the grid that removes it: the honest robustness statement.

An attack row (label and budget) *removes* a scheme (with one verify variant) when, at every seed of the grid,
the cell ran, the verdict on the attacked model is not ``owned`` at the plan's alpha (or the verifier refused
the attacked model -- e.g. a key for another architecture -- so the owner cannot claim it), and the attacked
model lost at most ``max_loss`` points (default 5) of test accuracy. *Cheapest* orders the removing rows by the
attacker's resources, lexicographically: attacker samples used (``data_n``; a data-free attack is cheaper
than any that needs data), then queries, then the mean wall-clock seconds the attack took. A scheme no row
removes is reported as such -- for this grid only: an attack that is not in the grid is not evidence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from nnmark.harness.config import NO_ATTACK

MAX_LOSS_POINTS = 5.0


def variant_label(variant: dict[str, Any]) -> str:
    """``align=on`` style text for a verify variant (``default`` when empty)."""
    if not variant:
        return "default"
    return ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in sorted(variant.items()))


def groups(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    """Cells grouped by (scheme, verify variant, attack, budget); each entry the cell's figures for that variant."""
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    records = list(records)
    seen: dict[str, list[dict[str, Any]]] = {}  # a scheme's verify variants, for records that hold no verdict
    for rec in records:
        if rec.get("verdicts"):
            seen.setdefault(rec["scheme"], [{"verify": v["verify"]} for v in rec["verdicts"]])
        elif rec.get("variants"):
            seen.setdefault(rec["scheme"], [{"verify": v} for v in rec["variants"]])
    for rec in records:
        if rec.get("status") == "n/a":  # an attack that does not apply to the scheme's access
            continue
        variants = rec.get("verdicts") or seen.get(rec["scheme"]) or [{"verify": {}}]
        for v in variants:
            key = (rec["scheme"], variant_label(v.get("verify", {})), rec["attack"], json.dumps(rec.get("budget")))
            out.setdefault(key, []).append({"record": rec, "verdict": v})
    return out


def group_outcome(entries: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS) -> dict[str, Any]:
    """What one attack row did to one scheme variant over the seeds: removed or not, and its mean cost."""
    ok = [e for e in entries if e["record"].get("status") == "ok"]
    lost = [e["record"]["accuracy_lost_points"] for e in ok]
    owned = [bool(e["verdict"].get("owned")) for e in ok]
    ps = [float(e["verdict"]["p_value"]) for e in ok if e["verdict"].get("p_value") is not None]
    refused = sum("refused" in e["verdict"] for e in ok)
    removed_all = bool(ok) and len(ok) == len(entries) and not any(owned)
    within = bool(lost) and max(lost) <= max_loss
    cost = [e["record"].get("cost", {}) for e in ok]

    def mean(vals: list[float]) -> float | None:
        return sum(vals) / len(vals) if vals else None

    return {"seeds": len(entries), "errors": len(entries) - len(ok), "owned": sum(owned), "refused": refused,
            "removed": removed_all and within, "removed_but_costly": removed_all and not within,
            "max_p": max(ps) if ps else None, "min_p": min(ps) if ps else None,
            "mean_lost_points": mean(lost), "max_lost_points": max(lost) if lost else None,
            "mean_score": mean([e["verdict"].get("score") for e in ok if e["verdict"].get("score") is not None]),
            "seconds": mean([c.get("seconds", 0.0) for c in cost]), "data_n": max([c.get("data_n", 0) for c in cost],
                                                                                 default=0),
            "queries": max([c.get("queries", 0) for c in cost], default=0)}


def robustness_table(records: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS) -> list[dict[str, Any]]:
    """One row a (scheme, verify variant): the cheapest removing attack row (or none), with every removing row
    and the rows that removed the mark only at a larger accuracy loss."""
    by_variant: dict[tuple[str, str], list[tuple[str, str, dict[str, Any]]]] = {}
    baselines = unattacked(records)
    for (scheme, variant, attack, budget), entries in groups(records).items():
        if attack == NO_ATTACK:
            continue
        by_variant.setdefault((scheme, variant), []).append((attack, budget, group_outcome(entries, max_loss)))
    rows = []
    for (scheme, variant), outcomes in sorted(by_variant.items()):
        base = baselines.get((scheme, variant))
        if base is not None and base["owned"] < base["seeds"]:  # nothing to remove: no removal is claimed
            outcomes = [(a, b, {**o, "removed": False, "removed_but_costly": False}) for a, b, o in outcomes]
        removing = sorted((o for o in outcomes if o[2]["removed"]),
                          key=lambda o: (o[2]["data_n"], o[2]["queries"], o[2]["seconds"] or 0.0))
        costly = [o for o in outcomes if o[2]["removed_but_costly"]]
        best = removing[0] if removing else None
        rows.append({"scheme": scheme, "verify": variant, "attacks_tried": len(outcomes),
                     "not_embedded": None if base is None or base["owned"] == base["seeds"] else
                     f"unattacked model owned at {base['owned']}/{base['seeds']} seeds",
                     "cheapest": None if best is None else attack_name(best[0], best[1]),
                     "cheapest_outcome": None if best is None else best[2],
                     "removing": [attack_name(a, b) for a, b, _ in removing],
                     "removed_only_beyond_loss": [attack_name(a, b) for a, b, _ in costly]})
    return rows


def unattacked(records: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS) -> dict[tuple[str, str], Any]:
    """The no-attack row's outcome of each (scheme, verify variant) that has one: a mark whose unattacked model
    is not owned at every seed was not (reliably) embedded, and no attack can be said to remove it."""
    return {(scheme, variant): group_outcome(entries, max_loss)
            for (scheme, variant, attack, _), entries in groups(records).items() if attack == NO_ATTACK}


def attack_name(attack: str, budget_json: str) -> str:
    """``ftal@200`` for a budgeted row, the label alone otherwise."""
    budget = json.loads(budget_json)
    return attack if budget is None else f"{attack}@{budget}"


def robustness_markdown(rows: list[dict[str, Any]], alpha: float, max_loss: float = MAX_LOSS_POINTS) -> str:
    """The table as Markdown, with the rule that made it."""
    lines = [f"| scheme | verify | cheapest removing attack (<= {max_loss:g} points lost) | its cost | "
             "p after it (max over seeds) | accuracy lost (max) | removing rows | removed only beyond the loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["cheapest_outcome"]
        if r.get("not_embedded"):
            cheapest, cost, p, lost = f"not embedded: {r['not_embedded']}", "", "", ""
        elif o is None:
            cheapest, cost, p, lost = f"none of {r['attacks_tried']} rows", "", "", ""
        else:
            cheapest = r["cheapest"]
            cost = f"{o['data_n']} samples, {o['queries']} queries, {o['seconds']:.2f} s"
            p, lost = f"{o['max_p']:.3g}", f"{o['max_lost_points']:.1f}"
        lines.append(f"| {r['scheme']} | {r['verify']} | {cheapest} | {cost} | {p} | {lost} | "
                     f"{len(r['removing'])} | {', '.join(r['removed_only_beyond_loss']) or '-'} |")
    rule = (f"An attack row removes a scheme when at every seed the verdict on the attacked model is not owned at "
            f"alpha = {alpha:g} and at most {max_loss:g} points of test accuracy were lost. Cheapest: fewest attacker "
            "samples, then fewest queries, then least wall time. 'none' holds for the attacks in this grid only. A "
            "scheme whose unattacked model is not owned at every seed is reported as not embedded: no attack is "
            "credited with removing it.")
    return "\n".join(lines) + "\n\n" + rule + "\n"


# -- the SoK's main table: schemes x attack families -------------------------------------------------------

#: attack name -> family; families follow the SoK's taxonomy of removal attacks (Lukas et al., S&P 2022): input
#: preprocessing, model modification (fine-tuning, pruning, quantisation, function-preserving obfuscation,
#: overwriting) and model extraction
ATTACK_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("input-jpeg", "input-noise", "input-quantize", "input-smooth", "magnet"), "input preprocessing"),
    **dict.fromkeys(("ftll", "ftal", "rtll", "rtal", "ft-sgd", "weight-shift"), "fine-tuning"),
    **dict.fromkeys(("prune", "fine-prune"), "pruning"),
    **dict.fromkeys(("quantize", "int8-ptq"), "quantisation"),
    **dict.fromkeys(("permute", "rescale", "permute-rescale", "fold-bn", "split", "dummy", "merge"), "obfuscation"),
    "overwrite": "overwriting",
    **dict.fromkeys(("distill", "transfer"), "extraction"),
}
#: the SoK's three classes of removal attack, for each family
SOK_CLASS = {"input preprocessing": "input preprocessing", "fine-tuning": "model modification",
             "pruning": "model modification", "quantisation": "model modification",
             "obfuscation": "model modification", "overwriting": "model modification", "extraction": "model extraction",
             "combined": "combined", "other": "other"}
FAMILY_ORDER = tuple(SOK_CLASS)

#: what the SoK published (its abstract; PAPERS.md holds no per-scheme figures of it), shown beside the table
SOK_FINDING = ("The SoK (Lukas et al., S&P 2022; CIFAR-10 and ImageNet, a 5-point accuracy budget) found none of "
               "the schemes it surveyed robust in practice: each was removed by some attack, including attacks the "
               "schemes' own papers had not tried -- adaptive ones (weight shifting, smooth retraining) and ways of "
               "deriving a surrogate model (extraction).")


def family_of(steps: list[dict[str, Any]]) -> str | None:
    """The family of an attack row from its steps: the one family of its attacks, ``combined`` for a chain over
    several families, ``other`` for an attack not in :data:`ATTACK_FAMILIES`, ``None`` for the no-attack row."""
    families = {ATTACK_FAMILIES.get(s["name"], "other") for s in steps}
    if not families:
        return None
    return families.pop() if len(families) == 1 else "combined"


def family_table(records: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS) -> dict[str, Any]:
    """Schemes x attack families: for each (scheme, verify variant) and each family with rows in the grid, the
    cheapest row of the family that removes the scheme within ``max_loss`` points (the order of
    :func:`robustness_table`), or none, with the rows tried and those that removed it only beyond the loss.
    Returns ``{"families": [...], "rows": [{"scheme", "verify", "cells": {family: {...}}}]}``."""
    by_variant: dict[tuple[str, str], dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    present: set[str] = set()
    for (scheme, variant, attack, budget), entries in groups(records).items():
        family = family_of(entries[0]["record"].get("steps") or [])
        if attack == NO_ATTACK or family is None:
            continue
        present.add(family)
        by_variant.setdefault((scheme, variant), {}).setdefault(family, []).append(
            (attack_name(attack, budget), group_outcome(entries, max_loss)))
    families = [f for f in FAMILY_ORDER if f in present]
    rows = []
    baselines = unattacked(records, max_loss)
    for (scheme, variant), fams in sorted(by_variant.items()):
        cells = {}
        base = baselines.get((scheme, variant))
        not_embedded = base is not None and base["owned"] < base["seeds"]
        for family, outcomes in fams.items():
            if not_embedded:
                outcomes = [(n, {**o, "removed": False, "removed_but_costly": False}) for n, o in outcomes]
            removing = sorted((o for o in outcomes if o[1]["removed"]),
                              key=lambda o: (o[1]["data_n"], o[1]["queries"], o[1]["seconds"] or 0.0))
            cells[family] = {"tried": len(outcomes), "cheapest": removing[0][0] if removing else None,
                             "outcome": removing[0][1] if removing else None, "removing": len(removing),
                             "beyond_loss": [name for name, o in outcomes if o["removed_but_costly"]]}
        rows.append({"scheme": scheme, "verify": variant, "cells": cells,
                     "not_embedded": f"unattacked model owned at {base['owned']}/{base['seeds']} seeds"
                     if not_embedded else None})
    return {"families": families, "rows": rows}


def family_cell_text(cell: dict[str, Any] | None) -> str:
    """``removed: ROW (N samples, Q queries, L pts)`` / ``kept (n rows)`` / ``-`` (no row of the family)."""
    if cell is None:
        return "-"
    o = cell["outcome"]
    if o is not None:
        return (f"removed: {cell['cheapest']} ({o['data_n']} samples, {o['queries']} queries, "
                f"{o['max_lost_points']:.1f} pts)")
    beyond = f"; removed beyond the loss by {', '.join(cell['beyond_loss'])}" if cell["beyond_loss"] else ""
    return f"kept ({cell['tried']} row{'s' if cell['tried'] != 1 else ''}{beyond})"


def family_markdown(table: dict[str, Any], alpha: float, max_loss: float = MAX_LOSS_POINTS) -> str:
    """The schemes x families table as Markdown, the rule that made it, and the SoK's finding beside this grid's."""
    fams = table["families"]
    if not table["rows"]:
        return "No attacked cells recorded.\n"
    lines = ["| scheme | verify | " + " | ".join(f"{f} ({SOK_CLASS[f]})" if SOK_CLASS[f] != f else f for f in fams)
             + " |", "|---|---|" + "---|" * len(fams)]
    for r in table["rows"]:
        if r.get("not_embedded"):
            lines.append(f"| {r['scheme']} | {r['verify']} | " + " | ".join(
                f"not embedded ({r['not_embedded']})" for _ in fams) + " |")
            continue
        lines.append(f"| {r['scheme']} | {r['verify']} | "
                     + " | ".join(family_cell_text(r["cells"].get(f)) for f in fams) + " |")
    rows = [r for r in table["rows"] if not r.get("not_embedded")]
    removed = [r for r in rows if any(c["outcome"] is not None for c in r["cells"].values())]
    kept = [f"{r['scheme']} ({r['verify']})" for r in rows if r not in removed]
    unembedded = [f"{r['scheme']} ({r['verify']})" for r in table["rows"] if r.get("not_embedded")]
    rule = (f"A family removes a scheme when one of its rows does: at every seed not owned at alpha = {alpha:g} "
            f"(or refused by the verifier) with at most {max_loss:g} points of test accuracy lost; the cell names "
            "the family's cheapest such row (fewest attacker samples, then queries, then seconds).")
    here = (f"In this grid: {len(removed)} of {len(rows)} embedded scheme variants are removed by at least one "
            "family within the loss" + (f"; no family here removes {', '.join(kept)}" if kept else "")
            + " (for the rows of this grid only)"
            + (f"; not embedded (the unattacked model is not owned at every seed, so nothing is credited with "
               f"removing it): {', '.join(unembedded)}" if unembedded else "") + ".")
    return "\n".join(lines) + "\n\n" + rule + "\n\n" + SOK_FINDING + " " + here + "\n"
