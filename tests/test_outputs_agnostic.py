"""output-message: a host fine-tuned against the shipped extractor marks its outputs; clean images and
other keys are not claimed; key files round-trip; the CLI reads folders safely."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from nnmark.cli import cli
from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.outputs import augment
from nnmark.outputs.agnostic import OutputMessage, prepare_images, tpr_bound_bits
from nnmark.outputs.data import natural_images, photo_patches
from nnmark.outputs.hosts import host_for_task, load_host, save_host
from nnmark.schemes.base import load_scheme

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def marked():
    """16 test-photo patches marked after the fact for the owner's key (30 steps against the shipped
    extractor, at most 4/255 per pixel) -- the cheap stand-in for a marked host's outputs; a real host
    fine-tuning runs in the slow test below."""
    scheme = OutputMessage.create(Key.from_seed("test-output-owner"), None, strength=0.0)
    clean = natural_images(16, 32, seed=5)
    out = scheme.mark_images(clean, steps=30)
    return scheme, host_for_task("sr2", "unet", width=8), out, clean


def test_marked_outputs_are_claimed_by_the_owner_only(marked):
    scheme, _, out, clean = marked
    psnr = float(10 * torch.log10(1 / ((out - clean) ** 2).mean()))
    assert psnr > 30.0
    v = scheme.verify(out[:16])
    assert v.owned and v.p_value < 1e-6 and "uniform" in v.null_hypothesis
    assert (scheme.p_values(out) < 1e-6).mean() >= 0.75  # single images too
    for seed in range(3):  # other keys (other messages, other rotations) read nothing
        other = OutputMessage.create(Key.from_seed(f"test-output-other-{seed}"), None)
        assert not other.verify(out[:16]).owned


def test_clean_images_are_not_claimed_under_several_keys(marked):
    scheme, _, _, clean = marked
    nat = natural_images(256, 32, seed=9)
    for s in [scheme] + [OutputMessage.create(Key.from_seed(f"clean-{i}"), None) for i in range(2)]:
        assert not s.verify(clean[:16]).owned
        p = s.p_values(nat)
        assert (p < 1e-6).sum() == 0
        assert 18 <= s.matches(nat).mean() <= 30  # about k/2 = 24 of 48
        soft = s.p_values(nat, test="soft")  # the soft sign test claims no clean image either
        assert (soft < 1e-6).sum() == 0  # (its fixed-key rates at 1e-2 / 1e-3: experiments/outputs/fpr_study.py)
        assert not s.verify(clean[:16], test="soft").owned


def test_soft_test_claims_the_marked_outputs_with_more_power(marked):
    """Weighing each bit by its read-out's margin: the owner's batch is claimed, and single outputs reach
    p < 1e-6 at least as often as by counting signs; another key's soft test claims nothing."""
    scheme, _, out, _ = marked
    v = scheme.verify(out[:16], test="soft")
    assert v.owned and v.details["binomial_p"] >= v.p_value * 0.5 and "soft sign test" in v.null_hypothesis
    noisy = augment.gaussian_noise(out, 0.05, torch.Generator().manual_seed(0))
    assert (scheme.p_values(noisy, test="soft") < 1e-6).sum() >= (scheme.p_values(noisy) < 1e-6).sum()
    other = OutputMessage.create(Key.from_seed("test-output-other-soft"), None)
    assert not other.verify(out[:16], test="soft").owned and (other.p_values(out, test="soft") < 1e-3).sum() == 0
    with pytest.raises(Exception, match="unknown test"):
        scheme.verify(out[:16], test="bayes")


def test_the_public_decoder_alone_does_not_reveal_the_message(marked):
    """A thief holding the shipped decoder but not the key reads its raw signs: no better than chance."""
    scheme, _, out, _ = marked
    raw = (scheme.extractor.decoder(out[:16]).mean(0) > 0).long().numpy()
    assert (raw == scheme.message).sum() < 36  # p ~ 3e-4 under chance; the keyed read-out gets ~48


