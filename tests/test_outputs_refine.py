"""Per-output refinement: every refined output sits at the budget's PSNR and decodes to the key's message;
other keys do not claim it; bad inputs are refused with the reason."""

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from nnmark.keys import Key
from nnmark.outputs.agnostic import OutputMessage
from nnmark.outputs.data import natural_images
from nnmark.outputs.refine import fit_to_budget, refine_outputs

torch.set_num_threads(1)


def psnr_each(a, b):
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def test_fit_to_budget_holds_the_psnr_on_saturated_images_too():
    y = torch.cat([natural_images(4, 32, seed=3), torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.5)])
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    p = psnr_each(fit_to_budget(y, r, 10 ** (-36.0 / 20)), y)
    assert float(p.min()) >= 36.0 - 1e-3
    # a black image can move one way only: the rescale gives what survives the clamp the whole budget
    assert float(p[4:].max()) == pytest.approx(36.0, abs=0.05)


def test_refined_outputs_carry_the_key_at_the_budget_and_no_other_key_claims_them():
    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    clean = natural_images(16, 32, seed=11, split="test")
    marked, stats = refine_outputs(scheme, clean, psnr=38.0, steps=60, chunk=8)
    stored = (marked * 255).round() / 255  # as a PNG holds it
    assert float(psnr_each(marked, clean).min()) >= 38.0 - 1e-3
    assert float(psnr_each(stored, clean).min()) > 37.5
    assert stats["steps"] == 60 and stats["bit_acc"] > 0.95
    assert (scheme.p_values(stored) < 1e-6).mean() > 0.8  # single outputs
    assert scheme.verify(stored).owned and not scheme.verify(clean).owned
    for i in range(3):
        other = OutputMessage.create(Key.from_seed(f"test-refine-other-{i}"), None)
        assert not other.verify(stored).owned and (other.p_values(stored) < 1e-6).sum() == 0


def test_refinement_starts_from_a_given_mark_and_reads_larger_outputs_by_tiles():
    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    clean = natural_images(2, 64, seed=12, split="test")
    start, _ = refine_outputs(scheme, clean, psnr=36.0, steps=0)
    assert float(psnr_each(start, clean).min()) >= 36.0 - 1e-3  # zero steps: the seeded random residual
    again, _ = refine_outputs(scheme, clean, start, psnr=36.0, steps=0)
    assert torch.allclose(again, start, atol=1e-5)  # a start at the budget is kept as it is
    marked, stats = refine_outputs(scheme, clean, start, psnr=36.0, steps=40)
    assert stats["bit_acc"] > 0.9 and scheme.verify(marked).owned


