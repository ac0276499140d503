"""Uchida et al. 2017 ("Embedding watermarks into deep neural networks"): a bit
string hidden in one layer's weights by a regulariser.

The carrier ``c`` of the chosen layer (the filter mean of a conv weight, the
flattened weight of a linear layer; see :mod:`nnmark.schemes.layers`) is read out
by a secret matrix ``X`` ``(bits, width)``; the extracted bit ``i`` is
``[X c]_i > 0``, i.e. ``sigmoid(X c) > 1/2``. During training the host loss gets

    strength * BCE(sigmoid(X c), m)

with the message ``m`` drawn from the key. Everything (``X``, ``m``) is derived
from the key, so the key file holds no tensors.

Matrices (``variant``), as in Uchida et al. §4:

- ``"random"`` (default): ``X_ij ~ N(0, 1)`` over all carrier values;
- ``"direct"``: each row is one-hot -- bit ``i`` is the sign of one keyed carrier
  value (distinct for each bit);
- ``"diff"``: each row is the difference of two one-hot rows -- bit ``i`` is the
  sign of ``c_a - c_b`` (keyed pairs along a random path, so every sign pattern is
  reachable; needs ``bits < width``).

Loss reduction (``reduction``): the paper *sums* the bit-wise BCE over the ``l``
bits (``"sum"``, the default here); a mean over bits (``"mean"``, the form of Wang
et al.'s Eq. 1) is ``1/l`` as strong for the same ``strength``. With
``reduction="mean"`` multiply the strength by ``l`` to get the same pull.

Default strength (:meth:`Uchida.create`), with the summed loss: ``0.01`` (the
paper's value) on a conv layer's filter-mean carrier, ``0.05`` on a flattened
(linear-layer) carrier. Measured with 512 bits, 10 epochs (``experiments/results/wang``):
the MLP head's 640 weights on digits-28 reach BER 0 at 0.05; the CNN's 576 conv4
filter means on mnist5k reach BER 0 (one bit of 512 wrong on one of three seeds) at
0.01 with accuracy 0.17 points below clean (mean of 3 seeds), while 0.02 and 0.05 cost
0.6 points -- the summed pull grows the filter means (histogram correlation with
clean 0.25 at 0.05) for no gain in robustness (FTAL: BER 0 at every strength).

In your own PyTorch loop::

    scheme = Uchida.create(key, model, layer="head", bits=512)     # parameters as declared in PARAMS
    hook = scheme.training_hook()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + hook.loss(model)
        opt.zero_grad(); loss.backward(); opt.step()
    hook.finalize(model)                      # records the unit signature (alignment) in the scheme
    scheme.save("owner.key", model_file="marked.safetensors")   # writes the key and commits it
    print(scheme.verify(model).summary())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.params import Param, Params
from nnmark.schemes.layers import (
    BITS,
    LAYER,
    REDUCE,
    STRICT,
    WhiteBoxScheme,
    carrier_width,
    default_layer,
    get_layer,
    resolve_reduce,
    unwrap,
)
from nnmark.train import TrainingHook

VARIANTS = ("random", "direct", "diff")
STRENGTH_FLAT, STRENGTH_FILTER_MEAN = 0.05, 0.01


def default_strength(model: nn.Module, layer: str, reduce: str = "auto") -> float:
    """Default ``lambda`` for ``layer`` of ``model``: 0.01 for a conv filter-mean
    carrier, 0.05 otherwise (see the module docs for the measurements)."""
    mod = get_layer(model, layer)
    return STRENGTH_FILTER_MEAN if resolve_reduce(mod, reduce) == "mean" and not isinstance(mod, nn.Linear) \
        else STRENGTH_FLAT
LOSS_REDUCTIONS = ("sum", "mean")


class RegularizerHook(TrainingHook):
    """A training hook that adds ``scheme.regularizer(model)`` to the task loss."""

    def __init__(self, scheme: Any) -> None:
        self.scheme = scheme

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.scheme.regularizer(model)

    def finalize(self, model: nn.Module) -> None:
        """Record the finished marked model's unit signature in the scheme (its key file's reference)."""
        self.scheme.remember_reference(unwrap(model))


class Uchida(WhiteBoxScheme):
    """Uchida et al.'s weight regulariser watermark.

    Parameters
    ----------
    key: the owner's key (derives ``X`` and the message).
    layer: name of the conv / linear layer that carries the mark.
    bits: message length ``l`` (at most the carrier width; ``"diff"``: below it).
    width: number of carrier values of the layer (set by :meth:`create`).
    strength: ``lambda``, the weight of the regulariser (no default here; :meth:`create` takes
        :func:`default_strength` of the layer: 0.01 for a conv filter-mean carrier, 0.05 otherwise).
    reduction: ``"sum"`` (paper, default) or ``"mean"`` over the bits.
    variant: ``"random"`` (default), ``"direct"`` or ``"diff"`` (see module docs).
    reduce: carrier, ``"auto"`` / ``"mean"`` / ``"flat"`` (see :mod:`~nnmark.schemes.layers`).
    strict_capacity: refuse messages longer than the carrier (default); ``False``
        allows them for capacity experiments (the verdict's null stays exact, the
        message just cannot be embedded whole).
    """

    name = "uchida"
    PARAMS = Params(
        LAYER, BITS,
        Param("strength", float, None, "lambda, the regulariser's weight (default: 0.01 on a conv filter-mean "
              "carrier, 0.05 on flat ones)", optional=True, low=0.0),
        Param("reduction", str, "sum", "BCE summed over the bits (the paper's) or averaged", choices=LOSS_REDUCTIONS),
        Param("variant", str, "random", "read-out matrix: random N(0,1), direct (one weight a bit), diff (pairs)",
              choices=VARIANTS),
        REDUCE, STRICT,
    )

    def __init__(self, key: Key, *, layer: str, bits: int, width: int, strength: float,
                 reduction: str = "sum", variant: str = "random", reduce: str = "auto",
                 strict_capacity: bool = True) -> None:
        super().__init__(key, layer=layer, bits=bits, width=width, reduce=reduce, strict_capacity=strict_capacity)
        if variant not in VARIANTS:
            raise SchemeError(f"Uchida matrix variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if reduction not in LOSS_REDUCTIONS:
            raise SchemeError(f"loss reduction must be 'sum' or 'mean', got {reduction!r}")
        if variant == "diff" and self.bits >= self.width and strict_capacity:
            raise SchemeError(f"the 'diff' matrix needs fewer bits than carrier values ({self.width}); "
                              f"got {self.bits}")
        if not float(strength) > 0:
            raise SchemeError("strength must be positive")
        self.strength = float(strength)
        self.reduction = reduction
        self.variant = variant
        self.X = self._matrix()
        self._target = torch.from_numpy(self.message).float()

    @classmethod
    def build(cls, key: Key, model: nn.Module, data: Any = None, *, layer: str | None, bits: int,
              strength: float | None, reduction: str, variant: str, reduce: str, strict_capacity: bool) -> Uchida:
        """Build for host ``model`` from parsed :attr:`PARAMS` (see :meth:`Scheme.create`)."""
        layer = layer or default_layer(model)
        get_layer(model, layer)
        width = carrier_width(model, layer, reduce)
        if strength is None:
            strength = default_strength(model, layer, reduce)
        scheme = cls(key, layer=layer, bits=bits, width=width, strength=strength, reduction=reduction,
                     variant=variant, reduce=reduce, strict_capacity=strict_capacity)
        scheme.remember_model(model)
        return scheme

    def _matrix(self) -> torch.Tensor:
        l, w = self.bits, self.width
        purpose = f"{self.name}/X/{self.variant}"
        if self.variant == "random":
            return torch.randn(l, w, generator=self.key.torch_generator(purpose))
        perm = torch.from_numpy(self.key.numpy_rng(purpose).permutation(w))
        X = torch.zeros(l, w)
        rows = torch.arange(l)
        X[rows, perm[:l]] = 1.0
        if self.variant == "diff":
            X[rows, perm[1 : l + 1]] = -1.0
        return X

    # -- embedding ------------------------------------------------------------------
    def logits(self, model: nn.Module) -> torch.Tensor:
        """``X c`` ``(bits,)`` for ``model`` (differentiable)."""
        c = self.carrier(model)
        return self.X.to(c.device, c.dtype) @ c

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """``strength * BCE(sigmoid(X c), m)``, summed or averaged over the bits."""
        z = self.logits(unwrap(model))
        return self.strength * F.binary_cross_entropy_with_logits(
            z, self._target.to(z.device, z.dtype), reduction=self.reduction)

    def training_hook(self) -> TrainingHook:
        return RegularizerHook(self)

    # -- extraction -----------------------------------------------------------------
    @torch.no_grad()
    def extract(self, model: nn.Module) -> np.ndarray:
        """Bits ``[X c > 0]`` of ``model`` (``(bits,)`` 0/1 int64)."""
        self.check_model(model)
        return (self.logits(unwrap(model)) > 0).cpu().numpy().astype(np.int64)

    # -- persistence ----------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": self.bits, "width": self.width, "strength": self.strength,
                "reduction": self.reduction, "variant": self.variant, "reduce": self.reduce,
                "strict_capacity": self.strict_capacity}

    @classmethod
    def from_params(cls, key: Key, params: dict[str, Any], material: dict[str, torch.Tensor]) -> Uchida:
        return cls(key, **params)
