"""Shared, session-scoped fixtures: small models on bundled digits, trained once."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest
import torch

from nnmark import Key
from nnmark.data import load_splits
from nnmark.models import model_spec
from nnmark.train import TrainConfig, seeded_model, train

torch.set_num_threads(2)

CLEAN_EPOCHS = 10
MARK_EPOCHS = 40


@pytest.fixture(scope="session")
def digits():
    return load_splits("digits")


@pytest.fixture(scope="session")
def clean_models(digits):
    """Clean (unmarked) models: 5 seeds x 2 architectures, {(arch, seed): model}."""
    models = {}
    for arch in ("cnn", "lenet5"):
        spec = model_spec(arch, digits.image_shape, 10)
        for seed in range(5):
            m = seeded_model(spec, seed)
            train(m, digits.train, TrainConfig(epochs=CLEAN_EPOCHS, seed=seed, progress=False))
            models[(arch, seed)] = m
    return models


@pytest.fixture(scope="session")
def noise_marked(digits):
    """A CNN on digits marked with 100 keyed-label noise triggers: (scheme, model)."""
    from nnmark.schemes import TriggerSetWatermark

    spec = model_spec("cnn", digits.image_shape, 10)
    model = seeded_model(spec, 0)
    scheme = TriggerSetWatermark.create(Key.from_seed("tests-owner"), model, digits, generator="noise", n=100)
    scheme.embed(model, digits.train, TrainConfig(epochs=MARK_EPOCHS, seed=0, progress=False))
    return scheme, model


@dataclass
class CliResult:
    """What one ``nnmark`` invocation printed and returned (like ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run ``nnmark ARGS`` in this process through the real entry point (``nnmark.cli.main``: its exit codes
    and one-line error handling), capturing stdout and stderr. Tests that need a separate process (exit
    codes of crashes, tracebacks, servers) use ``subprocess`` instead."""
    from nnmark.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses these calls replace (small models: one thread is faster)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            torch.set_num_threads(threads)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli():
    """The in-process ``nnmark`` runner (:func:`run_cli`)."""
    return run_cli


# Test files that start a local Ray cluster run on one xdist worker, one after another (two local clusters started
# at once on one machine by ray.init() may find each other). Every other file is a group of its own, so that its
# module- and session-scoped fixtures (models trained once per file) are built on one worker, not on each:
# the default run measured 467 s spread test by test, 412 s file by file (cumulative 892 s -> 756 s).
RAY_FILES = {"test_fingerprint_cli.py", "test_harness.py", "test_split_processes.py", "test_split_parties.py"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns xdist_group marks into node-id suffixes
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in RAY_FILES:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_configure(config):
    """Refuse ``--dist loadgroup`` under pytest >= 9.2: pytest-xdist (3.8) can no longer rename its node ids
    there, so every xdist_group mark is silently ignored (the Ray files would start clusters side by side)."""
    major, minor = (int(p) for p in pytest.__version__.split(".")[:2])
    if getattr(config.option, "dist", None) == "loadgroup" and (major, minor) >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} makes --dist loadgroup ignore xdist_group marks; "
                                "install the pytest pinned in pyproject.toml (bash scripts/setup-env.sh)")
