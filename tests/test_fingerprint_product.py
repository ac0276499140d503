"""Per-customer fingerprints on a real (small) model: issuing, collusion tracing under attacks, controls, errors.

One CNN trained once on bundled digits is the vendor's base model; copies are issued through
:class:`nnmark.fingerprint.Product` with a SQLite registry. Every decision asserted here is the
guarded AND-ACC decoder's (H0 and decision rule in :mod:`nnmark.fingerprint.product`).
"""

from __future__ import annotations

import contextlib
import shutil
import time

import numpy as np
import pytest
import torch

from nnmark.attacks import Average, Prune, build_attack
from nnmark.errors import KeyFileError
from nnmark.fingerprint import FingerprintError, IssueConfig, Product, issue_copy
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.registry import Registry, RegistryNotFoundError, RegistryProductError
from nnmark.train import TrainConfig, accuracy, seeded_model, train

N_CUSTOMERS = 12


@contextlib.contextmanager
def one_thread():
    """Tiny CPU models train many times faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def fp_base(tmp_path_factory, digits):
    """The vendor's base CNN on digits: (file, model, test accuracy)."""
    with one_thread():
        model = seeded_model(model_spec("cnn", digits.image_shape, 10), 0)
        train(model, digits.train, TrainConfig(epochs=10, seed=0, progress=False))
    path = tmp_path_factory.mktemp("fp_base") / "base.safetensors"
    save_model(path, model, {"data": "digits"})
    return path, model, accuracy(model, digits.test)


@pytest.fixture(scope="session")
def shop(tmp_path_factory, fp_base):
    """A product (AG(2,7): 56 codes) with 12 customers, each issued a copy with the default issuing (45 Adam
    steps on conv4 with the regulariser, then the correction). Returns (product, {customer: model})."""
    root = tmp_path_factory.mktemp("fp_shop") / "shop"
    prod = Product.create(root, fp_base[0], key=Key.from_seed("fp-tests"), code="ag:7")
    names = [f"cust-{i:02d}" for i in range(N_CUSTOMERS)]
    prod.add_customers(names)
    models = {}
    with one_thread():
        for n in names:
            models[n] = load_model(prod.issue(n).model_path)[0]
    return prod, models


def test_copies_exact_unique_and_faithful(shop, fp_base, digits):
    prod, models = shop
    holders = prod.registry.assigned_codes()
    assert sorted(holders.values()) == sorted(models) and len(holders) == N_CUSTOMERS  # one code each
    assert prod.registry.audit(check_files=True) == []
    base_acc = fp_base[2]
    for name, m in models.items():
        code = prod.registry.customer(name).code_index
        np.testing.assert_allclose(prod.carrier.extract(m), prod.layout.compose(code), atol=1e-4)
        # fidelity: no copy loses more than 0.5 accuracy points against the base
        assert accuracy(m, digits.test) >= base_acc - 0.005
        report = prod.trace(m)
        assert report.named == [name] and report.status == "accused"


def test_issue_modes(shop, fp_base, digits):
    """Every issue mode makes the code exact and leaves the base untouched; the default is the activation-weighted
    correction alone (no fine-tune steps)."""
    prod, models = shop
    _, meta = load_model(prod.registry.issued_copies("cust-00")[0].model_path)
    assert meta["issue"]["steps"] == 0
    f = prod.layout.compose(40)
    for cfg in (IssueConfig(correction="min-norm"), IssueConfig(train="carrier", finetune_steps=5),
                IssueConfig(train="all", lr=1e-4, finetune_steps=5)):
        model, rec = issue_copy(fp_base[1], f, prod.carrier, digits.train, cfg)
        assert rec.residual < 1e-4
        report = prod.trace(model)  # code 40 was never issued: decoded, but nobody is accused
        assert report.status == "unissued-code" and report.accused == []
        assert report.evidence["unissued_codes"] == [40]
        assert rec.steps == (0 if cfg.train == "none" else 5)
    with pytest.raises(FingerprintError):
        IssueConfig(correction="magic")
    assert torch.equal(fp_base[1].conv4.weight, load_model(fp_base[0])[0].conv4.weight)  # base untouched
    with pytest.raises(FingerprintError):
        IssueConfig(train="none", correct=False)


