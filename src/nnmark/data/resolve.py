"""Turn a data string from the command line or a model file into :class:`Splits`.

Accepted forms (``NAME`` or ``NAME:ARG``; every name is a ``dataset`` component of
:mod:`nnmark.components`, so plugins add their own):

- a bundled name: ``digits``, ``digits28``, ``mnist5k``;
- ``digits-denoise`` / ``mnist5k-denoise`` -- image-to-image pairs (noisy input, clean
  target; Gaussian noise of std ``sigma``, default 0.2, seeded);
- ``mnist-idx:DIR`` -- the four MNIST IDX files in DIR;
- ``cifar10:DIR`` / ``cifar100:DIR`` -- the CIFAR python batches in DIR.

``ARG`` is the dataset's ``path`` parameter. On-disk datasets use their own test
split as ``test`` and split their training part deterministically into train / val /
attacker (75% / 12.5% / 12.5%).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from nnmark.data.bundled import load_splits
from nnmark.data.dataset import ImageDataset, Splits
from nnmark.data.ondisk import load_cifar, load_mnist_idx
from nnmark.errors import DataError
from nnmark.params import Param, Params


def _split_train(full: ImageDataset, test: ImageDataset, seed: int = 0) -> Splits:
    idx = np.arange(len(full))
    y = full.y.numpy()

    def split(ix: np.ndarray, size: float, rs: int) -> list[np.ndarray]:
        try:
            return train_test_split(ix, test_size=size, stratify=y[ix], random_state=rs)
        except ValueError:  # too few samples of some class to stratify
            return train_test_split(ix, test_size=size, random_state=rs)

    train, rest = split(idx, 0.25, seed)
    val, att = split(rest, 0.5, seed + 1)
    name = full.name.split("/")[0]

    def part(ix: np.ndarray, tag: str) -> ImageDataset:
        t = torch.from_numpy(np.sort(ix))
        return ImageDataset(full.x[t], full.y[t], full.num_classes, f"{name}/{tag}")

    return Splits(part(train, "train"), part(val, "val"), test, part(att, "attacker"))


def _bundled(name: str):
    def load(seed: int = 0) -> Splits:
        return load_splits(name, seed)

    load.__doc__ = f"bundled {name} (see nnmark.data.bundled.load_splits)"
    load.PARAMS = Params(Param("seed", int, 0, "seed of the stratified split", low=0))  # type: ignore[attr-defined]
    return load


digits = _bundled("digits")
digits28 = _bundled("digits28")
mnist5k = _bundled("mnist5k")
_PATH = Param("path", str, None, "directory holding the dataset's files", optional=True)


def _need(path: str | None, kind: str) -> str:
    if not path:
        raise DataError(f"dataset {kind} needs a directory: {kind}:DIR")
    return path


def mnist_idx(path: str | None = None) -> Splits:
    """full MNIST from its four IDX files (mnist-idx:DIR)"""
    path = _need(path, "mnist-idx")
    return _split_train(load_mnist_idx(path, "train"), load_mnist_idx(path, "test"))


def cifar10(path: str | None = None) -> Splits:
    """CIFAR-10 python batches (cifar10:DIR)"""
    path = _need(path, "cifar10")
    return _split_train(load_cifar(path, 10, "train"), load_cifar(path, 10, "test"))


def cifar100(path: str | None = None) -> Splits:
    """CIFAR-100 python batches (cifar100:DIR)"""
    path = _need(path, "cifar100")
    return _split_train(load_cifar(path, 100, "train"), load_cifar(path, 100, "test"))


for _loader in (mnist_idx, cifar10, cifar100):
    _loader.PARAMS = Params(_PATH)  # type: ignore[attr-defined]


def denoise_pairs(splits: Splits, sigma: float = 0.2, seed: int = 0) -> Splits:
    """Image-to-image splits from classification ones: inputs are the images plus Gaussian noise of
    std ``sigma`` (clipped to [0, 1], seeded), targets (``y``) the clean images; ``num_classes`` 0."""
    gen = torch.Generator().manual_seed(seed)

    def pairs(ds: ImageDataset) -> ImageDataset:
        noisy = (ds.x + sigma * torch.randn(ds.x.shape, generator=gen)).clamp(0.0, 1.0)
        return ImageDataset(noisy, ds.x.clone(), 0, f"{ds.name}/denoise")

    return Splits(pairs(splits.train), pairs(splits.val), pairs(splits.test), pairs(splits.attacker))


def _denoise(name: str):
    def load(sigma: float = 0.2, seed: int = 0) -> Splits:
        return denoise_pairs(load_splits(name), sigma, seed)

    load.__doc__ = f"image-to-image pairs from {name}: noisy input, clean target"
    load.PARAMS = Params(Param("sigma", float, 0.2, "noise std (images in [0, 1])", low=0.0, high=1.0),  # type: ignore[attr-defined]
                         Param("seed", int, 0, "noise seed", low=0))
    return load


digits_denoise = _denoise("digits")
mnist5k_denoise = _denoise("mnist5k")


def load_data(spec: str) -> Splits:
    """Splits for a data string ``NAME`` or ``NAME:ARG`` (see the module docs)."""
    from nnmark.components import ComponentError, get_component

    name, _, arg = str(spec).partition(":")
    try:
        comp = get_component("dataset", name.strip())
    except ComponentError as exc:
        raise DataError(f"{exc} (or NAME:DIR for on-disk data)") from None
    given = {"path": arg} if arg else {}
    if arg and "path" not in comp.params:
        raise DataError(f"dataset {name!r} takes no directory (got {spec!r})")
    return comp.load()(**comp.resolve(given))
