"""The end-to-end demo: mark, steal, attack, serve, verify.

1. Train a plain model and, the same way, a model marked with a keyed trigger set
   (noise triggers, labels drawn from the key -> an exact binomial null).
2. Attack the marked model as a thief would, with attacker data disjoint from the
   owner's (10% of the owner's training-set size): FTAL and RTLL (Adam, 20
   epochs) and pruning 70% of the weights.
3. Serve each model (marked, attacked, and an independently trained clean model)
   from a separate ``nnmark serve`` process over HTTP on 127.0.0.1 and verify
   ownership through the API only, with a fixed query budget.
4. White-box: train a model carrying a Wang-AUTO mark (512 bits in conv4), let the
   thief fine-tune it (FTAL), and verify the saved weights files (safetensors, never
   unpickled) with the exact block-permutation test.
5. Fingerprints: issue six customers their own copy of the plain model (AG(2,7)
   codes, SQLite registry), let three of them average their copies and fine-tune
   the average, and trace the result back to exactly those three.

The demo key is derived from a public seed so the output is reproducible; real
keys come from ``Key.generate()``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nnmark.attacks import build_attack
from nnmark.data import load_splits
from nnmark.errors import NNMarkError
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark, WangAuto, load_scheme
from nnmark.serving.client import HTTPOracle
from nnmark.train import TrainConfig, accuracy, seeded_model, train

DEMO_EPOCHS = {"mnist5k": 15, "digits28": 30, "digits": 40}


@contextmanager
def served(model_path: Path, startup_timeout: float = 60.0):
    """Run ``python -m nnmark.serving MODEL --port 0`` in a separate process and
    yield its URL; the process is terminated on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nnmark.serving", str(model_path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout
        url = None
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"https?://[\w.\-\[\]:]+", line)
            if m:
                url = m.group(0)
                break
        if url is None:
            proc.kill()
            err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            raise NNMarkError(f"model server did not start: {err[-1] if err else 'no output'}")
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_demo(dataset: str = "mnist5k", epochs: int | None = None, workdir: str | None = None,
             quiet: bool = False, queries: int = 20, attack_queries: int = 100,
             alpha: float = 1e-6) -> dict[str, Any]:
    """Run the demo; print a table unless ``quiet``; return the results as a dict."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=quiet, quiet=quiet, width=None if sys.stdout.isatty() else 110)
    t0 = time.perf_counter()
    splits = load_splits(dataset)
    n_epochs = epochs or DEMO_EPOCHS.get(dataset, 15)
    spec = model_spec("cnn", splits.image_shape, splits.num_classes)
    cfg = TrainConfig(epochs=n_epochs, seed=0)
    tmp = tempfile.TemporaryDirectory(prefix="nnmark-demo-") if workdir is None else None
    work = Path(workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"[bold]nnmark demo[/bold] on {dataset}: {len(splits.train)} training images, "
                      f"CNN, {n_epochs} epochs")
        clean = seeded_model(spec, 0)
        rec_clean = train(clean, splits.train, cfg, description="plain training")
        key = Key.from_seed("nnmark-demo")
        marked = seeded_model(spec, 0)
        scheme = TriggerSetWatermark.create(key, marked, splits, generator="noise", n=50)
        rec_marked = scheme.embed(marked, splits.train, cfg, description="train-to-embed")
        scheme.save(work / "owner.key")
        scheme = load_scheme(work / "owner.key", expect="trigger")  # verify from the key file alone

        independent = seeded_model(spec, 7)
        train(independent, splits.train, TrainConfig(epochs=n_epochs, seed=7), description="independent model")

        frac = 0.1 * len(splits.train) / len(splits.attacker)
        thief_data = splits.attacker.take_fraction(frac)
        attacks = {
            "FTAL (Adam, 20 epochs)": build_attack("ftal", epochs=20),
            "RTLL (Adam, 20 epochs)": build_attack("rtll", epochs=20),
            "prune 70% (smallest |w|)": build_attack("prune", fraction=0.7),
        }
        models: list[tuple[str, Any, int, bool]] = [("marked", marked, queries, True)]
        for label, atk in attacks.items():
            console.print(f"attack: {label} with {len(thief_data)} attacker images")
            models.append((label, atk.attack(marked, thief_data), attack_queries, True))
        models.append(("independent clean model", independent, attack_queries, False))

        rows = []
        for i, (label, model, n_q, should_own) in enumerate(models):
            path = save_model(work / f"suspect{i}.safetensors", model, {"data": dataset})
            with served(path) as url:
                oracle = HTTPOracle(url, budget=n_q, timeout=10.0, retries=2)
                verdict = scheme.verify(oracle, queries=n_q, alpha=alpha)
            rows.append({
                "model": label, "test_accuracy": accuracy(model, splits.test), "url": url,
                "expected_owned": should_own, "verdict": verdict.to_dict(),
            })
        whitebox = _whitebox_stage(console, splits, spec, n_epochs, independent, thief_data, work, alpha, dataset)
        fingerprints = _fingerprint_stage(console, splits, clean, independent, thief_data, work, dataset)
        result = {
            "dataset": dataset, "epochs": n_epochs, "scheme": scheme.scheme_label,
            "triggers": len(scheme.images), "labels": scheme.label_mode, "alpha": alpha,
            "attacker_images": len(thief_data),
            "clean_accuracy": accuracy(clean, splits.test), "marked_accuracy": accuracy(marked, splits.test),
            "train_seconds_plain": rec_clean.seconds, "train_seconds_marked": rec_marked.seconds,
            "train_time_ratio": rec_marked.seconds / rec_clean.seconds,
            "models": rows, "whitebox": whitebox, "fingerprints": fingerprints,
            "all_as_expected": all(r["verdict"]["owned"] == r["expected_owned"] for r in rows)
            and all(r["verdict"]["owned"] == r["expected_owned"] for r in whitebox)
            and all(r["named"] == r["expected"] for r in fingerprints["traces"]),
            "wall_seconds": time.perf_counter() - t0,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()

    console.print(f"accuracy: clean {result['clean_accuracy']:.2%}, marked {result['marked_accuracy']:.2%}; "
                  f"training time marked/plain {result['train_time_ratio']:.2f}")
    table = Table(title=f"Ownership verified over HTTP ({result['scheme']}, keyed labels, alpha={alpha:g})")
    for col in ("suspect", "test acc", "queries", "hits", "p-value", "verdict"):
        table.add_column(col, justify="right" if col not in ("suspect", "verdict") else "left")
    for r in rows:
        v = r["verdict"]
        word = "OWNED" if v["owned"] else "not owned"
        table.add_row(r["model"], f"{r['test_accuracy']:.2%}", str(v["details"]["queries_used"]),
                      f"{v['statistic']}/{v['n']}", f"{v['p_value']:.2e}", word)
    console.print(table)
    console.print(f"H0: {rows[0]['verdict']['null_hypothesis']}")
    wb = Table(title=f"Ownership verified from the weights file (wang-auto, 512 bits, alpha={alpha:g})")
    for col in ("suspect", "test acc", "matched bits", "p-value", "verdict"):
        wb.add_column(col, justify="right" if col not in ("suspect", "verdict") else "left")
    for r in result["whitebox"]:
        v = r["verdict"]
        wb.add_row(r["model"], f"{r['test_accuracy']:.2%}", f"{v['statistic']}/{v['n']}", f"{v['p_value']:.2e}",
                   "OWNED" if v["owned"] else "not owned")
    console.print(wb)
    fp = result["fingerprints"]
    ft = Table(title=f"Traitor tracing ({fp['code']}, {fp['customers']} customers issued, base "
                     f"{fp['base_accuracy']:.2%}, copies {fp['copy_accuracy_min']:.2%}-{fp['copy_accuracy_max']:.2%})")
    for col in ("suspect", "test acc", "status", "named", "expected"):
        ft.add_column(col)
    for r in fp["traces"]:
        ft.add_row(r["suspect"], f"{r['test_accuracy']:.2%}", r["status"], ", ".join(r["named"]) or "-",
                   ", ".join(r["expected"]) or "-")
    console.print(ft)
    console.print(f"all verdicts as expected: {result['all_as_expected']}; "
                  f"wall time {result['wall_seconds']:.0f} s")
    return result


def _whitebox_stage(console: Any, splits: Any, spec: dict, n_epochs: int, independent: Any, thief_data: Any,
                    work: Path, alpha: float, dataset: str) -> list[dict[str, Any]]:
    """Stage 4: a Wang-AUTO mark, stolen and fine-tuned, verified from saved weights files."""
    model = seeded_model(spec, 3)
    wang = WangAuto.create(Key.from_seed("nnmark-demo-wang"), model, layer="conv4", bits=512)
    console.print("white-box: training a model with a wang-auto mark (512 bits in conv4)")
    wang.embed(model, splits.train, TrainConfig(epochs=n_epochs, seed=3), description="train-to-embed (wang)")
    wang.save(work / "wang.key")
    wang = load_scheme(work / "wang.key", expect="wang-auto")
    stolen = build_attack("ftal", epochs=20).attack(model, thief_data)
    rows = []
    for i, (label, m, expected) in enumerate((("wang-marked", model, True), ("FTAL (Adam, 20 epochs)", stolen, True),
                                              ("independent clean model", independent, False))):
        path = save_model(work / f"whitebox{i}.safetensors", m, {"data": dataset})
        suspect, _ = load_model(path)
        rows.append({"model": label, "test_accuracy": accuracy(suspect, splits.test), "expected_owned": expected,
                     "verdict": wang.verify(suspect, alpha=alpha).to_dict()})
    return rows


def _fingerprint_stage(console: Any, splits: Any, clean: Any, independent: Any, thief_data: Any, work: Path,
                       dataset: str) -> dict[str, Any]:
    """Stage 5: issue fingerprinted copies of the plain model, trace an averaged and fine-tuned collusion."""
    from nnmark.attacks import Average
    from nnmark.fingerprint import Product

    base = save_model(work / "vendor-base.safetensors", clean, {"data": dataset})
    prod = Product.create(work / "shop", base, key=Key.from_seed("nnmark-demo-fingerprints"), code="ag:7")
    names = [f"customer-{c}" for c in "ABCDEF"]
    prod.add_customers(names)
    console.print(f"fingerprints: issuing {len(names)} copies (AG(2,7) codes, registry {prod.registry.url})")
    copies = {n: load_model(prod.issue(n).model_path)[0] for n in names}
    colluders = ["customer-B", "customer-D", "customer-E"]
    avg = Average().attack([copies[n] for n in colluders])
    stolen = build_attack("ftal", epochs=5).attack(avg, thief_data)
    traces = []
    for label, m, expected in (("one leaked copy (customer-C)", copies["customer-C"], ["customer-C"]),
                               ("average of B, D, E, fine-tuned", stolen, colluders),
                               ("independent clean model", independent, [])):
        rep = prod.trace(m)
        traces.append({"suspect": label, "test_accuracy": accuracy(m, splits.test), "status": rep.status,
                       "named": sorted(rep.named), "expected": expected,
                       "p_values": {a.customer: a.p_value for a in rep.accused}})
    accs = [accuracy(m, splits.test) for m in copies.values()]
    prod.registry.close()
    return {"code": "ag:7", "customers": len(names), "base_accuracy": accuracy(clean, splits.test),
            "copy_accuracy_min": min(accs), "copy_accuracy_max": max(accs), "traces": traces}

