"""Trigger-image generators for trigger-set watermarks.

Each generator returns float32 images ``(n, C, H, W)`` in [0, 1]; all randomness
comes from the ``numpy`` Generator passed in (derived from the owner's key).

- :func:`content_triggers` -- a visible text (default ``"TEST"``) stamped on
  source images (Zhang et al. "content").
- :func:`noise_triggers` -- one fixed Gaussian noise pattern added to source
  images (Zhang et al. "noise").
- :func:`unrelated_triggers` -- images from another domain (photos and textures
  from scikit-image; Zhang et al. "unrelated").
- :func:`abstract_triggers` -- random abstract images (Adi et al. 2018): smooth
  random colour fields plus random strokes.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from nnmark.data.bundled import out_of_domain_images

GENERATORS = ("content", "noise", "unrelated", "abstract")
"""Names of the trigger generators."""


@cache
def _text_mask(text: str, height: int, width: int) -> np.ndarray:
    """A [0, 1] mask ``(H, W)`` with ``text`` rendered along the bottom edge."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    tw, th = right - left + 2, bottom - top + 2
    canvas = Image.new("L", (tw, th), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, fill=255, font=font)
    # Scale the rendered word to the image width, keep its aspect, put it at the bottom.
    target_w = width
    target_h = max(1, round(th * target_w / tw))
    target_h = min(target_h, max(1, height // 3))
    word = np.asarray(canvas.resize((target_w, target_h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    mask = np.zeros((height, width), dtype=np.float32)
    mask[height - target_h :, :] = word
    return mask


def content_triggers(source: torch.Tensor, text: str = "TEST") -> torch.Tensor:
    """Stamp ``text`` (white, bottom edge) onto ``source`` images ``(n, C, H, W)``."""
    _, _, h, w = source.shape
    mask = torch.from_numpy(_text_mask(text, h, w))
    return torch.maximum(source, mask.expand_as(source)).contiguous()


def noise_pattern(shape: tuple[int, int, int], rng: np.random.Generator, std: float = 0.4) -> torch.Tensor:
    """One fixed Gaussian noise pattern of ``shape`` = (C, H, W), N(0, std²)."""
    return torch.from_numpy(rng.normal(0.0, std, size=shape).astype(np.float32))


def noise_triggers(source: torch.Tensor, rng: np.random.Generator, std: float = 0.4) -> torch.Tensor:
    """Add one keyed noise pattern (std ``std``) to ``source``; clip to [0, 1]."""
    pattern = noise_pattern(tuple(source.shape[1:]), rng, std)
    return (source + pattern).clamp(0, 1).contiguous()


def unrelated_triggers(n: int, shape: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """``n`` out-of-domain images (crops of scikit-image photos and textures)."""
    return out_of_domain_images(n, shape, rng)


def abstract_triggers(n: int, shape: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """``n`` random abstract images: a smooth random field (4x4 noise upsampled)
    plus 1-3 random bright strokes, in [0, 1]."""
    c, h, w = shape
    coarse = torch.from_numpy(rng.uniform(0, 1, size=(n, c, 4, 4)).astype(np.float32))
    imgs = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        for _ in range(int(rng.integers(1, 4))):
            x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [w, h, w, h]
            # distance of each pixel to the segment (x0,y0)-(x1,y1)
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
            dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
            stroke = torch.from_numpy((dist < max(1.0, w / 14)).astype(np.float32))
            imgs[i] = torch.maximum(imgs[i], stroke * float(rng.uniform(0.6, 1.0)))
    return imgs.clamp(0, 1).contiguous()
