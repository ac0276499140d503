"""White-box weight-space schemes: Uchida, Wang (MANU / AUTO), projection regulariser.

All models are the MLP 784-64-10 on digits-28 (512 bits: the head's 640 weights,
or fc1's 784 filter means for the projection code) plus small CNNs on 8x8 digits
for the second architecture. Models are trained once per session.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnmark.alignment import UnitSignature
from nnmark.attacks.finetune import FineTune
from nnmark.attacks.prune import prune_by_magnitude
from nnmark.data import load_splits
from nnmark.errors import KeyFileError, SchemeError
from nnmark.keyfile import load_key_file
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.params import ParamError
from nnmark.schemes import SCHEMES, load_scheme
from nnmark.schemes.projection import ProjectionRegularizer
from nnmark.schemes.uchida import Uchida
from nnmark.schemes.wang import WangAuto, WangManu, combine_block_pvalues
from nnmark.train import TrainConfig, accuracy, seeded_model, train

BITS = 512
ALPHA = 1e-6
CFG = TrainConfig(epochs=10, batch_size=32, lr=1e-3, progress=False)
# per scheme: class and parameters (as the CLI would pass them: strings)
SETUPS = {
    "uchida": (Uchida, {"layer": "head", "bits": str(BITS)}),
    "projection": (ProjectionRegularizer, {"layer": "fc1", "reduce": "mean", "bits": str(BITS)}),
    "wang-auto": (WangAuto, {"layer": "head", "bits": str(BITS)}),
    "wang-manu": (WangManu, {"layer": "head", "bits": str(BITS)}),
}


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits28():
    return load_splits("digits28")


@pytest.fixture(scope="session")
def mlp_spec(digits28):
    return model_spec("mlp", digits28.train.image_shape, 10)


@pytest.fixture(scope="session")
def clean_mlps(digits28, mlp_spec):
    """Five clean MLPs (seeds 0..4)."""
    out = []
    for seed in range(5):
        m = seeded_model(mlp_spec, seed)
        train(m, digits28.train, TrainConfig(**{**CFG.__dict__, "seed": seed}))
        out.append(m)
    return out


@pytest.fixture(scope="session")
def marked(digits28, mlp_spec):
    """name -> (scheme with key 1, marked model (init seed 10)), and the same with key 2."""
    out = {}
    for name, (cls, params) in SETUPS.items():
        for k in (1, 2):
            model = seeded_model(mlp_spec, 10 + k)
            scheme = cls.create(Key.from_seed(f"wb-{k}"), model, **params)
            scheme.embed(model, digits28.train, TrainConfig(**{**CFG.__dict__, "seed": 10 + k}))
            out[(name, k)] = (scheme, model)
    return out


@pytest.mark.parametrize("name", list(SETUPS))
def test_unattacked_ber_zero_and_tiny_p(marked, name):
    scheme, model = marked[(name, 1)]
    v = scheme.verify(model)
    assert v.n == BITS and v.details["ber"] == 0.0 and v.statistic == BITS
    assert v.p_value < 1e-30 and v.owned
    if name.startswith("wang"):
        # exact block-permutation test: every block ranks (nearly) first among all 8! orders of its units
        assert v.details["blocks"] == 8 and v.details["exhaustive"] and v.details["orders_per_block"] == 40_320
        assert max(v.details["block_p_values"]) <= 3 / 40_320
        assert v.p_value >= v.details["smallest_possible_p"]
        assert "permutation" in v.null_hypothesis and "NOT independent" in v.null_hypothesis
        assert "shares no ancestor" in v.null_hypothesis
    else:
        assert "probability 1/2" in v.null_hypothesis


@pytest.mark.parametrize("name", list(SETUPS))
def test_fidelity_sanity(marked, clean_mlps, digits28, name):
    _, model = marked[(name, 1)]
    clean = np.mean([accuracy(m, digits28.test) for m in clean_mlps])
    assert accuracy(model, digits28.test) > clean - 0.03


@pytest.mark.parametrize("name", list(SETUPS))
def test_no_false_accusation_mlp(marked, clean_mlps, name):
    scheme, _ = marked[(name, 1)]
    _, other = marked[(name, 2)]
    for m in [*clean_mlps, other]:
        v = scheme.verify(m, alpha=ALPHA)
        assert not v.owned, (name, v.statistic, v.p_value)
        if name.startswith("wang"):  # a clean model's blocks rank anywhere, not first
            assert v.p_value > 1e-3 and np.median(v.details["block_p_values"]) > 0.01


@pytest.fixture(scope="session")
def cnn_world(clean_models):
    """Second architecture: CNNs on 8x8 digits -- the five clean ones of the session (seeds 0-4,
    tests/conftest.py), and one marked by each scheme (conv4 carrier, 256 bits, 3 epochs, init seed 21)
    with key 1. (Other-key models: the MLP tests.)"""
    data = load_splits("digits")
    spec = model_spec("cnn", data.train.image_shape, 10)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-3, progress=False)
    cleans = [clean_models[("cnn", seed)] for seed in range(5)]
    schemes = {}
    for name, (cls, _) in SETUPS.items():
        extra = {"snapshot_steps": 4} if name == "wang-manu" else {}
        m = seeded_model(spec, 21)
        s = cls.create(Key.from_seed("wb-1"), m, layer="conv4", bits=256, **extra)
        s.embed(m, data.train, cfg)
        schemes[name] = (s, m)
    return cleans, schemes


@pytest.mark.parametrize("name", list(SETUPS))
def test_no_false_accusation_cnn(cnn_world, name):
    cleans, schemes = cnn_world
    scheme, model = schemes[name]
    for m in cleans:
        assert not scheme.verify(m, alpha=ALPHA).owned
    v = scheme.verify(model, alpha=ALPHA)
    assert v.owned and v.details["ber"] < 0.1  # the marked CNN itself is claimed
    assert v.p_value < 1e-12


def test_wang_without_decoys_would_accuse_clean_models(digits28, mlp_spec, clean_mlps):
    """Why nnmark trains the secret network with decoys: the paper's plain version
    memorises the message and answers it for unrelated (clean) models too."""
    model = seeded_model(mlp_spec, 30)
    plain = WangAuto.create(Key.from_seed("plain"), model, layer="head", bits=BITS, decoys=0, finalize_steps=0)
    plain.embed(model, digits28.train, CFG)
    matches = [plain.verify(m).statistic for m in clean_mlps]
    assert max(matches) > 0.6 * BITS  # far above the 1/2 a fair null would give


@pytest.mark.parametrize("name", ["wang-auto", "wang-manu", "uchida"])
def test_survives_ftal_with_10pct_data(marked, digits28, name):
    scheme, model = marked[(name, 1)]
    # the attacker's own split: 10% of the data (disjoint from the owner's 60%)
    stolen = FineTune("FTAL", epochs=10, lr=1e-3, batch_size=32).attack(model, digits28.attacker)
    v = scheme.verify(stolen, alpha=ALPHA)
    if name.startswith("wang"):
        assert v.details["ber"] <= 0.01 and v.owned
    else:
        assert v.details["ber"] <= 0.05 and v.owned


@pytest.mark.parametrize("name", list(SETUPS))
def test_survives_pruning_60pct_of_layer(marked, name):
    scheme, model = marked[(name, 1)]
    pruned = copy.deepcopy(model)
    prune_by_magnitude(pruned, 0.6, order="smallest", scope="layer", layers=[scheme.layer])
    v = scheme.verify(pruned, alpha=ALPHA)
    if name.startswith("wang"):
        assert v.details["ber"] <= 0.05 and v.owned
    else:  # Uchida on the head: ~10% BER here, still far beyond chance
        assert v.owned


def test_fine_tune_to_embed(clean_mlps, digits28):
    model = copy.deepcopy(clean_mlps[0])
    before = accuracy(model, digits28.test)
    s = Uchida.create(Key.from_seed("ft"), model, layer="head", bits=BITS, strength=0.1)
    assert s.verify(model).details["ber"] > 0.3
    s.embed(model, digits28.train, TrainConfig(epochs=8, batch_size=32, lr=1e-3, progress=False))
    v = s.verify(model)
    assert v.details["ber"] <= 0.02 and v.p_value < 1e-30
    assert accuracy(model, digits28.test) > before - 0.03


def test_manu_selects_converged_weights(marked):
    scheme, _ = marked[("wang-manu", 1)]
    assert scheme.active and 16 <= len(scheme.selection) <= scheme.width
    assert len(torch.unique(scheme.selection)) == len(scheme.selection)


@pytest.mark.parametrize("name", list(SETUPS))
def test_key_file_round_trip(marked, tmp_path, name):
    scheme, model = marked[(name, 1)]
    path = tmp_path / f"{name}.key"
    scheme.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded = load_scheme(path, expect=name)
    assert type(loaded) is type(scheme) and loaded.model_spec == scheme.model_spec
    np.testing.assert_array_equal(loaded.extract(model), scheme.extract(model))
    assert "fc1.weight" not in path.read_text()  # no model tensors in the key
    material = load_key_file(path).material  # secret tensors: Wang's network, and every key's unit signature
    assert bool(UnitSignature.strip(material)) == name.startswith("wang")
    assert loaded.reference is not None and "align.meta" in material


def test_registered_under_their_names():
    for name in SETUPS:
        assert name in SCHEMES


def test_key_for_another_scheme_or_architecture(marked, tmp_path, digits28):
    scheme, _ = marked[("uchida", 1)]
    path = tmp_path / "u.key"
    scheme.save(path)
    with pytest.raises(KeyFileError, match="not for"):
        load_scheme(path, expect="projection")
    loaded = load_scheme(path)
    other = seeded_model(model_spec("mlp", digits28.train.image_shape, 10, hidden=[32]), 0)
    with pytest.raises(KeyFileError, match="another architecture"):
        loaded.verify(other)
    cnn = seeded_model(model_spec("cnn", digits28.train.image_shape, 10), 0)
    with pytest.raises(KeyFileError, match="another architecture"):
        loaded.extract(cnn)


def test_missing_and_too_small_layer(mlp_spec):
    model = seeded_model(mlp_spec, 0)
    for cls in (Uchida, ProjectionRegularizer, WangAuto, WangManu):
        with pytest.raises(SchemeError, match="no conv/linear layer named 'conv9'"):
            cls.create(Key.from_seed(0), model, layer="conv9", bits=16)
        with pytest.raises(SchemeError, match="cannot carry more than w independent bits"):
            cls.create(Key.from_seed(0), model, layer="head", bits=641)
    # the filter mean of the head has 64 values only
    with pytest.raises(SchemeError, match="only 64 values"):
        Uchida.create(Key.from_seed(0), model, layer="head", reduce="mean", bits=65)
    with pytest.raises(ParamError, match="unknown scheme 'uchida' parameter.*valid: layer"):
        Uchida.create(Key.from_seed(0), model, layer="head", bits=8, colour="red")


def test_uchida_matrix_variants(mlp_spec, digits28):
    for variant in ("direct", "diff"):
        model = seeded_model(mlp_spec, 3)
        # one or two weights a bit: logits are tiny, so these variants need a stronger pull
        s = Uchida.create(Key.from_seed(variant), model, layer="head", bits=128, variant=variant, strength=0.5)
        X = s.X
        assert torch.all((X != 0).sum(1) == (1 if variant == "direct" else 2))
        assert torch.all(X.sum(1) == (1 if variant == "direct" else 0))
        s.embed(model, digits28.train, TrainConfig(epochs=10, batch_size=32, progress=False))
        v = s.verify(model)
        assert v.details["ber"] <= 0.05 and v.owned
    with pytest.raises(SchemeError, match="diff"):
        Uchida.create(Key.from_seed(0), seeded_model(mlp_spec, 0), layer="head", bits=640, variant="diff")


def test_uchida_mean_reduction_is_weaker(mlp_spec):
    model = seeded_model(mlp_spec, 0)
    a = Uchida.create(Key.from_seed(0), model, layer="head", bits=200, reduction="sum")
    b = Uchida.create(Key.from_seed(0), model, layer="head", bits=200, reduction="mean")
    with torch.no_grad():
        assert float(a.regularizer(model)) == pytest.approx(200 * float(b.regularizer(model)), rel=1e-5)


def test_projection_real_code_and_closed_form(mlp_spec, marked):
    _, model = marked[("projection", 1)]
    model = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    code = rng.normal(size=300).astype(np.float32)
    s = ProjectionRegularizer(Key.from_seed("fp"), "fc1", code, width=784, reduce="mean")
    assert s.bits == 300
    s.remember_model(model)
    assert s.verify(model).details["ber"] > 0.3
    s.correct(model)
    np.testing.assert_allclose(s.extract_real(model), code, atol=1e-3)
    v = s.verify(model)
    assert v.details["ber"] == 0.0 and v.details["code_correlation"] > 0.999


def test_projection_key_round_trip_with_custom_code(tmp_path, mlp_spec):
    model = seeded_model(mlp_spec, 0)
    code = np.linspace(-1, 1, 50)
    s = ProjectionRegularizer(Key.from_seed("c"), "fc1", code, width=784, reduce="mean")  # the carrier's own use
    s.save(tmp_path / "p.key")
    t = load_scheme(tmp_path / "p.key")
    np.testing.assert_allclose(t.target.numpy(), code.astype(np.float32))
    np.testing.assert_allclose(t.extract_real(model), s.extract_real(model), rtol=1e-6)


def test_wang_refuses_the_input_layer(mlp_spec):
    model = seeded_model(mlp_spec, 0)
    for cls in (WangAuto, WangManu):
        with pytest.raises(SchemeError, match="first layer"):
            cls.create(Key.from_seed(0), model, layer="fc1", reduce="mean", bits=16)


def test_wang_alpha_below_the_tests_floor_is_an_error(mlp_spec):
    model = seeded_model(mlp_spec, 0)
    # 32 blocks of 2 units: each block has 2 orders, so p >= 32 * P[Bin(32, 1/2) >= 32] ~ 7e-9
    s = WangAuto.create(Key.from_seed(0), model, layer="head", bits=64, block_units=2)
    assert s.blocks == 32 and s.smallest_p() == pytest.approx(32 * 0.5**32)
    with pytest.raises(SchemeError, match="smallest p-value"):
        s.verify(model, alpha=1e-9)
    assert not s.verify(model, alpha=1e-6).owned


def test_wang_blocks_partition_the_units(marked):
    scheme, _ = marked[("wang-auto", 1)]
    members = scheme.block_members.flatten().tolist()
    assert sorted(members) == list(range(64))  # 8 keyed blocks of 8 hidden units
    other, _ = marked[("wang-auto", 2)]
    assert other.block_members.tolist() != scheme.block_members.tolist()  # the partition is keyed
    # block b reads exactly the head's 8 x 10 weights of its units
    idx = scheme.block_index[0]
    rows, cols = idx // 64, idx % 64
    assert (cols == scheme.block_members[0].unsqueeze(1)).all() and sorted(rows[0].tolist()) == list(range(10))


def test_combined_block_p_values_are_valid_under_uniform_nulls():
    rng = np.random.default_rng(0)
    for b in (1, 4, 8):
        ps = np.array([combine_block_pvalues(rng.uniform(size=b)) for _ in range(4000)])
        for t in (0.01, 0.05, 0.2):
            # P[p <= t] <= t, up to 4 binomial standard deviations of the simulation
            assert (ps <= t).mean() <= t + 4 * np.sqrt(t * (1 - t) / len(ps))
    assert combine_block_pvalues([1 / 40_320] * 8) == pytest.approx(8 * (1 / 40_320) ** 8, rel=1e-6)
    assert combine_block_pvalues([0.5] * 8) == pytest.approx(8 / 256)  # all eight at or below 1/2
    assert combine_block_pvalues([0.9] * 8) == 1.0


def test_block_p_values_uniform_over_unit_orders_of_a_clean_model(clean_mlps, marked):
    """The null in action: a clean model with its hidden units re-ordered (an equally
    likely outcome of its training) gets block p-values that are uniform, whatever the
    secret network learnt. Blocks of 5 units (120 orders each) keep it fast."""
    model = seeded_model(model_spec("mlp", (1, 28, 28), 10), 7)
    s = WangAuto.create(Key.from_seed("null"), model, layer="head", bits=120, block_units=5, finalize_steps=20)
    _, marked_model = marked[("wang-auto", 1)]
    s.training_hook().finalize(marked_model, steps=20)  # a secret network fitted to some other model
    clean = copy.deepcopy(clean_mlps[0])
    gen = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(60):
        perm = torch.randperm(64, generator=gen)
        with torch.no_grad():  # the same network function, hidden units in another order
            clean.fc1.weight.copy_(clean_mlps[0].fc1.weight[perm])
            clean.fc1.bias.copy_(clean_mlps[0].fc1.bias[perm])
            clean.head.weight.copy_(clean_mlps[0].head.weight[:, perm])
        ps.extend(s.block_pvalues(clean)["p"])
    ps = np.array(ps)  # 60 x 12 block p-values
    for t in (0.05, 0.25, 0.5):
        assert abs((ps <= t).mean() - t) < 4 * np.sqrt(t * (1 - t) / 60) + 1 / 120


@pytest.mark.parametrize("name", ["wang-auto", "wang-manu"])
def test_wang_fine_tune_to_embed_does_not_claim_siblings(clean_mlps, digits28, name):
    """Fine-tune-to-embed from a base model: MANU finds converged weights within a
    3-epoch run (per-step snapshots), the mark is claimed, and clean fine-tunes of the
    same base (which keep its unit order, outside the test's null) are not claimed."""
    base = clean_mlps[0]
    model = copy.deepcopy(base)
    s = SETUPS[name][0].create(Key.from_seed("ft-" + name), model, layer="head", bits=256)
    s.embed(model, digits28.train, TrainConfig(epochs=3, batch_size=32, progress=False))
    assert s.snapshot_steps is None  # the automatic per-step snapshots are not saved
    v = s.verify(model, alpha=ALPHA)
    assert v.owned and v.details["ber"] == 0.0
    for seed in (1, 2):
        sibling = copy.deepcopy(base)
        train(sibling, digits28.train, TrainConfig(epochs=3, batch_size=32, seed=seed, progress=False))
        assert not s.verify(sibling, alpha=ALPHA).owned
    assert not s.verify(base, alpha=ALPHA).owned


def test_manu_that_never_converges_is_an_error(mlp_spec, digits28):
    model = seeded_model(mlp_spec, 0)
    s = WangManu.create(Key.from_seed(0), model, layer="head", bits=16, threshold=0.0)
    with pytest.raises(SchemeError, match="converged"):
        s.embed(model, digits28.train, TrainConfig(epochs=2, batch_size=32, progress=False))


def test_wang_does_not_claim_its_clean_twin(marked, digits28, mlp_spec):
    """A clean twin (same initialisation and batches, no mark) shares the marked model's
    ancestry, so it is outside Wang's null; lambda * mean-BCE hardly moves the host, and
    the paper's decoder (no negatives) reads the message from it. nnmark's finalized
    secret network is taught the complement on the carrier the embedding started from
    (here the random initialisation), and the twin reads "not the message": not claimed.
    Uchida's fixed random read-out gives the twin chance bits."""
    twin = seeded_model(mlp_spec, 11)  # the "marked" fixture's key-1 models start from seed 11
    train(twin, digits28.train, TrainConfig(**{**CFG.__dict__, "seed": 11}))
    for name in ("wang-auto", "wang-manu", "uchida"):
        scheme, _ = marked[(name, 1)]
        v = scheme.verify(twin, alpha=ALPHA)
        assert not v.owned, (name, v.statistic, v.p_value)
        if name.startswith("wang"):
            assert 2 * v.statistic < BITS  # the complement side
