"""Loaders for a user's local copy of standard datasets in their usual formats.

- MNIST: the four IDX files (``train-images-idx3-ubyte`` ..., optionally ``.gz``).
- CIFAR-10 / CIFAR-100: the "python version" pickle batches. Pickle can execute
  code, so these files are read with :class:`_ArrayOnlyUnpickler`, which refuses
  every global except the handful numpy needs to rebuild an ndarray.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from nnmark.data.dataset import ImageDataset
from nnmark.errors import DataError


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise DataError(f"missing file {path} (or {path.name}.gz)")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (unsigned-byte data) into an array of its stored shape."""
    raw = _open_maybe_gz(Path(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX data is supported")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{path}: expected {count} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(directory: str | Path, split: str = "train") -> ImageDataset:
    """MNIST from IDX files in ``directory``; ``split`` is ``"train"`` or ``"test"``.

    Returns images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)``.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError("split must be 'train' or 'test'")
    d = Path(directory)
    x = read_idx(d / f"{prefix}-images-idx3-ubyte")
    y = read_idx(d / f"{prefix}-labels-idx1-ubyte")
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"MNIST files in {d} disagree in shape: images {x.shape}, labels {y.shape}")
    xt = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    return ImageDataset(xt, torch.from_numpy(y.astype(np.int64)), 10, f"mnist/{split}")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def load_cifar(directory: str | Path, which: int = 10, split: str = "train",
               label: str = "fine") -> ImageDataset:
    """CIFAR-10 (``which=10``) or CIFAR-100 (``which=100``) from the python batches.

    ``directory`` holds ``data_batch_1..5`` and ``test_batch`` (CIFAR-10) or
    ``train`` and ``test`` (CIFAR-100). ``label`` picks CIFAR-100's ``fine`` (100)
    or ``coarse`` (20) labels. Returns images ``(N, 3, 32, 32)`` in [0, 1].
    """
    d = Path(directory)
    if which == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, classes = "labels", 10
    elif which == 100:
        names = ["train" if split == "train" else "test"]
        label_key, classes = f"{label}_labels", (100 if label == "fine" else 20)
    else:
        raise DataError("which must be 10 or 100")
    xs, ys = [], []
    for name in names:
        b = _read_cifar_batch(d / name)
        if "data" not in b or label_key not in b:
            raise DataError(f"{d / name} lacks 'data' or '{label_key}'")
        data = np.asarray(b["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{d / name}: data must be (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(b[label_key], dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32) / 255.0
    y = np.concatenate(ys)
    if len(x) != len(y):
        raise DataError(f"CIFAR files in {d}: {len(x)} images but {len(y)} labels")
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), classes, f"cifar{which}/{split}")
