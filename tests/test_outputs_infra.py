"""Output-mark infrastructure: bundled photo patches split by source, hosts, distortions."""

import numpy as np
import pytest
import torch

from nnmark.outputs import augment
from nnmark.outputs.data import SOURCES, natural_images, photo_patches, photo_splits, source_photos
from nnmark.outputs.hosts import build_host, host_for_task, train_host

torch.set_num_threads(1)


def test_splits_use_disjoint_source_photos():
    assert not set(SOURCES["train"]) & set(SOURCES["test"])
    assert not set(SOURCES["attacker"]) & (set(SOURCES["train"]) | set(SOURCES["test"]))
    test_pixels = {p.tobytes()[:4096] for p in source_photos("test")}
    assert not test_pixels & {p.tobytes()[:4096] for p in source_photos("train")}


@pytest.mark.parametrize("task,cin", [("sr2", 3), ("colourise", 1), ("denoise", 3)])
def test_photo_patches_shapes_and_determinism(task, cin):
    x, y = photo_patches(task, 16, "test", 8, seed=3)
    assert x.shape == (8, cin, 16, 16) and y.shape == (8, 3, 16, 16)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x2, y2 = photo_patches(task, 16, "test", 8, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, photo_patches(task, 16, "test", 8, seed=4)[1])
    assert not torch.equal(x, y[:, :cin])  # the input is degraded


def test_dataset_component_gives_image_to_image_splits():
    from nnmark.data.resolve import load_data

    splits = photo_splits("sr2", 16, n=8)
    assert splits.num_classes == 0 and splits.train.y.shape == splits.train.x.shape
    assert load_data("photos-denoise").train.y.shape[1:] == (3, 32, 32)


def test_jpeg_differentiable_tracks_pillow_and_has_gradient():
    img = natural_images(16, 32, seed=1).requires_grad_(True)
    sim = augment.jpeg_differentiable(img, 50)
    real = augment.jpeg_real(img, 50)
    psnr = lambda a, b: float(10 * torch.log10(1 / ((a - b).detach() ** 2).mean()))  # noqa: E731
    assert psnr(sim, real) > psnr(real, img) + 5  # closer to Pillow's output than JPEG is to the original
    sim.sum().backward()
    assert img.grad is not None and float(img.grad.abs().mean()) > 0.1


def test_distortions_keep_shape_and_do_what_they_say():
    img = natural_images(4, 32, seed=2)
    gen = torch.Generator().manual_seed(0)
    kept = augment.crop_keep(img, 0.25, gen)
    frac = float((kept.abs().sum(1) > 0).float().mean())
    assert kept.shape == img.shape and 0.2 < frac <= 0.25
    noisy = augment.gaussian_noise(img, 0.05, gen)
    assert 0.03 < float((noisy - img).std()) < 0.06
    small = augment.resize(img, 0.5)
    assert small.shape == img.shape and float((small - img).abs().mean()) > 0
    assert augment.random_augment(img, gen).shape == img.shape
    q = augment.quantize_uint8(img + 0.001)
    assert np.allclose((q * 255).numpy(), np.round((q * 255).numpy()), atol=1e-4)


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_fresh_host_is_identity_and_training_lowers_loss(kind):
    model = build_host(kind, 1, 3, width=8)
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(model(x), x.expand(-1, 3, -1, -1))
    odd = torch.rand(1, 1, 37, 42)  # any size (the U-Net pads to multiples of 4 and crops back)
    assert model(odd).shape == (1, 3, 37, 42)
    model = host_for_task("denoise", kind, width=8)
    data = photo_patches("denoise", 16, "train", 128)
    out = train_host(model, "denoise", epochs=3, data=data, batch_size=32, lr=2e-3)
    assert out["losses"][-1] < out["losses"][0]
    assert out["test_psnr"] > 20.0
