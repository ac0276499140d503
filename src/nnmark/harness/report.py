"""Reports of an evaluation folder: CSV, Markdown, plots and an HTML page that opens in a browser.

:func:`write_reports` reads ``results.jsonl`` (and ``false_alarm.jsonl``) and writes

- ``results.csv``: one row a cell and verify variant (scheme, verify, attack, budget, seed, status, marked /
  attacked accuracy, points lost, cost seconds / samples / queries, p-value, -log10 p, owned, alpha, score);
- ``summary.md``: the main table (attack rows x schemes: removed or not at <= 5 points lost), the SoK's main table
  (schemes x attack families, with each family's cheapest removing row, beside the SoK's finding), the per-row
  figures, and the false-alarm table; ``robustness.md`` (both robustness tables, :mod:`nnmark.harness.robustness`);
  ``false_alarm.md``;
- ``plots/``: -log10 p and the score (bit accuracy, or trigger hit rate) against the accuracy lost and against
  the attack's wall time, one panel a scheme;
- ``report.html`` from the Jinja2 template ``templates/report.html.j2`` (images linked relatively, so the folder
  can be moved or served as it is).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from nnmark.harness.config import NO_ATTACK, Plan
from nnmark.harness.falsealarm import FalseAlarmLog, checks, false_alarm_rate
from nnmark.harness.forgery import forgeable_label, forgery_markdown
from nnmark.harness.grid import ResultsLog, cells
from nnmark.harness.robustness import (
    MAX_LOSS_POINTS,
    SOK_FINDING,
    attack_name,
    family_cell_text,
    family_markdown,
    family_table,
    group_outcome,
    groups,
    robustness_markdown,
    robustness_table,
    variant_label,
)
from nnmark.harness.tracing import tracing_markdown, tracing_table

CSV_COLUMNS = ("scheme", "verify", "attack", "budget", "seed", "status", "accuracy_marked", "accuracy_attacked",
               "accuracy_lost_points", "cost_seconds", "cost_data_n", "cost_queries", "p_value", "neg_log10_p",
               "owned", "alpha", "score", "error")


def neg_log10(p: float | None) -> float | None:
    """-log10 p, with p floored at 1e-300 (a p-value that underflowed to 0 plots at 300)."""
    if p is None:
        return None
    return -math.log10(max(float(p), 1e-300))


def rows_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows: one a cell and verify variant (an errored cell: one row with its error)."""
    out = []
    for rec in records:
        if rec.get("status") == "n/a":
            continue
        cost = rec.get("cost") or {}
        base = {"scheme": rec["scheme"], "attack": rec["attack"], "budget": rec.get("budget"), "seed": rec["seed"],
                "status": rec.get("status"), "accuracy_marked": rec.get("accuracy_marked"),
                "accuracy_attacked": rec.get("accuracy_attacked"),
                "accuracy_lost_points": rec.get("accuracy_lost_points"), "cost_seconds": cost.get("seconds"),
                "cost_data_n": cost.get("data_n"), "cost_queries": cost.get("queries"), "error": rec.get("error")}
        for v in rec.get("verdicts") or [{}]:
            out.append({**base, "verify": variant_label(v.get("verify", {})), "p_value": v.get("p_value"),
                        "neg_log10_p": neg_log10(v.get("p_value")), "owned": v.get("owned"), "alpha": v.get("alpha"),
                        "score": v.get("score"), "error": v.get("refused") or base["error"]})
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main_table(records: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS,
               order: list[str] | None = None) -> dict[str, Any]:
    """The SoK-style matrix: rows (scheme, verify variant), columns attack rows in config order; each entry
    ``{"mark": "removed" | "kept" | "removed, > N pts" | "error", "p": max p over seeds, "lost": max points}``.
    ``order``: the column order (default: as first recorded)."""
    g = groups(records)
    columns: list[str] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for (scheme, variant, attack, budget), entries in g.items():
        col = attack_name(attack, budget)
        if col not in columns:
            columns.append(col)
        o = group_outcome(entries, max_loss)
        if o["errors"]:
            mark = "error"
        elif attack == NO_ATTACK:
            mark = "kept" if o["owned"] == o["seeds"] else f"not owned ({o['seeds'] - o['owned']}/{o['seeds']})"
        elif o["removed"] and o["refused"]:
            mark = "removed (verifier refused)"
        elif o["removed"]:
            mark = "removed"
        elif o["removed_but_costly"]:
            mark = f"removed, > {max_loss:g} pts"
        else:
            mark = "kept"
        rows.setdefault((scheme, variant), {})[col] = {"mark": mark, "p": o["max_p"], "lost": o["max_lost_points"],
                                                       "owned": o["owned"], "seeds": o["seeds"]}
    if order:  # the config's order of attack rows; rows no longer in the config last
        rank = {c: i for i, c in enumerate(order)}
        columns.sort(key=lambda c: rank.get(c, len(rank)))
    return {"columns": columns, "rows": [{"scheme": s, "verify": v, "cells": rows[(s, v)]} for (s, v) in rows]}


