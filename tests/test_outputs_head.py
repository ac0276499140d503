"""Mark heads: every output of a host with a mark head sits at the head's PSNR budget and carries the key's
message; other keys and unmarked outputs are not claimed; host files with a head round-trip and crafted
ones are refused."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torchmetrics.functional.image import peak_signal_noise_ratio

from nnmark.errors import NNMarkError
from nnmark.keys import Key
from nnmark.outputs.agnostic import OutputMessage
from nnmark.outputs.data import dead_leaves_patches, natural_images, photo_patches
from nnmark.outputs.hosts import host_for_task, load_host, save_host
from nnmark.outputs.mark_head import MarkedHost, MarkHead, budget_for_psnr, mark_with_head

torch.set_num_threads(1)
# one worker builds the trained head once for every test here (not once per xdist worker)
pytestmark = pytest.mark.xdist_group("outputs_head")  # (tests/conftest.py groups every file alike)


def psnr_each(a, b):
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


@pytest.fixture(scope="session")
def headed():
    """An sr2 host (width 8, one epoch) with a width-16 mark head trained 300 steps for the owner's key."""
    from nnmark.outputs.hosts import train_host

    scheme = OutputMessage.create(Key.from_seed("test-head-owner"), None, strength=0.0)
    host = host_for_task("sr2", "unet", width=8, seed=0)
    x, y = photo_patches("sr2", 32, "train", 256, seed=0)
    train_host(host, "sr2", 1, seed=0, data=(x, y))
    marked, stats = mark_with_head(scheme, host, x, psnr=35.3, width=16, steps=300, variation=0.5)
    return scheme, host, marked, stats


def test_head_holds_its_budget_on_every_image():
    torch.manual_seed(0)
    head = MarkHead(8, budget_for_psnr(36.0))
    imgs = torch.cat([natural_images(32, 32, seed=2), torch.rand(8, 3, 32, 32)])
    grey = torch.full((4, 3, 48, 40), 0.5)  # another size; far from the clamps
    with torch.no_grad():
        assert float(psnr_each(head(imgs), imgs).min()) >= 36.0 - 1e-3  # clamping can only shrink the residual
        p = psnr_each(head(grey), grey)
    assert float(p.min()) == pytest.approx(36.0, abs=0.01) and float(p.max()) == pytest.approx(36.0, abs=0.01)
    with pytest.raises(ValueError, match="RGB"):
        head(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="budget"):
        MarkHead(8, 0.7)


def test_host_with_head_marks_unseen_photos_for_its_key_only(headed):
    scheme, host, marked, stats = headed
    xt, _ = photo_patches("sr2", 32, "test", 64, seed=5)
    with torch.no_grad():
        out, clean = marked(xt), host(xt).clamp(0, 1)
    out = (out * 255).round() / 255  # as a PNG holds it
    assert float(psnr_each(out, clean).min()) > 34.5
    assert scheme.verify(out[:16]).owned and scheme.verify(out[16:32]).owned
    assert not scheme.verify(clean[:16]).owned  # the same host without its head
    for i in range(3):
        other = OutputMessage.create(Key.from_seed(f"test-head-other-{i}"), None)
        assert not other.verify(out[:16]).owned
        assert (other.p_values(out) < 1e-6).sum() == 0
    assert stats["steps"] == 300 and stats["bit_acc"] > 0.8


def test_host_file_with_head_round_trips_and_crafted_heads_are_refused(headed, tmp_path):
    _, _, marked, _ = headed
    path = save_host(tmp_path / "marked.safetensors", marked, "sr2")
    back, info = load_host(path)
    assert isinstance(back, MarkedHost) and info["head"]["width"] == 16
    x = dead_leaves_patches(4, 32, seed=1)
    with torch.no_grad():
        assert torch.equal(back(x), marked(x))
    tensors = {f"host.{k}": v.contiguous() for k, v in marked.host.state_dict().items()}
    tensors.update({f"head.{k}": v.contiguous() for k, v in marked.head.state_dict().items()})
    base = {"kind": "unet", "in_channels": 3, "out_channels": 3, "width": 8, "task": "sr2"}
    for head in ({"width": 10**6, "budget": 0.01}, {"width": 16, "budget": 3.0}, [16], {"width": 16}):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={"nnmark-output-host": json.dumps({**base, "head": head})})
        with pytest.raises(NNMarkError, match="not an nnmark output host"):
            load_host(bad)
    with pytest.raises(NNMarkError, match="UNetHost"):
        save_host(tmp_path / "x.safetensors", torch.nn.Conv2d(3, 3, 1), "sr2")


