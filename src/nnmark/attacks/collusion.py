"""Collusion by weight averaging: K customers average their fingerprinted copies.

Averaging only yields a working model when the copies share their training history
(here: all are issued from one base model), which is why it is the realistic
collusion attack on fine-tune-issued fingerprints. Floating-point parameters and
buffers are averaged (optionally weighted); integer buffers (e.g. batch-norm's
``num_batches_tracked``) are taken from the first model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from nnmark.attacks.base import SEED, Attack
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params


def combine_models(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """A new model whose floating-point tensors are ``sum_i weights[i] * models[i]`` (float64 accumulation).

    The weights may be of any sign (an affine combination when they sum to 1: the framing thief's tool,
    see :mod:`nnmark.fingerprint.own`); integer buffers are taken from the first model. Raises ``ValueError``
    for an empty list, a weight count that differs from the model count, or models whose tensors differ in
    names or shapes."""
    models = list(models)
    if not models:
        raise ValueError("combining needs at least one model")
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models")
    states = [m.state_dict() for m in models]
    ref = states[0]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != ref.keys() or any(s[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"model {i} has another architecture than model 0; only copies of one model combine")
    out = {}
    for k, v in ref.items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for wi, s in zip(weights, states, strict=True):
                acc += float(wi) * s[k].double()
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone()
    combined = copy.deepcopy(models[0])
    combined.load_state_dict(out)
    return combined.eval()


def average_models(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """A new model whose floating-point tensors are the (weighted) mean of ``models``' (same architecture).

    ``weights``: non-negative, one per model, normalised to sum 1 (default: equal).
    Raises ``ValueError`` for an empty list or models whose tensors differ in names or shapes.
    """
    models = list(models)
    if not models:
        raise ValueError("averaging needs at least one model")
    if weights is None:
        w = [1.0 / len(models)] * len(models)
    else:
        if len(weights) != len(models) or any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError("weights must be non-negative, one per model, not all zero")
        total = float(sum(weights))
        w = [float(x) / total for x in weights]
    return combine_models(models, w)


class Average(Attack):
    """Average the weights of the colluders' copies: ``attack([m1, ..., mK]) -> averaged model``.

    ``data`` is ignored (chain a fine-tuning or pruning attack for "average then fine-tune");
    a single model is returned as a copy.
    """

    name = "average"
    models = (1, None)
    PARAMS = Params(
        Param("weights", list, None, "non-negative weight per copy, normalised to sum 1 (default: equal)",
              optional=True, item=float, low=0.0),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        return average_models(models, self.weights)
