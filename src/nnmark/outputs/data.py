"""Real photographs for image-to-image hosts, cut into patches split by source image.

The photos are the colour images that ship inside scikit-image (``skimage.data``) and
scikit-learn (``load_sample_images``) -- no download. Each source photo belongs to exactly
one split, so a test patch comes from a photo no training patch was cut from:

- ``train`` / ``val``: astronaut, coffee, rocket, hubble_deep_field, retina, the left
  stereo_motorcycle view, china (val patches are cut at other random positions of the
  same photos, with another seed);
- ``attacker``: immunohistochemistry (a pool for attacks, disjoint from the owner's);
- ``test``: chelsea, flower.

Tasks (inputs ``(N, C_in, S, S)``, targets ``(N, 3, S, S)``, float32 in [0, 1]):

- ``sr2``: input = the patch downsampled x0.5 (bicubic, antialiased) and upsampled back
  (bicubic), 3 channels;
- ``colourise``: input = the patch's luma (ITU-R BT.601 weights), 1 channel;
- ``denoise``: input = patch + N(0, 0.1**2) noise, clamped, 3 channels.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from nnmark.data.dataset import ImageDataset, Splits
from nnmark.errors import DataError
from nnmark.params import Param, Params

TASKS = ("sr2", "colourise", "denoise")
#: input channels per task
IN_CHANNELS = {"sr2": 3, "colourise": 1, "denoise": 3}
SOURCES: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "stereo_motorcycle", "china"),
    "attacker": ("immunohistochemistry",),
    "test": ("chelsea", "flower"),
}
SOURCES["val"] = SOURCES["train"]
#: default patch counts per split when ``n`` is None
DEFAULT_N = {"train": 4096, "val": 512, "attacker": 1024, "test": 1024}
DENOISE_SIGMA = 0.1
_LUMA = (0.299, 0.587, 0.114)
_SPLIT_SEED = {"train": 0, "val": 1, "attacker": 2, "test": 3}


@cache
def _photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 ``(H, W, 3)`` (read-only)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
    img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    img.setflags(write=False)
    return img


def source_photos(split: str) -> list[np.ndarray]:
    """The uint8 ``(H, W, 3)`` photos of ``split`` (train, val, attacker, test)."""
    if split not in SOURCES:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SOURCES)}")
    return [_photo(n) for n in SOURCES[split]]


def _patches(split: str, size: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` crops (random flips) of the split's photos, ``(n, 3, S, S)``."""
    photos = source_photos(split)
    if any(min(p.shape[:2]) < size for p in photos):
        raise DataError(f"patch size {size} is larger than a source photo")
    rng = np.random.default_rng([seed, _SPLIT_SEED[split], size])
    # photos weighted by area so large photos give proportionally more patches
    areas = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
    which = rng.choice(len(photos), size=n, p=areas / areas.sum())
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, k in enumerate(which):
        p = photos[k]
        r = rng.integers(0, p.shape[0] - size + 1)
        c = rng.integers(0, p.shape[1] - size + 1)
        crop = p[r:r + size, c:c + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


#: grey scikit-image photos no split above uses: extra content for *marking* a host (never for training or
#: testing one, and never among output-message's negatives; output-wu's false-positive study reads them)
MARKING_GREY_PHOTOS = ("brick", "grass", "gravel", "camera", "moon", "coins", "clock", "cell")


def tinted_grey_patches(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size`` px patches ``(n, 3, S, S)`` in [0, 1] of :data:`MARKING_GREY_PHOTOS`, each replicated
    to RGB and multiplied by a random gain per channel in [0.6, 1.4] (clamped): more kinds of content for the
    marking set than the 7 train photos hold."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0 for name in MARKING_GREY_PHOTOS]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        p = photos[rng.integers(len(photos))]
        r, c = rng.integers(0, p.shape[0] - size + 1), rng.integers(0, p.shape[1] - size + 1)
        out[i] = p[r:r + size, c:c + size][None] * rng.uniform(0.6, 1.4, (3, 1, 1))
    return torch.from_numpy(out).clamp(0.0, 1.0)


def dead_leaves_patches(n: int, size: int = 32, seed: int = 0, max_leaves: int = 300) -> torch.Tensor:
    """``n`` synthetic "dead leaves" images ``(n, 3, S, S)`` in [0, 1]: content for *marking* (never for
    training or testing a host, never among the negatives) with the occlusions, edges and scale-free size
    statistics of natural photos, but drawn from a seed instead of the 7 bundled train photos.

    Each image is painted at twice ``size``, front leaf first: discs or squares whose radius r has density
    ~ r^-3 between 2 px and the canvas side (scale invariance), a random colour each, and on half of them a
    texture (a grating of random period and angle, or white noise) of random contrast. Colours come from a
    palette of 2-5 per image (a grey level plus a small chroma each, jittered per leaf); pixels no leaf
    reached take the palette's first colour. The canvas is then shrunk x0.5 (antialiased), given a random
    gamma and clamped.
    ``max_leaves`` bounds the leaves per image (default 300)."""
    rng = np.random.default_rng(seed)
    big = 2 * size
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    r_min, r_max = 2.0, float(big)
    out = np.empty((n, big, big, 3), dtype=np.float32)
    for i in range(n):
        img = np.zeros((big, big, 3), dtype=np.float32)
        k = int(rng.integers(2, 6))  # a palette per image: natural photos hold few hues
        palette = (rng.uniform(0.05, 0.95, (k, 1)) + rng.normal(0.0, 0.12, (k, 3))).astype(np.float32)
        free = np.ones((big, big), dtype=bool)
        for _ in range(max_leaves):
            u = rng.uniform()
            r = r_min / np.sqrt(1.0 - u * (1.0 - (r_min / r_max) ** 2))
            cx, cy = rng.uniform(-r, big + r, 2)
            if rng.uniform() < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            else:
                mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
            mask &= free
            if not mask.any():
                continue
            colour = palette[rng.integers(k)] + rng.normal(0.0, 0.04, 3).astype(np.float32)
            kind = rng.integers(4)
            if kind == 0:  # a grating
                a = rng.uniform(0, np.pi)
                period = rng.uniform(2.0, 16.0)
                tex = np.sin(2 * np.pi * (xx[mask] * np.cos(a) + yy[mask] * np.sin(a)) / period + rng.uniform(0, 6.3))
            elif kind == 1:  # white noise
                tex = rng.standard_normal(int(mask.sum())).astype(np.float32)
            else:
                tex = np.zeros(int(mask.sum()), dtype=np.float32)
            contrast = rng.uniform(0.05, 0.3)
            img[mask] = colour[None] + contrast * tex[:, None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
            free &= ~mask
            if not free.any():
                break
        img[free] = palette[0]
        out[i] = img
    t = torch.from_numpy(out).permute(0, 3, 1, 2).clamp(0.0, 1.0)
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    gamma = torch.from_numpy(np.exp(rng.normal(0.0, 0.3, (n, 1, 1, 1))).astype(np.float32))
    return t.clamp(1e-4, 1.0).pow(gamma).clamp(0.0, 1.0).contiguous()


def to_luma(img: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB -> ``(N, 1, H, W)`` luma (BT.601 weights)."""
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def degrade(task: str, target: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The host's input for clean ``target`` images ``(N, 3, H, W)`` under ``task`` (see module docs)."""
    if task == "sr2":
        h, w = target.shape[-2:]
        small = F.interpolate(target, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    if task == "colourise":
        return to_luma(target)
    if task == "denoise":
        gen = torch.Generator().manual_seed(int(seed))
        return (target + DENOISE_SIGMA * torch.randn(target.shape, generator=gen)).clamp(0.0, 1.0)
    raise DataError(f"unknown image task {task!r}; known: {', '.join(TASKS)}")


def photo_patches(task: str, size: int = 32, split: str = "train", n: int | None = None, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` for ``task`` from ``n`` patches (default :data:`DEFAULT_N`) of ``split``.

    inputs ``(n, IN_CHANNELS[task], size, size)``, targets ``(n, 3, size, size)``, float32 in [0, 1];
    deterministic in ``seed``.
    """
    if task not in TASKS:
        raise DataError(f"unknown image task {task!r}; known: {', '.join(TASKS)}")
    n = DEFAULT_N.get(split, 1024) if n is None else int(n)
    if n < 1:
        raise DataError("need at least one patch")
    target = _patches(split, int(size), n, seed)
    return degrade(task, target, seed), target


def natural_images(n: int, size: int = 32, seed: int = 0, split: str = "test") -> torch.Tensor:
    """``n`` natural photo patches ``(n, 3, size, size)`` in [0, 1] (negatives; default the test photos)."""
    return _patches(split, int(size), int(n), seed)


def photo_splits(task: str, size: int = 32, n: int | None = None, seed: int = 0) -> Splits:
    """:class:`Splits` for ``task`` (``num_classes`` 0, targets in ``y``); ``n`` caps the train split."""
    parts = {}
    for split in ("train", "val", "test", "attacker"):
        m = None if n is None else max(1, min(int(n), DEFAULT_N[split]) if split != "train" else int(n))
        x, y = photo_patches(task, size, split, m, seed)
        parts[split] = ImageDataset(x, y, 0, f"photos-{task}/{split}")
    return Splits(parts["train"], parts["val"], parts["test"], parts["attacker"])


def _dataset(task: str):
    def load(size: int = 32, n: int = 4096, seed: int = 0) -> Splits:
        return photo_splits(task, size, n, seed)

    load.__doc__ = f"bundled photo patches for {task} (split by source photo)"
    load.PARAMS = Params(  # type: ignore[attr-defined]
        Param("size", int, 32, "patch side (pixels)", low=8, high=256),
        Param("n", int, 4096, "training patches", low=1, high=100_000),
        Param("seed", int, 0, "patch / noise seed", low=0))
    return load


photos_sr2 = _dataset("sr2")
photos_colourise = _dataset("colourise")
photos_denoise = _dataset("denoise")
