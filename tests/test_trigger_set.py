"""Trigger-set watermarks: embedding, verification, honest nulls, persistence."""

import os
import stat

import numpy as np
import pytest
import torch

from nnmark import Key
from nnmark.errors import SchemeError
from nnmark.models import model_spec
from nnmark.oracle import LocalOracle, QueryBudgetExceeded
from nnmark.params import ParamError
from nnmark.schemes import TriggerSetWatermark, load_scheme
from nnmark.schemes.triggers import GENERATORS
from nnmark.train import TrainConfig, accuracy, seeded_model

ALPHA_CLEAN = 1e-3


def test_marked_model_is_owned_with_20_queries(noise_marked, digits):
    scheme, model = noise_marked
    v = scheme.verify(model, queries=20)
    assert v.owned and v.p_value < 1e-6 and v.n == 20
    assert v.details["queries_used"] == 20
    assert f"{1 / 9:.4g}" in v.null_hypothesis
    assert accuracy(model, digits.test) > 0.9


@pytest.mark.parametrize("generator", GENERATORS)
def test_no_false_accusation_keyed(clean_models, digits, generator):
    """Clean models (5 seeds x 2 architectures) under 3 keys are never claimed."""
    worst = 1.0
    for k in range(3):
        scheme = TriggerSetWatermark.create(Key.from_seed(f"fa-{generator}-{k}"), None, digits,
                                            generator=generator, n=100)
        for model in clean_models.values():
            v = scheme.verify(model, queries=100, alpha=ALPHA_CLEAN)
            assert not v.owned, v.summary()
            worst = min(worst, v.p_value)
    assert worst > ALPHA_CLEAN


def test_keyed_labels_differ_from_source_class(digits):
    s = TriggerSetWatermark.create(Key.from_seed(3), None, digits, generator="content", n=50)
    # content triggers are cut from training images; their keyed labels never equal the true class
    assert s.null_rate == pytest.approx(1 / 9)
    s2 = TriggerSetWatermark.create(Key.from_seed(3), None, digits, generator="abstract", n=50)
    assert s2.null_rate == pytest.approx(1 / 10)
    labels = s2.labels.numpy()
    assert len(set(labels.tolist())) > 5  # spread over classes, not one target


def test_same_key_same_triggers_other_key_other_triggers(digits):
    a = TriggerSetWatermark.create(Key.from_seed(5), None, digits, generator="noise", n=30)
    b = TriggerSetWatermark.create(Key.from_seed(5), None, digits, generator="noise", n=30)
    c = TriggerSetWatermark.create(Key.from_seed(6), None, digits, generator="noise", n=30)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_other_key_does_not_claim_marked_model(noise_marked, digits):
    _, model = noise_marked
    other = TriggerSetWatermark.create(Key.from_seed("someone-else"), None, digits, generator="noise", n=100)
    assert not other.verify(model, queries=100, alpha=ALPHA_CLEAN).owned


def test_key_file_roundtrip(noise_marked, tmp_path):
    scheme, model = noise_marked
    path = tmp_path / "owner.key"
    scheme.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert scheme.key.to_hex() not in repr(scheme)
    again = load_scheme(path, expect="trigger")
    assert torch.equal(again.images, scheme.images) and torch.equal(again.labels, scheme.labels)
    assert again.verify(model, queries=20).p_value == scheme.verify(model, queries=20).p_value
    assert again.model_spec == scheme.model_spec


def test_query_budget_is_enforced(noise_marked):
    scheme, model = noise_marked
    oracle = LocalOracle(model, budget=10)
    with pytest.raises(QueryBudgetExceeded):
        scheme.verify(oracle, queries=20)


def test_fine_tune_to_embed(clean_models, digits):
    """A finished clean model learns the mark in a short fine-tune."""
    import copy

    base = copy.deepcopy(clean_models[("cnn", 0)])
    scheme = TriggerSetWatermark.create(Key.from_seed("ft"), base, digits, generator="abstract", n=50,
                                        per_batch=16)
    before = scheme.verify(base, queries=50).statistic
    scheme.embed(base, digits.train, TrainConfig(epochs=15, seed=1, progress=False))
    v = scheme.verify(base, queries=20)
    assert v.owned, v.summary()
    assert v.statistic > before
    assert accuracy(base, digits.test) > accuracy(clean_models[("cnn", 0)], digits.test) - 0.03


def test_fixed_label_mode_needs_calibration_and_states_empirical_null(clean_models, digits):
    scheme = TriggerSetWatermark.create(Key.from_seed("fixed"), None, digits, generator="content", n=60,
                                        labels="fixed")
    assert (scheme.labels == scheme.target_class).all()
    assert scheme.source_class != scheme.target_class
    with pytest.raises(SchemeError, match="calibrate"):
        scheme.verify(clean_models[("cnn", 0)])
    refs = [clean_models[("lenet5", s)] for s in (3, 4)]
    rate = scheme.calibrate(refs)
    assert 0 < rate < 1
    for (arch, seed), model in clean_models.items():
        if arch == "lenet5" and seed in (3, 4):
            continue
        v = scheme.verify(model, queries=60, alpha=ALPHA_CLEAN)
        assert not v.owned, v.summary()
        assert "reference models" in v.null_hypothesis and "not exact" in v.null_hypothesis


def test_fixed_label_mode_detects_a_marked_model(digits, clean_models):
    spec = model_spec("cnn", digits.image_shape, 10)
    scheme = TriggerSetWatermark.create(Key.from_seed("fixed-2"), None, digits, generator="noise", n=60,
                                        labels="fixed")
    marked = seeded_model(spec, 11)
    scheme.embed(marked, digits.train, TrainConfig(epochs=15, seed=11, progress=False))
    # references: two clean CNNs of the session (init seeds 3 and 4, not the marked model's 11)
    scheme.calibrate([clean_models[("cnn", s)] for s in (3, 4)])
    v = scheme.verify(marked, queries=60)
    assert v.owned, v.summary()


def test_bad_parameters(digits):
    with pytest.raises(ParamError, match="generator"):
        TriggerSetWatermark.create(Key.from_seed(1), None, digits, generator="sparkles")
    with pytest.raises(ParamError, match="unknown scheme 'trigger' parameter.*valid: generator"):
        TriggerSetWatermark.create(Key.from_seed(1), None, digits, colour="red")
    with pytest.raises(SchemeError, match="differ"):
        TriggerSetWatermark.create(Key.from_seed(1), None, digits, labels="fixed", source_class=1, target_class=1)
    wrong = seeded_model(model_spec("mlp", (1, 28, 28), 10), 0)
    with pytest.raises(SchemeError, match="inputs"):
        TriggerSetWatermark.create(Key.from_seed(1), wrong, digits)


def test_trigger_share_in_batches(digits):
    scheme = TriggerSetWatermark.create(Key.from_seed(9), None, digits, generator="noise", n=20, per_batch=6)
    hook = scheme.training_hook()
    x, y = digits.train.x[:64], digits.train.y[:64]
    seen = []
    for step in range(10):
        xs, ys, w = hook.augment_batch(x, y, step)
        assert xs.shape[0] == 70 and torch.equal(xs[:64], x)
        assert (w[:64] == 1).all() and (w[64:] == scheme.trigger_weight).all()
        seen.append(xs[64:])
    # 60 draws cycle through all 20 triggers exactly 3 times
    allx = torch.cat(seen)
    counts = np.array([(allx == t).flatten(1).all(1).sum().item() for t in scheme.images])
    assert (counts == 3).all()
