"""A keyed, fixed (never trained) bit decoder that reads only low-frequency luma: robust by construction.

The learned HiDDeN-style decoder of :mod:`nnmark.outputs.extractor` must *learn* to ignore what JPEG and
resizing destroy, and a short CPU pre-training does not get there (0.56 bit accuracy after JPEG 50 on its
own encoder's marks). This decoder instead fixes what it looks at:

1. luma ``Y`` (BT.601) -- JPEG keeps luma at full resolution and the colour planes at a quarter;
2. a two-level average-pool pyramid, ``Y`` pooled by 2 and by 4 (``scales``) -- the content a x0.5 resize
   keeps and the lowest coefficients of JPEG's 8 x 8 blocks, which quality 50 quantises least;
3. ``feats`` random zero-mean, unit-norm ``ksize`` x ``ksize`` filters per level, drawn from the key, a
   saturating ``tanh(gain * response)``, averaged over every position -- so every bit is spread over the
   whole image (any part of it, e.g. a quarter crop, holds every bit) and the read-out does not depend on
   where the content sits (a convolutional host without absolute position can still write it);
4. pixels that are 0 in every channel count as missing (what a crop that zeroes the rest leaves): pooled
   cells touching them are filled with the mean of the valid cells before filtering and left out of the
   average;
5. a random ``(bits, feats * len(scales))`` mixing matrix from the key.

The host is then fine-tuned to this decoder exactly as to the learned one (:mod:`nnmark.outputs.agnostic`).
How it departs from HiDDeN: HiDDeN's decoder is learned jointly with an encoder so it reads whatever
signal survives the training distortions; here robustness comes from the decoder's fixed low-pass front end
and only the host learns. Because the filters come from the key, the decoder is as secret as the key: no
public decoder exists for a thief to run gradient removal against (the shipped learned decoder is such an
oracle). The price: the mark lives in low-frequency luma, where natural images have most of their energy,
so it costs more PSNR per bit than a learned decoder's high-frequency mark on undistorted images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import NNMarkError

_LUMA = (0.299, 0.587, 0.114)
#: defaults measured in experiments/results/outputs/README.md ("keyed low-pass decoder")
DEFAULT_FEATS, DEFAULT_SCALES, DEFAULT_KSIZE, DEFAULT_GAIN = 64, (2, 4), 3, 100.0


class KeyedLowpassDecoder(nn.Module):
    """``(N, C, H, W)`` images in [0, 1] (C = 1 or 3, H, W >= the largest scale) -> ``(N, bits)`` raw logits
    (module docs). All weights are buffers drawn from ``generator``; nothing is trainable."""

    def __init__(self, bits: int = 48, feats: int = DEFAULT_FEATS, scales: tuple[int, ...] = DEFAULT_SCALES,
                 ksize: int = DEFAULT_KSIZE, gain: float = DEFAULT_GAIN,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 8 <= bits <= 256 or not 1 <= feats <= 512 or not scales or not ksize % 2 or not 1 <= ksize <= 9 \
                or any(not 1 <= s <= 16 for s in scales) or not 0.0 < gain <= 1e4:
            raise NNMarkError(f"implausible keyed decoder: bits {bits}, feats {feats}, scales {scales}, "
                              f"ksize {ksize}, gain {gain}")
        self.bits, self.feats, self.scales = int(bits), int(feats), tuple(int(s) for s in scales)
        self.ksize, self.gain = int(ksize), float(gain)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        w = torch.randn(len(self.scales), feats, 1, ksize, ksize, generator=g)
        w = w - w.mean((-1, -2), keepdim=True)
        self.register_buffer("filters", w / w.flatten(2).norm(dim=2)[..., None, None, None])
        mix = torch.randn(bits, feats * len(self.scales), generator=g) / math.sqrt(feats * len(self.scales))
        self.register_buffer("mix", mix)

    def spec(self) -> dict[str, object]:
        """What :meth:`from_tensors` needs besides the tensors (JSON-serialisable)."""
        return {"bits": self.bits, "feats": self.feats, "scales": list(self.scales), "ksize": self.ksize,
                "gain": self.gain}

    @classmethod
    def from_tensors(cls, spec: dict[str, object], tensors: dict[str, torch.Tensor]) -> KeyedLowpassDecoder:
        """Rebuild from :meth:`spec` and ``state_dict()`` tensors (shapes checked)."""
        try:
            dec = cls(int(spec["bits"]), int(spec["feats"]), tuple(int(s) for s in spec["scales"]),  # type: ignore[arg-type, union-attr]
                      int(spec["ksize"]), float(spec["gain"]))  # type: ignore[arg-type]
            dec.load_state_dict({k: tensors[k] for k in ("filters", "mix")})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise NNMarkError(f"keyed decoder tensors do not fit its description: {str(exc)[:200]}") from None
        return dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise NNMarkError(f"keyed decoder reads (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if min(x.shape[-2:]) < max(self.scales):
            raise NNMarkError(f"image {tuple(x.shape[-2:])} smaller than the decoder's pooling {max(self.scales)}")
        if x.shape[1] == 3:
            y = (x * torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            y = x
        valid = (x.detach().sum(1, keepdim=True) > 0).to(x.dtype)
        whole = bool(valid.all())  # no missing pixel: the masking below would multiply by ones (skipped)
        pad = self.ksize // 2
        outs = []
        for s, w in zip(self.scales, self.filters, strict=True):
            ys = F.avg_pool2d(y, s) if s > 1 else y
            if whole:
                z = F.conv2d(F.pad(ys, (pad,) * 4, mode="replicate"), w)
                outs.append(torch.tanh(self.gain * z).sum((2, 3)) / float(z.shape[-2] * z.shape[-1]))
                continue
            vs = (F.avg_pool2d(valid, s) > 0.999).to(x.dtype) if s > 1 else valid
            count = vs.sum((2, 3), keepdim=True)
            fill = (ys * vs).sum((2, 3), keepdim=True) / count.clamp(min=1.0)
            ys = ys * vs + fill * (1.0 - vs)
            z = F.conv2d(F.pad(ys, (pad,) * 4, mode="replicate"), w)
            outs.append((torch.tanh(self.gain * z) * vs).sum((2, 3)) / count.flatten(1).clamp(min=1.0))
        return torch.cat(outs, 1) @ self.mix.T
