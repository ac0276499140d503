"""The issuing protocol both products share (``Registry.issue_file``), and combined black-box + weight evidence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nnmark.registry import Registry, RegistryError

BASE = hashlib.sha256(b"base").hexdigest()


def _registry(tmp_path: Path, n: int = 4) -> Registry:
    return Registry.create(tmp_path / "reg.sqlite", product="p", base_sha256=BASE, key_id="0123456789abcdef",
                           code_family={"family": "test"}, codes=n)


def test_issue_file_completes_with_the_files_hash_or_leaves_nothing(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    reg.add_customers(["ann", "ben", "cat"])
    out = tmp_path / "copies"
    out.mkdir()

    def good(res, dest: Path) -> None:
        dest.write_bytes(f"copy of code {res.code_index}".encode())

    copy = reg.issue_file("ann", out / "ann.bin", good)
    assert copy.model_sha256 == hashlib.sha256((out / "ann.bin").read_bytes()).hexdigest()
    assert reg.pending_customers() == ["ben", "cat"] and reg.pending_customers(["cat", "ann"]) == ["cat"]

    free = reg.counts()["codes_free"]
    for exc in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        def bad(res, dest: Path, exc=exc) -> None:
            dest.write_bytes(b"half a file")
            raise exc

        with pytest.raises(type(exc)):
            reg.issue_file("ben", out / "ben.bin", bad)
        assert not (out / "ben.bin").exists()  # the partial file is removed
        assert reg.counts()["codes_free"] == free and reg.issued_copies("ben") == []
    with pytest.raises(RegistryError, match="refusing to overwrite"):  # an existing file is never replaced
        reg.issue_file("cat", out / "ann.bin", good)
    assert reg.counts()["codes_free"] == free
    assert reg.audit(check_files=True) == []
    reg.close()


@pytest.fixture(scope="module")
def combined_shop(tmp_path_factory: pytest.TempPathFactory, clean_models):
    """A weight-fingerprint product (AG(2,7)) and a black-box product (m = 128) on the same digits base; alice
    and bob each issued one copy carrying both fingerprints."""
    from nnmark import Key
    from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct
    from nnmark.blackbox.combined import issue_combined
    from nnmark.fingerprint import Product
    from nnmark.io import save_model

    root = tmp_path_factory.mktemp("combined")
    base_file = save_model(root / "base.safetensors", clean_models[("cnn", 0)], {"data": "digits"})
    weights = Product.create(root / "weights", base_file, key=Key.from_seed("combined-weights"), code="ag:7")
    blackbox = BlackBoxProduct.create(root / "blackbox", base_file, key=Key.from_seed("combined-blackbox"), m=128,
                                      capacity=2000, colluders=2, noise=0.3,
                                      issue=BlackBoxIssueConfig(steps=150, lr=2e-3))
    for prod in (weights, blackbox):
        prod.add_customers(["alice", "bob", "carol"])
    issued = {n: issue_combined(weights, blackbox, n) for n in ("alice", "bob")}
    return weights, blackbox, issued


@pytest.mark.slow  # the module fixture issues 4 copies: ~87 s at load 8, over the default budget
def test_a_combined_copy_is_named_both_ways_and_clean_models_by_neither(combined_shop, clean_models) -> None:
    from nnmark.blackbox.combined import trace_combined
    from nnmark.io import load_model

    weights, blackbox, issued = combined_shop
    alice, _ = load_model(issued["alice"].model_path)
    rep = trace_combined(weights, blackbox, model=alice)
    assert rep.blackbox["named"] == ["alice"] and rep.weights is not None and rep.weights["named"] == ["alice"]
    assert rep.agree is True and rep.named_both == ["alice"]
    assert rep.customers["alice"]["named_combined"]
    assert rep.customers["alice"]["p_combined"] <= rep.combined_level == 1e-6 / 56
    assert [n for n, c in rep.customers.items() if c["named_combined"]] == ["alice"]
    # the registries record the delivered file (black-box) and the weight-only intermediate (weights)
    assert blackbox.registry.issued_copies("alice")[0].model_sha256 == issued["alice"].blackbox.model_sha256
    assert weights.registry.audit(check_files=True) == [] and blackbox.registry.audit(check_files=True) == []
    for seed in (1, 2, 3):  # other vendors' clean models (seed 0 is the base itself)
        clean = trace_combined(weights, blackbox, model=clean_models[("cnn", seed)])
        assert clean.named_either == [] and clean.agree is True, seed
        assert not any(c["named_combined"] for c in clean.customers.values())
    api_only = trace_combined(weights, blackbox, oracle=_Answers(alice))  # only the API is seen
    assert api_only.weights is None and api_only.agree is None and api_only.blackbox["named"] == ["alice"]


class _Answers:
    """A prediction API that returns only the top label of ``model``."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x):
        import torch

        with torch.no_grad():
            return self.model(x).argmax(1)


@pytest.mark.slow  # the module fixture issues 4 copies: ~87 s at load 8, over the default budget
def test_an_average_of_two_combined_copies_names_no_innocent(combined_shop) -> None:
    from nnmark.attacks import Average
    from nnmark.blackbox.combined import trace_combined
    from nnmark.io import load_model

    weights, blackbox, issued = combined_shop
    avg = Average().attack([load_model(issued[n].model_path)[0] for n in ("alice", "bob")])
    rep = trace_combined(weights, blackbox, model=avg)
    # the weight tracer names averaged coalitions (up to 6 for AG(2,7)); the black-box one may name fewer
    assert rep.weights is not None and rep.weights["named"] == ["alice", "bob"]
    assert set(rep.blackbox["named"]) <= {"alice", "bob"} and rep.agree == (rep.blackbox["named"] == ["alice", "bob"])
    assert {n for n, c in rep.customers.items() if c["named_combined"]} == {"alice", "bob"}
    assert all(c["p_blackbox"] is not None for c in rep.customers.values())  # every holder's p is reported


@pytest.mark.slow  # the module fixture issues 4 copies: ~87 s at load 8, over the default budget
def test_products_of_different_bases_are_refused(combined_shop, tmp_path: Path, clean_models) -> None:
    from nnmark import Key
    from nnmark.blackbox import BlackBoxError, BlackBoxProduct
    from nnmark.blackbox.combined import issue_combined
    from nnmark.io import save_model

    weights, _, _ = combined_shop
    other = save_model(tmp_path / "other.safetensors", clean_models[("cnn", 1)], {"data": "digits"})
    bb = BlackBoxProduct.create(tmp_path / "bb", other, key=Key.from_seed("x"), m=64, capacity=100)
    with pytest.raises(BlackBoxError, match="different base"):
        issue_combined(weights, bb, "alice")


@pytest.mark.slow  # the module fixture issues 4 copies: ~87 s at load 8, over the default budget
def test_cli_trace_of_a_file_reads_probabilities_or_labels(combined_shop) -> None:
    import json

    from conftest import run_cli

    _, blackbox, issued = combined_shop
    leaked = issued["bob"].model_path
    for mode, read in (("auto", "probabilities"), ("labels", "labels")):
        r = run_cli("fingerprint", "trace", leaked, "--product", blackbox.root, "--answers", mode, "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["answers_read"] == read and [v["customer"] for v in rep["named"]] == ["bob"]
    r = run_cli("fingerprint", "trace", leaked, "--product", blackbox.root, "--answers", "labels")
    assert r.returncode == 0 and "NAMED bob" in r.stdout and "named when p <= alpha / N" in r.stdout
