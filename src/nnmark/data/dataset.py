"""In-memory image datasets and deterministic splits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split


@dataclass
class ImageDataset:
    """Images ``x`` (float32, ``(N, C, H, W)``, values in ``[0, 1]``) and labels ``y``
    (int64, ``(N,)``) with ``num_classes`` classes."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError("images and labels differ in count")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: np.ndarray | torch.Tensor | list[int], name: str | None = None):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ImageDataset(self.x[idx], self.y[idx], self.num_classes, name or self.name)

    def take_fraction(self, fraction: float, seed: int = 0) -> ImageDataset:
        """A stratified random ``fraction`` of this dataset (at least one sample)."""
        n = max(1, int(round(fraction * len(self))))
        if n >= len(self):
            return self
        idx = _stratified_pick(self.y.numpy(), n, seed)
        return self.subset(idx, f"{self.name}[{fraction:g}]")

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            j = order[i : i + batch_size]
            yield self.x[j], self.y[j]


def _stratified_pick(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    try:
        idx, _ = train_test_split(
            np.arange(len(y)), train_size=n, stratify=y, random_state=seed
        )
    except ValueError:  # too few per class to stratify
        idx = np.random.default_rng(seed).choice(len(y), size=n, replace=False)
    return np.sort(idx)


@dataclass
class Splits:
    """Disjoint splits of one dataset.

    ``train``: the owner's training data; ``val``: the owner's validation data (early
    stopping); ``test``: held-out evaluation data; ``attacker``: a pool disjoint
    from all the others, from which attacks (fine-tuning, distillation) draw
    their data, so that an attacker never holds the owner's training set.
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    attacker: ImageDataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def make_splits(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    name: str,
    fractions: tuple[float, float, float] = (0.2, 0.1, 0.1),
    seed: int = 0,
) -> Splits:
    """Stratified, deterministic split into train / val / test / attacker.

    ``fractions`` = (test, val, attacker) shares of the whole; train gets the rest.
    ``x``: float array ``(N, C, H, W)`` in ``[0, 1]``; ``y``: ints ``(N,)``.
    """
    test_f, val_f, att_f = fractions
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_f, stratify=y, random_state=seed)
    rest, val = train_test_split(
        rest, test_size=val_f / (1 - test_f), stratify=y[rest], random_state=seed + 1
    )
    train, att = train_test_split(
        rest, test_size=att_f / (1 - test_f - val_f), stratify=y[rest], random_state=seed + 2
    )
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def part(ix: np.ndarray, split: str) -> ImageDataset:
        ix = np.sort(ix)
        return ImageDataset(xt[ix], yt[ix], num_classes, f"{name}/{split}")

    return Splits(part(train, "train"), part(val, "val"), part(test, "test"), part(att, "attacker"))
