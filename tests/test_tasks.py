"""Tasks beyond classification: an image-to-image host is trained, read by an oracle and scored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnmark.data import load_data
from nnmark.oracle import LocalOracle
from nnmark.tasks import Classification, ImageToImage, TaskError, get_task, task_of
from nnmark.train import TrainConfig, train


class Denoiser(nn.Module):
    """A user's own image-to-image network (not from nnmark's zoo): a residual conv stack."""

    task = "image-to-image"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@pytest.fixture(scope="module")
def noisy_digits():
    splits = load_data("digits-denoise")
    return splits.train, splits.test


def test_task_lookup():
    assert isinstance(get_task(None), Classification)
    assert isinstance(get_task("image-to-image"), ImageToImage)
    assert isinstance(task_of(Denoiser()), ImageToImage)
    assert isinstance(task_of(nn.Linear(3, 2)), Classification)
    with pytest.raises(TaskError, match="known"):
        get_task("segmentation-3d")
    with pytest.raises(TaskError):
        ImageToImage().loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8))
    with pytest.raises(TaskError):
        Classification().loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_image_to_image_host_trains_and_is_queried(noisy_digits):
    train_set, test_set = noisy_digits
    torch.manual_seed(0)
    model = Denoiser()
    task = task_of(model)
    before = task.fidelity(model, test_set.x, test_set.y)
    noisy_psnr = task.fidelity(nn.Identity(), test_set.x, test_set.y)
    rec = train(model, train_set, TrainConfig(epochs=4, lr=3e-3, seed=0, progress=False), val=test_set)
    after = task.fidelity(model, test_set.x, test_set.y)
    # the loss fell and the denoiser beats the noisy input it was given
    assert rec.train_loss[-1] < rec.train_loss[0]
    assert after > max(before, noisy_psnr) + 1.0
    assert rec.val_accuracy[-1] == pytest.approx(after, abs=1e-6)
    out = LocalOracle(model, budget=64)(test_set.x[:8])
    assert out.shape == test_set.y[:8].shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_weighted_loss_scales_samples():
    task = ImageToImage(loss="mse")
    out, tgt = torch.zeros(2, 1, 2, 2), torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    assert float(task.loss(out, tgt)) == pytest.approx(0.5)
    assert float(task.loss(out, tgt, torch.tensor([1.0, 0.0]))) == pytest.approx(0.0)
    assert float(task.loss(out, tgt, torch.tensor([0.0, 2.0]))) == pytest.approx(1.0)


def test_classification_oracle_unchanged(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    oracle = LocalOracle(model)
    labels = oracle(digits.test.x[:5])
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert torch.equal(labels, model(digits.test.x[:5]).argmax(1))


def test_dataset_names_resolve_through_the_registry(tmp_path):
    from nnmark.errors import DataError

    pairs = load_data("digits-denoise")
    assert pairs.train.y.shape == pairs.train.x.shape and pairs.train.num_classes == 0
    assert float((pairs.train.x - pairs.train.y).abs().mean()) > 0.05
    with pytest.raises(DataError, match="known: .*mnist5k"):
        load_data("imagenet")
    with pytest.raises(DataError, match="needs a directory"):
        load_data("cifar10")
    with pytest.raises(DataError, match="takes no directory"):
        load_data(f"digits:{tmp_path}")
