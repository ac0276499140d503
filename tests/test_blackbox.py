"""Black-box tracing end to end on digits: a Tardos product, issued copies, traces through a served API."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nnmark import Key
from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct, look_schedule
from nnmark.blackbox.answers import ProbabilityOracle
from nnmark.io import save_model
from nnmark.oracle import LocalOracle
from nnmark.serving.client import HTTPOracle
from nnmark.serving.server import make_server

M = 128
CAPACITY = 2000


@pytest.fixture(scope="session")
def bb_product(tmp_path_factory: pytest.TempPathFactory, clean_models):
    """A black-box product on the digits CNN (clean seed 0 as the base), two customers issued a copy."""
    root = tmp_path_factory.mktemp("bb")
    base_file = root / "base.safetensors"
    save_model(base_file, clean_models[("cnn", 0)], {"data": "digits"})
    prod = BlackBoxProduct.create(root / "shop", base_file, key=Key.from_seed("bb-tests"), m=M, capacity=CAPACITY,
                                  colluders=2, noise=0.3, issue=BlackBoxIssueConfig(steps=150, lr=2e-3))
    prod.add_customers(["alice", "bob", "carol"])
    copies = {n: prod.issue(n) for n in ("alice", "bob")}
    return prod, copies


def _served(model: torch.nn.Module):
    srv = make_server(model, "127.0.0.1", 0, max_batch=64)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv, thread


def test_a_leaked_copy_is_named_through_its_api_and_nobody_else(bb_product) -> None:
    prod, copies = bb_product
    from nnmark.io import load_model

    model, _ = load_model(copies["alice"].model_path)
    srv, thread = _served(model)
    try:
        oracle = HTTPOracle(srv.url, budget=M)
        rep = prod.trace(oracle, budget=M)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
    assert rep.named_customers == ["alice"]
    v = rep.named[0]
    assert v.p_value <= prod.config.alpha / CAPACITY and v.queries is not None and v.queries <= M
    assert rep.queries_used == oracle.queries_used <= M
    assert rep.min_p_not_named > rep.level  # nobody else passes
    assert rep.level == prod.config.alpha / (len(look_schedule(M)) * CAPACITY)
    assert "not used" in rep.null_hypothesis


def test_an_api_that_shows_probabilities_is_traced_soft_and_one_that_shows_labels_hard(bb_product) -> None:
    """`nnmark serve --probabilities`: the tracer reads the softmax rows (soft answers) and names the copy with a
    far smaller p-value than from the labels of the same server; a server without them falls back to labels."""
    prod, copies = bb_product
    from nnmark.io import load_model

    model, _ = load_model(copies["alice"].model_path)
    reports = {}
    for shows in (True, False):
        srv = make_server(model, "127.0.0.1", 0, max_batch=64, probabilities=shows)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            reports[shows] = prod.trace(HTTPOracle(srv.url, budget=M, scores=True), budget=M, stop="budget")
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(5)
    soft, hard = reports[True], reports[False]
    assert (soft.answers_read, hard.answers_read) == ("probabilities", "labels")
    assert soft.named_customers == hard.named_customers == ["alice"]
    assert soft.named[0].p_value < hard.named[0].p_value
    assert soft.min_p_not_named > soft.level and soft.evidence["temperature"] is not None
    # the same answers read locally (ProbabilityOracle) give the same verdict
    local = prod.trace(ProbabilityOracle(model), budget=M, stop="budget")
    assert local.named[0].p_value == pytest.approx(soft.named[0].p_value, rel=1e-6)


def test_clean_models_random_answers_and_other_keys_name_nobody(bb_product, clean_models) -> None:
    prod, copies = bb_product
    holders = {u: f"code-{u}" for u in range(CAPACITY)}  # every code counts as issued: any pass would show
    for i, ((arch, seed), model) in enumerate(clean_models.items()):
        # labels for every clean model, their probabilities (soft answers) for three of them
        for oracle in (LocalOracle(model), ProbabilityOracle(model))[: 2 if i < 3 else 1]:
            rep = prod.trace(oracle, stop="budget", holders=holders)
            assert rep.named == [] and rep.status == "not-named", (arch, seed)
            assert rep.min_p_not_named > rep.level

    class Randomiser:  # an API that answers every trigger with a random label
        queries_used = 0

        def __init__(self, seed: int) -> None:
            self.rng = np.random.default_rng(seed)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.rng.integers(0, 10, size=len(x)))

    for seed in range(3):
        assert prod.trace(Randomiser(seed), stop="budget", holders=holders).named == []
    # another vendor's product (other key: other codewords, triggers, labels) traces alice's copy: nobody
    from nnmark.io import load_model

    alice, _ = load_model(copies["alice"].model_path)
    other = BlackBoxProduct.create(Path(copies["alice"].model_path).parents[2] / "other",
                                   prod.root / "base.safetensors", key=Key.from_seed("another-vendor"), m=M,
                                   capacity=CAPACITY, colluders=2)
    rep = other.trace(LocalOracle(alice), stop="budget", holders=holders)
    assert rep.named == []


def test_issued_copies_are_recorded_and_keep_accuracy(bb_product, digits) -> None:
    from nnmark.io import file_sha256, load_model
    from nnmark.train import accuracy

    prod, copies = bb_product
    assert {c.customer for c in prod.registry.issued_copies()} == {"alice", "bob"}
    assert copies["alice"].code_index != copies["bob"].code_index
    for c in copies.values():
        assert file_sha256(c.model_path) == c.model_sha256
        model, _ = load_model(c.model_path)
        # the short fine-tune costs little accuracy on the held-out split (measured on digits: about 1 point)
        assert accuracy(model, digits.test) >= accuracy(prod.base_model, digits.test) - 0.04
    assert prod.registry.audit(check_files=True) == []
    assert (prod.root / "key.json").stat().st_mode & 0o777 == 0o600

