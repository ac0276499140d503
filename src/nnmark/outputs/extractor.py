"""A message-agnostic bit extractor: an encoder/decoder pair pre-trained on random messages.

The approach of HiDDeN (Zhu et al. 2018) and Stable Signature (Fernandez et al. 2023): an
encoder learns to hide any ``k``-bit message in any image under a fixed distortion budget,
a decoder learns to read it back after the robustness distortions of
:mod:`nnmark.outputs.augment`. Only the decoder is kept: a host network is later fine-tuned
so that its outputs decode to the owner's message (:mod:`nnmark.outputs.agnostic`).

- :class:`MessageEncoder` -- ``(image (N, 3, H, W), bits (N, k) in {0, 1})`` -> marked image;
  the residual is rescaled to a fixed RMS ``budget`` (default 0.012, about 38 dB PSNR),
  so the pre-training loss is the bit loss alone.
- :class:`MessageDecoder` -- ``(N, 3, H, W)`` (any H, W >= 8) -> ``(N, k)`` logits. Its
  features are averaged over the whole image, so it reads a crop or a larger image, and a
  batch's mark by averaging logits.
- :class:`Extractor` -- a decoder plus its null calibration: the mean ``mu`` and a whitening
  matrix ``W`` of its logits over natural photo patches (train photos only), so that on
  images carrying no mark the read-out ``W (z - mu)`` has zero mean, unit variance and no
  correlation across bits (bits are then its signs). Saved as safetensors (never pickle).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import NNMarkError
from nnmark.outputs import augment
from nnmark.outputs.data import natural_images

DEFAULT_BITS = 48
DEFAULT_BUDGET = 0.012
#: where the shipped extractor lives (made by experiments/outputs/train_extractor.py)
SHIPPED = Path(__file__).with_name("assets") / "extractor48.safetensors"
#: the companion decoder shipped beside it: the same pre-training behind the ``luma2`` front end (reads luma
#: averaged over 2 x 2 pixels; ``train_extractor.py --front luma2``, a copy of
#: experiments/results/outputs/extractor48_luma2.safetensors). It survives JPEG 50 and a x0.5 resize, which
#: the RGB decoder does not, and fails crops, which the RGB decoder survives; a companion mark of a second key
#: read by it covers the threats the main mark misses (experiments/results/outputs/README.md, round 5)
SHIPPED_LUMA2 = Path(__file__).with_name("assets") / "extractor48_luma2.safetensors"


class ExtractorError(NNMarkError):
    """An extractor file is missing, malformed or does not fit."""


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


#: periods (px) of the grid-phase channels a ``phase`` encoder sees; all divide
#: :data:`~nnmark.outputs.agnostic.WINDOW_STRIDE`, so every window at a multiple of 8 sees the same phase
PHASE_PERIODS = (8, 4)


def phase_channels(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, 4 * len(PHASE_PERIODS), h, w)``: cos / sin of ``2 pi row / P`` and of ``2 pi column / P`` for each
    period P of :data:`PHASE_PERIODS`, counted from the image's top-left pixel."""
    rows = torch.arange(h, dtype=like.dtype, device=like.device).view(1, h, 1).expand(1, h, w)
    cols = torch.arange(w, dtype=like.dtype, device=like.device).view(1, 1, w).expand(1, h, w)
    out = []
    for period in PHASE_PERIODS:
        for grid in (rows, cols):
            a = 2.0 * math.pi * grid / period
            out += [torch.cos(a), torch.sin(a)]
    return torch.cat(out, 0).unsqueeze(0)


