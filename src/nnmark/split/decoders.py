"""Networks that map what leaves a data owner (activations at the cut) back to images.

The same builders make the owners' *defenders* (which simulate the attacker during training) and the
server's *attackers* (trained afterwards on public data). A decoder is described by a short spec string:

- vector decoders (any activation, flattened): comma-separated hidden layers ``"<width>:<act>"`` with
  ``act`` in ``tanh, relu, sigmoid`` and an optional ``:drop<p>``; ``"conv1d:<act>"`` is a 1-d convolution
  (4 channels, kernel 5) over the activation vector. A final linear layer to the image size and a sigmoid
  always follow, so ``""`` is the linear decoder. The paper's "900 -> Tanh -> 900 -> Sigmoid" is read as
  ``"900:tanh"``: hidden width 900 with tanh, then the sigmoid output layer (the last number names the
  output layer, whose size must be the image's).
- deconvolution decoders (activation maps ``(C, h, w)``): ``"deconv:<w1>[,<w2>...][:<act>]"``: a 2x
  transposed convolution (kernel 4) per halving between the map and the image, widths ``w1, w2, ...``
  (the last repeated), activation ``act`` (default relu), a 3x3 convolution to the image's channels and a
  sigmoid; the output is resized (bilinear) to the image when the sizes are not powers of two apart.

Outputs are ``(N, C, H, W)`` in ``(0, 1)``, like the images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnmark.split.partition import SplitError

_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
MAX_WIDTH = 8192


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise SplitError(f"unknown activation {name!r}; known: {', '.join(_ACTS)}")
    return _ACTS[name]()


class VectorDecoder(nn.Module):
    """Flattened activation ``(N, *act_shape)`` -> image ``(N, *image_shape)`` (see the module doc)."""

    def __init__(self, spec: str, act_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, tuple(image_shape)
        width = math.prod(act_shape)
        layers: list[nn.Module] = []
        for token in [t.strip() for t in spec.split(",") if t.strip()]:
            parts = token.split(":")
            if parts[0] == "conv1d":
                layers += [nn.Unflatten(1, (1, width)), nn.Conv1d(1, 4, 5, padding=2),
                           _act(parts[1] if len(parts) > 1 else "tanh"), nn.Flatten(1)]
                width *= 4
                continue
            if not parts[0].isdigit() or not 1 <= int(parts[0]) <= MAX_WIDTH:
                raise SplitError(f"bad decoder layer {token!r}: want <width>:<act>[:drop<p>], width 1..{MAX_WIDTH}")
            layers += [nn.Linear(width, int(parts[0])), _act(parts[1] if len(parts) > 1 else "relu")]
            width = int(parts[0])
            for extra in parts[2:]:
                if not extra.startswith("drop"):
                    raise SplitError(f"bad decoder layer option {extra!r} in {token!r}")
                layers.append(nn.Dropout(float(extra[4:])))
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.flatten(1)).view(h.shape[0], *self.image_shape)


class DeconvDecoder(nn.Module):
    """Activation maps ``(N, C, h, w)`` -> image ``(N, *image_shape)`` (see the module doc)."""

    def __init__(self, spec: str, act_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(act_shape) != 3:
            raise SplitError(f"a deconvolution decoder needs activation maps (C, h, w), got {act_shape}")
        self.spec, self.image_shape = spec, tuple(image_shape)
        parts = spec.split(":")
        widths = [int(w) for w in parts[1].split(",")] if len(parts) > 1 and parts[1] else [64]
        if not all(1 <= w <= MAX_WIDTH for w in widths):
            raise SplitError(f"bad deconvolution widths in {spec!r}")
        act = parts[2] if len(parts) > 2 else "relu"
        c, h = act_shape[0], act_shape[1]
        ups = max(0, round(math.log2(max(1, image_shape[1] // max(1, h)))))
        layers: list[nn.Module] = []
        for i in range(ups):
            w = widths[min(i, len(widths) - 1)]
            layers += [nn.ConvTranspose2d(c, w, 4, stride=2, padding=1), _act(act)]
            c = w
        if not ups:
            w = widths[0]
            layers += [nn.Conv2d(c, w, 3, padding=1), _act(act)]
            c = w
        layers += [nn.Conv2d(c, image_shape[0], 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.net(h)
        if tuple(y.shape[2:]) != self.image_shape[1:]:
            y = nn.functional.interpolate(y, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(y)


def build_decoder(spec: str, act_shape: tuple[int, ...], image_shape: tuple[int, ...],
                  seed: int = 0) -> nn.Module:
    """A decoder from its spec string (module doc), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.startswith("deconv"):
            return DeconvDecoder(spec, tuple(act_shape), tuple(image_shape))
        return VectorDecoder(spec, tuple(act_shape), tuple(image_shape))
