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
- :func:`floor_scores`: the scores of what an attacker can output without looking at the activations at all.
  The *mean-image floor* (the public mean image) is what an attacker that learns nothing scores. The *label
  floor*: the server receives each image's label (it must, to train the task), so it can always output a
  template of that class built from the public images -- the class mean, or the class medoid (the public image
  of the class with the least summed Euclidean distance to the others); the label floor is the better of the
  two. The *predicted-label floor*: the same templates indexed by the server part's own prediction from the
  activations (what is left when the labels stay with the owners). No defence that keeps the task accurate
  can push the best attacker below the label floor while labels reach the server.
"""

from __future__ import annotations

from functools import cache
from typing import Any

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


def class_templates(reference: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class templates of public images ``reference`` ``(M, C, H, W)`` with ``labels`` ``(M,)``:
    ``{"class_mean": (K, C, H, W), "class_medoid": (K, C, H, W)}`` (module doc). A class with no public image
    gets the overall mean image."""
    mean = reference.mean(0)
    means, medoids = [], []
    for c in range(num_classes):
        pc = reference[labels == c]
        if pc.shape[0] == 0:
            means.append(mean)
            medoids.append(mean)
            continue
        flat = pc.flatten(1).double()
        means.append(pc.mean(0))
        medoids.append(pc[int(torch.cdist(flat, flat).sum(1).argmin())])
    return {"class_mean": torch.stack(means), "class_medoid": torch.stack(medoids)}


def _template_scores(x: torch.Tensor, templates: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {name: {"mse": mse(x, t[index]), "ssim": ssim(x, t[index])} for name, t in templates.items()}
    best = max(templates, key=lambda k: out[k]["ssim"])
    out["best"] = {"template": best, **out[best]}
    return out


def floor_scores(x: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None,
                 reference_labels: torch.Tensor | None = None, num_classes: int | None = None,
                 predicted: torch.Tensor | None = None) -> dict[str, Any]:
    """What an attacker scores on targets ``x`` ``(N, C, H, W)`` without using the activations (module doc).

    Always: ``mse``, ``ssim``, ``ssim_gaussian`` of the mean image of ``reference`` (``(M, C, H, W)``, public
    data). With the targets' ``labels`` ``(N,)``, the public ``reference_labels`` ``(M,)`` and ``num_classes``:
    ``"label"`` = ``{"class_mean": {mse, ssim}, "class_medoid": {...}, "best": {"template", mse, ssim}}``; with
    ``predicted`` ``(N,)`` (the server's predicted classes) also ``"predicted_label"``, the same indexed by them.
    """
    mean = reference.mean(0, keepdim=True).expand_as(x)
    out: dict[str, Any] = {"mse": mse(x, mean), "ssim": ssim(x, mean), "ssim_gaussian": ssim(x, mean, gaussian=True)}
    if labels is not None and reference_labels is not None:
        k = num_classes if num_classes is not None else int(max(labels.max(), reference_labels.max())) + 1
        templates = class_templates(reference, reference_labels, k)
        out["label"] = _template_scores(x, templates, labels)
        if predicted is not None:
            out["predicted_label"] = _template_scores(x, templates, predicted)
    return out