def test_dead_leaves_are_seeded_images_in_range():
    a, b = dead_leaves_patches(6, 32, seed=4), dead_leaves_patches(6, 32, seed=4)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0.05
    assert not torch.equal(a, dead_leaves_patches(6, 32, seed=5))


def test_host_with_head_exports_to_onnx_and_its_outputs_still_claim(headed, tmp_path):
    import onnxruntime as ort

    from nnmark.targets.export import export_onnx

    scheme, _, marked, _ = headed
    xt, _ = photo_patches("sr2", 32, "test", 16, seed=6)
    path = export_onnx(marked, tmp_path / "marked.onnx", xt[:2]) or tmp_path / "marked.onnx"
    sess = ort.InferenceSession(str(path))
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xt.numpy()})[0])
    with torch.no_grad():
        assert float((out - marked(xt)).abs().max()) < 1e-4
    assert scheme.verify(out).owned


@pytest.mark.slow  # 80 s; generate / refine / verify through the CLI stay in test_outputs_companion.py
def test_cli_trains_a_head_then_verifies_its_images_and_not_the_unmarked_hosts(tmp_path):
    from click.testing import CliRunner

    from nnmark.cli import cli

    runner = CliRunner()
    run = tmp_path / "run"
    args = ["outputs", "train", "--task", "sr2", "--out", str(run), "--n", "128", "--host-epochs", "1",
            "--head-steps", "150", "--head-psnr", "35"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "mark head step 150/150" in res.output and (run / "owner.key").stat().st_mode & 0o777 == 0o600
    assert "exists" in runner.invoke(cli, args).output  # a second run keeps what the first made
    key = str(run / "owner.key")
    for name, expected in (("marked", 0), ("unmarked", 1)):
        res = runner.invoke(cli, ["outputs", "generate", str(run / f"{name}.safetensors"), "--out",
                                  str(tmp_path / name), "--count", "16"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(cli, ["outputs", "verify", "--key", key, str(tmp_path / name)])
        assert res.exit_code == expected, res.output
    # the unmarked host's outputs refined for the key at serving time are claimed
    res = runner.invoke(cli, ["outputs", "generate", str(run / "unmarked.safetensors"), "--out",
                              str(tmp_path / "refined"), "--count", "16", "--refine-key", key, "--refine-steps", "60"])
    assert res.exit_code == 0 and "refined 16 outputs at 35.3 dB" in res.output, res.output
    assert runner.invoke(cli, ["outputs", "verify", "--key", key, str(tmp_path / "refined")]).exit_code == 0


def test_interrupted_head_training_resumes_to_the_same_head(tmp_path):
    """A run stopped after 20 of 40 steps and resumed from its checkpoint ends with the weights of a run that
    was never stopped; a checkpoint of another configuration is refused."""
    from nnmark.outputs.mark_head import train_mark_head

    scheme = OutputMessage.create(Key.from_seed("test-head-resume"), None, strength=0.5)
    pool = natural_images(24, 32, seed=4)

    def fresh():
        torch.manual_seed(3)
        return MarkHead(4, budget_for_psnr(35.0))

    whole = fresh()
    ref = train_mark_head(scheme, whole, pool, steps=40, batch_size=8, every=10)

    class Stop(Exception):
        pass

    def stop_at_20(step, _stats):
        if step == 20:
            raise Stop

    ckpt = tmp_path / "head.ckpt.safetensors"
    with pytest.raises(Stop):
        train_mark_head(scheme, fresh(), pool, steps=40, batch_size=8, every=10, checkpoint=ckpt,
                        progress=stop_at_20)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:  # the key's message is not written out in the clear
        assert "".join(str(int(b)) for b in scheme.message) not in json.dumps(f.metadata())
    resumed = fresh()
    stats = train_mark_head(scheme, resumed, pool, steps=40, batch_size=8, every=10, checkpoint=ckpt)
    assert stats["resumed_from"] == 20 and len(stats["losses"]) == 4
    assert stats["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ValueError, match="another mark head run .*lr"):
        train_mark_head(scheme, fresh(), pool, steps=40, batch_size=8, every=10, lr=2e-3, checkpoint=ckpt)
