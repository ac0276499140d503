"""Image distortions a mark must survive: for robustness training and for attack evaluation.

Every function takes and returns ``(N, C, H, W)`` float images in [0, 1] (C = 1 or 3) and keeps
the shape. Randomness comes only from the ``gen`` argument (a seeded ``torch.Generator``).

- :func:`crop_keep` -- keep one random square holding ``frac`` of the area, zero the rest
  (HiDDeN's "crop");
- :func:`gaussian_noise` -- additive N(0, sigma**2), clamped;
- :func:`jpeg_differentiable` -- JPEG simulated in torch: BT.601 YCbCr, 4:2:0 chroma
  subsampling (2x2 average, nearest upsampling), 8x8 DCT, quantisation by the IJG tables
  scaled to ``quality`` with straight-through rounding (the gradient of rounding is taken
  as 1), so it can sit inside a training graph;
- :func:`jpeg_real` -- the real thing through Pillow (not differentiable; for evaluation);
- :func:`resize` -- down by ``scale`` (antialiased bilinear) and back up (bilinear);
- :func:`quantize_uint8` -- rounding to 8 bits, straight-through (what saving a PNG does);
- :func:`random_augment` -- one random distortion per batch, for robustness training.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

# IJG standard quantisation tables (ITU-T T.81 Annex K)
_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_Q_CHROMA = torch.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                                 dtype=torch.float32)


def _dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix ``(8, 8)``."""
    k = torch.arange(8, dtype=torch.float64).view(8, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, 8)
    m = torch.cos(math.pi * (2 * n + 1) * k / 16.0) * math.sqrt(2.0 / 8.0)
    m[0] /= math.sqrt(2.0)
    return m.float()


_DCT = _dct_matrix()


def quant_table(quality: int, chroma: bool = False) -> torch.Tensor:
    """The IJG quantisation table ``(8, 8)`` for ``quality`` in 1..100."""
    q = min(100, max(1, int(quality)))
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    base = _Q_CHROMA if chroma else _Q_LUMA
    return torch.floor((base * scale + 50.0) / 100.0).clamp(1.0, 255.0)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize_uint8(img: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 1/255 with a straight-through gradient (clamped to [0, 1])."""
    return _round_ste(img.clamp(0.0, 1.0) * 255.0) / 255.0


def _rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:  # x in 0..255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack([y, cb, cr], 1)


def _ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    y, cb, cr = x[:, 0], x[:, 1] - 128.0, x[:, 2] - 128.0
    return torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)


def _dct_quantise(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """JPEG-quantise one channel ``(N, H, W)`` (0..255, H and W multiples of 8) blockwise."""
    n, h, w = plane.shape
    d = _DCT.to(plane)
    blocks = (plane - 128.0).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    t = table.to(plane)
    coef = _round_ste(coef / t) * t
    back = d.T @ coef @ d
    return back.permute(0, 1, 3, 2, 4).reshape(n, h, w) + 128.0


def jpeg_differentiable(img: torch.Tensor, quality: int = 50) -> torch.Tensor:
    """Differentiable JPEG approximation at ``quality`` (see module docs); 1- or 3-channel input."""
    n, c, h, w = img.shape
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(img.clamp(0.0, 1.0) * 255.0, (0, pw, 0, ph), mode="replicate")
    if c == 1:
        out = _dct_quantise(x[:, 0], quant_table(quality)).unsqueeze(1)
    else:
        ycc = _rgb_to_ycbcr(x)
        y = _dct_quantise(ycc[:, 0], quant_table(quality))
        chroma = F.avg_pool2d(ycc[:, 1:], 2)
        q = quant_table(quality, chroma=True)
        cpad_h, cpad_w = (-chroma.shape[-2]) % 8, (-chroma.shape[-1]) % 8
        chroma = F.pad(chroma, (0, cpad_w, 0, cpad_h), mode="replicate")
        cb = _dct_quantise(chroma[:, 0], q)
        cr = _dct_quantise(chroma[:, 1], q)
        cc = torch.stack([cb, cr], 1)[..., :x.shape[-2] // 2, :x.shape[-1] // 2]
        cc = F.interpolate(cc, scale_factor=2, mode="nearest")
        out = _ycbcr_to_rgb(torch.cat([y.unsqueeze(1), cc], 1))
    return (out[..., :h, :w] / 255.0).clamp(0.0, 1.0)


def jpeg_real(img: torch.Tensor, quality: int = 50) -> torch.Tensor:
    """Encode and decode each image with Pillow's JPEG at ``quality`` (default 4:2:0 subsampling)."""
    from PIL import Image

    arr = (img.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, a in enumerate(arr):
        pic = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        buf = io.BytesIO()
        pic.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if a.shape[-1] == 1 else "RGB"))
        out[i] = dec.reshape(a.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255.0).to(img.device)


