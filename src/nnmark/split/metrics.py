"""How much of an owner's images a reconstruction gives away.

All functions take originals ``x`` and reconstructions ``r`` of shape ``(N, C, H, W)`` in ``[0, 1]``.

- :func:`mse`: mean squared error per pixel (lower: closer).
- :func:`ssim`: mean SSIM over images, from scikit-image (``structural_similarity``, ``data_range=1``,
  its default 7x7 uniform window; ``gaussian=True``: Wang et al.'s 11x11 Gaussian window, sigma 1.5; on images smaller
  than 11 pixels the sigma that gives the largest window that fits).
- :class:`Judge`: a CNN trained in the project on the dataset's ``attacker`` + ``val`` splits (never the
  owners' images), giving the *reprint accuracy* (its accuracy on the reconstructions against the true
  labels) and a *perceptual distance* (:meth:`Judge.distance`: the mean over its four conv layers of the
  squared distance between unit-normalised feature vectors, LPIPS-style without learned weights; 0 for
  identical images, higher: less alike).
- :func:`floor_scores`: the scores of the mean image -- what an attacker that learns nothing from the
  activations can always output (the floor every defended SSIM is to be read against).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn


def mse(x: torch.Tensor, r: torch.Tensor) -> float:
    """Mean squared error per pixel."""
    return float(((x - r) ** 2).mean())


def ssim(x: torch.Tensor, r: torch.Tensor, gaussian: bool = False) -> float:
    """Mean SSIM over the images (module doc)."""
    a, b = x.detach().cpu().numpy(), r.detach().cpu().numpy()
    vals = []
    side = min(a.shape[2:])
    kw: dict = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False} if gaussian else {}
    if gaussian and side < 11:  # skimage cuts the Gaussian at 3.5 sigma: a smaller sigma fits 8x8 digits (7x7)
        kw["sigma"] = ((side - 1) // 2) / 3.5 - 0.01
    for i in range(a.shape[0]):
        vals.append(structural_similarity(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0), data_range=1.0,
                                          channel_axis=2, **kw))
    return float(np.mean(vals))


class Judge:
    """The evaluation classifier (module doc). Build with :func:`judge_for`."""

    def __init__(self, model: nn.Module, accuracy: float) -> None:
        self.model = model.eval()
        self.accuracy = accuracy  # on the test split

    @torch.no_grad()
    def reprint_accuracy(self, r: torch.Tensor, y: torch.Tensor) -> float:
        """The judge's accuracy on reconstructions ``r`` against the true labels ``y``."""
        return float((self.model(r).argmax(1) == y).float().mean())

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        m, out = self.model, []
        h = torch.relu(m.conv1(x))
        out.append(h)
        h = m.pool(torch.relu(m.conv2(h)))
        out.append(h)
        h = torch.relu(m.conv3(h))
        out.append(h)
        out.append(m.pool(torch.relu(m.conv4(h))))
        return out

    @torch.no_grad()
    def distance(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Perceptual distance (module doc), averaged over images."""
        total = 0.0
        fa, fb = self._features(x), self._features(r)
        for a, b in zip(fa, fb, strict=True):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total += float(((a - b) ** 2).sum(1).mean())
        return total / len(fa)


@cache
def judge_for(data: str, epochs: int = 8, seed: int = 0) -> Judge:
    """Train (once per process) the judge CNN for dataset ``data`` (:func:`~nnmark.split.datasets.load_split_data`):
    ``epochs`` over its attacker + val images, raised so that it takes at least 150 Adam steps of 64 images
    (small sets such as ``lfw-faces``: 80 images, 75 epochs; ``mnist5k`` keeps 8)."""
    from nnmark.data.dataset import ImageDataset
    from nnmark.models import model_spec
    from nnmark.split.datasets import load_split_data as load_splits
    from nnmark.train import TrainConfig, accuracy, seeded_model, train

    s = load_splits(data)
    pool = ImageDataset(torch.cat([s.attacker.x, s.val.x]), torch.cat([s.attacker.y, s.val.y]), s.num_classes,
                        f"{data}/judge")
    model = seeded_model(model_spec("cnn", s.image_shape, s.num_classes, channels=[16, 16, 32, 32],
                                    dense=[128, 128], dropout=0.3), seed)
    epochs = max(epochs, -(-150 // -(-len(pool) // 64)))
    train(model, pool, TrainConfig(epochs=epochs, lr=1e-3, batch_size=64, seed=seed))
    return Judge(model, float(accuracy(model, s.test)))


def floor_scores(x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """MSE and SSIM of the mean image of ``reference`` (``(M, C, H, W)``, e.g. public data) against ``x``."""
    mean = reference.mean(0, keepdim=True).expand_as(x)
    return {"mse": mse(x, mean), "ssim": ssim(x, mean), "ssim_gaussian": ssim(x, mean, gaussian=True)}
