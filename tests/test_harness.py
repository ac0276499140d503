"""The evaluation harness: config validation before training, a grid killed with SIGKILL and resumed, the
artifact store, the results log, the false-alarm interval, and the HTML report as headless Chromium shows it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from nnmark.harness.cache import ArtifactStore
from nnmark.harness.config import ConfigError, load_plan, plan_from_mapping
from nnmark.harness.falsealarm import clopper_pearson, false_alarm_rate
from nnmark.harness.grid import ResultsLog, cells

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# one scheme x two attacks x one seed on digits; the FTAL cell takes ~1-2 s so that a kill lands inside it
TINY = {
    "name": "tiny", "dataset": "digits", "host": {"arch": "cnn", "epochs": 2}, "alpha": 1e-3, "seeds": [0],
    "schemes": [{"name": "uchida", "params": {"bits": 32}, "verify": [{"align": True}, {"align": False}]}],
    "attacks": ["permute", {"name": "ftal", "params": {"epochs": 30}}],
    "false_alarm": {"clean_seeds": 1, "architectures": ["cnn"], "other_keys": 1, "epochs": 1},
    "forgery": {"tries": 5},
}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("change, expect", [
    ({"schemes": ["no-such-mark"]}, "unknown scheme 'no-such-mark'; known:"),
    ({"attacks": ["no-such-attack"]}, "unknown attack 'no-such-attack'; known:"),
    ({"attacks": [{"name": "ftal", "params": {"epoch": 3}}]}, "unknown attack 'ftal' parameter(s) epoch; valid:"),
    ({"schemes": [{"name": "uchida", "params": {"bitz": 3}}]}, "unknown scheme 'uchida' parameter(s) bitz"),
    ({"schemes": [{"name": "uchida", "verify": {"align": "maybe"}}]}, "parameter 'align' must be a bool"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; known:"),
    ({"host": {"arch": "resnet9000"}}, "unknown architecture 'resnet9000'; known: cnn"),
    ({"host": {"arch": "no_such_module:f"}}, "cannot be imported"),
    ({"attacks": [{"name": "permute", "budgets": [1, 2]}]}, "declares a budget parameter"),
    ({"attacks": ["average"]}, "combines several models"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"forgery": {"tries": 0}}, "forgery tries must be a positive integer"),
])
def test_config_rejected_before_training(tmp_path, change, expect):
    """A bad config is refused with the known names, and nothing is written (no artifact, no results)."""
    cfg = _write(tmp_path / "bad.yaml", {**TINY, **change})
    out = tmp_path / "out"
    res = run_cli("evaluate", cfg, "--out", out, "--no-progress")
    assert res.returncode == 2, res.stderr
    assert expect in res.stderr
    assert not out.exists()


def test_config_plan_counts_cells_and_budgets():
    plan = plan_from_mapping({**TINY, "seeds": [0, 1],
                              "attacks": ["none", {"name": "ftal", "budgets": [5, 50]},
                                          {"label": "p+f", "chain": ["permute", "ftal"], "budgets": ["7"]}]})
    grid = cells(plan)
    assert len(grid) == 2 * (1 + 2 + 1)
    assert [c.budget for c in grid[:4]] == [None, 5, 50, 7]  # "7" typed by the budget parameter's declaration
    assert grid[3].steps()[1]["params"]["max_batches"] == 7 and "max_batches" not in grid[3].steps()[0]["params"]
    assert len({c.ident(plan) for c in grid}) == len(grid)
    with pytest.raises(ConfigError, match="share a label"):
        plan_from_mapping({**TINY, "attacks": ["ftal", "ftal"]})


def test_artifact_store_builds_once_and_writes_atomically(tmp_path):
    store = ArtifactStore(tmp_path)
    recipe = {"kind": "test", "seed": 3}
    calls = []

    def build():
        calls.append(1)
        return torch.nn.Linear(3, 2), {"note": "built"}

    assert store.build_once(recipe, build) is False
    assert store.build_once(recipe, build) is True
    assert store.build_once(dict(reversed(list(recipe.items()))), build) is True  # canonical: key order is irrelevant
    assert calls == [1] and (store.hits, store.builds) == (2, 1)
    assert set(store.state(recipe)) == {"weight", "bias"} and store.info(recipe) == {"note": "built"}
    assert not list(tmp_path.rglob(".nnmark-*"))  # no temp file left behind
    assert (tmp_path / ".gitignore").read_text().splitlines()[-1] == "*"  # key files are never committed
    assert not store.has({"kind": "test", "seed": 4})


def test_results_log_ignores_and_cuts_a_torn_line(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    log.append({"cell": "a"})
    with open(log.path, "a") as fh:
        fh.write('{"cell": "b", "half')  # what a writer killed mid-line leaves
    assert log.finished() == {"a"}
    log.append({"cell": "c"})
    assert [json.loads(x)["cell"] for x in log.path.read_text().splitlines()] == ["a", "c"]


def test_false_alarm_rate_interval():
    lo, hi = clopper_pearson(0, 30)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 30), rel=1e-6)
    recs = [{"scheme": "s", "alpha": 1e-3, "suspect": {"kind": "clean", "arch": "cnn", "seed": i},
             "verdicts": [{"verify": {}, "p_value": p, "owned": p < 1e-3}]} for i, p in enumerate((0.5, 0.2, 1e-4))]
    # a second owner key claiming the same model is one false alarm, not two
    recs.append({**recs[2], "owner_seed": 1})
    recs.append({"scheme": "s", "alpha": 1e-3, "suspect": {"kind": "clean", "arch": "x"},
                 "verdicts": [{"verify": {}, "refused": "SchemeError: no conv4"}]})
    (g,) = false_alarm_rate(recs)
    assert (g["checks"], g["verdicts"], g["refused"], g["models"], g["false_alarms"]) == (5, 4, 1, 3, 1)
    assert g["rate"] == pytest.approx(1 / 3) and g["ci_low"] > 0 and g["min_p"] == 1e-4


def _evaluate_process(cfg: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnmark.cli", "evaluate", str(cfg), "--out", str(out),
                             "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_until(condition, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The tiny grid as a real ``nnmark evaluate`` process, SIGKILLed while it holds the claim of its second cell
    (FTAL); then a rerun as another process and, once that one holds the cell's claim, a second run on the same
    folder at the same time, in this process. Returns the folder, the records after the kill, the killed pid,
    the rerun's pid and the second run's summary."""
    from nnmark.harness.claims import is_locked

    root = tmp_path_factory.mktemp("grid")
    cfg = _write(root / "tiny.yaml", TINY)
    out = root / "out"
    permute_id, ftal_id = (c.ident(load_plan(cfg)) for c in cells(load_plan(cfg)))
    ftal_lock = out / "locks" / f"{ftal_id}.lock"
    log = ResultsLog(out / "results.jsonl")
    proc = _evaluate_process(cfg, out)
    _wait_until(lambda: is_locked(ftal_lock), proc)  # the permute cell is recorded, FTAL is running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = log.records()
    assert proc.returncode == -signal.SIGKILL
    assert [r["cell"] for r in before] == [permute_id]
    assert not is_locked(ftal_lock)  # the kernel dropped the killed run's claim
    rerun = _evaluate_process(cfg, out)
    _wait_until(lambda: is_locked(ftal_lock) or ftal_id in {r["cell"] for r in log.records()}, rerun)
    from nnmark.harness.runner import run_plan

    torch.set_num_threads(1)
    second = run_plan(load_plan(cfg), out)  # a second run on the folder, while the rerun holds FTAL
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read().decode()[-2000:]
    return out, before, proc.pid, rerun.pid, second