def test_refinement_refuses_bad_inputs():
    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    with pytest.raises(ValueError, match="RGB"):
        refine_outputs(scheme, torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=">= 32"):
        refine_outputs(scheme, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="start has shape"):
        refine_outputs(scheme, torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_refinement_through_named_threats_keeps_the_budget_and_is_seeded():
    from nnmark.outputs.refine import NAMED_THREATS

    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    clean = natural_images(4, 32, seed=13, split="test")
    a, _ = refine_outputs(scheme, clean, psnr=35.0, steps=8, distortions=NAMED_THREATS, seed=3)
    b, _ = refine_outputs(scheme, clean, psnr=35.0, steps=8, distortions=NAMED_THREATS, seed=3)
    assert torch.equal(a, b)  # the same key, images and seed give the same outputs
    assert float(psnr_each(a, clean).min()) >= 35.0 - 1e-3


def test_crop_geometry_centres_apply_to_partly_zeroed_tiles_only_and_keep_crops_unclaimed():
    from nnmark.outputs.agnostic import content_box

    nat = natural_images(128, 32, seed=14, split="test")
    boxes = [(0, 16, 0, 16), (16, 32, 16, 32), (8, 24, 4, 20), (0, 32, 0, 16)]
    crops = torch.zeros_like(nat)
    for i, (t, b, lft, rgt) in enumerate(boxes):
        part = slice(32 * i, 32 * i + 32)
        crops[part, :, t:b, lft:rgt] = nat[part, :, t:b, lft:rgt]
    claims = 0
    for k in range(3):
        scheme = OutputMessage.create(Key.from_seed(f"test-crop-null-{k}"), None)
        whole = nat[[content_box(x) == (0, 32, 0, 32) for x in nat]]
        assert len(whole) > 100 and float(scheme.geometry_offsets(whole).abs().max()) == 0.0
        off = scheme.geometry_offsets(crops)
        assert bool((off.abs().sum(1) > 0).all())  # every cropped tile is read against its own geometry
        assert torch.equal(off[0], off[1])  # one centre per geometry
        claims += int((scheme.p_values(crops) < 1e-3).sum())
    assert claims <= 2  # 384 verdicts at alpha 1e-3: 0.4 expected under the null


def test_crop_keep_each_keeps_one_quarter_square_per_image_at_its_own_place():
    from nnmark.outputs.agnostic import content_box
    from nnmark.outputs.augment import crop_keep_each

    x = torch.rand(64, 3, 32, 32) * 0.9 + 0.05  # no zero pixel before the crop
    c = crop_keep_each(x, 0.25, torch.Generator().manual_seed(0))
    boxes = {content_box(t) for t in c}
    assert all(b - t == 16 and r - lft == 16 for t, b, lft, r in boxes)
    assert len(boxes) > 20  # positions differ between images (17 x 17 possible)
    assert torch.equal(c[c > 0], x[c > 0])  # what is kept is kept unchanged


def test_crops_on_a_grid_meet_few_geometries_and_a_grid_below_one_is_refused():
    """Marking loops draw crops on a 4 px grid: at most 5 x 5 places for a quarter of a 32 px tile (the
    read-out centre of each new geometry costs a decoder pass), every side and corner a multiple of 4."""
    from nnmark.outputs.agnostic import content_box
    from nnmark.outputs.augment import crop_keep, crop_keep_each

    x = torch.rand(256, 3, 32, 32) * 0.9 + 0.05
    gen = torch.Generator().manual_seed(1)
    boxes = {content_box(t) for t in crop_keep_each(x, 0.25, gen, grid=4)}
    assert len(boxes) == 25 and all(v % 4 == 0 for b in boxes for v in b)
    one = {content_box(crop_keep(x[:1], f, gen, grid=4)[0]) for f in (0.3, 0.5, 0.7) for _ in range(20)}
    assert all(v % 4 == 0 for b in one for v in b) and {b[1] - b[0] for b in one} <= {16, 20, 24, 28}
    with pytest.raises(ValueError, match="grid"):
        crop_keep(x[:1], 0.25, gen, grid=0)
    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    at = torch.zeros(2, 3, 32, 32)
    at[0, :, 5:21, 9:25], at[1, :, 4:20, 8:24] = 0.5, 0.5  # a quarter 1 px off the grid, and on it
    exact = scheme.geometry_offsets(at)
    snapped = scheme.geometry_offsets(at, snap=4)
    assert torch.equal(snapped[0], exact[1]) and not torch.equal(exact[0], exact[1])
    with pytest.raises(ValueError, match="snap"):
        scheme.geometry_offsets(at, snap=0)
    with pytest.raises(ValueError, match="centre_grid"):
        refine_outputs(scheme, x[:2], steps=1, centre_grid=0)


def test_refinement_with_a_crop_term_keeps_the_budget_and_refuses_a_negative_weight():
    scheme = OutputMessage.create(Key.from_seed("test-refine-owner"), None, strength=0.0)
    clean = natural_images(4, 32, seed=15, split="test")
    a, _ = refine_outputs(scheme, clean, psnr=35.0, steps=2, crop_weight=1.0, seed=5)
    b, _ = refine_outputs(scheme, clean, psnr=35.0, steps=2, crop_weight=1.0, seed=5)
    assert torch.equal(a, b) and float(psnr_each(a, clean).min()) >= 35.0 - 1e-3
    with pytest.raises(ValueError, match="crop_weight"):
        refine_outputs(scheme, clean, crop_weight=-1.0)