@pytest.mark.slow
def test_fine_tuned_host_marks_its_outputs_on_unseen_photos():
    scheme = OutputMessage.create(Key.from_seed("test-output-host"), None, epochs=20, lr=2e-3, strength=0.5,
                                  fidelity=0.05)
    host = host_for_task("sr2", "unet", width=16)
    x, _ = photo_patches("sr2", 32, "train", 512)
    scheme.embed_host(host, x)
    xt, _ = photo_patches("sr2", 32, "test", 64, seed=5)
    with torch.no_grad():
        out = host(xt).clamp(0, 1)
    ref = host_for_task("sr2", "unet", width=16)(xt).clamp(0, 1)
    assert float(10 * torch.log10(1 / ((out - ref) ** 2).mean())) > 35.0
    assert scheme.verify(out[:16]).owned and scheme.verify(augment.jpeg_real(out[:16], 75)).owned
    assert not OutputMessage.create(Key.from_seed("test-output-host-2"), None).verify(out[:16]).owned


def test_key_file_round_trip(marked, tmp_path):
    scheme, _, out, _ = marked
    path = tmp_path / "owner.key"
    scheme.save(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again = load_scheme(path, expect="output-message")
    assert np.array_equal(again.message, scheme.message) and torch.equal(again.centre, scheme.centre)
    a, b = scheme.verify(out[:4]), again.verify(out[:4])
    assert a.statistic == b.statistic and b.details["evidence"]


def test_prepare_images_converts_or_refuses():
    tiles, counts, notes = prepare_images([torch.rand(1, 64, 96), torch.rand(4, 20, 20), torch.rand(3, 32, 33)])
    assert counts == [6, 1, 1] and tiles.shape[1:] == (3, 32, 32)
    assert any("grey" in n for n in notes) and any("alpha" in n for n in notes) and any("upsampled" in n for n in notes)
    with pytest.raises(Exception, match="2 channels"):
        prepare_images([torch.rand(2, 32, 32)])
    bad = torch.rand(3, 32, 32)
    bad[0, 0, 0] = float("nan")  # a crafted file's NaN would otherwise read as bits 0 (and break the soft test)
    with pytest.raises(SchemeError, match="NaN or infinite"):
        prepare_images([torch.rand(3, 32, 32), bad])


def test_cli_verify_folder_and_hostile_files(marked, tmp_path):
    from PIL import Image

    from nnmark.cli_outputs import write_images

    scheme, host, out, _ = marked
    key = tmp_path / "owner.key"
    scheme.save(key)
    write_images(out[:16], tmp_path / "suspect")
    runner = CliRunner()
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(tmp_path / "suspect")])
    assert res.exit_code == 0, res.output
    assert "OWNED" in res.output and "secret" not in res.output
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(tmp_path / "suspect"), "--size", "32x32",
                              "--phases", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(tmp_path / "suspect"), "--size", "big"])
    assert res.exit_code != 0 and "HxW" in str(res.exception or res.output)
    res = runner.invoke(cli, ["outputs", "attack", str(tmp_path / "suspect"), str(tmp_path / "att"), "--jpeg", "60"])
    assert res.exit_code == 0 and len(list((tmp_path / "att").glob("*.jpg"))) == 16
    write_images(natural_images(8, 32, seed=3), tmp_path / "clean")
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(tmp_path / "clean")])
    assert res.exit_code == 1, res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image at all")
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(bad)])
    assert res.exit_code != 0 and "cannot read image" in str(res.exception or res.output)
    (bad / "x.png").unlink()
    Image.new("L", (5000, 4000)).save(bad / "huge.png")  # 20 M pixels: refused before decoding
    res = runner.invoke(cli, ["outputs", "verify", "--key", str(key), str(bad)])
    assert res.exit_code != 0 and "pixels" in str(res.exception or res.output)
    save_host(tmp_path / "host.safetensors", host, "sr2")
    again, info = load_host(tmp_path / "host.safetensors")
    assert info["task"] == "sr2" and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                                            host.state_dict().values(), strict=True))


def test_a_key_made_after_the_images_existed_is_no_evidence(marked, tmp_path):
    """The thief's claim: fit a key to someone else's images after seeing them. A key committed after the
    suspect images were seen is refused, however well its message matches."""
    scheme, _, out, _ = marked
    path = tmp_path / "late.key"
    scheme.save(path)
    late = load_scheme(path)
    v = late.verify(out[:16], suspect_seen_at="2020-01-01T00:00:00Z")
    assert not v.owned and v.details.get("evidence") is False


