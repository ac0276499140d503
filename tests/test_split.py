"""Privacy-partitioned training in one process: partition, protocol, messages, checkpoints, fingerprint, tracing.

Every run here is tiny (bundled 8x8 digits, 2-3 owners, one epoch); the same rounds over separate processes are
in ``test_split_parties.py`` (slow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnmark.data import load_splits
from nnmark.fingerprint.product import build_layout
from nnmark.keys import Key
from nnmark.models import build_model, model_spec
from nnmark.split.attackers import AttackConfig
from nnmark.split.baselines import add_noise, distance_correlation
from nnmark.split.decoders import build_decoder
from nnmark.split.defenders import assign_defenders
from nnmark.split.metrics import floor_scores, ssim
from nnmark.split.partition import SplitError, join_parts, partition_points, split_model
from nnmark.split.protocol import (
    FingerprintPlan,
    InProcess,
    OwnerParty,
    ServerParty,
    SplitConfig,
    code_bit_errors,
    party_keys,
    run_rounds,
    simulate,
    total_rounds,
)

TINY = {"data": "digits", "arch": "mlp", "arch_overrides": {"hidden": [64, 64, 64], "dropout": 0.1},
        "at": "fc2", "owners": 3, "epochs": 3, "batch_size": 32, "lr": 1e-2}
PRODUCT_KEY = Key.from_seed("split-tests/product")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fingerprint(code: int = 3) -> FingerprintPlan:
    layout = build_layout(PRODUCT_KEY, "ag:7")
    return FingerprintPlan(PRODUCT_KEY, layout.compose(code), ("fc3",), scale=2.0, strength=1.0)


@pytest.fixture(scope="module")
def fingerprinted_run():
    """One adversarial run with multiple defenders and the fingerprint regulariser on the server's fc3."""
    torch.set_num_threads(1)
    cfg = SplitConfig.from_dict({**TINY, "defense": "adversarial", "strength": 1.0, "keep_payloads": True,
                                 "defender_kinds": ["64:tanh", "", "64:sigmoid"]})
    res, owners, server = simulate(cfg, Key.from_seed("split-tests/session"), _fingerprint(), keep=True)
    return cfg, res, owners, server


@pytest.mark.parametrize("arch,at", [("mlp", "fc2"), ("cnn", "pool1"), ("cnn", "pool2"), ("lenet5", "pool1")])
def test_split_and_join_compute_the_network(arch, at):
    over = {"hidden": [32, 32, 32]} if arch == "mlp" else {}
    torch.manual_seed(0)
    model = build_model(model_spec(arch, (1, 8, 8), 10, **over)).eval()
    local, remote = split_model(model, at)
    local.eval()
    remote.eval()
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(remote(local(x)), model(x))
    ls, rs = local.state_dict(), remote.state_dict()
    assert not set(ls) & set(rs) and set(ls) | set(rs) == set(model.state_dict())
    torch.testing.assert_close(join_parts(model.spec, ls, rs).eval()(x), model(x))
    assert at in partition_points(model) and "head" not in partition_points(model)


def test_bad_partition_point_names_the_valid_ones():
    model = build_model(model_spec("cnn", (1, 8, 8), 10))
    with pytest.raises(SplitError, match="points: conv1, conv2, pool1"):
        split_model(model, "pool9")
    with pytest.raises(SplitError, match="cannot partition"):
        split_model(build_model(model_spec("vgg-small", (3, 8, 8), 10)), "pool1")


def test_decoders_and_defender_settings():
    for spec, act in [("900:tanh", (32,)), ("", (32,)), ("conv1d:tanh", (32,)), ("deconv:8", (4, 4, 4)),
                      ("deconv:8,4:tanh", (4, 2, 2))]:
        out = build_decoder(spec, act, (1, 8, 8))(torch.randn(3, *act)).detach()
        assert out.shape == (3, 1, 8, 8) and float(out.min()) > 0 and float(out.max()) < 1
    assert assign_defenders("multiple", 5, (32,)) == [["d1"], ["d2"], ["d3"], ["d4"], ["d1"]]
    assert assign_defenders("single", 2, (4, 4, 4)) == [["c1"], ["c1"]]
    with pytest.raises(SplitError):
        build_decoder("12:swish", (32,), (1, 8, 8))
    with pytest.raises(SplitError):
        SplitConfig(defense="adversarial", defenders="none")


def test_distance_correlation_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 16, generator=g)
    assert float(distance_correlation(x, x * 3 + 1)) == pytest.approx(1.0, abs=1e-5)
    indep = float(distance_correlation(x, torch.rand(200, 16, generator=g)))  # the V-statistic is biased up
    noisy = float(distance_correlation(x, x + 0.1 * torch.randn(200, 16, generator=g)))
    assert indep < 0.6 < 0.9 < noisy < 1.0
    for kind in ("gaussian", "laplace"):
        n = add_noise(torch.zeros(20000), kind, 2.0, g)
        assert float(n.std()) == pytest.approx(2.0 if kind == "gaussian" else 2.0 * 2 ** 0.5, rel=0.05)