def test_random_coalitions_named_exactly(shop):
    """Coalitions of 1..6 (= k - 1 for k = 7) random customers average their copies: all named, nobody else."""
    prod, models = shop
    names = sorted(models)
    rng = np.random.default_rng(7)
    for size in range(1, 7):
        for _ in range(3):
            coalition = sorted(rng.choice(names, size, replace=False).tolist())
            avg = Average().attack([models[n] for n in coalition])
            report = prod.trace(avg)
            assert report.status == "accused"
            assert sorted(report.named) == coalition
            assert all(a.p_value < 0.01 for a in report.accused)


def test_activation_correction_preserves_outputs(fp_base, digits):
    """The activation-weighted correction changes conv4 in the directions its inputs excite least: the copy's
    logits move less than with the minimum-norm correction, and both carry the fingerprint exactly."""
    from nnmark.fingerprint import FingerprintCarrier
    from nnmark.fingerprint.issue import correction_metrics

    base = fp_base[1]
    key = Key.from_seed("act-corr")
    from nnmark.codes import AndAccCode

    f = AndAccCode.from_key(key, "ag", 7).fingerprint(3)
    carrier = FingerprintCarrier(key, base, ["conv4"], dim=f.size)
    metrics = correction_metrics(base, carrier, digits.train)
    assert set(metrics) == {"conv4"}
    x = digits.test.x[:300]
    with torch.no_grad():
        ref = base(x)
        moved = {}
        for mode in ("activation", "min-norm"):
            m, rec = issue_copy(base, f, carrier, digits.train, IssueConfig(correction=mode))
            assert rec.residual < 1e-4 and rec.steps == 0
            moved[mode] = float((m(x) - ref).pow(2).mean())
    assert moved["activation"] < 0.5 * moved["min-norm"], moved


def test_k_minus_1_colluders_of_ag11_after_finetune_and_k_refused(fp_base, digits, tmp_path):
    """(121,11,1): the average of k - 1 = 10 copies, fine-tuned by the attacker, still names exactly the ten;
    the average of k = 11 copies (beyond the code's guarantee) is refused by the code decoder, but each
    colluder's own secret component still names exactly the eleven (and nobody else)."""
    prod = Product.create(tmp_path / "wide11", fp_base[0], key=Key.from_seed("ag11"), code="ag:11")
    names = [f"w{i:02d}" for i in range(12)]
    prod.add_customers(names)
    models = {n: load_model(prod.issue(n).model_path)[0] for n in names}
    base_acc = fp_base[2]
    rng = np.random.default_rng(3)
    for trial in range(2):
        coalition = sorted(rng.choice(names, 10, replace=False).tolist())
        avg = Average().attack([models[n] for n in coalition])
        stolen = build_attack("ftal", epochs=5, seed=trial).attack(avg, digits.attacker)
        assert accuracy(stolen, digits.test) > base_acc - 0.1
        report = prod.trace(stolen)
        assert sorted(report.named) == coalition, report.evidence
    big = Average().attack([models[n] for n in names[:11]])
    report = prod.trace(big)
    assert report.evidence["decoder_status"] != "accused"
    assert sorted(report.named) == names[:11] and not any(a.code_named for a in report.accused)


def test_threshold_decoder_still_available(fp_base, tmp_path):
    prod = Product.create(tmp_path / "thr", fp_base[0], key=Key.from_seed("thr"), code="ag:7", decoder="threshold")
    prod.add_customers(["a", "b", "c"])
    models = [load_model(prod.issue(n).model_path)[0] for n in "abc"]
    report = prod.trace(Average().attack(models))
    assert sorted(report.named) == ["a", "b", "c"] and report.evidence["decoder"]["method"] == "threshold"
    assert prod.trace(fp_base[1]).accused == []
    with pytest.raises(FingerprintError, match="decoder"):
        Product.create(tmp_path / "bad", fp_base[0], decoder="guess")


@pytest.mark.parametrize("attack", ["finetune", "prune"])
def test_attacked_averages_still_traced(shop, digits, attack):
    """Average then fine-tune all layers (5 epochs on the attacker's 10 % split), or prune the smallest 50 % of
    the weights then sparse fine-tune 3 epochs: every colluder named, no innocent."""
    prod, models = shop
    names = sorted(models)
    rng = np.random.default_rng(11)
    for size in (3, 6):
        coalition = sorted(rng.choice(names, size, replace=False).tolist())
        avg = Average().attack([models[n] for n in coalition])
        if attack == "finetune":
            stolen = build_attack("ftal", epochs=5, seed=size).attack(avg, digits.attacker)
        else:
            stolen = Prune(0.5, finetune_epochs=3, seed=size).attack(avg, digits.attacker)
        assert accuracy(stolen, digits.test) > 0.8  # the attacked model still works
        report = prod.trace(stolen)
        assert sorted(report.named) == coalition, report.evidence