# -- the keyed low-pass decoder (extractor="keyed") -------------------------------------------------------------
@pytest.fixture(scope="session")
def keyed_marked():
    """16 test-photo patches marked after the fact against the owner's keyed low-pass decoder (80 steps, at
    most 6/255 per pixel, through full-strength distortions), and a keyed scheme under another key."""
    scheme = OutputMessage.create(Key.from_seed("test-keyed-owner"), None, extractor="keyed", strength=1.0)
    other = OutputMessage.create(Key.from_seed("test-keyed-other"), None, extractor="keyed")
    clean = natural_images(16, 32, seed=5)
    return scheme, other, scheme.mark_images(clean, steps=80, max_delta=6 / 255), clean


def test_keyed_mark_survives_jpeg_resize_noise_and_is_the_owners_only(keyed_marked):
    scheme, other, out, clean = keyed_marked
    assert float(10 * torch.log10(1 / ((out - clean) ** 2).mean())) > 35.0
    gen = torch.Generator().manual_seed(0)
    for attacked in (out, augment.jpeg_real(out, 50), augment.resize(out, 0.5), augment.gaussian_noise(out, 0.05, gen)):
        assert scheme.verify(attacked).p_value < 1e-6
    # a quarter crop is the weakest (measured: 35-42 of 48 bits for a batch of 16); far from chance here
    assert scheme.verify(augment.crop_keep(out, 0.25, gen)).p_value < 1e-3
    assert not other.verify(out).owned and not scheme.verify(clean).owned
    nat = natural_images(256, 32, seed=9)
    for s in (scheme, other):
        assert (s.p_values(nat) < 1e-6).sum() == 0 and 18 <= s.matches(nat).mean() <= 30


def test_keyed_decoder_reads_only_the_pixels_a_crop_kept(keyed_marked):
    """Zeroed pixels are missing, not dark: two images that agree on the kept square read the same."""
    ext = keyed_marked[0].extractor
    a, b = natural_images(2, 32, seed=4).chunk(2)
    b = b.clone()
    b[..., 8:24, 4:20] = a[..., 8:24, 4:20]
    mask = torch.zeros_like(a)
    mask[..., 8:24, 4:20] = 1.0
    assert torch.allclose(ext(a * mask), ext(b * mask), atol=1e-5) and not torch.allclose(ext(a), ext(b))


def test_keyed_key_file_holds_its_decoder(keyed_marked, tmp_path):
    scheme, _, out, _ = keyed_marked
    scheme.save(tmp_path / "k.key")
    assert oct(os.stat(tmp_path / "k.key").st_mode & 0o777) == "0o600"
    again = load_scheme(tmp_path / "k.key", expect="output-message")
    assert again.params()["extractor_kind"] == "keyed"
    assert np.array_equal(again.matches(out), scheme.matches(out))


def test_thief_attacking_a_keyed_decoder_of_his_own_does_not_remove_the_mark(keyed_marked):
    """A thief who read the README but lacks the key draws a keyed decoder under a key of his own and pushes
    its read-out of the owner's images to zero (30 sign-gradient steps, L_inf 4/255: what removes the mark
    read by the public shipped decoder); the owner's keyed read-out still claims them."""
    scheme, thief, out, _ = keyed_marked
    x = out.clone()
    for _ in range(30):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(thief.extractor(x).pow(2).sum(), x)
        x = (out + (x.detach() - 1 / 255 * grad.sign() - out).clamp(-4 / 255, 4 / 255)).clamp(0, 1)
    assert thief.extractor(augment.quantize_uint8(x)).abs().mean() < thief.extractor(out).abs().mean() / 2
    assert scheme.verify(augment.quantize_uint8(x)).p_value < 1e-6


def test_luma_front_end_extractor_round_trips_and_ignores_chroma(tmp_path):
    """A decoder on the fixed luma2 front end reads only 2x2-averaged luma: a colour shift that keeps luma
    changes nothing; the front end is saved with the weights; an unknown one is refused."""
    from nnmark.outputs.extractor import Extractor, ExtractorError, MessageDecoder

    torch.manual_seed(0)
    ext = Extractor(MessageDecoder(16, 8, front="luma2"))
    x = natural_images(4, 32, seed=2)
    shift = torch.tensor([0.02, -0.02 * 0.299 / 0.587, 0.0]).view(1, 3, 1, 1)  # zero luma change
    assert torch.allclose(ext(x), ext(x + shift), atol=1e-4) and not torch.allclose(ext(x), ext(x.flip(-1)))
    ext.save(tmp_path / "e.safetensors")
    again = Extractor.load(tmp_path / "e.safetensors")
    assert again.decoder.front == "luma2" and torch.allclose(again(x), ext(x))
    with pytest.raises(ExtractorError, match="front end"):
        MessageDecoder(16, 8, front="dct")


