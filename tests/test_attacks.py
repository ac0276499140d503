import pytest
import torch

from nnmark.attacks import ATTACKS, FineTune, Prune, build_attack, prune_by_magnitude
from nnmark.models import model_spec
from nnmark.train import accuracy, seeded_model


def _weights(model):
    return {n: p for n, p in model.named_parameters() if p.ndim >= 2}


@pytest.mark.parametrize("order", ["smallest", "largest", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_fraction_and_order(order, scope):
    m = seeded_model(model_spec("lenet5", (1, 8, 8), 10), 0)
    before = {n: p.detach().clone() for n, p in _weights(m).items()}
    masks = prune_by_magnitude(m, 0.6, order=order, scope=scope)
    w = _weights(m)
    total = sum(p.numel() for p in w.values())
    zeros = sum(int((p == 0).sum()) for p in w.values())
    assert abs(zeros / total - 0.6) < 0.002
    if scope == "layer":
        for n, p in w.items():
            assert abs(float((p == 0).float().mean()) - 0.6) < 0.02, n
    if order != "random":
        groups = [list(w)] if scope == "global" else [[n] for n in w]
        for names in groups:
            removed = torch.cat([before[n][w[n] == 0].abs() for n in names])
            kept = torch.cat([before[n][w[n] != 0].abs() for n in names])
            if order == "smallest":
                assert removed.max() <= kept.min()
            else:
                assert removed.min() >= kept.max()
    assert set(masks) == {n.rsplit(".", 1)[0] for n in w}


def test_prune_named_layers_only():
    m = seeded_model(model_spec("cnn", (1, 8, 8), 10), 0)
    prune_by_magnitude(m, 0.5, layers=["conv4"])
    assert float((m.conv4.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert int((m.conv1.weight == 0).sum()) == 0
    with pytest.raises(ValueError, match="no conv/linear layer"):
        prune_by_magnitude(m, 0.5, layers=["conv9"])


def test_sparse_finetune_keeps_pruned_weights_zero(digits, clean_models):
    model = clean_models[("lenet5", 0)]
    att = digits.attacker
    pruned_only = Prune(fraction=0.5).attack(model, att)
    out = Prune(fraction=0.5, finetune_epochs=2).attack(model, att)
    for (n, p), q in zip(_weights(out).items(), _weights(pruned_only).values(), strict=True):
        assert torch.equal(p == 0, q == 0), n  # same zero pattern after sparse fine-tuning
    assert not torch.equal(out.head.weight, pruned_only.head.weight)  # but it did train
    assert int((_weights(model)["conv1.weight"] == 0).sum()) == 0  # original untouched


@pytest.mark.parametrize("mode", ["FTLL", "FTAL", "RTLL", "RTAL"])
def test_finetune_modes_touch_the_right_layers(mode, digits, clean_models):
    model = clean_models[("lenet5", 1)]
    out = FineTune(mode=mode, epochs=1, max_batches=3).attack(model, digits.attacker)
    body_changed = not torch.equal(out.conv1.weight, model.conv1.weight)
    head_changed = not torch.equal(out.head.weight, model.head.weight)
    assert head_changed
    assert body_changed == mode.endswith("AL")
    assert accuracy(out, digits.test) > 0.1


def test_rtll_reinitialises_head(digits, clean_models):
    model = clean_models[("lenet5", 2)]
    out = FineTune(mode="RTLL", epochs=1, max_batches=1, lr=1e-9).attack(model, digits.attacker)
    # with a negligible learning rate the head is (almost exactly) the fresh initialisation
    assert (out.head.weight - model.head.weight).abs().mean() > 1e-3


def test_registry_and_errors():
    assert {"ftll", "ftal", "rtll", "rtal", "prune"} <= set(ATTACKS)
    assert build_attack("FTAL", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("melt")
    with pytest.raises(ValueError, match="mode"):
        FineTune(mode="XX")
    with pytest.raises(ValueError, match="attacker data"):
        FineTune().attack(seeded_model(model_spec("mlp", (1, 8, 8), 10), 0), None)
