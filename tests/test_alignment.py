"""Function-preserving transforms (permute / rescale hidden units) and the alignment that undoes them.

The thief permutes every hidden layer and rescales every hidden unit across its ReLU by a log-uniform
factor in [0.01, 100]: the model computes the same function, and every read-out in a fixed weight
order reads chance (the ``align=False`` assertions: today's verification). With the alignment
(:mod:`nnmark.alignment`, on by default) the marks verify as on the marked model itself and the tracer
names exactly the colluders; clean models of several seeds are still not claimed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nnmark.alignment import AlignmentError, UnitSignature, align_model, transform_units, unit_chain, unit_signature
from nnmark.attacks import Average, build_attack
from nnmark.attacks.obfuscate import max_output_change, random_permutations
from nnmark.io import load_model, save_model
from nnmark.keyfile import load_key_file, save_key_file
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.schemes import load_scheme
from nnmark.schemes.projection import ProjectionRegularizer
from nnmark.schemes.uchida import Uchida
from nnmark.schemes.wang import WangAuto, WangManu
from nnmark.train import TrainConfig, seeded_model, train

ALPHA = 1e-6
SCHEMES = {"uchida": Uchida, "projection": ProjectionRegularizer, "wang-auto": WangAuto, "wang-manu": WangManu}
ARCHS = {"cnn": (1, 8, 8), "mlp": (1, 8, 8), "lenet5": (1, 8, 8), "vgg-small": (3, 16, 16)}
ATTACKS = ("permute", "rescale", "permute-rescale")
CFG = TrainConfig(epochs=3, batch_size=64, lr=1e-3, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(arch: str) -> nn.Module:
    """An untrained zoo model in eval mode, batch norms with non-trivial statistics."""
    model = seeded_model(model_spec(arch, ARCHS[arch], 10), 3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 1e-3)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_transforms_preserve_the_function(arch, attack):
    model = random_model(arch)
    x = torch.rand(32, *ARCHS[arch], generator=torch.Generator().manual_seed(0))
    stolen = build_attack(attack, seed=1).attack(model)
    assert max_output_change(model, stolen, x) < 1e-5
    before, after = model.state_dict(), stolen.state_dict()
    first = unit_chain(model).names[0]
    moved = (before[f"{first}.weight"] - after[f"{first}.weight"]).abs().max() / before[f"{first}.weight"].abs().max()
    assert moved > 0.1  # the weights did change
    assert torch.equal(model.state_dict()[f"{first}.weight"], before[f"{first}.weight"])  # input untouched


@pytest.mark.parametrize("arch", list(ARCHS))
def test_alignment_restores_the_reference_weights(arch):
    model = random_model(arch)
    key = Key.from_seed("align-arch")
    sig = unit_signature(model, key)
    stolen = build_attack("permute-rescale", seed=2).attack(model)
    aligned, report = align_model(stolen, sig, key)
    assert report.applied and all(q["mean_correlation"] > 0.999 for q in report.layers.values())
    assert report.layers[unit_chain(model).names[0]]["moved"] > 0
    ref = model.state_dict()
    for name, value in aligned.state_dict().items():
        if value.is_floating_point():
            err = float((value - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1e-12))
            assert err < 1e-3, (name, err)


def test_chain_discovery_and_refusals():
    chain = unit_chain(seeded_model(model_spec("cnn", (1, 28, 28), 10), 0))
    assert chain.names == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"] and chain.last == "head"
    assert chain.links[3].spatial == 49 and chain.links[3].next == "fc1"  # conv4 -> flatten -> fc1
    vgg = unit_chain(seeded_model(model_spec("vgg-small", (1, 28, 28), 10), 0))
    assert all(link.bn for link in vgg.links if link.name.startswith("conv"))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(torch.relu(self.b(h)) + h)

    class Tanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.a(x)))

    with pytest.raises(AlignmentError, match="used 2 times"):
        unit_chain(Residual())
    tanh = Tanh()
    assert not unit_chain(tanh).links[0].scale_safe  # permutable, but not rescalable
    with pytest.raises(AlignmentError, match="not positively homogeneous"):
        transform_units(copy.deepcopy(tanh), unit_chain(tanh), post={"a": np.full(8, 2.0)})
    sig = unit_signature(tanh, Key.from_seed(0), in_shape=(8,))
    out, report = align_model(Residual(), sig, Key.from_seed(0))
    assert not report.applied and "used 2 times" in report.reason


def test_signature_is_compact_and_survives_a_key_file(tmp_path):
    model = seeded_model(model_spec("cnn", (1, 28, 28), 10), 0)
    sig = unit_signature(model, Key.from_seed("size"))
    material = sig.to_material()
    assert sum(t.numel() * t.element_size() for t in material.values()) < 300_000
    from nnmark.keyfile import KeyFile

    save_key_file(tmp_path / "k.json", KeyFile(Key.from_seed(1), "x", {}, material))
    back = UnitSignature.from_material(load_key_file(tmp_path / "k.json").material)
    assert back is not None and list(back.layers) == list(sig.layers)
    for name, layer in sig.layers.items():
        assert torch.equal(back.layers[name].pattern, layer.pattern) and torch.equal(back.layers[name].std, layer.std)
    assert UnitSignature.from_material({}) is None


# -- the white-box schemes on a small CNN (digits) --------------------------------------------------------
@pytest.fixture(scope="session")
def obf_world(digits):
    """Four clean CNNs (seeds 40-43) and one CNN marked by each scheme (conv4, 256 bits, key obf-1)."""
    spec = model_spec("cnn", digits.train.image_shape, 10)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        cleans = []
        for seed in range(40, 44):
            m = seeded_model(spec, seed)
            train(m, digits.train, TrainConfig(**{**CFG.__dict__, "seed": seed}))
            cleans.append(m.eval())
        marked = {}
        for name, cls in SCHEMES.items():
            extra = {"snapshot_steps": 4} if name == "wang-manu" else {}
            m = seeded_model(spec, 21)
            s = cls.create(Key.from_seed("obf-1"), m, layer="conv4", bits=256, **extra)
            s.embed(m, digits.train, CFG)
            marked[name] = (s, m.eval())
    return cleans, marked


@pytest.mark.parametrize("name", list(SCHEMES))
def test_permute_rescale_defeats_the_raw_read_out_and_alignment_undoes_it(obf_world, digits, name):
    _, marked = obf_world
    scheme, model = marked[name]
    own = scheme.verify(model)
    assert own.owned and own.p_value < 1e-12 and own.details["alignment"]["alignment"] == "on"
    stolen = build_attack("permute-rescale", seed=5).attack(model)
    assert max_output_change(model, stolen, digits.test.x[:200]) < 1e-5  # the same model
    raw = scheme.verify(stolen, align=False)  # what verification read before alignment existed
    assert not raw.owned and raw.p_value > 1e-3, raw.p_value
    assert raw.details["alignment"]["alignment"] == "off"
    v = scheme.verify(stolen)
    assert v.owned and v.p_value < 1e-12 and v.details["ber"] == own.details["ber"]
    layers = v.details["alignment"]["layers"]
    assert set(layers) == {"conv3", "conv4"}  # conv4's input units and its own units
    assert min(q["mean_correlation"] for q in layers.values()) > 0.99
    assert "aligning its hidden units" in v.null_hypothesis


@pytest.mark.parametrize("name", list(SCHEMES))
def test_clean_models_not_claimed_with_alignment_on(obf_world, name):
    cleans, marked = obf_world
    scheme, _ = marked[name]
    for m in cleans:
        v = scheme.verify(m, alpha=ALPHA)
        assert not v.owned and v.p_value > 1e-3, (name, v.p_value)
        # the gate: an independently trained model's units do not match the marked model's well enough to be
        # aligned, so it is read in its own order (where every scheme's null is exact)
        a = v.details["alignment"]
        assert a["alignment"] == "off" and "do not match" in a["reason"]
        assert min(q["mean_correlation"] for q in a["layers"].values()) < a["gate"]
        assert set(a["layers"]) == {"conv3", "conv4"}  # the layers that move conv4's weights


def test_key_file_keeps_the_reference_and_old_keys_still_verify(obf_world, tmp_path):
    _, marked = obf_world
    scheme, model = marked["wang-auto"]
    stolen = build_attack("permute-rescale", seed=6).attack(model)
    scheme.save(tmp_path / "w.key", log=tmp_path / "log.db")
    loaded = load_scheme(tmp_path / "w.key", log=tmp_path / "log.db")
    v = loaded.verify(stolen)
    assert v.owned and v.details["alignment"]["alignment"] == "on", v.details.get("commitment")
    # a key file written before alignment existed: no signature -- verified in the model's own order, saying so
    kf = load_key_file(tmp_path / "w.key")
    kf.material = UnitSignature.strip(kf.material)
    save_key_file(tmp_path / "old.key", kf)
    old = load_scheme(tmp_path / "old.key", log=tmp_path / "log.db")
    assert old.reference is None
    v = old.verify(model, allow_uncommitted=True)
    assert v.details["alignment"]["alignment"] == "off" and "no unit signature" in v.details["alignment"]["reason"]
    assert v.details["unverified_p_value"] < 1e-12  # the unpermuted model still reads (uncommitted: not evidence)


# -- the fingerprint tracer ----------------------------------------------------------------------------------
def test_tracer_names_the_colluders_of_a_permuted_rescaled_average(obf_world, digits, tmp_path):
    from nnmark.fingerprint import Product

    cleans, _ = obf_world
    save_model(tmp_path / "base.safetensors", cleans[0], {"data": "digits"})
    prod = Product.create(tmp_path / "shop", tmp_path / "base.safetensors", key=Key.from_seed("obf-shop"),
                          code="ag:7")
    names = ["a", "b", "c", "d"]
    prod.add_customers(names)
    copies = {n: load_model(prod.issue(n).model_path)[0] for n in names}
    coalition = ["a", "c", "d"]
    stolen = build_attack("permute-rescale", seed=3).attack(Average().attack([copies[n] for n in coalition]))
    prod.align = False  # the tracer as it read before alignment existed
    assert prod.trace(stolen).named == []
    prod.align = True
    report = prod.trace(stolen)
    assert sorted(report.named) == coalition, report.status
    assert report.evidence["alignment"]["alignment"] == "on"
    for clean in cleans[1:]:
        assert prod.trace(clean).named == []


def test_permutations_are_seeded():
    chain = unit_chain(seeded_model(model_spec("cnn", (1, 8, 8), 10), 0))
    a, b, c = (random_permutations(chain, s) for s in (1, 1, 2))
    assert all(np.array_equal(a[n], b[n]) for n in a) and not all(np.array_equal(a[n], c[n]) for n in a)