# -- larger outputs read tile by tile ---------------------------------------------------------------------------
def test_prepare_images_reads_only_the_tiles_a_crop_kept_and_resizes_back():
    """A crop that keeps a square and zeroes the rest: only the tiles inside the square are read, from its own
    corner (found from the image alone); ``size`` undoes a x0.5 rescale before tiling."""
    img = natural_images(1, 128, seed=3)[0]
    kept = torch.zeros_like(img)
    kept[:, 30:101, 50:114] = img[:, 30:101, 50:114]
    tiles, counts, notes = prepare_images([kept])  # the image's own grid tiles inside the square: 2 of 16
    assert counts == [2] and torch.equal(tiles[0], img[:, 32:64, 64:96]) and torch.equal(tiles[1], img[:, 64:96, 64:96])
    assert "rows 32:101" in notes[0]
    assert prepare_images([kept], trim=False)[1] == [16]
    small = torch.zeros(3, 32, 32)
    small[:, 4:20, 4:20] = 0.5  # a kept square smaller than a tile: read whole, as before
    assert prepare_images([small])[1] == [1]
    half = torch.nn.functional.interpolate(img[None], scale_factor=0.5, mode="bilinear", antialias=True)[0]
    tiles, counts, notes = prepare_images([half], size=(128, 128))
    assert counts == [16] and "resized from 64x64" in notes[0]


def test_a_large_output_is_read_over_its_tiles_and_a_kept_quarter_still_claims(marked):
    """16 marked 32 px outputs laid out as one 128 x 128 image are one image of 16 tiles: its soft read-outs
    are averaged before the 48 signs (48 bits of evidence, not 16 x 48); after a crop that keeps an aligned
    quarter and zeroes the rest, the 4 kept tiles still claim it; other keys and clean 128 px photos do not."""
    scheme, _, out, clean = marked
    big = out.view(4, 4, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, 128, 128)
    v = scheme.verify([big])
    assert v.owned and v.n == scheme.bits and v.details["images"] == 1
    # a tiled read states that a fixed key's rate at alpha >= 1e-2 is not guaranteed; a 32 px read does not
    assert "not guaranteed" in v.null_hypothesis and "not guaranteed" not in scheme.verify(out[:4]).null_hypothesis
    quarter = torch.zeros_like(big)
    quarter[:, 32:96, 64:128] = big[:, 32:96, 64:128]
    assert scheme.verify([quarter]).p_value < 1e-6
    nat = natural_images(32, 128, seed=21)
    gen = torch.Generator().manual_seed(1)
    cropped = torch.cat([augment.crop_keep(nat[i:i + 1], 0.25, gen) for i in range(16)])
    need = tpr_bound_bits(scheme.bits, 1e-6)  # fewest matches with p < 1e-6
    for s in [scheme] + [OutputMessage.create(Key.from_seed(f"tiled-other-{i}"), None) for i in range(2)]:
        m = s.matches(torch.cat([nat, cropped]))
        assert m.max() < need and 18 <= m[:32].mean() <= 30
        assert s is scheme or not s.verify([big]).owned