def _crop_side(h: int, w: int, frac: float, grid: int) -> int:
    if grid < 1:
        raise ValueError(f"crop grid must be >= 1 pixel, got {grid}")
    side = max(1, min(h, w, int(round(math.sqrt(frac) * min(h, w)))))
    return max(min(grid, h, w), side // grid * grid)


def crop_keep(img: torch.Tensor, frac: float = 0.25, gen: torch.Generator | None = None,
              grid: int = 1) -> torch.Tensor:
    """Keep one square with ``frac`` of the image area (side ``round(sqrt(frac) * min(H, W))``) at a
    random position (the same for the whole batch), zero everything else. ``grid`` > 1 (pixels) rounds the
    side down to, and draws the corner on, multiples of ``grid``: few distinct crop geometries (marking
    loops cache a per-geometry read-out centre, see ``OutputMessage.geometry_offsets``)."""
    h, w = img.shape[-2:]
    side = _crop_side(h, w, frac, grid)
    r = grid * int(torch.randint(0, (h - side) // grid + 1, (1,), generator=gen))
    c = grid * int(torch.randint(0, (w - side) // grid + 1, (1,), generator=gen))
    mask = torch.zeros((1, 1, h, w), dtype=img.dtype, device=img.device)
    mask[..., r:r + side, c:c + side] = 1.0
    return img * mask


def crop_keep_each(img: torch.Tensor, frac: float = 0.25, gen: torch.Generator | None = None,
                   grid: int = 1) -> torch.Tensor:
    """As :func:`crop_keep`, but each image ``(N, C, H, W)`` keeps its square at its own random position
    (``grid`` as there)."""
    n, _, h, w = img.shape
    side = _crop_side(h, w, frac, grid)
    r = grid * torch.randint(0, (h - side) // grid + 1, (n,), generator=gen)
    c = grid * torch.randint(0, (w - side) // grid + 1, (n,), generator=gen)
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    keep_r = (rows >= r[:, None]) & (rows < r[:, None] + side)
    keep_c = (cols >= c[:, None]) & (cols < c[:, None] + side)
    mask = (keep_r[:, :, None] & keep_c[:, None, :]).to(img.dtype)[:, None]
    return img * mask.to(img.device)


def gaussian_noise(img: torch.Tensor, sigma: float = 0.05, gen: torch.Generator | None = None) -> torch.Tensor:
    """``img`` + N(0, ``sigma``**2) noise (images in [0, 1]), clamped to [0, 1]."""
    noise = torch.randn(img.shape, generator=gen, dtype=img.dtype).to(img.device)
    return (img + sigma * noise).clamp(0.0, 1.0)


def resize(img: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Downscale by ``scale`` (antialiased bilinear) and upscale back to the original size (bilinear)."""
    h, w = img.shape[-2:]
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    small = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def _uniform(gen: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def random_augment(img: torch.Tensor, gen: torch.Generator | None = None, strength: float = 1.0,
                   crop: bool = True, crop_grid: int = 1) -> torch.Tensor:
    """One distortion for the whole batch, drawn uniformly from identity, crop (keep 1/4..1 of the area),
    noise (sigma up to 0.06), differentiable JPEG (quality 40..90), resize (x0.4..0.9); ``strength`` in
    (0, 1] scales how hard each may be (1 = the ranges above). ``crop=False`` leaves the crop out of the draw
    (for marks read tile by tile, where the verifier reads only the tiles a zeroing crop kept whole);
    ``crop_grid`` is :func:`crop_keep`'s ``grid``. Differentiable in ``img``."""
    s = float(strength)
    kinds = (0, 1, 2, 3, 4) if crop else (0, 2, 3, 4)
    choice = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))]
    if choice == 1:
        return crop_keep(img, _uniform(gen, 1.0 - 0.75 * s, 1.0), gen, crop_grid)
    if choice == 2:
        return gaussian_noise(img, _uniform(gen, 0.0, 0.06 * s), gen)
    if choice == 3:
        return jpeg_differentiable(img, int(round(_uniform(gen, 90 - 50 * s, 90))))
    if choice == 4:
        return resize(img, _uniform(gen, 1.0 - 0.6 * s, 1.0))
    return img


def vary_inputs(img: torch.Tensor, gen: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Random photometric and geometric variants of a host's *inputs* ``(N, C, H, W)`` in [0, 1], one draw
    per image, so that marking sees more kinds of content than the owner's few training photos hold:

    - a horizontal flip (probability 1/2) and, for square images, a rotation by a random multiple of 90°;
    - a zoom by a factor in [1 - 0.4 s, 1 + 0.6 s] (bilinear, antialiased when shrinking), centre-cropped
      or reflect-padded back to ``(H, W)`` -- other texture scales;
    - a gain per channel in [1 - 0.4 s, 1 + 0.4 s] and a gamma exp(0.4 s z), z ~ N(0, 1) -- other colours
      and contrasts (a 1-channel input gets one gain).

    ``strength`` s in [0, 1] (0 returns ``img`` unchanged). Not differentiable in the draw; the marking
    loop compares the marked host with the unmarked one on the *same* varied inputs, so the variation never
    asks the host to change what it does, only to write the mark on more content."""
    s = float(strength)
    if s <= 0:
        return img
    n, c, h, w = img.shape
    out = []
    for i in range(n):
        x = img[i:i + 1]
        if float(torch.rand((), generator=gen)) < 0.5:
            x = x.flip(-1)
        if h == w:
            x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), (-2, -1))
        z = _uniform(gen, 1.0 - 0.4 * s, 1.0 + 0.6 * s)
        zh, zw = max(4, int(round(h * z))), max(4, int(round(w * z)))
        if (zh, zw) != (h, w):
            x = F.interpolate(x, size=(zh, zw), mode="bilinear", antialias=zh < h, align_corners=False)
            if zh >= h:
                t, left = (zh - h) // 2, (zw - w) // 2
                x = x[..., t:t + h, left:left + w]
            else:
                ph, pw = h - zh, w - zw
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
        gain = 1.0 + 0.4 * s * (2 * torch.rand((1, 1 if c == 1 else c, 1, 1), generator=gen) - 1)
        gamma = math.exp(0.4 * s * float(torch.randn((), generator=gen)))
        out.append((x.clamp(1e-4, 1.0) ** gamma * gain.to(x)).clamp(0.0, 1.0))
    return torch.cat(out)
