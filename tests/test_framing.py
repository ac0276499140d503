"""Framing: no combination of copies, however weighted, gets an innocent customer named.

A thief who read the README and the papers knows that a copy is the base plus a linear function of the
customer's code and that AND-ACC codes from AG(2, q) come in parallel classes whose blocks sum to the same
vector. The strongest such thief also knows which code every colluder holds (here: read from the registry,
i.e. even the secret issue order has leaked). With weights summing to 1 (some negative) the colluders rebuild
an innocent customer's code exactly:

- 13 colluders: one parallel class at +1 and the next class minus its first line at -1 leave that line's code;
- 8 colluders: a whole class at +1/6 and one line of another class at -1/6 leave the average of that class's
  six other lines (six innocents).

Before the per-copy secret components the tracer named the framed innocents (p = 5e-324). Now a customer is
named only when its own keyed component passes ``p_u <= alpha / n_codes``, which no combination of other
copies can make more likely than ``alpha / n_codes`` (:mod:`nnmark.fingerprint.own`).
"""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch

from nnmark.attacks import Average, Prune, build_attack, combine_models
from nnmark.fingerprint import Product
from nnmark.io import load_model, save_model
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import TrainConfig, accuracy, seeded_model, train

Q = 7  # AG(2,7): 56 codes in 8 parallel classes of 7 lines


@contextlib.contextmanager
def one_thread():
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


def parallel_classes(code) -> list[list[int]]:
    """The parallel classes of an AND-ACC codebook's design: maximal sets of pairwise disjoint blocks."""
    inc = code.incidence.astype(np.int64)
    meets = (inc.T @ inc) > 0  # (b, b): blocks sharing a point
    left = set(range(code.n_codewords))
    classes = []
    while left:
        j = min(left)
        cls = [i for i in sorted(left) if not meets[i, j] or i == j]
        cls = [i for i in cls if not any(meets[i, o] for o in cls if o != i)]
        classes.append(cls)
        left -= set(cls)
    return classes


@pytest.fixture(scope="module")
def full_shop(tmp_path_factory, digits):
    """A product on a digits CNN with every one of the 56 AG(2,7) codes issued: (product, {code: (name, model)},
    base model, base test accuracy)."""
    with one_thread():
        base = seeded_model(model_spec("cnn", digits.image_shape, 10), 1)
        train(base, digits.train, TrainConfig(epochs=8, seed=1, progress=False))
    root = tmp_path_factory.mktemp("framing")
    save_model(root / "base.safetensors", base, {"data": "digits"})
    prod = Product.create(root / "shop", root / "base.safetensors", key=Key.from_seed("framing-tests"), code="ag:7")
    names = [f"u{i:02d}" for i in range(prod.layout.n_codes)]
    prod.add_customers(names)
    by_code = {}
    with one_thread():
        for n in names:
            issued = prod.issue(n)
            by_code[issued.code_index] = (n, load_model(issued.model_path)[0])
    return prod, by_code, base, accuracy(base, digits.test)


def _innocents_named(report, coalition_names) -> list[str]:
    return sorted(set(report.named) - set(coalition_names))


def test_parallel_class_frames_name_no_innocent(full_shop):
    """The issue's affine frames, built by a thief who knows every colluder's code: they rebuild the innocents'
    code part exactly, yet nobody outside the coalition is named (and the framed codes are reported as weak
    evidence at most)."""
    prod, by_code, _base, _ = full_shop
    classes = parallel_classes(prod.layout.cic)
    assert len(classes) == Q + 1 and all(len(c) == Q for c in classes)
    frames = []
    for a, b in [(0, 1), (3, 7), (5, 2)]:
        target = classes[b][0]
        members = classes[a] + classes[b][1:]
        weights = [1.0] * Q + [-1.0] * (Q - 1)  # sums to 1
        frames.append(([target], members, weights))
    for a, b in [(0, 1), (6, 4)]:
        line = classes[b][0]
        members = classes[a] + [line]
        weights = [1.0 / (Q - 1)] * Q + [-1.0 / (Q - 1)]  # sums to 1: the average of b's other six lines
        frames.append((classes[b][1:], members, weights))
    for targets, members, weights in frames:
        suspect = combine_models([by_code[c][1] for c in members], weights)
        # the frame works on the code: the carrier reads exactly the framed code (or the framed average)
        want = np.mean([prod.layout.compose(t) for t in targets], axis=0)
        np.testing.assert_allclose(prod.carrier.extract(suspect), want, atol=1e-3)
        names = [by_code[c][0] for c in members]
        report = prod.trace(suspect)
        assert _innocents_named(report, names) == [], (targets, report.named)
        framed = {by_code[t][0] for t in targets}
        assert not framed & set(report.named)
        # the decoder still "sees" the framed codes; they are listed, never accused
        weak = {s["customer"] for s in report.suspects}
        assert framed <= weak, report.to_dict()["suspects"]


