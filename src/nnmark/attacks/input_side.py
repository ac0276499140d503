"""Input-side attacks at inference: the thief's API transforms or refuses queries before the stolen model.

The stolen weights are untouched; what changes is what the model is shown. Each attack returns a
wrapper module (:class:`FilteredModel`, :class:`GuardedModel`) whose ``model`` attribute is the stolen
model itself -- black-box verifiers query the wrapper (through an oracle, as a client of the API would);
white-box verifiers read ``wrapper.model``, whose weights are unchanged.

- ``"input-jpeg"``: every query JPEG-compressed at ``quality`` (Pillow, per image, 8-bit);
- ``"input-noise"``: Gaussian noise of standard deviation ``sigma`` added, clipped to [0, 1];
- ``"input-quantize"``: pixel values rounded to ``levels`` grey levels;
- ``"input-smooth"``: Gaussian smoothing of standard deviation ``sigma`` pixels (``"gaussian"``) or a 3x3
  median filter (``"median"``);
- ``"magnet"`` (:class:`MagNetDetector`, Meng & Chen 2017, as used against trigger sets by Zhang et al.):
  a small convolutional autoencoder trained on the attacker's clean images; a query whose reconstruction
  error exceeds the ``1 - fpr`` quantile of the errors on a held-out fifth of the attacker's images is
  refused -- the API answers a random label instead (seeded). ``cost`` records the threshold and the
  false-positive rate measured on that held-out fifth; :meth:`GuardedModel.refused` tells which inputs
  would be refused, for measuring the detector's false-positive rate on normal data beside the fraction
  of trigger images it blocks.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [0, 1] JPEG-compressed at ``quality`` (1-95) and decoded (grey or RGB)."""
    from PIL import Image

    out = torch.empty_like(x)
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, img in enumerate(arr):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if img.shape[-1] == 1 else "RGB"))
        dec = dec[..., None] if dec.ndim == 2 else dec
        out[i] = torch.from_numpy(dec.astype(np.float32) / 255.0).permute(2, 0, 1)
    return out


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of ``x`` ``(N, C, H, W)`` blurred by a Gaussian of ``sigma`` pixels (reflect padding)."""
    radius = max(1, int(np.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    k = k[radius - pad: radius + pad + 1]
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter of ``x`` ``(N, C, H, W)`` (reflect padding)."""
    n, c, h, w = x.shape
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    patches = F.unfold(p.reshape(n * c, 1, h + 2, w + 2), 3)  # (N*C, 9, H*W)
    return patches.median(dim=1).values.reshape(n, c, h, w)


