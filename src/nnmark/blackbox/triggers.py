"""Keyed, in-distribution trigger queries for black-box tracing: natural images with a keyed perturbation.

Trigger ``i`` (``i < m``) is one of the vendor's own images (train and validation splits of the product's
dataset; never the test split, on which accuracy is measured), chosen by the key without repetition, plus a
keyed Gaussian perturbation of standard deviation ``noise`` (default 0.1 on [0, 1] pixels; clipped to [0, 1]).
It carries two keyed labels ``a_i != b_i``, both drawn uniformly among the classes other than the image's own
label: customer ``u``'s copy is taught to answer ``b_i`` where its codeword bit is 1 and ``a_i`` where it is 0.
A suspect's answer reads as symbol 1 (``b_i``), 0 (``a_i``) or unusable (-1: any other label, e.g. the image's
own label, which is what a model that never saw the triggers mostly answers).

The queries are asked in a keyed order (:attr:`TriggerSet.order`), so a tracer that stops early has asked a
uniformly random subset of the code's symbols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnmark.data.dataset import ImageDataset, Splits
from nnmark.keys import Key

PURPOSE = "blackbox/triggers"
DEFAULT_NOISE = 0.1


@dataclass
class TriggerSet:
    """``m`` trigger images ``x`` ``(m, C, H, W)`` float32 in [0, 1], their sources' labels ``source_y`` ``(m,)``,
    the keyed label pairs ``a``, ``b`` ``(m,)`` int64, and the keyed query ``order`` ``(m,)`` (a permutation)."""

    x: torch.Tensor
    source_y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    order: np.ndarray
    noise: float

    @property
    def m(self) -> int:
        return int(self.x.shape[0])

    def labels_for(self, bits: np.ndarray) -> torch.Tensor:
        """The labels ``(m,)`` int64 a copy with codeword ``bits`` ``(m,)`` (bool) must answer."""
        return torch.from_numpy(np.where(np.asarray(bits, dtype=bool), self.b, self.a).astype(np.int64))

    def symbols(self, answers: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Read answers (labels) of the triggers at ``positions`` (default all, in index order) as symbols:
        1 for ``b``, 0 for ``a``, -1 for anything else. Returns ``(len,)`` int8."""
        pos = np.arange(self.m) if positions is None else np.asarray(positions, dtype=np.int64)
        ans = np.asarray(answers, dtype=np.int64).ravel()
        if ans.shape != pos.shape:
            raise ValueError(f"{ans.size} answers for {pos.size} triggers")
        return np.where(ans == self.b[pos], 1, np.where(ans == self.a[pos], 0, -1)).astype(np.int8)


def make_triggers(key: Key, splits: Splits, m: int, noise: float = DEFAULT_NOISE) -> TriggerSet:
    """The product's ``m`` triggers (module doc), reproducible from ``key`` and the dataset."""
    pool = ImageDataset(torch.cat([splits.train.x, splits.val.x]), torch.cat([splits.train.y, splits.val.y]),
                        splits.num_classes)
    if m > len(pool):
        raise ValueError(f"{m} triggers need {m} distinct source images; the dataset's train and validation "
                         f"splits hold {len(pool)}")
    classes = splits.num_classes
    if classes < 3:
        raise ValueError("black-box tracing needs at least 3 classes (two keyed labels besides the image's own)")
    rng = key.numpy_rng(f"{PURPOSE}:{m}:{noise}")
    pick = rng.choice(len(pool), size=m, replace=False)
    src = pool.x[torch.from_numpy(pick)]
    y = pool.y[torch.from_numpy(pick)].numpy()
    pert = rng.normal(0.0, noise, size=tuple(src.shape)).astype(np.float32)
    x = (src + torch.from_numpy(pert)).clamp(0.0, 1.0).contiguous()
    # two distinct labels among the classes other than y: draw an offset pair from 1..C-1 without repetition
    offs = np.stack([rng.choice(np.arange(1, classes), size=2, replace=False) for _ in range(m)])
    a = (y + offs[:, 0]) % classes
    b = (y + offs[:, 1]) % classes
    order = rng.permutation(m).astype(np.int64)
    return TriggerSet(x, y.astype(np.int64), a.astype(np.int64), b.astype(np.int64), order, float(noise))