def test_mean_image_floor_and_identity():
    s = load_splits("digits")
    x = s.train.x[:100]
    fl = floor_scores(x, s.attacker.x)
    assert fl["mse"] == pytest.approx(float(((x - s.attacker.x.mean(0)) ** 2).mean()), rel=1e-5)
    assert 0.0 < fl["ssim"] < ssim(x, (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)) < 1.0
    assert ssim(s.train.x[:10], s.train.x[:10]) == pytest.approx(1.0)


def test_partitioned_training_learns_and_embeds_the_fingerprint(fingerprinted_run):
    cfg, res, owners, server = fingerprinted_run
    assert res.accuracy > 0.5 and res.rounds == total_rounds(cfg) == 33
    # (4) the fingerprint the server embedded while training is read back from the assembled model: BER 0
    code = build_layout(PRODUCT_KEY, "ag:7").cic
    assert code_bit_errors(server.carrier, code, res.model, 3) == (0, 49)
    # another codeword is not what the model carries (the read-out is not vacuous)
    assert code_bit_errors(server.carrier, code, res.model, 11)[0] >= 10
    # every owner holds the same local part (the summed local gradients keep them in step)
    for o in owners[1:]:
        for (k, a), b in zip(owners[0].local.state_dict().items(), o.local.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_no_raw_image_crosses_the_boundary(fingerprinted_run):
    """(2) every message the server received: activations of the agreed shape or labels; none is an input batch;
    the owners received only gradients of their activations and each other's local-part gradients."""
    cfg, res, owners, server = fingerprinted_run
    inputs = set().union(*(o.digests() for o in owners))
    raw = [o._batch(r)[0] for o in owners for r in range(res.rounds)]
    recs = server.messages()
    assert {r["kind"] for r in recs} == {"activations", "labels", "local-weights"}
    for r in recs:
        assert r["sha256"] not in inputs
        assert tuple(r["shape"][1:]) != (1, 8, 8)
        if r["kind"] == "activations":  # 64 values per image, as many as an 8x8 digit: compare the values too
            assert tuple(r["shape"]) == (32, 64) and r["dtype"] == "float32"
            assert not any(torch.allclose(r["payload"].flatten(), x.flatten(), atol=1e-3) for x in raw)
        elif r["kind"] == "labels":
            assert r["dtype"] == "int64" and tuple(r["shape"]) == (32,)
        else:
            assert r["round"] == -1  # the final local part, once, to assemble the product
    for o in owners:
        kinds = {r["kind"] for r in o.messages()}
        assert kinds == {"gradients", "local-gradients"}
        assert all(tuple(r["shape"]) == (32, 64) for r in o.messages() if r["kind"] == "gradients")
        assert not {r["sha256"] for r in o.messages()} & inputs


def test_server_refuses_images_and_off_layer_carriers():
    cfg = SplitConfig.from_dict(TINY)
    _okeys, skey = party_keys(Key.from_seed("x"), 3)
    server = ServerParty(cfg, skey)
    x = load_splits("digits").train.x[:32]
    with pytest.raises(SplitError, match="agreed"):
        server.step(0, (x, torch.zeros(32, dtype=torch.int64)))
    with pytest.raises(SplitError, match="not in the server's part"):
        ServerParty(cfg, skey, FingerprintPlan(PRODUCT_KEY, np.ones(49), ("fc1",)))


def test_checkpoint_resume_gives_the_same_model(tmp_path):
    """Stop after 4 rounds (a checkpoint every 2), start fresh parties from the manifest: the final weights equal
    an uninterrupted run's."""
    cfg = SplitConfig.from_dict({**TINY, "epochs": 1, "defense": "gaussian", "strength": 0.3, "checkpoint_every": 2})
    key = Key.from_seed("split-tests/resume")
    whole = simulate(cfg, key)
    okeys, skey = party_keys(key, cfg.owners)
    owners = [OwnerParty(cfg, i, k) for i, k in enumerate(okeys)]
    server = ServerParty(cfg, skey)
    run_rounds(cfg, InProcess(), owners, server, 0, 5, str(tmp_path))  # dies after round 5; manifest at 4
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"{n}.r4.safetensors" for n in
                                                                      ("owner0", "owner1", "owner2", "server")]
    resumed = simulate(cfg, key, checkpoint_dir=str(tmp_path))
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


