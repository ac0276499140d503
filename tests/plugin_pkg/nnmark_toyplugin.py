"""A third-party nnmark plugin in one file: a scheme (``sign-mark``) and an attack (``weight-noise``).

``SignMark`` writes a keyed message into the signs of keyed carrier values of one layer (a hinge
regulariser pushes each selected value past a margin on its bit's side) and reads it back with the
binomial bit-match test of :class:`nnmark.schemes.layers.WhiteBoxScheme`. ``WeightNoise`` adds
Gaussian noise of a relative size to every conv/linear weight. Both declare their parameters, so
``nnmark schemes``, ``nnmark embed --scheme sign-mark --param ...`` and ``nnmark attack --attack
weight-noise`` work for them exactly as for nnmark's own.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.attacks.base import SEED, Attack
from nnmark.params import Param, Params
from nnmark.schemes.layers import LAYER, WhiteBoxScheme, carrier_width, default_layer, unwrap
from nnmark.schemes.uchida import RegularizerHook


class SignMark(WhiteBoxScheme):
    """Message bits in the signs of keyed carrier values (a toy plugin scheme)."""

    name = "sign-mark"
    PARAMS = Params(LAYER, Param("bits", int, 32, "message length (at most the carrier width)", low=1),
                    Param("margin", float, 0.02, "how far past zero each selected value is pushed", low=0.0),
                    Param("strength", float, 10.0, "weight of the hinge regulariser", low=0.0))

    def __init__(self, key: Any, *, layer: str, bits: int, width: int, margin: float = 0.02,
                 strength: float = 10.0, reduce: str = "auto", strict_capacity: bool = True) -> None:
        super().__init__(key, layer=layer, bits=bits, width=width, reduce=reduce, strict_capacity=strict_capacity)
        self.margin, self.strength = float(margin), float(strength)
        self.positions = torch.from_numpy(self.key.numpy_rng("sign-mark/positions").permutation(width)[:bits])

    @classmethod
    def build(cls, key: Any, model: nn.Module, data: Any = None, *, layer: str | None, bits: int, margin: float,
              strength: float) -> SignMark:
        layer = layer or default_layer(model)
        scheme = cls(key, layer=layer, bits=bits, width=carrier_width(model, layer), margin=margin,
                     strength=strength)
        scheme.remember_model(model)
        return scheme

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        c = self.carrier(unwrap(model))[self.positions]
        sign = torch.from_numpy(2.0 * self.message - 1.0).to(c.dtype)
        return self.strength * torch.relu(self.margin - sign * c).sum()

    def training_hook(self) -> RegularizerHook:
        return RegularizerHook(self)

    @torch.no_grad()
    def extract(self, model: nn.Module) -> np.ndarray:
        self.check_model(model)
        return (self.carrier(unwrap(model))[self.positions] > 0).numpy().astype(np.int64)

    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": self.bits, "width": self.width, "margin": self.margin,
                "strength": self.strength, "reduce": self.reduce, "strict_capacity": self.strict_capacity}

    @classmethod
    def from_params(cls, key: Any, params: dict[str, Any], material: dict[str, torch.Tensor]) -> SignMark:
        return cls(key, **params)


class WeightNoise(Attack):
    """Add Gaussian noise, ``sigma`` times each weight tensor's RMS, to every conv/linear weight."""

    name = "weight-noise"
    PARAMS = Params(Param("sigma", float, 0.1, "noise std relative to each weight tensor's RMS", low=0.0), SEED)

    def run(self, models: list[nn.Module], data: Any) -> nn.Module:
        out = copy.deepcopy(models[0])
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for mod in out.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    w = mod.weight
                    w.add_(self.sigma * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=gen))
        return out.eval()
