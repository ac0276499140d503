"""Turn a data string from the command line or a model file into :class:`Splits`.

Accepted forms:

- a bundled name: ``digits``, ``digits28``, ``mnist5k``;
- ``mnist-idx:DIR`` -- the four MNIST IDX files in DIR;
- ``cifar10:DIR`` / ``cifar100:DIR`` -- the CIFAR python batches in DIR.

On-disk datasets use their own test split as ``test`` and split their training
part deterministically into train / val / attacker (75% / 12.5% / 12.5%).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from nnmark.data.bundled import DATASETS, load_splits
from nnmark.data.dataset import ImageDataset, Splits
from nnmark.data.ondisk import load_cifar, load_mnist_idx
from nnmark.errors import DataError


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


def load_data(spec: str) -> Splits:
    """Splits for a data string (see the module docs)."""
    if spec in DATASETS:
        return load_splits(spec)
    kind, _, path = spec.partition(":")
    if not path:
        raise DataError(f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)}, "
                        "mnist-idx:DIR, cifar10:DIR or cifar100:DIR")
    if kind == "mnist-idx":
        return _split_train(load_mnist_idx(path, "train"), load_mnist_idx(path, "test"))
    if kind in ("cifar10", "cifar100"):
        which = 10 if kind == "cifar10" else 100
        return _split_train(load_cifar(path, which, "train"), load_cifar(path, which, "test"))
    raise DataError(f"unknown dataset kind {kind!r} in {spec!r}")