class MessageEncoder(nn.Module):
    """Hides ``bits`` bits in an image (HiDDeN's layout: the message, as +-1, replicated over every pixel
    and concatenated with image features); the residual is scaled to RMS ``budget`` per image ([0, 1] units)."""

    def __init__(self, bits: int = DEFAULT_BITS, width: int = 32, budget: float = DEFAULT_BUDGET,
                 phase: bool = False) -> None:
        super().__init__()
        self.bits, self.budget, self.phase = bits, budget, bool(phase)
        extra = len(PHASE_PERIODS) * 4 if self.phase else 0
        self.img = nn.Sequential(_conv(3 + extra, width), _conv(width, width))
        self.mix = nn.Sequential(_conv(width + bits + 3 + extra, width), _conv(width, width), nn.Conv2d(width, 3, 1))

    def forward(self, x: torch.Tensor, bits: torch.Tensor, budget: float | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        m = (2.0 * bits.float() - 1.0).view(n, self.bits, 1, 1).expand(-1, -1, h, w)
        if self.phase:  # the pixel grid's phase, so the encoder can lay down a code that repeats every 8 px
            x_in = torch.cat([x, phase_channels(h, w, x).expand(n, -1, -1, -1)], 1)
        else:
            x_in = x
        r = self.mix(torch.cat([self.img(x_in), m, x_in], 1))
        rms = r.pow(2).flatten(1).mean(1).clamp(min=1e-12).sqrt().view(n, 1, 1, 1)
        return (x + (self.budget if budget is None else budget) * r / rms).clamp(0.0, 1.0)


#: decoder front ends: ``rgb`` reads the image as it is; ``luma2`` reads only its luma averaged over 2 x 2
#: pixels -- the content a x0.5 resize keeps and JPEG quantises least -- so the encoder pre-trained with it
#: must hide the message there (robust by construction; the choice of :mod:`nnmark.outputs.keyed_decoder`)
FRONTS = ("rgb", "luma2")
_LUMA = (0.299, 0.587, 0.114)


class MessageDecoder(nn.Module):
    """Reads ``bits`` logits from an image ``(N, 3, H, W)`` (global average of conv features) through the
    fixed front end ``front`` (:data:`FRONTS`, default ``rgb``)."""

    def __init__(self, bits: int = DEFAULT_BITS, width: int = 32, front: str = "rgb") -> None:
        super().__init__()
        if front not in FRONTS:
            raise ExtractorError(f"unknown decoder front end {front!r}; known: {', '.join(FRONTS)}")
        self.bits, self.front = bits, front
        cin = 3 if front == "rgb" else 1
        self.features = nn.Sequential(_conv(cin, width), _conv(width, width), _conv(width, 2 * width, 2),
                                      _conv(2 * width, 2 * width), _conv(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.front == "luma2":
            if x.shape[1] == 3:
                x = (x * torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = F.avg_pool2d(x, 2)
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.head(self.features(x).mean((2, 3)))


class Extractor(nn.Module):
    """A frozen decoder (a :class:`MessageDecoder`, or the keyed
    :class:`~nnmark.outputs.keyed_decoder.KeyedLowpassDecoder`) with its null calibration.

    :meth:`forward` gives the calibrated read-out ``W (decoder(x) - mu)`` ``(N, k)``: on unmarked natural
    images zero-mean, unit-variance, uncorrelated across bits (measured on train-photo patches).
    """

    def __init__(self, decoder: nn.Module, mu: torch.Tensor | None = None,
                 whiten: torch.Tensor | None = None, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        k = int(decoder.bits)
        if (mu is not None and tuple(mu.shape) != (k,)) or (whiten is not None and tuple(whiten.shape) != (k, k)):
            raise ExtractorError(f"calibration shapes do not fit a {k}-bit decoder")
        self.register_buffer("mu", torch.zeros(k) if mu is None else mu.float().clone())
        self.register_buffer("whiten", torch.eye(k) if whiten is None else whiten.float().clone())
        self.meta = dict(meta or {})

    @property
    def bits(self) -> int:
        return self.decoder.bits

    def train(self, mode: bool = True) -> Extractor:  # the decoder stays in eval mode (frozen statistics)
        super().train(mode)
        self.decoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.decoder(x) - self.mu) @ self.whiten.T

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 512) -> None:
        """Set ``mu`` and the ZCA whitening matrix from the raw logits of ``images`` (unmarked, natural)."""
        z = torch.cat([self.decoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).double()
        mu = z.mean(0)
        cov = torch.cov((z - mu).T)
        evals, evecs = torch.linalg.eigh(cov)
        w = evecs @ torch.diag(evals.clamp(min=1e-8 * float(evals.max())).rsqrt()) @ evecs.T
        self.mu.copy_(mu.float())
        self.whiten.copy_(w.float())

    @torch.no_grad()
    def calibration_readout(self, n: int, seed: int) -> torch.Tensor:
        """The calibrated read-out ``(n, k)`` of :func:`calibration_images` ``(n, 32, seed)`` (cached on this
        object, so that every key built on one extractor pays for it once)."""
        cached = self.__dict__.setdefault("_calibration_cache", {})
        if (n, seed) not in cached:
            x = calibration_images(n, 32, seed)
            cached[(n, seed)] = torch.cat([self(x[i:i + 512]) for i in range(0, n, 512)])
        return cached[(n, seed)]

    @torch.no_grad()
    def masked_calibration_readout(self, box: tuple[int, int, int, int], n: int, seed: int) -> torch.Tensor:
        """The calibrated read-out ``(n, k)`` of :func:`calibration_images` ``(n, 32, seed)`` with every pixel
        outside ``box`` ``(top, bottom, left, right)`` (end-exclusive) set to zero: unmarked images of one
        crop geometry. Cached on this object per box."""
        cached = self.__dict__.setdefault("_masked_calibration_cache", {})
        if (box, n, seed) not in cached:
            x = calibration_images(n, 32, seed)
            mask = torch.zeros((1, 1, 32, 32))
            mask[..., box[0]:box[1], box[2]:box[3]] = 1.0
            cached[(box, n, seed)] = torch.cat([self(x[i:i + 512] * mask) for i in range(0, n, 512)])
        return cached[(box, n, seed)]

    def save(self, path: str | Path) -> None:
        """Write weights, calibration and metadata to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {f"decoder.{k}": v.detach().contiguous() for k, v in self.decoder.state_dict().items()}
        tensors["mu"], tensors["whiten"] = self.mu.contiguous(), self.whiten.contiguous()
        meta = {"bits": str(self.bits), "width": str(self.decoder.head.in_features // 4),
                "front": self.decoder.front, "meta": json.dumps(self.meta)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Extractor:
        """Read a file written by :meth:`save` (safetensors; size bounded to 64 MB)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ExtractorError(f"no extractor file at {path}")
        if path.stat().st_size > 64 * 2**20:
            raise ExtractorError(f"{path}: extractor file larger than 64 MB")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            bits, width, front = int(info["bits"]), int(info["width"]), info.get("front", "rgb")
            meta = json.loads(info.get("meta", "{}"))
        except (KeyError, ValueError, OSError) as exc:
            raise ExtractorError(f"{path}: not an nnmark extractor file ({exc})") from None
        return cls.from_tensors(tensors, bits, width, meta, front)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int, width: int,
                     meta: dict[str, Any] | None = None, front: str = "rgb") -> Extractor:
        """Rebuild from :meth:`tensors` output (e.g. a key file's material)."""
        if not 8 <= bits <= 256 or not 4 <= width <= 256:
            raise ExtractorError(f"implausible extractor shape: {bits} bits, width {width}")
        dec = MessageDecoder(bits, width, front)
        state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
        try:
            dec.load_state_dict(state)
        except RuntimeError as exc:
            raise ExtractorError(f"extractor weights do not fit its shape: {exc}") from None
        return cls(dec, tensors["mu"], tensors["whiten"], meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors (decoder weights under ``decoder.``, ``mu``, ``whiten``)."""
        out = {f"decoder.{k}": v.detach().clone() for k, v in self.decoder.state_dict().items()}
        out["mu"], out["whiten"] = self.mu.clone(), self.whiten.clone()
        return out


def calibration_images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """A copy of :func:`_calibration_images` (cached: every key built in one process reuses them)."""
    return _calibration_images(int(n), int(size), int(seed)).clone()


@lru_cache(maxsize=3)
def _calibration_images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """``n`` unmarked images ``(n, 3, size, size)`` for the null calibration, from the train photos only: a
    quarter each of natural patches, x0.5 bicubic down-up copies (what a super-resolution host outputs
    looks like), the same after JPEG quality 75, and copies with N(0, 0.02**2) noise -- so that the read-out
    is centred on host-like outputs as well as on photos."""
    from nnmark.outputs.data import degrade

    x = natural_images(n, size, seed, split="train")
    q = n // 4
    gen = torch.Generator().manual_seed(seed)
    x[q:2 * q] = degrade("sr2", x[q:2 * q])
    x[2 * q:3 * q] = augment.jpeg_real(degrade("sr2", x[2 * q:3 * q]), 75)
    x[3 * q:] = augment.gaussian_noise(x[3 * q:], 0.02, gen)
    return augment.quantize_uint8(x)


@cache
def load_shipped() -> Extractor:
    """The extractor shipped with nnmark (48 bits; see :data:`SHIPPED`); loaded once per process and shared
    (frozen: never train or recalibrate the returned object in place)."""
    return Extractor.load(SHIPPED)


@cache
def load_shipped_luma2() -> Extractor:
    """The shipped companion decoder (48 bits, ``luma2`` front end; see :data:`SHIPPED_LUMA2`); loaded once
    per process and shared, like :func:`load_shipped`."""
    return Extractor.load(SHIPPED_LUMA2)


def pretrain_extractor(bits: int = DEFAULT_BITS, steps: int = 3000, seed: int = 0, *, width: int = 32,
                       budget: float = DEFAULT_BUDGET, size: int = 32, batch_size: int = 32, lr: float = 2e-3,
                       n_images: int = 8192, calib_images: int = 8192, clean_frac: float = 0.1,
                       ramp_frac: float = 0.5, boost: float = 4.0, front: str = "rgb", window: int | None = None,
                       phase: bool = False,
                       progress: Callable[[int, dict[str, float]], None] | None = None,
                       log_every: int = 100) -> tuple[Extractor, MessageEncoder, dict[str, Any]]:
    """Pre-train an encoder/decoder on uniformly random ``bits``-bit messages over ``n_images`` train-photo
    patches (``size`` px), the encoder's residual fixed at RMS ``budget``; each batch passes through
    8-bit quantisation and :func:`~nnmark.outputs.augment.random_augment` distortions (one per quarter
    batch) whose strength ramps up to full at ``ramp_frac`` of the steps (after ``clean_frac`` of the steps
    with no distortion), while the residual's RMS shrinks from ``boost`` x ``budget`` to ``budget`` over the
    same ramp (defaults 0.1, 0.5, 4); ``front`` the decoder's front end (:data:`FRONTS`). Then calibrate the decoder on
    ``calib_images`` other train-photo patches. Returns ``(extractor, encoder, log)``; ``progress(step, stats)`` every
    ``log_every`` steps.

    ``window`` W (e.g. 32 with ``size`` 64): the decoder reads, instead of the whole patch, one random W x W window
    of each marked patch at an offset that is a multiple of
    :data:`~nnmark.outputs.agnostic.WINDOW_STRIDE` (no zeroing crop among the distortions then). The code found
    this way cannot lean on the patch border (the decoder's zero padding never meets the encoder's border), so it
    repeats over an image: the kind of mark a convolutional host can write everywhere and a verifier can read in
    any aligned tile, including the tiles a crop kept. ``phase``: the encoder also sees the grid-phase channels
    of :func:`phase_channels` (a stride-1 convolution cannot tell one pixel's position from another's, so
    without them it can only write content-driven residuals once the border is out of the decoder's sight)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = natural_images(n_images, size, seed, split="train")
    enc, dec = MessageEncoder(bits, width, budget, phase), MessageDecoder(bits, width, front)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log: dict[str, Any] = {"steps": [], "loss": [], "bit_acc": []}
    t0 = time.perf_counter()
    run_loss, run_acc = 0.0, 0.0
    for step in range(steps):
        j = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[j]
        m = torch.randint(0, 2, (batch_size, bits), generator=gen).float()
        # curriculum: a 4x larger residual and no distortion at first, the target budget and full-strength
        # distortions from half-way on
        ramp = min(1.0, step / (ramp_frac * steps))
        marked = augment.quantize_uint8(enc(x, m, budget * (boost - (boost - 1.0) * ramp)))
        if step >= clean_frac * steps:  # four distortions per batch, one per quarter
            marked = torch.cat([augment.random_augment(part, gen, max(0.1, ramp), crop=window is None)
                                for part in marked.chunk(4)])
        if window is not None:
            from nnmark.outputs.agnostic import random_windows  # (agnostic imports this module)

            marked = torch.cat([random_windows(marked[i:i + 1], window, 1, gen) for i in range(batch_size)])
        logits = dec(marked)
        loss = F.binary_cross_entropy_with_logits(logits, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        run_acc += float(((logits.detach() > 0).float() == m).float().mean())
        if (step + 1) % log_every == 0:
            stats = {"loss": run_loss / log_every, "bit_acc": run_acc / log_every}
            log["steps"].append(step + 1)
            log["loss"].append(stats["loss"])
            log["bit_acc"].append(stats["bit_acc"])
            run_loss, run_acc = 0.0, 0.0
            if progress is not None:
                progress(step + 1, stats)
    log["seconds"] = time.perf_counter() - t0
    enc.eval()
    dec.eval()
    ext = Extractor(dec, meta={"bits": bits, "width": width, "budget": budget, "size": size, "steps": steps,
                               "seed": seed, "batch_size": batch_size, "lr": lr, "clean_frac": clean_frac,
                               "ramp_frac": ramp_frac, "boost": boost, "front": front, "window": window,
                               "phase": phase})
    ext.calibrate(calibration_images(calib_images, window or size, seed + 1))
    return ext, enc, log


@torch.no_grad()
def bit_stats(readout: torch.Tensor) -> dict[str, float]:
    """Bias and correlation of the bits ``readout > 0`` over ``N`` images ``(N, k)``: the largest
    ``|P[bit = 1] - 1/2|``, the largest and the RMS off-diagonal Pearson correlation between bits."""
    b = (readout > 0).double().numpy()
    p1 = b.mean(0)
    c = np.corrcoef(b.T) if b.shape[0] > 2 else np.zeros((b.shape[1], b.shape[1]))
    c = np.nan_to_num(c)
    off = c[~np.eye(len(c), dtype=bool)]
    return {"max_bias": float(np.abs(p1 - 0.5).max()), "mean_abs_bias": float(np.abs(p1 - 0.5).mean()),
            "max_abs_corr": float(np.abs(off).max()) if off.size else 0.0,
            "rms_corr": float(np.sqrt((off ** 2).mean())) if off.size else 0.0}
