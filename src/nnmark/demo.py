"""The end-to-end demo: mark, steal, attack, serve, verify.

1. Train a plain model and, the same way, a model marked with a keyed trigger set
   (noise triggers, labels drawn from the key -> an exact binomial null).
2. Attack the marked model as a thief would, with attacker data disjoint from the
   owner's (10% of the owner's training-set size): FTAL and RTLL (Adam, 20
   epochs) and pruning 70% of the weights.
3. Serve each model (marked, attacked, and an independently trained clean model)
   from a separate ``nnmark serve`` process over HTTP on 127.0.0.1 and verify
   ownership through the API only, with a fixed query budget.

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
from nnmark.io import save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import TriggerSetWatermark, load_scheme
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
        result = {
            "dataset": dataset, "epochs": n_epochs, "scheme": scheme.scheme_label,
            "triggers": len(scheme.images), "labels": scheme.label_mode, "alpha": alpha,
            "attacker_images": len(thief_data),
            "clean_accuracy": accuracy(clean, splits.test), "marked_accuracy": accuracy(marked, splits.test),
            "train_seconds_plain": rec_clean.seconds, "train_seconds_marked": rec_marked.seconds,
            "train_time_ratio": rec_marked.seconds / rec_clean.seconds,
            "models": rows, "all_as_expected": all(r["verdict"]["owned"] == r["expected_owned"] for r in rows),
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
    console.print(f"all verdicts as expected: {result['all_as_expected']}; "
                  f"wall time {result['wall_seconds']:.0f} s")
    return result