def main_table_markdown(table: dict[str, Any]) -> str:
    """The main table as Markdown: one row an attack row, one column a scheme and verify variant (the SoK's
    layout)."""
    heads = [f"{r['scheme']} ({r['verify']})" for r in table["rows"]]
    lines = ["| attack | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for c in table["columns"]:
        cells = []
        for r in table["rows"]:
            e = r["cells"].get(c)
            cells.append("n/a" if e is None else e["mark"])
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detail_markdown(records: list[dict[str, Any]], max_loss: float = MAX_LOSS_POINTS) -> str:
    lines = ["| scheme | verify | attack | owned (seeds) | max p | mean score | mean pts lost | max pts lost | "
             "mean s | samples | queries |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (scheme, variant, attack, budget), entries in groups(records).items():
        o = group_outcome(entries, max_loss)

        def f(x: Any, fmt: str) -> str:
            return "" if x is None else format(x, fmt)

        lines.append(f"| {scheme} | {variant} | {attack_name(attack, budget)} | {o['owned']}/{o['seeds']}"
                     f"{' (' + str(o['errors']) + ' errors)' if o['errors'] else ''} | {f(o['max_p'], '.3g')} | "
                     f"{f(o['mean_score'], '.3f')} | {f(o['mean_lost_points'], '.1f')} | "
                     f"{f(o['max_lost_points'], '.1f')} | {f(o['seconds'], '.2f')} | {o['data_n']} | {o['queries']} |")
    return "\n".join(lines) + "\n"


def false_alarm_markdown(rates: list[dict[str, Any]]) -> str:
    if not rates:
        return "No false-alarm study in this config.\n"
    note = ("models: distinct suspects that got a verdict; a false alarm: a model claimed (owned at alpha) by any "
            "owner key of the scheme; the interval is over models. refused: the verifier could not read the suspect "
            "(no verdict, no claim).\n\n")
    lines = ["| scheme | verify | checks | verdicts | refused | models | false alarms | empirical FPR | "
             "95% Clopper-Pearson | nominal alpha | smallest p | architectures | models by kind |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in rates:
        rate = "" if g["rate"] is None else f"{g['rate']:.3g}"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(g["kinds"].items()))
        lines.append(f"| {g['scheme']} | {variant_label(g['verify'])} | {g['checks']} | {g['verdicts']} | "
                     f"{g['refused']} | {g['models']} | {g['false_alarms']} | {rate} | "
                     f"[{g['ci_low']:.3g}, {g['ci_high']:.3g}] | "
                     f"{g['alpha']:g} | {g['min_p']:.3g} | {', '.join(g['architectures'])} | {kinds} |")
    return note + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], folder: Path, alpha: float) -> list[str]:
    """The plots (PNG, under ``folder/plots``); returns their paths relative to ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["p_value"] is not None]
    panels = sorted({(r["scheme"], r["verify"]) for r in ok})
    if not panels:
        return []
    attacks = sorted({r["attack"] for r in ok})
    cmap = plt.get_cmap("tab20")
    colour = {a: cmap(i % 20) for i, a in enumerate(attacks)}
    (folder / "plots").mkdir(exist_ok=True)
    written = []
    specs = [("neg_log10_p", "accuracy_lost_points", "-log10 p", "test accuracy lost (points)", "p_vs_accuracy_lost"),
             ("neg_log10_p", "cost_seconds", "-log10 p", "attack wall time (s)", "p_vs_cost"),
             ("score", "accuracy_lost_points", "score (bit accuracy / trigger hit rate)", "test accuracy lost (points)",
              "score_vs_accuracy_lost")]
    for ykey, xkey, ylabel, xlabel, name in specs:
        ncol = min(3, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
        for ax, (scheme, variant) in zip(axes.flat, panels, strict=False):
            sel = [r for r in ok if (r["scheme"], r["verify"]) == (scheme, variant) and r[ykey] is not None]
            for a in attacks:
                pts = [r for r in sel if r["attack"] == a]
                if pts:
                    xs = [max(r[xkey] or 0.0, 1e-3) if xkey == "cost_seconds" else r[xkey] for r in pts]
                    ax.scatter(xs, [r[ykey] for r in pts], s=22, color=colour[a], label=a, alpha=0.85)
            if ykey == "neg_log10_p":
                ax.set_ylim(bottom=0)
                ax.axhline(-math.log10(alpha), color="black", lw=1, ls="--", label=f"alpha = {alpha:g}")
            if xkey == "accuracy_lost_points":
                ax.axvline(MAX_LOSS_POINTS, color="grey", lw=1, ls=":")
            if xkey == "cost_seconds":
                ax.set_xscale("log")
            ax.set_title(f"{scheme} ({variant})", fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel(ylabel, fontsize=9)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles, strict=False))
        for ax in axes.flat:
            h, lab = ax.get_legend_handles_labels()
            seen.update(dict(zip(lab, h, strict=False)))
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(6, len(seen)), fontsize=8,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(seen) // 6), 1, 1))
        path = folder / "plots" / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(f"plots/{name}.png")
    return written


def _runs(folder: Path) -> list[dict[str, Any]]:
    """Every finished run of the folder (``runs.jsonl``), oldest first; unreadable lines are skipped."""
    path = folder / "runs.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and {"ran", "skipped", "hosts_built", "seconds"} <= set(rec):
            out.append(rec)
    return out


def _last_run(folder: Path) -> dict[str, Any] | None:
    runs = _runs(folder)
    return runs[-1] if runs else None


def runs_markdown(runs: list[dict[str, Any]]) -> str:
    """One line a run: when it finished, its command (``nnmark evaluate ...``, when recorded) and what it did."""
    return "".join(f"- {r.get('finished_at', '?')}: `{r.get('command') or '(command not recorded)'}` -- "
                   f"{r['ran']} cells run, {r['skipped']} already recorded, {r['hosts_built']} hosts trained, "
                   f"{r['seconds']:.0f} s\n" for r in runs)


def write_reports(folder: str | Path, plan: Plan | None = None) -> dict[str, Path]:
    """Write every report of ``folder`` (see the module docs); returns their paths by kind."""
    from importlib.resources import files

    from jinja2 import Environment, StrictUndefined, select_autoescape

    folder = Path(folder)
    if plan is None:
        plan = Plan.from_dict(json.loads((folder / "plan.json").read_text()))
    records = ResultsLog(folder / "results.jsonl").records()
    # the latest record of a cell wins (a cell is recorded once; this only guards a hand-edited log)
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        latest[r["cell"]] = r
    # Only the cells the plan makes now count: a record of a cell whose recipe the config has since changed (a
    # scheme's parameters, an attack's budget) stays in the log as history but is not reported.
    planned_cells = {c.ident(plan) for c in cells(plan)}
    records = [r for r in latest.values() if r["cell"] in planned_cells]
    rows = rows_of(records)
    write_csv(folder / "results.csv", rows)
    table = main_table(records, order=[attack_name(a.label, json.dumps(b)) for a in plan.attacks for b in a.budgets])
    robust = robustness_table(records)
    families = family_table(records)
    family_md = family_markdown(families, plan.alpha)
    # Only the checks the plan makes now count: a record of a check the study no longer makes (e.g. an owner key
    # against the other-scheme host of its own seed, see falsealarm.shares_initialisation) is left out.
    planned = {c["check"] for c in checks(plan)} if plan.false_alarm else set()
    fa = false_alarm_rate([r for r in FalseAlarmLog(folder / "false_alarm.jsonl").records()
                           if r.get("check") in planned])
    forgeries = FalseAlarmLog(folder / "forgery.jsonl", key="forgery").records()
    traces = FalseAlarmLog(folder / "fingerprint.jsonl", key="trace").records()
    if traces:
        (folder / "fingerprint.md").write_text(f"# Fingerprint tracer: {plan.name}\n\n" + tracing_markdown(traces))
    run = _last_run(folder)
    (folder / "robustness.md").write_text(
        f"# Robustness: {plan.name}\n\n" + (f"Made by:\n\n{runs_markdown(_runs(folder))}\n" if run else "")
        + "## The cheapest attack that removes each scheme\n\n"
        + robustness_markdown(robust, plan.alpha) + "\n## Schemes x attack families (the SoK's main table)\n\n"
        + family_md)
    (folder / "false_alarm.md").write_text(f"# False alarms: {plan.name}\n\n" + false_alarm_markdown(fa))
    runs = _runs(folder)
    head = (f"# {plan.name}\n\n" + (f"Runs of this folder:\n\n{runs_markdown(runs)}\n" if runs else "")
            + f"Dataset {plan.dataset['name']}, host {plan.host['arch']} "
            f"({plan.host['epochs']} epochs), "
            f"alpha {plan.alpha:g}, seeds {plan.seeds}; {len(records)} cells recorded, "
            f"{sum(r.get('status') == 'error' for r in records)} errors.\n")
    if run:
        head += (f"Last run: {run['ran']} cells run, {run['skipped']} already recorded, {run['hosts_built']} hosts "
                 f"trained, {run['hosts_cached']} from the cache, {run['seconds']:.0f} s ({run.get('mode')}).\n")
    md = (head + f"\n## Main table (removed: not owned at every seed, <= {MAX_LOSS_POINTS:g} points lost)\n\n"
          + main_table_markdown(table) + "\n## Schemes x attack families (the SoK's main table)\n\n" + family_md
          + "\n## Robustness\n\n" + robustness_markdown(robust, plan.alpha)
          + "\n## False alarms\n\n" + false_alarm_markdown(fa)
          + "\n## Forgery (ambiguity) attempts\n\n" + forgery_markdown(forgeries)
          + ("\n## Fingerprint tracer\n\n" + tracing_markdown(traces) if traces else "") + "\n## Every attack row\n\n"
          + detail_markdown(records))
    (folder / "summary.md").write_text(md)
    plots = plot(rows, folder, plan.alpha)
    env = Environment(autoescape=select_autoescape(default=True), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True)
    template = env.from_string(files("nnmark.harness").joinpath("templates/report.html.j2").read_text())
    details = []
    for (scheme, variant, attack, budget), entries in groups(records).items():
        details.append({"scheme": scheme, "verify": variant, "attack": attack_name(attack, budget),
                        **group_outcome(entries)})
    forgeries = sorted(({**r, "forgeable_label": forgeable_label(r)} for r in forgeries),
                       key=lambda r: (r["scheme"], r["seed"]))
    html = template.render(plan=plan, run=run, runs=runs, forgeries=forgeries, traces=tracing_table(traces),
                           n_records=len(records),
                           n_errors=sum(r.get("status") == "error" for r in records), table=table, robust=robust,
                           false_alarms=fa, plots=plots, details=details, max_loss=MAX_LOSS_POINTS,
                           families=families, family_cell_text=family_cell_text, sok_finding=SOK_FINDING,
                           variant_label=variant_label,
                           errors=[r for r in records if r.get("status") == "error"][:20])
    (folder / "report.html").write_text(html)
    return {"csv": folder / "results.csv", "summary": folder / "summary.md", "robustness": folder / "robustness.md",
            "false_alarm": folder / "false_alarm.md", "html": folder / "report.html"}
