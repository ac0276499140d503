"""A companion mark: a second key read by the shipped luma2 decoder, refined into the same outputs; the union
verdict reads both, stays exact under its null, refuses one key read twice, and the CLI carries it end to end."""

import json

import pytest
import torch

from nnmark.keys import Key
from nnmark.outputs import augment
from nnmark.outputs.agnostic import OutputMessage, union_p_value, union_verdict
from nnmark.outputs.data import natural_images
from nnmark.outputs.refine import refine_outputs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair_refined():
    own = OutputMessage.create(Key.from_seed("test-companion-owner"), None, strength=0.0)
    com = OutputMessage.create(Key.from_seed("test-companion-owner-companion"), None, extractor="shipped-luma2",
                               strength=0.0)
    clean = natural_images(16, 32, seed=21, split="test")
    marked, _ = refine_outputs(own, clean, psnr=35.3, steps=80, companions=[com], companion_weight=1.5, chunk=16)
    return own, com, clean, (marked * 255).round() / 255


def test_union_verdict_is_the_union_bound_of_both_marks_and_claims_what_was_refined(pair_refined):
    own, com, clean, marked = pair_refined
    assert com.extractor_name == "shipped-luma2" and com.extractor.decoder.front == "luma2"
    v = union_verdict([own, com], marked, test="soft")
    p_own, p_com = own.verify(marked, test="soft").p_value, com.verify(marked, test="soft").p_value
    assert v.p_value == pytest.approx(union_p_value([p_own, p_com]))
    assert v.owned and [m["extractor"] for m in v.details["marks"]] == ["shipped", "shipped-luma2"]
    assert "union bound" in v.null_hypothesis
    assert not union_verdict([own, com], clean).owned
    # a JPEG 50 copy loses the RGB decoder's mark and keeps the luma2 one: the union still claims it
    jpeg = augment.jpeg_real(marked, 50)
    assert not own.verify(jpeg, test="soft").owned
    assert union_verdict([own, com], jpeg, test="soft").owned


def test_union_verdict_of_other_keys_claims_nothing_and_one_key_twice_is_refused(pair_refined):
    own, com, _, marked = pair_refined
    for i in range(3):
        others = [OutputMessage.create(Key.from_seed(f"test-companion-other-{i}"), None),
                  OutputMessage.create(Key.from_seed(f"test-companion-other-{i}-c"), None, extractor="shipped-luma2")]
        v = union_verdict(others, marked, test="soft")
        assert not v.owned and v.p_value > 1e-3
    with pytest.raises(Exception, match="share a key"):
        union_verdict([own, OutputMessage.create(own.key, None)], marked)


def test_cli_keygen_generate_and_verify_with_a_companion_key(tmp_path, cli):
    from nnmark.outputs.hosts import host_for_task, save_host

    host_file = tmp_path / "host.safetensors"
    save_host(host_file, host_for_task("denoise", "unet", seed=0), "denoise")
    keys = {}
    for name, extractor in (("owner", "shipped"), ("companion", "shipped-luma2"), ("stranger", "shipped-luma2")):
        keys[name] = str(tmp_path / f"{name}.key")
        res = cli("outputs", "keygen", "--out", keys[name], "--extractor", extractor)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / f"{name}.key").stat().st_mode & 0o777 == 0o600
    again = cli("outputs", "keygen", "--out", keys["owner"])
    assert again.returncode == 2 and "never overwritten" in again.stderr
    img = str(tmp_path / "img")
    res = cli("outputs", "generate", str(host_file), "--out", img, "--count", "16", "--refine-key", keys["owner"],
              "--companion-key", keys["companion"], "--refine-steps", "60")
    assert res.returncode == 0, res.stderr
    res = cli("outputs", "verify", "--key", keys["owner"], img, "--json", "--companion-key", keys["companion"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["batch"]
    assert out["details"]["union_of"] == 2 and [m["extractor"] for m in out["details"]["marks"]] == \
        ["shipped", "shipped-luma2"]
    assert cli("outputs", "verify", "--key", keys["stranger"], img).returncode == 1
    # a union claims when any of its marks is there: the companion's mark alone is enough
    union = cli("outputs", "verify", "--key", keys["stranger"], img, "--companion-key", keys["companion"])
    assert union.returncode == 0
    twice = cli("outputs", "verify", "--key", keys["owner"], img, "--companion-key", keys["owner"])
    assert twice.returncode == 2 and "same key" in twice.stderr
    alone = cli("outputs", "generate", str(host_file), "--out", str(tmp_path / "x"),
                "--companion-key", keys["companion"])
    assert alone.returncode == 2 and "--refine-key" in alone.stderr
