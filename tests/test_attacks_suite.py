"""The attack suite (issue 12): structural obfuscation and the width defence, quantisation, overwriting,
distillation, transfer, practical fine-tuning, fine-pruning and chains -- tiny budgets on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnmark import Key
from nnmark.attacks import build_attack
from nnmark.attacks.chain import ChainAttack
from nnmark.attacks.obfuscate import max_output_change
from nnmark.components import ComponentError
from nnmark.errors import KeyFileError
from nnmark.io import load_model, save_model
from nnmark.models import model_spec
from nnmark.schemes import SCHEMES
from nnmark.train import TrainConfig, accuracy, seeded_model
from nnmark.unit_surgery import restore_widths, widths


def _randomised(arch: str, shape=(1, 8, 8), seed: int = 0):
    """An untrained zoo model with random batch-norm statistics (so folding and scaling are not trivial)."""
    m = seeded_model(model_spec(arch, shape, 10), seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.weight.copy_(torch.randn(mod.num_features, generator=gen))
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.2)
    return m.eval()


@pytest.fixture(scope="session")
def uchida_cnn(digits):
    """A CNN on digits with 64 Uchida bits in conv4 (5 epochs): (scheme, model)."""
    torch.manual_seed(0)
    model = seeded_model(model_spec("cnn", digits.image_shape, 10), 3)
    scheme = SCHEMES["uchida"].create(Key.from_seed("suite-owner"), model, bits=64)
    scheme.embed(model, digits.train, TrainConfig(epochs=5, seed=3, progress=False))
    return scheme, model


@pytest.mark.parametrize("arch", ["cnn", "mlp", "vgg-small"])
@pytest.mark.parametrize("name,params", [("fold-bn", {}), ("split", {"units": 5}), ("dummy", {"units": 4}),
                                         ("dummy", {"kind": "zero", "units": 3}), ("merge", {})])
def test_structural_obfuscations_preserve_the_function(arch, name, params, digits, tmp_path):
    model = _randomised(arch)
    attack = build_attack(name, seed=1, **params)
    out = attack.attack(model)
    assert max_output_change(model, out, digits.test.x) < 1e-4
    before, after = widths(model), widths(out)
    if name in ("split", "dummy"):
        units = params["units"]
        if name == "dummy" and params.get("kind", "cancel") == "cancel":
            units += units % 2  # cancelling pairs
        assert after == {n: w + min(units, w) for n, w in before.items()}
        assert attack.cost["units_added"] == {n: after[n] - before[n] for n in before}
    else:
        assert after == before
    if name == "fold-bn":
        assert attack.cost["folded"] == (6 if arch == "vgg-small" else 0)
        if arch == "vgg-small":
            assert not torch.equal(out.conv1.weight, model.conv1.weight)
            assert torch.allclose(out.bn1.running_mean, torch.zeros(32))
    saved = save_model(tmp_path / "o.safetensors", out)  # the widths are in the spec: it loads again
    back = load_model(saved)[0]
    assert max_output_change(out, back, digits.test.x) == 0.0


def test_merge_undoes_split_and_restore_widths_is_exact():
    model = _randomised("cnn", seed=2)
    wide = build_attack("split", units=6, seed=4).attack(model)
    merged = build_attack("merge").attack(wide)
    assert widths(merged) == widths(model)
    back, report = restore_widths(build_attack("dummy", units=6, seed=5).attack(wide), widths(model),
                                  Key.from_seed("w"))
    assert report.applied and widths(back) == widths(model)
    x = torch.rand(32, 1, 8, 8)
    assert max_output_change(model, back, x) < 1e-4


def test_width_defence_reads_split_and_dummy_models_and_accuses_no_clean_one(uchida_cnn, clean_models):
    scheme, marked = uchida_cnn
    p_marked = scheme.verify(marked).p_value
    assert p_marked < 1e-6
    for name, params in [("split", {"units": 8}), ("dummy", {"units": 8})]:
        wide = build_attack(name, seed=7, **params).attack(marked)
        with pytest.raises(KeyFileError, match="another architecture"):
            scheme.verify(wide, align=False)  # without the defence the widened model cannot even be read
        v = scheme.verify(wide)
        assert v.details["alignment"]["widths"]["widths"] == "restored"
        assert v.owned and v.p_value == pytest.approx(p_marked, rel=1e-6)
    chained = build_attack("chain", steps=["split units=4", "dummy units=4", "permute-rescale"], seed=3).attack(marked)
    assert scheme.verify(chained).owned
    for seed in range(3):  # the thief's try: a clean model made wide is not accused
        clean_wide = build_attack("split", seed=seed).attack(clean_models[("cnn", seed)])
        v = scheme.verify(clean_wide)
        assert not v.owned and v.p_value > 1e-3


def test_split_plus_noise_is_restored_by_the_width_defence(uchida_cnn, digits):
    """Split units perturbed a little are no longer exact duplicates; the defence merges the most nearly
    proportional pairs back (kept only while the copy's outputs on the probes stay within 1% of the
    suspect's) and reads the mark; accuracy unchanged."""
    scheme, marked = uchida_cnn
    wide = build_attack("split", units=8, seed=2).attack(marked)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wide.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    assert abs(accuracy(wide, digits.test) - accuracy(marked, digits.test)) < 0.02
    with pytest.raises(KeyFileError, match="another architecture"):
        scheme.verify(wide, align=False)
    v = scheme.verify(wide)
    assert v.details["alignment"]["widths"]["widths"] == "restored", v.details["alignment"]["widths"]
    assert v.owned and v.p_value < 1e-6


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_quantize_puts_weights_on_a_grid(bits, uchida_cnn):
    scheme, marked = uchida_cnn
    out = build_attack("quantize", bits=bits).attack(marked)
    for name, p in out.named_parameters():
        if p.ndim >= 2:
            assert len(torch.unique(p.detach())) <= 2 ** bits - 1, name
    assert not torch.equal(out.conv4.weight, marked.conv4.weight)
    v = scheme.verify(out)
    assert v.p_value < 1e-3 if bits >= 5 else True  # 4 bits may cost bits; the verdict is still computed
    assert 0 <= v.details["matched_bits"] <= 64


def test_quantize_with_finetune_and_int8_deployed(uchida_cnn, digits):
    scheme, marked = uchida_cnn
    atk = build_attack("quantize", bits=4, finetune_epochs=1)
    out = atk.attack(marked, digits.attacker)
    assert len(torch.unique(out.conv4.weight.detach())) <= 15
    int8 = build_attack("int8-ptq", calibration=64)
    q = int8.attack(marked, digits.attacker)
    assert int8.cost["samples"] == 64
    assert abs(accuracy(q, digits.test) - accuracy(marked, digits.test)) < 0.05
    assert scheme.verify(q).owned  # read through its dequantised weights


def test_overwrite_both_keys_verify_and_the_original_is_not_the_attackers(uchida_cnn, digits):
    scheme, marked = uchida_cnn
    atk = build_attack("overwrite", scheme="uchida", scheme_params=["bits=64"], epochs=20, seed=1)
    stolen = atk.attack(marked, digits.attacker)
    thief = atk.attacker_scheme
    assert thief.key.key_id != scheme.key.key_id and atk.cost["key_id"] == thief.key.key_id
    assert thief.verify(stolen).p_value < 1e-3  # the thief's mark is in
    assert scheme.verify(stolen).owned  # the owner's mark survives the overwrite at 64 bits
    assert thief.verify(marked).p_value > 1e-3  # the owner's original does not carry the thief's mark
    with pytest.raises(ComponentError, match="unknown scheme"):
        build_attack("overwrite", scheme="nope").attack(marked, digits.attacker)


def test_distill_spends_its_query_budget_and_trains_a_fresh_student(digits, clean_models):
    teacher = clean_models[("cnn", 0)]
    atk = build_attack("distill", queries=400, student="mlp", labels="hard", epochs=20, seed=2)
    student = atk.attack(teacher, digits.attacker)
    assert atk.cost["queries"] == 400 and atk.cost["samples"] == len(digits.attacker)
    assert type(student).__name__ == "MLP"
    assert accuracy(student, digits.test) > 0.3  # it learnt from the answers (chance: 0.1)
    soft = build_attack("distill", queries=50, epochs=1, seed=2)
    same = soft.attack(teacher, digits.attacker)
    assert same.spec == teacher.spec and not torch.equal(same.conv1.weight, teacher.conv1.weight)


def test_transfer_changes_the_task_and_white_box_keys_refuse_it(uchida_cnn, digits):
    scheme, marked = uchida_cnn
    out = build_attack("transfer", classes=2, epochs=1).attack(marked, digits.attacker)
    assert out.head.out_features == 2 and out.spec["num_classes"] == 2
    with pytest.raises(KeyFileError, match="another architecture"):
        scheme.verify(out)


def test_practical_finetune_schedules_and_fine_prune(digits, clean_models):
    model = clean_models[("cnn", 1)]
    for sched in ("constant", "step", "cosine"):
        atk = build_attack("ft-sgd", schedule=sched, epochs=1, max_batches=2)
        out = atk.attack(model, digits.attacker)
        assert atk.cost["steps"] == 2 and not torch.equal(out.conv1.weight, model.conv1.weight)
    shifted = build_attack("weight-shift", epochs=1, max_batches=2).attack(model, digits.attacker)
    gentle = build_attack("ft-sgd", epochs=1, max_batches=2).attack(model, digits.attacker)
    assert (shifted.conv1.weight - model.conv1.weight).norm() > (gentle.conv1.weight - model.conv1.weight).norm()
    fp = build_attack("fine-prune", fraction=0.5, epochs=1)
    out = fp.attack(model, digits.attacker)
    dead = out.conv4.weight.detach().flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == 32 == fp.cost["units_pruned"]["conv4"]
    assert bool((out.conv4.bias[dead] == 0).all())


def test_chain_runs_steps_in_order_and_checks_them_first(digits, clean_models):
    model = clean_models[("cnn", 2)]
    atk = build_attack("chain", steps="permute,prune fraction=0.4,ftal epochs=1 max_batches=1", seed=5)
    assert isinstance(atk, ChainAttack) and [a.name for a in atk.attacks] == ["permute", "prune", "finetune"]
    assert atk.attacks[1].seed == 5 and atk.needs_data
    out = atk.attack(model, digits.attacker)
    assert [c["attack"] for c in atk.cost["steps"]] == ["permute", "prune", "finetune"]
    assert not torch.equal(out.head.weight, model.head.weight)
    with pytest.raises(ComponentError, match="unknown attack"):
        build_attack("chain", steps=["permute", "melt"])
    with pytest.raises(Exception, match="fractoin"):
        build_attack("chain", steps=["prune fractoin=0.3"])
    assert np.isfinite(atk.cost["seconds"])


# -- input side, detector, inversion, forgery (the session's noise-trigger CNN) ---------------------
def test_input_side_wrappers_transform_queries_and_keep_the_weights(noise_marked, digits):
    scheme, model = noise_marked
    x = digits.test.x[:16]
    for name, params in [("input-jpeg", {"quality": 20}), ("input-noise", {"sigma": 0.2}),
                         ("input-quantize", {"levels": 2}), ("input-smooth", {}),
                         ("input-smooth", {"filter": "median"})]:
        wrapped = build_attack(name, **params).attack(model)
        assert wrapped.model is model  # the stolen weights, untouched
        t = wrapped.transform(x)
        assert t.shape == x.shape and float(t.min()) >= 0 and float(t.max()) <= 1 + 1e-6
        assert not torch.equal(t, x), name
        if name == "input-quantize":
            assert set(torch.unique(t).tolist()) <= {0.0, 1.0}
        v = scheme.verify(wrapped, queries=20)  # a black-box verdict through the thief's API
        assert 0 <= v.statistic <= 20 and 0 < v.p_value <= 1


def test_magnet_detector_refuses_off_distribution_queries(noise_marked, digits):
    scheme, model = noise_marked
    atk = build_attack("magnet", fpr=0.05, epochs=15)
    guard = atk.attack(model, digits.attacker)
    assert atk.cost["heldout"] == len(digits.attacker) // 5 and atk.cost["heldout_fpr"] <= 0.05 + 1e-9
    noise = guard.refused(torch.rand(50, *digits.image_shape, generator=torch.Generator().manual_seed(1)))
    fpr = float(guard.refused(digits.test.x).float().mean())
    assert fpr < 0.5 < float(noise.float().mean())  # normal queries mostly pass, off-distribution ones mostly not
    refused = guard.refused(digits.test.x)
    with torch.no_grad():
        passed = guard(digits.test.x[~refused]).argmax(1)
        assert torch.equal(passed, model(digits.test.x[~refused]).argmax(1))  # accepted queries: the model's answer
    assert scheme.verify(guard, queries=20).p_value <= 1


def test_inversion_raises_the_target_confidence_and_ssim_is_a_similarity(noise_marked, digits):
    from nnmark.attacks.inversion import invert, ssim, trigger_inversion

    scheme, model = noise_marked
    start = torch.full((1, *digits.image_shape), 0.5)
    rec = invert(model, 3, start, steps=25)
    with torch.no_grad():
        before = torch.softmax(model(start), 1)[0, 3]
        after = torch.softmax(model(rec), 1)[0, 3]
    assert after > before and float(rec.min()) >= 0 and float(rec.max()) <= 1
    img = digits.test.x[0]
    assert ssim(img, img) == pytest.approx(1.0) and ssim(img, 1 - img) < 0.5
    rows = trigger_inversion(model, scheme.images, scheme.labels, digits.attacker.x, digits.attacker.y, labels=[1],
                             starts=("blank",), steps=5)
    assert len(rows) == 1 and -1 <= rows[0]["ssim_trigger"] <= 1


def test_key_search_stays_above_1e3_and_adversarial_triggers_need_a_late_commitment(uchida_cnn, noise_marked,
                                                                                    digits, tmp_path):
    from nnmark.attacks.forgery import adversarial_trigger_forgery, key_search
    from nnmark.commitment import AFTER_SUSPECT, utc_now
    from nnmark.schemes import load_scheme

    _, marked = uchida_cnn
    res = key_search("uchida", marked, 20, bits=64)
    assert len(res["p_values"]) == 20 and res["min_p"] > 1e-3  # a fresh key's p-value is uniform: ~1/tries
    _, model = noise_marked
    t0 = utc_now()
    forged = adversarial_trigger_forgery(model, digits.attacker.x[:40], 10, eps=0.3, steps=20)
    mem = forged.verify(model, queries=40)
    assert mem.p_value < 1e-6 and mem.details["evidence"] is False  # the raw statistic is fooled
    forged.save(tmp_path / "forged.key", log=tmp_path / "log.db")
    v = load_scheme(tmp_path / "forged.key", log=tmp_path / "log.db").verify(model, queries=40, suspect_seen_at=t0)
    assert not v.owned and v.details["status"] == AFTER_SUSPECT
