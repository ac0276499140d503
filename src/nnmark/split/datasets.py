"""Datasets for partitioned-training experiments: the bundled ones, plus scikit-image's LFW faces.

:func:`load_split_data` returns :class:`~nnmark.data.dataset.Splits` for a name:

- ``lfw-faces``: ``skimage.data.lfw_subset()`` -- 200 grey 25x25 images in ``[0, 1]``, the first 100 faces
  from Labeled Faces in the Wild and the last 100 non-face crops; the task label is face (1) / non-face (0).
  Stratified, deterministic shares: test 20% (40), val 10% (20), attacker 30% (60, the server's public
  images), train 40% (80, dealt to the owners). The attacker's share is larger than the bundled sets' 10%
  so that a reconstruction attacker has more than a handful of public images to learn from.
- any other name: :func:`nnmark.data.load_splits` (``digits``, ``digits28``, ``mnist5k``).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from nnmark.data.dataset import Splits, make_splits

LFW_FACES = "lfw-faces"


@cache
def _lfw_faces(seed: int) -> Splits:
    from skimage.data import lfw_subset

    x = lfw_subset().astype(np.float32)[:, None]  # (200, 1, 25, 25)
    y = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    return make_splits(x, y, 2, LFW_FACES, fractions=(0.2, 0.1, 0.3), seed=seed)


def load_split_data(name: str, seed: int = 0) -> Splits:
    """The splits of dataset ``name`` (module doc); cached, treat the tensors as read-only."""
    if name == LFW_FACES:
        return _lfw_faces(seed)
    from nnmark.data import load_splits

    return load_splits(name, seed=seed)
