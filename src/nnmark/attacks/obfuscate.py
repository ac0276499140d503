"""Function-preserving obfuscation: permute and rescale hidden units.

A thief who knows that white-box marks are read in a fixed weight order can re-order every
hidden layer's units and rescale them across their ReLUs without changing a single output
(see :mod:`nnmark.alignment` for the symmetries and the chain of layers they apply to):

- :class:`Permute` (``"permute"``): a seeded uniform random permutation of every hidden layer
  (conv channels, dense units; batch-norm parameters and running statistics with them; across
  a flatten each channel moves as ``h * w`` inputs of the first dense layer);
- :class:`Rescale` (``"rescale"``): every hidden unit's pre-activation times a seeded ``s``,
  log-uniform in ``[low, high]`` (default ``[0.01, 100]``), the next layer's inputs divided by
  it; a conv followed by batch norm is scaled twice -- the norm's affine parameters by ``s``
  and the conv itself by an independent ``t`` with the norm's running statistics adjusted;
- :class:`PermuteRescale` (``"permute-rescale"``): both.

The attacks need no data and work in eval-mode semantics (batch norm with running statistics).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from nnmark.alignment import Chain, transform_units, unit_chain
from nnmark.attacks.base import SEED, Attack
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params


def _layers(chain: Chain, layers: list[str] | None) -> list[str]:
    if layers is None:
        return chain.names
    unknown = sorted(set(layers) - set(chain.names))
    if unknown:
        raise ValueError(f"not hidden layers of the model: {', '.join(unknown)} (hidden: {', '.join(chain.names)})")
    return list(layers)


def random_permutations(chain: Chain, seed: int, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """A seeded uniform random permutation ``(units,)`` for each hidden layer (default: all)."""
    rng = np.random.default_rng([int(seed), 0x5E12])
    return {link.name: rng.permutation(link.units) for link in chain.links if link.name in _layers(chain, layers)}


def random_scales(chain: Chain, seed: int, low: float, high: float, layers: list[str] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Seeded log-uniform scales in ``[low, high]`` per hidden unit: ``(post, pre)`` -- ``post`` for
    every scalable hidden layer, ``pre`` (the conv inside a conv + batch norm) for those with a norm."""
    if not 0 < low <= high:
        raise ValueError(f"scales need 0 < low <= high, got [{low}, {high}]")
    rng = np.random.default_rng([int(seed), 0x5CA1E])
    wanted = _layers(chain, layers)
    post, pre = {}, {}
    for link in chain.links:
        if link.name not in wanted:
            continue
        if link.scale_safe:
            post[link.name] = np.exp(rng.uniform(np.log(low), np.log(high), link.units))
        if link.bn:
            pre[link.name] = np.exp(rng.uniform(np.log(low), np.log(high), link.units))
    return post, pre


_LAYERS = Param("layers", list, None, "hidden layers to transform (default: every hidden layer)", optional=True,
                item=str)
_LOW = Param("low", float, 0.01, "smallest rescaling factor (log-uniform)", low=1e-12)
_HIGH = Param("high", float, 100.0, "largest rescaling factor (log-uniform)", low=1e-12)


class _UnitTransform(Attack):
    """A seeded function-preserving transform of a copy's hidden units: permutation and/or rescaling."""

    permutes: bool = False
    rescales: bool = False

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(models[0])
        chain = unit_chain(stolen)
        perms = random_permutations(chain, self.seed, self.layers) if self.permutes else None
        post = pre = None
        if self.rescales:
            post, pre = random_scales(chain, self.seed, self.low, self.high, self.layers)
        return transform_units(stolen, chain, perms=perms, post=post, pre=pre).eval()


class Permute(_UnitTransform):
    """Permute the units of every hidden layer (or of ``layers``) of a copy of the model; the function is
    unchanged."""

    name = "permute"
    PARAMS = Params(SEED, _LAYERS)
    permutes = True


class Rescale(_UnitTransform):
    """Rescale every hidden unit (or those of ``layers``) across its ReLU by a log-uniform factor in
    ``[low, high]``; the function is unchanged."""

    name = "rescale"
    PARAMS = Params(_LOW, _HIGH, SEED, _LAYERS)
    rescales = True


class PermuteRescale(_UnitTransform):
    """:class:`Permute` then :class:`Rescale` (same ``seed``, ``low``, ``high``, ``layers``)."""

    name = "permute-rescale"
    PARAMS = Params(_LOW, _HIGH, SEED, _LAYERS)
    permutes = rescales = True


@torch.no_grad()
def max_output_change(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between the outputs of ``a`` and ``b`` on ``x`` (eval mode),
    relative to the largest output of ``a``."""
    was_a, was_b = a.training, b.training
    a.eval()
    b.eval()
    try:
        ya, yb = a(x), b(x)
    finally:
        a.train(was_a)
        b.train(was_b)
    return float((ya - yb).abs().max() / ya.abs().max().clamp(min=1e-30))