def test_random_affine_combinations_name_no_innocent(full_shop):
    """A search over coalitions of 2..56 copies (up to the whole registry) with random weights summing to 1,
    some negative, and min-norm code-level frames of random targets: no innocent is ever named."""
    prod, by_code, _base, _ = full_shop
    rng = np.random.default_rng(2024)
    codes = np.array(sorted(by_code))
    fps = np.stack([prod.layout.compose(c) for c in codes])
    n_frames = 0
    for trial in range(30):
        if trial % 2:  # random weights summing to 1 over 2..56 copies (the whole registry once)
            size = len(codes) if trial == 1 else int(rng.integers(2, len(codes) + 1))
            members = rng.choice(codes, size, replace=False)
            w = rng.normal(size=size)
            w = w / w.sum() if abs(w.sum()) > 0.2 else np.full(size, 1.0 / size) + w - w.mean()
        else:  # the least-norm weights over 50..55 other copies that rebuild a random target's code exactly
            target = int(rng.choice(codes))
            others = np.setdiff1d(codes, [target])
            members = rng.choice(others, int(rng.integers(50, len(others) + 1)), replace=False)
            a = np.vstack([fps[np.searchsorted(codes, members)].T, np.ones(members.size)])
            rhs = np.concatenate([prod.layout.compose(target), [1.0]])
            w, *_ = np.linalg.lstsq(a, rhs, rcond=None)
            n_frames += int(np.abs(a @ w - rhs).max() < 1e-6)
        suspect = combine_models([by_code[int(c)][1] for c in members], w)
        report = prod.trace(suspect)
        assert _innocents_named(report, [by_code[int(c)][0] for c in members]) == [], (trial, report.named)
    assert n_frames >= 5  # the search did rebuild innocents' codes exactly (about half of the 15 tries)


def test_true_coalitions_named_after_attacks(full_shop, digits):
    """Averages of 1..6 (= k - 1) copies, fine-tuned (FTAL, 5 epochs on the attacker's split) or pruned (40 %,
    then 3 epochs of sparse fine-tuning): every colluder named, nobody else."""
    prod, by_code, _base, base_acc = full_shop
    rng = np.random.default_rng(5)
    codes = sorted(by_code)
    for size in (1, 3, 6):
        members = rng.choice(codes, size, replace=False)
        names = sorted(by_code[int(c)][0] for c in members)
        avg = Average().attack([by_code[int(c)][1] for c in members])
        for stolen in (build_attack("ftal", epochs=5, seed=size).attack(avg, digits.attacker),
                       Prune(0.4, finetune_epochs=3, seed=size).attack(avg, digits.attacker)):
            assert accuracy(stolen, digits.test) > base_acc - 0.05
            report = prod.trace(stolen)
            assert sorted(report.named) == names, report.to_dict()["accused"]
            assert all(a.p_value <= prod.config.alpha / prod.layout.n_codes for a in report.accused)


def test_clean_models_name_nobody(full_shop, digits):
    prod, _by_code, base, _ = full_shop
    for seed in (2, 3):
        clean = seeded_model(base.spec, seed)
        train(clean, digits.train, TrainConfig(epochs=2, seed=seed, progress=False))
        report = prod.trace(clean)
        assert report.accused == [] and report.status != "accused"
    report = prod.trace(base)  # the vendor's own model: no customer's component in it
    assert report.accused == []


def test_copies_stay_faithful(full_shop, digits):
    """Per-copy components plus the code cost no more than 0.5 points of test accuracy on digits (mean over 28
    copies within 0.2 points)."""
    _prod, by_code, _base, base_acc = full_shop
    accs = np.array([accuracy(by_code[c][1], digits.test) for c in sorted(by_code)[::2]])
    assert accs.min() >= base_acc - 0.005 and accs.mean() >= base_acc - 0.002, (accs.min(), accs.mean(), base_acc)


def test_issue_order_is_secret_and_key_derived(full_shop):
    """Codes are handed out in a key-derived order: a permutation of all codes, the same for the same key,
    different for another key, and not the registry's natural order (one parallel class first)."""
    from nnmark.codes.order import secret_issue_order
    from nnmark.fingerprint import build_layout

    prod, by_code, _base, _ = full_shop
    layout = prod.layout
    order = [c.code_index for c in sorted(prod.registry.customers(), key=lambda c: c.name)]
    assert sorted(order) == list(range(layout.n_codes))
    assert order != list(range(layout.n_codes))
    k1, k2 = Key.from_seed("order-1"), Key.from_seed("order-2")
    o1 = secret_issue_order(k1, build_layout(k1, "ag:7").cic)
    assert np.array_equal(o1, secret_issue_order(k1, build_layout(k1, "ag:7").cic))
    assert not np.array_equal(o1, secret_issue_order(k2, build_layout(k2, "ag:7").cic))
    assert sorted(o1.tolist()) == list(range(56))


