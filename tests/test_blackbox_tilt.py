"""Black-box copies issued by a tilt of the output layer (:mod:`nnmark.blackbox.tilt`): named alone and in weight
averages through probabilities, nobody else named, and the thief's function-preserving and lying moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from nnmark import Key
from nnmark.attacks.collusion import combine_models
from nnmark.blackbox import BlackBoxIssueConfig, BlackBoxProduct, ScoreNull
from nnmark.blackbox.answers import ProbabilityOracle, answer_weights
from nnmark.blackbox.tilt import HeadTilt, output_layer
from nnmark.errors import NNMarkError
from nnmark.io import load_model, save_model
from nnmark.oracle import LocalOracle
from nnmark.train import accuracy

M = 1024  # digits' train and validation splits hold 1,257 source images
CAPACITY = 2000
NAMES = ["ann", "ben", "cat", "dan"]


@pytest.fixture(scope="module")
def tilt_shop(tmp_path_factory: pytest.TempPathFactory, clean_models):
    """A tilted black-box product on the digits CNN (clean seed 0 as the base); four customers issued a copy."""
    root = tmp_path_factory.mktemp("tilt")
    base_file = save_model(root / "base.safetensors", clean_models[("cnn", 0)], {"data": "digits"})
    prod = BlackBoxProduct.create(root / "shop", base_file, key=Key.from_seed("tilt-tests"), m=M, capacity=CAPACITY,
                                  colluders=3, noise=0.3, issue=BlackBoxIssueConfig(method="tilt", delta=0.5))
    prod.add_customers([*NAMES, "eve"])
    copies = {n: load_model(prod.issue(n).model_path)[0] for n in NAMES}
    return prod, copies


def test_tilted_copies_keep_the_arg_max_and_are_named_alone(tilt_shop, digits) -> None:
    prod, copies = tilt_shop
    base_acc = accuracy(prod.base_model, digits.test)
    for name, model in copies.items():
        assert abs(accuracy(model, digits.test) - base_acc) <= 0.01, name
        rep = prod.trace(ProbabilityOracle(model))
        assert rep.named_customers == [name] and rep.named[0].p_value < 1e-6
        assert rep.evidence["reference"] and rep.queries_used <= M


def test_weight_averages_name_every_colluder_with_any_mixing_weights(tilt_shop) -> None:
    prod, copies = tilt_shop
    for group, weights in ((["ann", "ben", "cat"], [1 / 3] * 3), (["ben", "dan"], [0.65, 0.35])):
        avg = combine_models([copies[g] for g in group], weights)
        rep = prod.trace(ProbabilityOracle(avg), looks=[M])
        assert sorted(rep.named_customers) == sorted(group), (group, rep.named_customers, rep.min_p_not_named)


def test_clean_models_the_base_labels_and_other_keys_name_nobody(tilt_shop, clean_models) -> None:
    prod, copies = tilt_shop
    for model in [prod.base_model, *(clean_models[("cnn", s)] for s in (1, 2, 3)), clean_models[("lenet5", 0)]]:
        rep = prod.trace(ProbabilityOracle(model), looks=[M])
        assert rep.named == [] and rep.status == "not-named"
    # a tilt lives in the scores: an API that shows labels only carries no evidence, and names nobody
    rep = prod.trace(LocalOracle(copies["ann"]), looks=[M])
    assert rep.named == [] and "labels only" in rep.evidence["warning"]
    with pytest.raises(NNMarkError, match="scores"):
        prod.trace(ProbabilityOracle(copies["ann"]), answers="labels")
    # the same copy under another vendor's key and triggers
    other = BlackBoxProduct.create(prod.root.parent / "other", prod.root / "base.safetensors",
                                   key=Key.from_seed("tilt-tests-other"), m=M, capacity=CAPACITY, colluders=3,
                                   noise=0.3, issue=BlackBoxIssueConfig(method="tilt"))
    other.add_customers(NAMES)
    assert other.trace(ProbabilityOracle(combine_models(list(copies.values()), [0.25] * 4)), looks=[M]).named == []


def test_innocents_p_values_are_valid_under_an_average(tilt_shop) -> None:
    prod, copies = tilt_shop
    avg = combine_models([copies["ann"], copies["ben"], copies["cat"]], [1 / 3] * 3)
    trig = prod.triggers
    w, _ = answer_weights(ProbabilityOracle(avg)(trig.x), trig.a, trig.b, reference=prod.reference)
    codes = prod.holders()
    involved = {c for c, n in codes.items() if n in ("ann", "ben", "cat")}
    innocents = [c for c in range(CAPACITY) if c not in involved]
    p = ScoreNull(prod.code.biases, weights=w).p_value(prod.code.scores(weights=w, codes=innocents))
    # valid: never smaller than uniform (one-sided KS), and about alpha of them below alpha
    assert stats.kstest(p, "uniform", alternative="greater").pvalue > 1e-3
    assert np.mean(p <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(p))


def test_permuted_and_rescaled_hidden_units_keep_the_trace(tilt_shop) -> None:
    """A thief who permutes the units feeding the output layer and rescales them (ReLU: positive factors pass
    through) changes every weight and no answer."""
    prod, copies = tilt_shop
    thief = combine_models([copies["ann"], copies["dan"]], [0.5, 0.5])
    fc2, head = thief.fc2, thief.head
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(fc2.out_features, generator=g)
    scale = torch.rand(fc2.out_features, generator=g) * 3 + 0.2
    with torch.no_grad():
        fc2.weight.copy_(fc2.weight[perm] * scale[:, None])
        fc2.bias.copy_(fc2.bias[perm] * scale)
        head.weight.copy_(head.weight[:, perm] / scale[None, :])
    rep = prod.trace(ProbabilityOracle(thief), looks=[M])
    assert sorted(rep.named_customers) == ["ann", "dan"]


def test_models_whose_output_is_not_a_linear_layer_are_refused(tilt_shop, digits) -> None:
    prod, copies = tilt_shop
    soft = torch.nn.Sequential(prod.base_model, torch.nn.Softmax(1))
    with pytest.raises(NNMarkError, match="last Linear"):
        output_layer(soft, digits.test.x[:2])
    with pytest.raises(NNMarkError, match="no nn.Linear|nn.Linear layer"):
        output_layer(torch.nn.Sequential(torch.nn.Conv2d(1, 10, 8), torch.nn.Flatten()), digits.test.x[:2])
    with pytest.raises(ValueError, match="issue method"):
        BlackBoxIssueConfig(method="telepathy")
    with pytest.raises(ValueError, match="positive"):
        BlackBoxIssueConfig(method="tilt", delta=float("nan"))
    with pytest.raises(NNMarkError, match="bits"):
        prod.tilt.weight_change(np.zeros(M + 1, dtype=bool), 0.5)
    with pytest.raises(NNMarkError, match="ridge"):
        HeadTilt.solve(prod.base_model, prod.triggers, digits.train.x[:10], ridge=0.0)


def test_cli_issues_tilted_copies_and_traces_their_average(tmp_path, clean_models, cli) -> None:
    import json

    base = save_model(tmp_path / "base.safetensors", clean_models[("cnn", 1)], {"data": "digits"})
    shop = tmp_path / "shop"
    r = cli("fingerprint", "issue", "--product", shop, "--base", base, "--customers", "2", "--code", "tardos:512",
            "--capacity", "2000", "--colluders", "2", "--noise", "0.3", "--issue-method", "tilt",
            "--key-seed", "tilt-cli", "--json")
    assert r.returncode == 0, r.stderr
    assert "tilt copies" in r.stderr
    files = [o["file"] for o in json.loads(r.stdout)["issued"]]
    avg = tmp_path / "avg.safetensors"
    assert cli("attack", *files, "--attack", "average", "--out", avg).returncode == 0
    r = cli("fingerprint", "trace", avg, "--product", shop, "--stop", "budget", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert sorted(v["customer"] for v in rep["named"]) == ["customer-0001", "customer-0002"]
    assert rep["evidence"]["reference"] and rep["answers_read"] == "probabilities"
    r = cli("fingerprint", "issue", "--product", tmp_path / "bad", "--base", base, "--customers", "1",
            "--code", "tardos:64", "--issue-method", "tilt", "--tilt-delta", "-1", "--key-seed", "x")
    assert r.returncode != 0 and "delta" in r.stderr


def test_lying_apis_name_nobody_through_the_reference(tilt_shop) -> None:
    """Crafted score rows (NaN, +-1e30 logits, the bare reference itself) against a tilted product: the
    reference subtraction keeps every innocent's null exact, so nobody is named."""
    prod, _ = tilt_shop
    rng = np.random.default_rng(3)

    def api(kind: str):
        def answer(x: torch.Tensor) -> torch.Tensor:
            n = len(x)
            if kind == "nan":
                return torch.full((n, 10), float("nan"))
            if kind == "huge":
                return torch.from_numpy(rng.choice([-1e30, 1e30], size=(n, 10)))
            return torch.from_numpy(rng.normal(0, 5, size=(n, 10)))  # random logits
        return answer

    for kind in ("nan", "huge", "random"):
        rep = prod.trace(api(kind), looks=[M])
        assert rep.named == [], kind
    # an API that answers the base's own logits (shifted by a constant): d - d0 = 0, no evidence, nobody named
    def base_api(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return prod.base_model(x) + 3.0

    rep = prod.trace(base_api, looks=[M])
    assert rep.named == [] and rep.min_p_not_named > 1e-6
