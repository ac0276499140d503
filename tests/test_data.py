import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nnmark.data import load_cifar, load_data, load_mnist_idx, load_splits, out_of_domain_images
from nnmark.errors import DataError


@pytest.mark.parametrize("name,shape", [("digits", (1, 8, 8)), ("mnist5k", (1, 28, 28)), ("digits28", (1, 28, 28))])
def test_bundled_splits_disjoint_and_deterministic(name, shape):
    s = load_splits(name)
    assert s.image_shape == shape and s.num_classes == 10
    parts = [s.train, s.val, s.test, s.attacker]
    total = sum(len(p) for p in parts)
    assert total == {"digits": 1797, "digits28": 1797, "mnist5k": 5000}[name]
    # disjointness: no image appears in two splits
    keys = [{hash(x.numpy().tobytes()) for x in p.x} for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert len(keys[i] & keys[j]) <= 2  # the raw data has a couple of exact duplicates
    for p in parts:
        assert float(p.x.min()) >= 0 and float(p.x.max()) <= 1
        assert set(p.y.tolist()) == set(range(10))
    assert torch.equal(load_splits.__wrapped__(name).train.y, s.train.y)


def test_take_fraction_is_stratified():
    s = load_splits("mnist5k")
    sub = s.attacker.take_fraction(0.6)
    assert len(sub) == 300
    counts = np.bincount(sub.y.numpy(), minlength=10)
    assert counts.min() >= 25


def test_out_of_domain_images():
    t = out_of_domain_images(7, (3, 16, 16), np.random.default_rng(0))
    assert t.shape == (7, 3, 16, 16) and t.dtype == torch.float32
    assert torch.equal(t, out_of_domain_images(7, (3, 16, 16), np.random.default_rng(0)))


def _write_idx(path, arr, gz=False):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def test_mnist_idx_loader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        x = rng.integers(0, 256, (n, 28, 28))
        y = np.arange(n) % 10
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", x, gz=prefix == "t10k")
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", y)
    ds = load_mnist_idx(tmp_path, "train")
    assert ds.x.shape == (40, 1, 28, 28) and ds.y.tolist() == list(np.arange(40) % 10)
    assert load_mnist_idx(tmp_path, "test").x.shape == (20, 1, 28, 28)
    splits = load_data(f"mnist-idx:{tmp_path}")
    assert len(splits.train) + len(splits.val) + len(splits.attacker) == 40
    # truncated file
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="expected"):
        load_mnist_idx(tmp_path, "train")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_loader_and_refuses_code(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}))
    ds = load_cifar(tmp_path, 10, "train")
    assert ds.x.shape == (50, 3, 32, 32) and ds.num_classes == 10
    c100 = tmp_path / "c100"
    c100.mkdir()
    for split in ("train", "test"):
        (c100 / split).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                                                 b"fine_labels": list(range(8)), b"coarse_labels": [0] * 8}))
    assert load_cifar(c100, 100, "test").num_classes == 100
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [1]}))
    with pytest.raises(DataError, match="refusing"):
        load_cifar(tmp_path, 10, "train")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_data("imagenet")