class FilteredModel(nn.Module):
    """``model(transform(x))``: the stolen ``model`` behind an input transform (``kind`` with ``value``)."""

    def __init__(self, model: nn.Module, kind: str, value: float, seed: int = 0) -> None:
        super().__init__()
        self.model, self.kind, self.value = model, kind, float(value)
        self.gen = torch.Generator().manual_seed(seed)
        spec = getattr(model, "spec", None)
        if spec is not None:
            self.spec = dict(spec)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "jpeg":
            return jpeg(x, int(self.value))
        if self.kind == "noise":
            return (x + self.value * torch.randn(x.shape, generator=self.gen).to(x)).clamp(0, 1)
        if self.kind == "quantize":
            steps = max(1, int(self.value) - 1)
            return torch.round(x.clamp(0, 1) * steps) / steps
        if self.kind == "gaussian":
            return gaussian_smooth(x, self.value)
        if self.kind == "median":
            return median3(x)
        raise AttackError(f"unknown input transform {self.kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(x))


class _InputAttack(Attack):
    kind = ""

    def value(self) -> float:
        raise NotImplementedError

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        return FilteredModel(models[0], self.kind, self.value(), self.seed).eval()


class InputJPEG(_InputAttack):
    """Every query JPEG-compressed at ``quality`` before the stolen model sees it."""

    name = "input-jpeg"
    kind = "jpeg"
    PARAMS = Params(Param("quality", int, 50, "JPEG quality (1-95; lower: stronger)", low=1, high=95), SEED)

    def value(self) -> float:
        return self.quality


class InputNoise(_InputAttack):
    """Gaussian noise of standard deviation ``sigma`` added to every query (clipped to [0, 1])."""

    name = "input-noise"
    kind = "noise"
    PARAMS = Params(Param("sigma", float, 0.1, "noise standard deviation (pixel values in [0, 1])", low=0.0), SEED)

    def value(self) -> float:
        return self.sigma


class InputQuantize(_InputAttack):
    """Every query's pixels rounded to ``levels`` grey levels."""

    name = "input-quantize"
    kind = "quantize"
    PARAMS = Params(Param("levels", int, 4, "grey levels per channel (2: black and white)", low=2, high=256), SEED)

    def value(self) -> float:
        return self.levels


class InputSmooth(_InputAttack):
    """Every query smoothed: Gaussian of ``sigma`` pixels, or a 3x3 median filter."""

    name = "input-smooth"
    PARAMS = Params(Param("filter", str, "gaussian", "smoothing filter", choices=("gaussian", "median")),
                    Param("sigma", float, 0.8, "Gaussian standard deviation in pixels", low=0.05), SEED)

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        return FilteredModel(models[0], self.filter, self.sigma, self.seed).eval()


class Autoencoder(nn.Module):
    """conv(16)-pool-conv(16)-upsample-conv(C), sigmoid output: a MagNet-style detector's reconstruction
    network for images ``(N, C, H, W)`` with even ``H``, ``W``."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(channels, width, 3, padding=1)
        self.enc2 = nn.Conv2d(width, width, 3, padding=1)
        self.dec = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.max_pool2d(torch.relu(self.enc1(x)), 2)
        z = torch.relu(self.enc2(z))
        z = F.interpolate(z, size=x.shape[-2:], mode="nearest")
        return torch.sigmoid(self.dec(z))


class GuardedModel(nn.Module):
    """The stolen ``model`` behind an autoencoder detector: inputs whose mean squared reconstruction error
    exceeds ``threshold`` are refused -- answered with the logits of a random label (seeded)."""

    def __init__(self, model: nn.Module, detector: Autoencoder, threshold: float, num_classes: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.model, self.detector, self.threshold, self.num_classes = model, detector, float(threshold), num_classes
        self.gen = torch.Generator().manual_seed(seed)
        spec = getattr(model, "spec", None)
        if spec is not None:
            self.spec = dict(spec)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction errors ``(N,)`` (mean squared, per image)."""
        return (self.detector(x) - x).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def refused(self, x: torch.Tensor) -> torch.Tensor:
        """Which of ``x`` the API refuses ``(N,)`` bool."""
        return self.score(x) > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        bad = self.refused(x)
        if bool(bad.any()):
            fake = F.one_hot(torch.randint(0, self.num_classes, (int(bad.sum()),), generator=self.gen),
                             self.num_classes).to(out) * 10.0
            out = out.clone()
            out[bad] = fake
        return out


class MagNetDetector(Attack):
    """An autoencoder input-anomaly detector in front of the stolen model (see the module docs)."""

    name = "magnet"
    needs_data = True
    budget = "epochs"
    PARAMS = Params(
        Param("fpr", float, 0.01, "target false-positive rate on clean inputs (sets the threshold)", low=0.0,
              high=1.0),
        Param("epochs", int, 30, "budget: autoencoder training epochs on the attacker's images", low=1),
        Param("lr", float, 1e-3, "learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        assert data is not None
        if len(data) < 10:
            raise AttackError("the detector needs at least 10 attacker images")
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(data), generator=gen)
        held = order[: max(2, len(data) // 5)]
        fit = order[len(held):]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            ae = Autoencoder(data.image_shape[0])  # initialised from the seed, not from the caller's RNG state
            opt = torch.optim.Adam(ae.parameters(), lr=self.lr)
            x = data.x[fit]
            ae.train()
            for _ in range(self.epochs):
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), self.batch_size):
                    b = x[perm[i: i + self.batch_size]]
                    loss = (ae(b) - b).pow(2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        ae.eval()
        num_classes = int(data.num_classes)
        guard = GuardedModel(models[0], ae, float("inf"), num_classes, self.seed)
        errors = guard.score(data.x[held])
        # the next error above the 1 - fpr quantile: at most a fraction fpr of the held-out images exceeds it
        threshold = float(torch.quantile(errors.double(), 1.0 - self.fpr, interpolation="higher"))
        guard.threshold = threshold
        self.cost.update({"threshold": threshold, "heldout_fpr": float((errors > threshold).float().mean()),
                          "heldout": int(len(held))})
        return guard.eval()