def test_clean_and_other_key_models_name_nobody(shop, fp_base, tmp_path):
    prod, _ = shop
    for clean in (fp_base[1], seeded_model(fp_base[1].spec, 5)):
        report = prod.trace(clean)
        assert report.accused == [] and report.status != "accused"
    other = Product.create(tmp_path / "other", fp_base[0], key=Key.from_seed("another-vendor"), code="ag:7",
                           issue=IssueConfig(train="none"))
    other.add_customers(["x", "y", "z"])
    copies = [load_model(other.issue(n).model_path)[0] for n in ("x", "y", "z")]
    assert other.trace(Average().attack(copies[:2])).named == ["x", "y"]  # its own key traces them
    for suspect in (copies[0], Average().attack(copies)):
        assert prod.trace(suspect).accused == []


def test_verbatim_leak_and_file_trace(shop):
    prod, _ = shop
    copy = prod.registry.issued_copies("cust-03")[0]
    report = prod.trace(copy.model_path)
    assert report.verbatim_copy_of == "cust-03" and report.named == ["cust-03"]
    d = report.to_dict()
    assert d["accused"][0]["customer"] == "cust-03" and "null_hypothesis" in d and d["decision_rule"]


def test_mismatch_errors(shop, fp_base, tmp_path, digits):
    prod, _ = shop
    lenet = seeded_model(model_spec("lenet5", digits.image_shape, 10), 0)
    save_model(tmp_path / "lenet.safetensors", lenet)
    with pytest.raises(FingerprintError, match="does not match the product's base model"):
        prod.trace(tmp_path / "lenet.safetensors")
    # a registry that is missing, or belongs to another product
    moved = tmp_path / "shop-copy"
    shutil.copytree(prod.root, moved)
    (moved / "registry.db").unlink()
    with pytest.raises(RegistryNotFoundError):
        Product.open(moved)
    other = Product.create(tmp_path / "p2", fp_base[0], key=Key.from_seed("p2"), issue=IssueConfig(train="none"))
    shutil.copyfile(other.root / "registry.db", moved / "registry.db")
    with pytest.raises(RegistryProductError):
        Product.open(moved)
    with pytest.raises(FingerprintError, match="key"):
        Product.open(prod.root, key_file=other.root / "key.json")
    with pytest.raises(KeyFileError):
        Product.open(prod.root, key_file=tmp_path / "nope.json")
    with pytest.raises(FingerprintError, match="576"):
        Product.create(tmp_path / "big", fp_base[0], code="ag:29")
    assert (prod.root / "key.json").stat().st_mode & 0o777 == 0o600


def test_failed_issue_leaves_no_record(shop, monkeypatch):
    prod, _ = shop
    prod.add_customers(["unlucky"])
    free_before = prod.registry.counts()["codes_free"]

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("nnmark.fingerprint.product.issue_copy", boom)
    with pytest.raises(RuntimeError):
        prod.issue("unlucky")
    assert prod.registry.counts()["codes_free"] == free_before
    assert prod.registry.issued_copies("unlucky") == [] and not list(prod.root.glob("copies/unlucky*"))


