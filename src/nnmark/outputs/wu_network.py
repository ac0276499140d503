"""The secret extraction network E(image, key) of Wu et al. (TCSVT 2020), and its watermarks.

E reads an image ``(N, C, H, W)`` in [0, 1] and a key of ``key_bits`` bits ``(N, key_bits)`` in {0, 1} and
returns an extracted watermark ``(N, c, h, w)`` in [-1, 1] (tanh). It is the paper's three branches:

- ``E_A`` (image): a 3x3 convolution, two inception-residual blocks (parallel 1x1 / 3x3 / 5x5 convolutions,
  concatenated, projected back by a 1x1 convolution and added to the block's input), a 3x3 convolution to
  ``C`` channels at full resolution; then space-to-depth (``pixel_unshuffle``) to ``h x w`` with
  ``c1 = C * (H / h)^2`` channels, as the paper resizes ``H x W x 3`` to ``h x w x floor(3HW / hw)``;
- ``E_B`` (key, the paper's convolutional branch): the key laid out as a ``t x h x w`` map
  (``t = key_bits / (h w)``; the paper's ``4 x 4`` blocks of equal bits are used when the key is smaller than
  the map), two 3x3 convolutions to ``c2`` channels (paper: 48);
- ``E_C`` (fusion): the concatenation through 3x3 convolutions to ``c`` channels, tanh.

Global key path (``key_path="film"``, the default; ``"conv"`` is the paper's branch alone): a convolutional
key branch sees each key bit only through a small receptive field, so one flipped bit changes the output
only near that bit's position and a wrong key with a few flipped bits still extracts most of the watermark
(measured in the issue's CPU trial). The FiLM path is a two-layer MLP of the whole key (``+-1`` coded) whose
output scales and shifts every fusion channel: every bit reaches every output pixel, so the network can
learn "this exact key, or blank". The MLP's first layer necessarily encodes what it learned about the key:
a stolen E is evidence about the key (the paper's threat model keeps E secret too).

All convolutions use ReLU except the output (tanh), as in the paper. Initialisation is seeded by the caller
(build under a ``torch.manual_seed`` derived from the owner's key).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.keys import Key

KEY_PATHS = ("film", "conv")
FILM_HIDDEN = 64  # hidden units of the global key MLP


class InceptionResidual(nn.Module):
    """Parallel 1x1, 3x3 and 5x5 convolutions (``width // 2``, ``width // 4``, ``width // 4`` channels),
    concatenated, a 1x1 projection to ``width``, plus the input; ReLU. Shape ``(N, width, H, W)`` kept."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w1, w3 = width // 2, width // 4
        w5 = width - w1 - w3
        self.b1 = nn.Conv2d(width, w1, 1)
        self.b3 = nn.Sequential(nn.Conv2d(width, w3, 1), nn.ReLU(), nn.Conv2d(w3, w3, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(width, w5, 1), nn.ReLU(), nn.Conv2d(w5, w5, 5, padding=2))
        self.project = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)
        return F.relu(x + self.project(F.relu(branches)))


class WuExtractor(nn.Module):
    """E(image, key) -> watermark.

    Parameters
    ----------
    image_size: side ``H = W`` of the images E reads (pixels); a multiple of ``wm_size``.
    in_channels: image channels ``C`` (1 or 3).
    wm_size: side ``h = w`` of the watermark (pixels; paper: 64 for 256-pixel images).
    wm_channels: watermark channels ``c`` (1: binary logo, 3: colour image).
    key_bits: key length ``l_k`` (paper: 1,024).
    width: channels of the image branch and of the fusion (default 32).
    key_channels: ``c2``, channels of the convolutional key branch (paper: 48).
    key_path: ``"film"`` (paper's branches plus a global MLP of the key modulating the fusion, default) or
        ``"conv"`` (the paper's convolutional key branch only).
    """

    def __init__(self, image_size: int, in_channels: int = 3, wm_size: int = 16, wm_channels: int = 1,
                 key_bits: int = 1024, width: int = 32, key_channels: int = 48, key_path: str = "film") -> None:
        super().__init__()
        if image_size % wm_size:
            raise ValueError(f"image size {image_size} must be a multiple of the watermark size {wm_size}")
        if key_path not in KEY_PATHS:
            raise ValueError(f"key_path must be one of {KEY_PATHS}, not {key_path!r}")
        cells = wm_size * wm_size
        if key_bits % cells and cells % key_bits:
            raise ValueError(f"key_bits {key_bits} must divide or be a multiple of the {wm_size}x{wm_size} map")
        self.image_size, self.in_channels = image_size, in_channels
        self.wm_size, self.wm_channels, self.key_bits = wm_size, wm_channels, key_bits
        self.key_path = key_path
        self.scale = image_size // wm_size
        self.key_depth = max(1, key_bits // cells)          # t
        self.key_block = int(round(math.sqrt(max(1, cells // key_bits))))  # equal-bit blocks when key < map
        if self.key_block ** 2 * key_bits // self.key_depth != cells:
            raise ValueError(f"a {key_bits}-bit key cannot be laid out in square blocks on a {wm_size}^2 map")
        c1 = in_channels * self.scale ** 2
        self.image_branch = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            InceptionResidual(width), InceptionResidual(width),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )
        self.key_branch = nn.Sequential(
            nn.Conv2d(self.key_depth, key_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(key_channels, key_channels, 3, padding=1), nn.ReLU(),
        )
        self.fuse_in = nn.Sequential(nn.Conv2d(c1 + key_channels, width, 3, padding=1), nn.ReLU())
        self.fuse_mid = nn.Conv2d(width, width, 3, padding=1)
        self.fuse_out = nn.Conv2d(width, wm_channels, 3, padding=1)
        self.film: nn.Module | None = None
        if key_path == "film":
            self.film = nn.Sequential(nn.Linear(key_bits, FILM_HIDDEN), nn.ReLU(), nn.Linear(FILM_HIDDEN, 2 * width))
            nn.init.zeros_(self.film[2].weight)
            nn.init.zeros_(self.film[2].bias)

    @property
    def config(self) -> dict[str, int | str]:
        """The constructor arguments (JSON-able), to rebuild the network from a key file."""
        return {"image_size": self.image_size, "in_channels": self.in_channels, "wm_size": self.wm_size,
                "wm_channels": self.wm_channels, "key_bits": self.key_bits, "width": self.fuse_mid.in_channels,
                "key_channels": self.key_branch[0].out_channels, "key_path": self.key_path}

    def key_map(self, key: torch.Tensor) -> torch.Tensor:
        """Bits ``(N, key_bits)`` -> the key branch's input ``(N, t, h, w)`` in {-1, +1}."""
        n = key.shape[0]
        b = self.key_block
        side = self.wm_size // b
        grid = (2.0 * key.float() - 1.0).reshape(n, self.key_depth, side, side)
        return grid.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3) if b > 1 else grid

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """``E_A``: images ``(N, C, H, W)`` in [0, 1] -> features ``(N, c1, h, w)`` (key-independent, so one pass
        serves several keys)."""
        if image.ndim != 4 or image.shape[1] != self.in_channels or image.shape[2:] != (self.image_size,) * 2:
            raise ValueError(f"E reads ({self.in_channels}, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(image.shape)}")
        return F.pixel_unshuffle(self.image_branch(image), self.scale)

    def decode(self, features: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``E_B`` and ``E_C``: features ``(N, c1, h, w)`` and keys ``(N, key_bits)`` (or one ``(key_bits,)``) in
        {0, 1} -> watermark ``(N, c, h, w)`` in [-1, 1]."""
        if key.ndim == 1:
            key = key.unsqueeze(0)
        if key.shape[-1] != self.key_bits:
            raise ValueError(f"E reads {self.key_bits}-bit keys, got {key.shape[-1]} bits")
        key = key.to(features.dtype).expand(features.shape[0], -1)
        b = self.key_branch(self.key_map(key))
        h = self.fuse_mid(self.fuse_in(torch.cat([features, b], dim=1)))
        if self.film is not None:
            gain, shift = self.film(2.0 * key - 1.0).chunk(2, dim=1)
            h = h * (1.0 + gain[:, :, None, None]) + shift[:, :, None, None]
        return torch.tanh(self.fuse_out(F.relu(h)))

    def forward(self, image: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``image`` ``(N, C, H, W)`` in [0, 1], ``key`` ``(N, key_bits)`` or ``(key_bits,)`` in {0, 1}
        -> watermark ``(N, c, h, w)`` in [-1, 1]."""
        return self.decode(self.image_features(image), key)


# -- keys ------------------------------------------------------------------------------------------------
def key_bits(key: Key, n_bits: int = 1024) -> torch.Tensor:
    """The extraction key: ``n_bits`` bits (float32 ``(n_bits,)`` in {0, 1}) derived from the owner's key."""
    rng = key.numpy_rng("output-wu:extraction-key")
    return torch.from_numpy(rng.integers(0, 2, n_bits).astype(np.float32))


def flip_bits(bits: torch.Tensor, n_flips: torch.Tensor | int, generator: torch.Generator) -> torch.Tensor:
    """Copies of ``bits`` ``(L,)`` with exactly ``n_flips`` (per row ``(N,)``, or one int) distinct positions
    flipped: ``(N, L)`` (``N = len(n_flips)``; an int gives one row)."""
    flips = torch.as_tensor(n_flips).reshape(-1)
    n, length = len(flips), bits.shape[-1]
    rank = torch.rand(n, length, generator=generator).argsort(dim=1).argsort(dim=1)
    mask = rank < flips[:, None]
    return torch.where(mask, 1.0 - bits, bits).expand(n, -1).clone()


# -- watermarks ----------------------------------------------------------------------------------------
def binary_logo(key: Key, size: int = 16, modules: int = 8) -> torch.Tensor:
    """A QR-like binary watermark ``(1, size, size)`` in {-1, +1}: ``modules x modules`` keyed random cells with
    three finder squares in the corners (as a QR code), upsampled to ``size``; about half the cells are +1."""
    if size % modules:
        raise ValueError(f"watermark size {size} must be a multiple of {modules} modules")
    rng = key.numpy_rng("output-wu:binary-logo")
    grid = rng.integers(0, 2, (modules, modules)).astype(np.float32)
    f = max(2, modules // 4)
    finder = np.zeros((f, f), np.float32)
    finder[0, :] = finder[-1, :] = finder[:, 0] = finder[:, -1] = 1.0
    if f > 2:
        finder[1:-1, 1:-1] = 0.0
        finder[f // 2, f // 2] = 1.0
    grid[:f, :f] = finder
    grid[:f, -f:] = finder
    grid[-f:, :f] = finder
    cell = size // modules
    img = np.kron(grid, np.ones((cell, cell), np.float32))
    return torch.from_numpy(2.0 * img - 1.0)[None]


def colour_logo(key: Key, size: int = 16, blobs: int = 6) -> torch.Tensor:
    """A colour watermark ``(3, size, size)`` in [-1, 1]: a sum of ``blobs`` keyed Gaussian blobs of keyed
    colours on a keyed background, each channel stretched to span [-0.9, 0.9]."""
    rng = key.numpy_rng("output-wu:colour-logo")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.tile(rng.uniform(-1, 1, (3, 1, 1)).astype(np.float32), (1, size, size))
    for _ in range(blobs):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.08, 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.uniform(-2, 2, (3, 1, 1)).astype(np.float32) * blob
    lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
    img = 1.8 * (img - lo) / np.maximum(hi - lo, 1e-6) - 0.9
    return torch.from_numpy(img.astype(np.float32))


def watermark_image(key: Key, kind: str, size: int) -> torch.Tensor:
    """The owner's watermark: ``kind`` ``"binary"`` (QR-like, ``(1, size, size)`` in {-1, +1}) or ``"colour"``
    (``(3, size, size)`` in [-1, 1])."""
    if kind == "binary":
        return binary_logo(key, size, modules=8 if size % 8 == 0 else size)
    if kind == "colour":
        return colour_logo(key, size)
    raise ValueError(f"watermark kind must be 'binary' or 'colour', not {kind!r}")


def detection_statistic(extracted: torch.Tensor, watermark: torch.Tensor) -> torch.Tensor:
    """Per image ``(N,)``: the extracted watermark ``(N, c, h, w)`` correlated with the owner's watermark
    ``(c, h, w)`` and normalised by the watermark's energy, ``<e, w> / <w, w>``: 1 for a perfect extraction,
    0 for a blank one (E trained to output zeros), negative for an inverted one. Unlike a cosine, a faint
    watermark-shaped residue scores low."""
    w = watermark.reshape(1, -1).to(extracted.dtype)
    return (extracted.reshape(extracted.shape[0], -1) * w).sum(1) / (w * w).sum()