def test_killed_grid_resumes_without_redoing_cells(killed_and_resumed):
    out, before, killed_pid, rerun_pid, second = killed_and_resumed
    assert second["pid"] == os.getpid() and second["errors"] == 0
    assert len(before) == 1 and before[0]["attack"] == "permute" and before[0]["pid"] == killed_pid
    after = ResultsLog(out / "results.jsonl").records()
    assert [r["attack"] for r in after] == ["permute", "ftal"]  # each cell recorded once, by either run
    assert after[0] == before[0]  # the finished cell was not run again
    assert after[1]["pid"] == rerun_pid and after[1]["status"] == "ok"  # the killed cell: done by the rerun only
    runs = {r["pid"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {rerun_pid, os.getpid()}  # the killed run never finished
    mine, theirs = runs[os.getpid()], runs[rerun_pid]
    assert (theirs["skipped"], theirs["ran"], theirs["hosts_built"]) == (1, 1, 0)  # the marked host: cached
    assert theirs["hosts_cached"] >= 1 and mine["hosts_built"] == 0
    # the run started beside it ran no cell: it found FTAL claimed and read the rerun's record
    assert mine["ran"] == 0 and mine["skipped"] + mine["by_other_runs"] == 2
    # an unattacked-equivalent obfuscation keeps accuracy; the verdict with alignment off is recorded too
    perm = after[0]
    assert abs(perm["accuracy_lost_points"]) < 1e-9 and [v["verify"] for v in perm["verdicts"]] == [
        {"align": True}, {"align": False}]
    assert perm["verdicts"][0]["owned"] and perm["verdicts"][0]["alpha"] == 1e-3
    assert perm["cost"]["data_n"] == 0 and after[1]["cost"]["data_n"] > 0
    fa = [json.loads(x) for x in (out / "false_alarm.jsonl").read_text().splitlines()]
    assert len(fa) == len({r["check"] for r in fa}) == 2 and not any(v.get("owned") for r in fa for v in r["verdicts"])
    assert mine["false_alarm_checks"] + theirs["false_alarm_checks"] == 2  # shared out, none done twice
    (forged,) = [json.loads(x) for x in (out / "forgery.jsonl").read_text().splitlines()]
    assert mine["forgery_checks"] + theirs["forgery_checks"] == 1
    assert forged["kind"] == "key-search" and forged["tries"] == 5 and forged["claims"] == 0 and not forged["forgeable"]
    assert forged["committed_claims"] == 0 and forged["forgeable_raw"] is False  # both rules reported
    # a third run has nothing left to do
    res = run_cli("evaluate", out.parent / "tiny.yaml", "--out", out, "--no-progress")
    assert "0 run" in res.stdout and "0 trained" in res.stdout and "false-alarm checks run: 0" in res.stdout
    assert "forgery checks run: 0" in res.stdout
    assert len(ResultsLog(out / "results.jsonl").records()) == 2
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert last["command"] == f"nnmark evaluate {out.parent / 'tiny.yaml'} --out {out}"  # the reports name it
    assert f"`{last['command']}`" in (out / "summary.md").read_text().split("Dataset digits")[0]


def test_reports_written(killed_and_resumed):
    out = killed_and_resumed[0]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("scheme,verify,attack,budget,seed,status") and len(rows) == 1 + 2 * 2
    summary = (out / "summary.md").read_text()
    assert "| attack | uchida (align=on) | uchida (align=off) |" in summary and "Clopper-Pearson" in summary
    assert {p.name for p in (out / "plots").iterdir()} == {"p_vs_accuracy_lost.png", "p_vs_cost.png",
                                                           "score_vs_accuracy_lost.png"}
    # the SoK's main table: schemes x attack families, the FTAL row under fine-tuning, permute under obfuscation
    sok = summary.split("## Schemes x attack families")[1].split("\n## ")[0]
    assert "| scheme | verify | fine-tuning (model modification) | obfuscation (model modification) |" in sok
    on = next(line for line in sok.splitlines() if line.startswith("| uchida | align=on |"))
    cells_on = [c.strip() for c in on.strip(" |").split("|")]  # scheme, verify, fine-tuning, obfuscation
    assert cells_on[3] == "kept (1 row)"  # permute with the alignment defence: owned (see above)
    assert "The SoK (Lukas et al." in sok and "scheme variants are removed" in sok
    assert "Schemes x attack families" in (out / "robustness.md").read_text()


def test_reports_leave_out_records_of_cells_the_config_no_longer_makes(killed_and_resumed, tmp_path):
    """A record whose cell the plan no longer makes (its recipe changed since) stays in the log but is not reported:
    a changed scheme parameter must not mix old and new models in one row."""
    import shutil

    from nnmark.harness.report import write_reports

    out = tmp_path / "out"
    shutil.copytree(killed_and_resumed[0], out, ignore=shutil.ignore_patterns("artifacts", "locks"))
    stale = dict(ResultsLog(out / "results.jsonl").records()[1], cell="0" * 64)  # FTAL of an older recipe
    stale["verdicts"] = [dict(v, owned=False, p_value=0.9) for v in stale["verdicts"]]
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(stale) + "\n")
    write_reports(out)
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2  # the stale FTAL row left out
    assert "2 cells recorded" in (out / "summary.md").read_text()
    assert len(ResultsLog(out / "results.jsonl").records()) == 3  # nothing deleted from the log


def test_a_mark_the_unattacked_model_does_not_carry_is_never_counted_as_removed():
    """A scheme whose unattacked model is not owned at some seed was not embedded there: no attack row is credited
    with removing it (it would otherwise look 'removed' by every attack, at no cost)."""
    from nnmark.harness.robustness import family_table, robustness_table

    def rec(scheme, attack, seed, owned, steps):
        return {"cell": f"{scheme}{attack}{seed}", "scheme": scheme, "attack": attack, "budget": None, "seed": seed,
                "status": "ok", "steps": steps, "accuracy_lost_points": 0.5,
                "cost": {"seconds": 1.0, "data_n": 0, "queries": 0},
                "verdicts": [{"verify": {}, "owned": owned, "p_value": 1e-9 if owned else 0.5, "score": 1.0}]}

    records = [rec(s, a, seed, owned, steps) for s, base in (("weak", [True, False]), ("firm", [True, True]))
               for seed in (0, 1)
               for a, owned, steps in (("none", base[seed], []), ("prune", False, [{"name": "prune"}]))]
    rows = {r["scheme"]: r for r in robustness_table(records)}
    assert rows["firm"]["cheapest"] == "prune" and rows["firm"]["not_embedded"] is None
    assert rows["weak"]["cheapest"] is None and rows["weak"]["not_embedded"] == "unattacked model owned at 1/2 seeds"
    fam = {r["scheme"]: r for r in family_table(records)["rows"]}
    assert fam["firm"]["cells"]["pruning"]["cheapest"] == "prune"
    assert fam["weak"]["not_embedded"] and fam["weak"]["cells"]["pruning"]["cheapest"] is None


def test_attack_families_of_rows_and_chains():
    from nnmark.harness.robustness import family_of

    assert family_of([{"name": "ftal"}]) == "fine-tuning" and family_of([{"name": "split"}]) == "obfuscation"
    assert family_of([{"name": "permute"}, {"name": "prune"}, {"name": "ftal"}]) == "combined"
    assert family_of([{"name": "prune"}, {"name": "fine-prune"}]) == "pruning"  # one family: not "combined"
    assert family_of([{"name": "my-attack"}]) == "other" and family_of([]) is None


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp}", *args], capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs it)")
def test_html_report_as_chromium_renders_it(killed_and_resumed, tmp_path):
    out = killed_and_resumed[0]
    url = (out / "report.html").resolve().as_uri()
    res = _chromium("--virtual-time-budget=5000", "--dump-dom", url, tmp=tmp_path / "profile")
    dom = res.stdout
    assert "nnmark evaluation: tiny" in dom and 'id="main-table"' in dom
    main = dom.split('id="main-table"')[1].split("</table>")[0]
    assert "<th>uchida<br><span class=\"small\">align=on</span></th>" in main.replace("\n", "")
    assert "<tr><td>permute</td>" in main.replace("\n", "") and "<tr><td>ftal</td>" in main.replace("\n", "")
    assert main.count(">kept<") + main.count(">removed<") >= 2  # a verdict string in every attack column
    images = dom.count("<img")
    assert images == 3 and dom.count('data-loaded="yes"') == images, "a plot did not load in the browser"
    fam = dom.split('id="family-table"')[1].split("</table>")[0].replace("\n", "")
    assert "<th>fine-tuning</th><th>obfuscation</th>" in fam and "kept (1 row)" in fam
    fa = dom.split('id="false-alarm-table"')[1].split("</table>")[0]
    assert "0.001" in fa and "[0, " in fa