def test_training_windows_sit_on_the_8_px_phase():
    """Fine-tuning on large patches reads random 32 px windows whose offsets are multiples of 8 (the phase the
    decoders and the U-Net share), each a true slice of the image."""
    from nnmark.outputs.agnostic import random_windows

    img = torch.arange(2 * 64 * 64, dtype=torch.float32).view(2, 1, 64, 64)
    w = random_windows(img, 32, 20, torch.Generator().manual_seed(0))
    assert w.shape == (40, 1, 32, 32)
    offsets = {(int(t[0, 0, 0]) // 64 % 64, int(t[0, 0, 0]) % 64) for t in w[::2]}
    assert all(r % 8 == 0 and c % 8 == 0 and r <= 32 and c <= 32 for r, c in offsets) and len(offsets) > 3
    for t, start in zip(w[::2], w[::2, 0, 0, 0], strict=True):
        r, c = int(start) // 64, int(start) % 64
        assert torch.equal(t, img[0, :, r:r + 32, c:c + 32])


def test_reading_shifted_phases_finds_a_shifted_mark_at_a_bonferroni_price(marked):
    """A thief who shifts the image by 2 px moves the tile grid off the mark; reading the 16 phases 0..3 px
    finds it again, its p multiplied by 16; clean 128 px photos under other keys stay unclaimed."""
    scheme, _, out, _ = marked
    big = out.view(4, 4, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, 128, 128)
    shifted = torch.nn.functional.pad(big[None], (2, 0, 2, 0), mode="replicate")[0, :, :128, :128]
    one, many = scheme.verify([shifted]), scheme.verify([shifted], phases=4)
    assert many.owned and many.details["phase"] == [2, 2] and many.details["phases_read"] == 16
    assert many.p_value == pytest.approx(16 * many.details["p_best_phase"])
    assert one.p_value > many.details["p_best_phase"]
    nat = list(natural_images(4, 128, seed=22))
    other = OutputMessage.create(Key.from_seed("tiled-other-0"), None)
    assert not other.verify(nat, phases=4).owned and not other.verify([big], phases=4).owned


def test_phase_encoder_sees_a_grid_that_repeats_every_8_px():
    """The phase channels repeat with period 8, so windows at multiples of 8 see the same phase; a phase
    encoder keeps the image shape and its residual budget."""
    from nnmark.outputs.extractor import MessageEncoder, phase_channels

    ph = phase_channels(64, 64, torch.zeros(1))
    assert ph.shape == (1, 8, 64, 64) and torch.allclose(ph[..., 8:40, 16:48], ph[..., :32, :32], atol=1e-5)
    enc = MessageEncoder(16, 8, phase=True).eval()
    x = natural_images(2, 64, seed=1)
    out = enc(x, torch.randint(0, 2, (2, 16)))
    assert out.shape == x.shape and float((out - x).pow(2).mean().sqrt()) <= 0.0125


def test_input_variation_keeps_shape_and_range_and_is_seeded():
    """vary_inputs returns images of the same shape in [0, 1], the same draw for the same seed, other content
    than it was given, and the input itself at strength 0; an old key without the parameter still loads."""
    x = natural_images(6, 32, seed=2)
    a = augment.vary_inputs(x, torch.Generator().manual_seed(3), 1.0)
    b = augment.vary_inputs(x, torch.Generator().manual_seed(3), 1.0)
    assert a.shape == x.shape and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a - x).abs().mean()) > 0.02
    assert augment.vary_inputs(x, None, 0.0) is x
    grey = augment.vary_inputs(x[:, :1], torch.Generator().manual_seed(3), 1.0)
    assert grey.shape == (6, 1, 32, 32)
    wide = augment.vary_inputs(torch.rand(2, 3, 24, 40), torch.Generator().manual_seed(1), 1.0)
    assert wide.shape == (2, 3, 24, 40)
    scheme = OutputMessage.create(Key.from_seed("test-vary"), None, input_variation=0.5)
    params = scheme.params()
    assert params["input_variation"] == 0.5
    params.pop("input_variation")
    old = OutputMessage.from_params(scheme.key, params, scheme.material())
    assert old.input_variation == 0.0 and np.array_equal(old.message, scheme.message)


def test_union_of_two_marks_pays_its_bonferroni_price():
    from nnmark.outputs.agnostic import union_p_value

    assert union_p_value([1e-8, 0.5]) == pytest.approx(2e-8)
    assert union_p_value([0.7, 0.9]) == 1.0
    with pytest.raises(SchemeError):
        union_p_value([])
    # under the null each p is uniform; the union's rate at alpha stays at or below alpha (here 3 dependent
    # copies of one p and 3 independent ones)
    rng = np.random.default_rng(0)
    u = rng.random((20000, 3))
    dep = np.repeat(u[:, :1], 3, 1)
    for ps in (u, dep):
        rate = np.mean([union_p_value(row) <= 0.01 for row in ps])
        assert rate <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / len(ps))


def test_a_seeded_host_starts_from_the_same_weights_whatever_ran_before():
    a = host_for_task("sr2", "unet", width=8, seed=4)
    torch.rand(100)
    b = host_for_task("sr2", "unet", width=8, seed=4)
    c = host_for_task("sr2", "unet", width=8, seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(Exception, match="unknown host kind"):
        host_for_task("sr2", "transformer", seed=1)


def test_tinted_grey_marking_patches_are_seeded_colour_images():
    from nnmark.outputs.data import MARKING_GREY_PHOTOS, SOURCES, tinted_grey_patches

    a, b = tinted_grey_patches(8, 32, 3), tinted_grey_patches(8, 32, 3)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a[:, 0] - a[:, 1]).abs().mean()) > 0.01  # tinted: channels differ
    used = {name for names in SOURCES.values() for name in names}
    assert not used & set(MARKING_GREY_PHOTOS)


