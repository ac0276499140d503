import pytest
import torch

from nnmark.attacks import Attack, AttackError, Average, FineTune, Prune, build_attack, prune_by_magnitude
from nnmark.components import REGISTRY, ComponentError
from nnmark.models import model_spec
from nnmark.params import ParamError
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
    assert {"ftll", "ftal", "rtll", "rtal", "prune", "average", "permute", "rescale"} <= set(REGISTRY.names("attack"))
    atk = build_attack("FTAL", epochs="3")
    assert isinstance(atk, FineTune) and atk.epochs == 3 and atk.mode == "FTAL"
    with pytest.raises(ComponentError, match="unknown attack"):
        build_attack("melt")
    with pytest.raises(ComponentError, match="fixes mode"):
        build_attack("ftal", mode="RTAL")
    with pytest.raises(ParamError, match="mode"):
        FineTune(mode="XX")
    with pytest.raises(ParamError, match="valid: .*fraction"):
        build_attack("prune", fractoin=0.5)
    with pytest.raises(AttackError, match="attacker data"):
        FineTune().attack(seeded_model(model_spec("mlp", (1, 8, 8), 10), 0), None)
    assert FineTune("rtll", 3).describe()["mode"] == "RTLL"  # positional in declaration order


def test_every_registered_attack_declares_its_parameters():
    for comp in REGISTRY.components("attack"):
        cls = comp.load()
        assert issubclass(cls, Attack), comp.name
        names = cls.PARAMS.names()
        assert "seed" in names, comp.name
        assert cls.budget is None or cls.budget in names, comp.name
        built = cls(**comp.resolve({}))  # every declared default builds
        assert built.describe()["attack"] == cls.name


def test_collusion_takes_several_models_and_single_model_attacks_refuse_them():
    spec = model_spec("mlp", (1, 8, 8), 10)
    a, b = seeded_model(spec, 0), seeded_model(spec, 1)
    avg = build_attack("average", weights="1,3").attack([a, b])
    assert torch.allclose(avg.head.weight, 0.25 * a.head.weight + 0.75 * b.head.weight, atol=1e-6)
    with pytest.raises(AttackError, match="takes 1 model"):
        build_attack("prune").attack([a, b])
    with pytest.raises(AttackError, match="1 or more"):
        Average().attack([])