def test_recover_after_killed_issuer(shop, fp_base):
    """A reservation whose file was written but never completed is completed only if the file carries the
    reserved code; one without a usable file is released (its code returns to the pool)."""
    prod, _ = shop
    prod.add_customers(["crash-a", "crash-b", "crash-c"])
    # The crashed issuer is a second registry handle with a short lease whose heartbeat stops (closed, as a
    # killed process stops renewing); its leases lapse and recover() may then settle its reservations.
    issuer = Registry.open(prod.registry.url, lease_s=0.3)
    good = issuer.reserve_code("crash-a", planned_path=prod.copy_path("crash-a"))
    model, _ = issue_copy(fp_base[1], prod.layout.compose(good.code_index), prod.carrier,
                          config=IssueConfig(train="none"))
    save_model(good.planned_path, model)
    wrong = issuer.reserve_code("crash-b", planned_path=prod.copy_path("crash-b"))
    save_model(wrong.planned_path, fp_base[1])  # a file without the reserved fingerprint
    issuer.reserve_code("crash-c", planned_path=prod.copy_path("crash-c"))  # no file at all
    assert prod.recover(older_than_s=0.0).released == ()  # leases current: a live issuer is never robbed
    issuer.close()
    time.sleep(0.6)
    rep = prod.recover(older_than_s=0.0)
    assert rep.completed == (good.token,) and len(rep.released) == 2
    assert prod.registry.issued_copies("crash-a")[0].code_index == good.code_index
    assert prod.registry.audit(check_files=True) == []


def test_two_codebooks_side_by_side(fp_base, tmp_path):
    prod = Product.create(tmp_path / "wide", fp_base[0], key=Key.from_seed("wide"), code="ag:5x2",
                          issue=IssueConfig(train="none"))
    assert prod.layout.n_codes == 900
    prod.add_customers(["a", "b", "c", "d"])
    models = [load_model(prod.issue(n).model_path)[0] for n in "abcd"]
    assert sorted(prod.trace(Average().attack(models[1:3])).named) == ["b", "c"]
    assert prod.trace(fp_base[1]).accused == []


def test_community_codes_shortlist(fp_base, tmp_path):
    import networkx as nx

    graph = nx.planted_partition_graph(3, 8, 0.9, 0.02, seed=1)
    prod = Product.create(tmp_path / "social", fp_base[0], key=Key.from_seed("social"), code="ag:7", crc_bits=12,
                          issue=IssueConfig(train="none"))
    prod.add_customers_from_graph(graph)
    with pytest.raises(FingerprintError, match="graph"):
        prod.add_customers(["no-graph"])
    colluders = ["0", "1", "2"]  # one planted community
    models = [load_model(prod.issue(n).model_path)[0] for n in colluders]
    report = prod.trace(Average().attack(models))
    assert sorted(report.named) == colluders
    top = {s["customer"] for s in report.community_shortlist[:8]}
    assert set(colluders) <= top
    assert len({a.community for a in report.accused}) == 1


def test_reed_solomon_chained_codebooks(fp_base, digits, tmp_path):
    """Four AG(2,7) codebooks chained by a Reed-Solomon code (ag:7rs4: 53^2 = 2,809 customers, 196 values):
    an average of three copies, fine-tuned by the attacker, names exactly the three; four (beyond L - 1) are
    never pinned on an innocent; a clean model names nobody."""
    prod = Product.create(tmp_path / "rs", fp_base[0], key=Key.from_seed("rs"), code="ag:7rs4")
    assert prod.layout.n_codes == 2809 and prod.layout.dim == 196
    names = ["a", "b", "c", "d", "e"]
    prod.add_customers(names)
    models = {n: load_model(prod.issue(n).model_path)[0] for n in names}
    stolen = build_attack("ftal", epochs=5, seed=0).attack(Average().attack([models[n] for n in "bce"]),
                                                           digits.attacker)
    assert sorted(prod.trace(stolen).named) == ["b", "c", "e"]
    four = prod.trace(Average().attack([models[n] for n in "abcd"]))
    assert set(four.named) <= set("abcd")
    assert prod.trace(fp_base[1]).accused == []


def test_code_split_over_layers_in_proportion_to_their_width(fp_base):
    from nnmark.fingerprint import plan_chunks

    model = fp_base[1]  # digits CNN: conv2 and conv3 filter means 288 values each, conv4 576
    assert plan_chunks(model, ["conv4"], 121) == [("conv4", 0, 121)]
    assert plan_chunks(model, ["conv3", "conv4"], 484) == [("conv3", 0, 161), ("conv4", 161, 484)]
    chunks = plan_chunks(model, ["conv2", "conv3", "conv4"], 1152)  # every value used: each layer full
    assert [(c[2] - c[1]) for c in chunks] == [288, 288, 576]
    with pytest.raises(FingerprintError, match="hold only 1152"):
        plan_chunks(model, ["conv2", "conv3", "conv4"], 1153)
    with pytest.raises(FingerprintError, match="repeat"):
        plan_chunks(model, ["conv4", "conv4"], 10)