@pytest.mark.parametrize("config", ["digits_full.yaml", "trigger_generators.yaml", "papers.yaml"])
def test_plan_of_the_checked_in_grid_is_valid(config):
    from nnmark.components import REGISTRY

    path = Path(__file__).parents[1] / "experiments" / "harness" / config
    named = {s if isinstance(s, str) else s.get("name") for a in yaml.safe_load(path.read_text())["attacks"]
             for s in ([a] if isinstance(a, str) or "chain" not in a else a["chain"])}
    missing = sorted(n for n in named - {"none", None} if n not in REGISTRY.names("attack"))
    if missing:
        pytest.skip(f"{config} needs attacks this checkout does not register: {', '.join(missing)}")
    plan = load_plan(path)
    if config == "digits_full.yaml":
        assert {s.name for s in plan.schemes} >= {"uchida", "projection", "wang-manu", "wang-auto", "trigger"}
    n_clean = len(plan.false_alarm["clean_seeds"]) * len(plan.false_alarm["architectures"])
    assert n_clean >= 20 and any(":" in a for a in plan.false_alarm["architectures"])
    assert math.isclose(plan.alpha, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("fan_out", ["processes", "ray"])
def test_cells_fan_out_over_processes_and_ray(tmp_path, fan_out):
    """The same tiny grid through spawned worker processes and through a local Ray cluster: every cell is
    recorded once, by a worker (not this process), with the same verdicts as in this process."""
    base = {**TINY, "false_alarm": None, "attacks": ["none", "permute", {"name": "ftal", "params": {"epochs": 2}}]}
    cfg = {**base, "ray": {"address": "local", "num_cpus": 2}} if fan_out == "ray" else base
    res = run_cli("evaluate", _write(tmp_path / "c.yaml", cfg), "--out", tmp_path / "out", "--workers", "2",
                  "--no-progress")
    if fan_out == "ray":
        import ray

        ray.shutdown()
    assert res.returncode == 0, res.stderr
    assert f"({fan_out})" in res.stdout
    recs = ResultsLog(tmp_path / "out" / "results.jsonl").records()
    assert sorted(r["attack"] for r in recs) == ["ftal", "none", "permute"]
    assert all(r["status"] == "ok" and r["pid"] != os.getpid() for r in recs)
    ref = run_cli("evaluate", _write(tmp_path / "r.yaml", base), "--out", tmp_path / "ref", "--no-progress")
    assert ref.returncode == 0 and "(in-process)" in ref.stdout
    mine = {r["attack"]: [v["p_value"] for v in r["verdicts"]] for r in recs}
    inproc = {r["attack"]: [v["p_value"] for v in r["verdicts"]]
              for r in ResultsLog(tmp_path / "ref" / "results.jsonl").records()}
    assert mine == inproc


def test_a_refused_suspect_is_recorded_as_not_owned(killed_and_resumed):
    """A verifier that cannot read the attacked model (here: another architecture) gives no claim: the row says
    refused and not owned, so the report counts the attack as removing the mark, not as a crash."""
    from nnmark.harness.grid import load_owner_scheme, marked_recipe, new_host, splits_of, verify_variants

    out = killed_and_resumed[0]
    plan = load_plan(out.parent / "tiny.yaml")
    scheme = load_owner_scheme(plan, ArtifactStore(out / "artifacts"), marked_recipe(plan, plan.schemes[0], 0))
    rows = verify_variants(scheme, new_host("lenet5", splits_of(plan), 0), plan.schemes[0], plan.alpha)
    assert len(rows) == 2 and all(r["owned"] is False and r["p_value"] is None and r["refused"] for r in rows)


@pytest.mark.slow
def test_forged_wang_keys_claim_raw_and_are_refused_by_the_commitment_rule(tmp_path):
    """The thief's key search against Wang: a secret network fitted to the owner's model claims it on the raw
    statistic; committed after the model was stored, every such key is refused."""
    from datetime import datetime, timezone

    from nnmark.commitment import AFTER_SUSPECT
    from nnmark.harness.forgery import forged_key_search
    from nnmark.models import model_spec
    from nnmark.train import seeded_model

    torch.set_num_threads(1)
    model = seeded_model(model_spec("cnn", (1, 8, 8), 10), 3).eval()
    seen = datetime.now(timezone.utc).isoformat()
    time.sleep(0.05)
    ps, committed = forged_key_search("wang-manu", model, 2, 0, 1e-3, seen, tmp_path / "forged")
    assert len(ps) == 2 and sum(p < 1e-3 for p in ps) == len(committed) >= 1  # the raw statistic is forged
    assert all(not c["owned"] and c["status"] == AFTER_SUSPECT for c in committed)
    assert all(oct((tmp_path / "forged" / f).stat().st_mode & 0o777) == "0o600"
               for f in os.listdir(tmp_path / "forged") if f.startswith("key-") and not f.endswith(".commit.json"))


@pytest.mark.parametrize("fingerprint, expect", [
    ({"customers": 3, "coalitions": [4]}, "fingerprint coalitions"),
    ({"colluders": 2}, "fingerprint: unknown key(s) colluders"),
    ({"attacks": ["average"]}, "combines several models"),
    ({"attacks": ["no-such-attack"]}, "unknown attack 'no-such-attack'"),
    ({"verify": [{"align": "yes"}]}, "fingerprint verify"),
    ({"code": "zz:3"}, "fingerprint code"),
])
def test_fingerprint_section_rejected(fingerprint, expect):
    with pytest.raises(ConfigError, match=None) as err:
        plan_from_mapping({**TINY, "fingerprint": fingerprint})
    assert expect in str(err.value)


@pytest.mark.slow
def test_tracer_row_names_coalitions_and_no_innocent(tmp_path):
    """The tracer in the grid: single copies and averaged pairs, obfuscated, traced with the alignment defence
    on and off; nobody innocent is named, the defence on names exactly the coalition; a rerun resumes."""
    from nnmark.harness.report import write_reports
    from nnmark.harness.runner import run_plan
    from nnmark.harness.tracing import DONE_MARK

    torch.set_num_threads(1)
    cfg = {**TINY, "host": {"arch": "cnn", "epochs": 8}, "attacks": ["none"], "false_alarm": None,
           "forgery": None, "fingerprint": {"customers": 3, "coalitions": [1, 2], "attacks": ["permute", "split"],
                                            "verify": [{"align": True}, {"align": False}], "clean": 1}}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    plan = plan_from_mapping(cfg)
    out = tmp_path / "out"
    assert run_plan(plan, out)["traces"] == 5
    recs = [json.loads(x) for x in (out / "fingerprint.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["size"]) for r in recs) == [("clean", 0)] + [("coalition", 1)] * 2 + \
        [("coalition", 2)] * 2
    for r in recs:
        on, off = r["verdicts"]
        assert on["verify"] == {"align": True} and not on["innocents_named"] and not off["innocents_named"]
        if r["kind"] == "clean":
            assert on["named"] == [] and off["named"] == []
        else:
            assert on["exact"], on  # the defence undoes permutation and split units
            assert len(r["coalition"]) == r["size"] and abs(r["accuracy_lost_points"]) < 1e-6
            if r["attack"] == "split":
                assert off["status"] == "refused"  # widened: another architecture without the defence
    mark = next((out / "artifacts" / "fingerprint").glob(f"*/{DONE_MARK}"))
    built = mark.stat().st_mtime
    lines = (out / "fingerprint.jsonl").read_text().splitlines()
    (out / "fingerprint.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a killed writer
    assert run_plan(plan, out)["traces"] == 1 and mark.stat().st_mtime == built  # product not rebuilt
    assert len((out / "fingerprint.jsonl").read_text().splitlines()) == 5
    write_reports(out, plan)
    assert "Innocent customers named: 0 over 10 traces" in (out / "fingerprint.md").read_text()
    assert 'id="tracer-table"' in (out / "report.html").read_text()


def test_false_alarm_negatives_never_share_the_owner_initialisation():
    """A host marked with another scheme from the owner's own seed starts from the owner's initialisation: it
    is no negative for that owner's key, so the study must not pair them (it once counted such a pair)."""
    from nnmark.harness.falsealarm import checks

    plan = plan_from_mapping({**yaml.safe_load((Path(__file__).parents[1] / "experiments" / "harness" /
                                                "digits_full.yaml").read_text()), "attacks": ["none"]},
                             base_dir=Path(__file__).parents[1] / "experiments" / "harness")
    pairs = [(c["owner_seed"], c["suspect"]) for c in checks(plan)]
    others = [(o, s["seed"]) for o, s in pairs if s["kind"] == "other-scheme"]
    assert others and all(o != s for o, s in others)
    assert {s["kind"] for _, s in pairs} >= {"clean", "other-scheme"}