def test_legacy_product_opens_and_never_accuses(full_shop, tmp_path):
    """A product created before per-copy components (no ``own`` parameters in product.json) still opens and
    traces, but names nobody: its copies carry nothing a frame cannot rebuild. Decoded codes are listed as
    suspects."""
    import shutil

    prod, by_code, _base, _ = full_shop
    legacy = tmp_path / "legacy"
    shutil.copytree(prod.root, legacy)
    cfg = json.loads((legacy / "product.json").read_text())
    cfg.pop("own")
    cfg.pop("code_order", None)
    (legacy / "product.json").write_text(json.dumps(cfg))
    old = Product.open(legacy)
    code = sorted(by_code)[0]
    report = old.trace(by_code[code][1])
    assert report.accused == [] and report.status == "unprotected"
    assert [s["customer"] for s in report.suspects] == [by_code[code][0]]


@pytest.mark.parametrize("weighting", ["adaptive", "plain"])
def test_own_component_null_is_exact(weighting):
    """For one fixed suspect -- here an affine combination of some codes' components plus noise, then 40 % of its
    conv4 weights pruned -- the z of every *other* code is standard normal: over 3,000 codes (3,000 independent
    draws of G) mean ~ 0, sd ~ 1, and a Kolmogorov-Smirnov test against N(0, 1) does not reject. The colluding
    codes themselves get large z. Small CNN, numpy only (no training)."""
    from scipy import stats

    from nnmark.fingerprint.carrier import FingerprintCarrier, patch_moment
    from nnmark.fingerprint.own import OwnComponents

    model = seeded_model(model_spec("cnn", (1, 8, 8), 10, channels=[4, 4, 8, 8], dense=[16, 16]), 0)
    key = Key.from_seed("null-check")
    carrier = FingerprintCarrier(key, model, ["conv4"], dim=25)
    images = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    own = OwnComponents(key, model, carrier, {"conv4": patch_moment(model, "conv4", images)})
    combined = copy.deepcopy(model)
    with torch.no_grad():
        for code, w in [(0, 1.0), (1, 1.0), (2, -1.0), (3, 0.5)]:
            combined.conv4.weight.add_(w * own.component(code)["conv4"].float().view_as(combined.conv4.weight))
    colluders = own.z_scores(combined, [0, 1, 2, 3], weighting)
    assert colluders[0] > 5 and colluders[1] > 5 and colluders[2] < -5, colluders  # the test has power
    suspect = copy.deepcopy(combined)
    with torch.no_grad():
        w = suspect.conv4.weight
        w.add_(0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.4 * w.numel())).values)
    for m in (combined, suspect):
        z = own.z_scores(m, range(10, 3010), weighting)
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1.0) < 0.06, (z.mean(), z.std())
        assert stats.kstest(z, "norm").pvalue > 1e-3


def test_scan_names_the_framers_and_scan_off_needs_the_decoder(full_shop):
    """In the 13-copy frame the seven copies weighted +1 keep their own components (at 1/sqrt(13) of a copy's
    strength), the six weighted -1 carry theirs negated: the scan names exactly the seven, the decoder names the
    framed innocent, whose component is absent (a suspect, never accused). With ``scan=False`` only decoded codes
    are tested: nobody is named. A plain average of three copies is named either way."""
    prod, by_code, _base, _ = full_shop
    classes = parallel_classes(prod.layout.cic)
    plus, minus, target = classes[2], classes[5][1:], classes[5][0]
    frame = combine_models([by_code[c][1] for c in plus + minus], [1.0] * Q + [-1.0] * (Q - 1))
    report = prod.trace(frame)
    assert sorted(report.named) == sorted(by_code[c][0] for c in plus)
    assert not any(a.code_named for a in report.accused)
    assert [s["customer"] for s in report.suspects] == [by_code[target][0]]
    assert report.suspects[0]["p_value"] > prod.config.alpha / prod.layout.n_codes
    off = prod.trace(frame, scan=False)
    assert off.accused == [] and off.status == "weak-evidence"
    three = sorted(by_code)[10:13]
    avg = Average().attack([by_code[c][1] for c in three])
    for s in (True, False):
        rep = prod.trace(avg, scan=s)
        assert sorted(rep.named) == sorted(by_code[c][0] for c in three)
        assert all(a.code_named for a in rep.accused)