@pytest.mark.slow
def test_copies_issued_from_the_partitioned_model_are_traced(fingerprinted_run, tmp_path):
    """The partitioned model is a product's base as any other: copies are issued from it (carrier fc3, in the
    server's part) and the tracer names exactly the two customers whose copies were averaged."""
    from nnmark.attacks.collusion import combine_models
    from nnmark.fingerprint import Product
    from nnmark.io import load_model, save_model

    _cfg, res, _owners, _server = fingerprinted_run
    save_model(tmp_path / "base.safetensors", res.model, {"data": "digits"})
    prod = Product.create(tmp_path / "shop", tmp_path / "base.safetensors", key=PRODUCT_KEY, code="ag:7",
                          layers=("fc3",))
    names = ["a", "b", "c", "d"]
    prod.add_customers(names)
    models = {n: load_model(prod.issue(n).model_path)[0] for n in names}
    report = prod.trace(combine_models([models["a"], models["c"]], [0.5, 0.5]))
    assert report.named == ["a", "c"] and report.status == "accused"
    assert prod.trace(res.model).named == []  # the base itself was issued to nobody


def test_cli_train_writes_a_model_a_run_record_and_a_product(tmp_path):
    from click.testing import CliRunner

    from nnmark.cli import cli
    from nnmark.fingerprint import Product

    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["split", "train", str(run), "--data", "digits", "--hidden", "32,32,32", "--owners",
                                 "2", "--epochs", "1", "--lr", "1e-2", "--strength", "1", "--product",
                                 str(tmp_path / "shop"), "--progress-every", "0"])
    assert r.exit_code == 0, r.output
    rec = json.loads((run / "run.json").read_text())
    assert rec["accuracy"] > 0.1 and rec["messages"]["server"]["activations"]["count"] == 2 * 16
    assert set(rec["messages"]["server"]) == {"activations", "labels", "local-weights"}
    assert (run / "session.key.json").stat().st_mode & 0o077 == 0
    assert "fingerprint code 0" in r.output and Product.open(tmp_path / "shop").config.layers == ["fc3"]
    bad = CliRunner().invoke(cli, ["split", "attack", str(tmp_path)])
    assert bad.exit_code != 0


def test_label_floor_templates_and_predicted_labels():
    """The server sees every label: class templates of public images score above the mean image, and the
    predicted-label floor is the label floor when the predictions are the labels (and lower when they are not)."""
    from nnmark.split.metrics import class_templates

    s = load_splits("digits")
    x, y = s.train.x[:200], s.train.y[:200]
    t = class_templates(s.attacker.x, s.attacker.y, s.num_classes)
    assert t["class_mean"].shape == t["class_medoid"].shape == (s.num_classes, *s.image_shape)
    for c in range(s.num_classes):  # the medoid is one of the class's public images
        pub = s.attacker.x[s.attacker.y == c]
        assert any(torch.equal(t["class_medoid"][c], p) for p in pub)
    fl = floor_scores(x, s.attacker.x, y, s.attacker.y, s.num_classes, predicted=y)
    lab = fl["label"]
    assert lab["class_mean"]["mse"] < fl["mse"] and lab["class_mean"]["ssim"] > fl["ssim"]
    assert lab["best"]["ssim"] == max(lab["class_mean"]["ssim"], lab["class_medoid"]["ssim"])
    assert fl["predicted_label"]["best"] == lab["best"]
    wrong = floor_scores(x, s.attacker.x, y, s.attacker.y, s.num_classes, predicted=(y + 1) % s.num_classes)
    assert wrong["predicted_label"]["class_mean"]["ssim"] < lab["class_mean"]["ssim"]


def test_a_collapsed_local_part_still_gives_away_the_labels():
    """Thief's view: a defence that turns the activations constant leaves the labels. A label-aware attacker
    reaches the class-mean template's MSE while the activations-only attacker stays at the mean image's."""
    from nnmark.split.evaluation import privacy_report

    cfg = SplitConfig.from_dict(TINY)
    model = build_model(model_spec("mlp", (1, 8, 8), 10, hidden=[64, 64, 64], dropout=0.1))
    local, _ = split_model(model, cfg.at)
    with torch.no_grad():
        for p in local.parameters():
            p.zero_()
    rep = privacy_report(model, cfg, ["a8"], n_targets=200, label_attackers=["a8"],
                         attack=AttackConfig(epochs=100, lr=3e-2), perceptual=False)
    fl, blind, aware = rep["floor"], rep["attackers"]["a8"], rep["attackers"]["a8+y"]
    assert blind["mse"] == pytest.approx(fl["mse"], rel=0.05)
    assert aware["mse"] == pytest.approx(fl["label"]["class_mean"]["mse"], rel=0.05)
    assert fl["label"]["class_mean"]["mse"] < 0.9 * fl["mse"]
    assert rep["best_with_labels"]["ssim"] >= max(rep["best"]["ssim"], fl["label"]["best"]["ssim"])
    # the server part sees a constant: it predicts one class, and the predicted-label floor falls below the label's
    assert rep["predicted_accuracy"] < 0.2
    assert fl["predicted_label"]["best"]["ssim"] < fl["label"]["best"]["ssim"]