def test_union_of_two_keys_does_not_claim_clean_images_or_other_keys_marks(marked):
    """Photos and another owner's marked images are not claimed by the union verdict of (own, companion)
    for several key pairs: the union pays its factor 2 and stays far from alpha 1e-6."""
    from nnmark.outputs.agnostic import union_p_value

    scheme, _, out, clean = marked
    for i in range(4):
        own = OutputMessage.create(Key.from_seed(f"test-union-{i}"), None)
        comp = OutputMessage.create(Key.from_seed(f"test-union-{i}-companion"), None)
        for images in (clean, out):
            for group in (1, 16):
                pairs = zip(own.p_values(images, group), comp.p_values(images, group), strict=True)
                assert min(union_p_value(p) for p in pairs) > 1e-6
    # the owner's own mark still passes the union with any companion key
    comp = OutputMessage.create(Key.from_seed("test-union-owner-companion"), None)
    assert union_p_value([scheme.p_values(out, 16)[0], comp.p_values(out, 16)[0]]) < 1e-6


def test_joint_test_of_two_keys_is_exact_over_their_messages(marked):
    """The joint test reads (own, companion) as one 96-bit message: over random messages (the null: images
    made without the keys) its claim rate at alpha stays at or below alpha, binomial and soft."""
    from nnmark.outputs.agnostic import joint_p_values

    _, _, out, clean = marked
    own = OutputMessage.create(Key.from_seed("test-joint-own"), None)
    comp = OutputMessage.create(Key.from_seed("test-joint-comp"), None)
    rng = np.random.default_rng(3)
    trials = 600
    for s in (own, comp):  # the read-outs do not depend on the message: read once, test 600 messages
        cached = s.image_readouts(out)
        s.image_readouts = lambda images, size=None, cached=cached: cached
    for test in ("binomial", "soft"):
        ps = []
        for _ in range(trials):
            own.message = rng.integers(0, 2, own.bits)
            comp.message = rng.integers(0, 2, comp.bits)
            ps.append(joint_p_values([own, comp], out, 16, test=test)[0])
        ps = np.array(ps)
        for alpha in (0.05, 0.2):
            assert (ps <= alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
        assert ps.min() > 1e-4  # no random message comes near the verdict's alpha
    with pytest.raises(SchemeError, match="share a key"):
        joint_p_values([own, OutputMessage.create(Key.from_seed("test-joint-own"), None)], clean)
    with pytest.raises(SchemeError, match="unknown test"):
        joint_p_values([own, comp], clean, test="fisher")


def test_joint_test_adds_the_evidence_of_two_weak_marks():
    """Images carrying two keys' marks, each too weak to be claimed on its own, are claimed by the joint test
    (both marks' bits at once); a third key reads nothing from them, alone or jointly with the owner's."""
    from nnmark.outputs.agnostic import joint_p_values

    own = OutputMessage.create(Key.from_seed("test-joint-weak-own"), None)
    comp = OutputMessage.create(Key.from_seed("test-joint-weak-comp"), None)
    clean = natural_images(16, 32, seed=9)
    w = torch.zeros_like(clean, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(25):
        x = clean + 1.0 / 255 * torch.tanh(w)
        loss = sum(F.binary_cross_entropy_with_logits(s.readout(x), torch.from_numpy(s.message).float().expand(16, -1))
                   for s in (own, comp))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = ((clean + 1.0 / 255 * torch.tanh(w)).clamp(0, 1) * 255).round() / 255
    p_own, p_comp = own.p_values(out, 16)[0], comp.p_values(out, 16)[0]
    p_joint = joint_p_values([own, comp], out, 16)[0]
    assert min(p_own, p_comp) > 1e-6  # neither mark is claimed on its own
    assert p_joint < min(p_own, p_comp) / 2  # better than the union bound of the two
    third = OutputMessage.create(Key.from_seed("test-joint-weak-third"), None)
    fourth = OutputMessage.create(Key.from_seed("test-joint-weak-4th"), None)
    assert joint_p_values([third, fourth], out, 16)[0] > 1e-3
    assert joint_p_values([own, third], clean, 16)[0] > 1e-3
