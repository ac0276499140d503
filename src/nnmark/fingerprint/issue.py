"""Issue one fingerprinted copy: a closed-form correction of the base model (optionally after a short fine-tune).

SecureMark-DL trains every customer's copy from scratch with the projection
regulariser. Here a copy starts from the vendor's finished base model:

1. optionally, ``finetune_steps`` optimiser steps on the vendor's data with the task loss plus
   ``mu * MSE(s F - X theta)`` (:class:`~nnmark.schemes.projection.ProjectionRegularizer`),
   updating the parameters named by ``train``: ``"carrier"`` (the carrier layers'
   weights only: the issue's CPU trial, Adam at 3e-2 with mu = 2,000), ``"all"``, or
   ``"none"`` (no fine-tune: the default);
2. with ``correct=True`` (default), a closed-form change of each carrier that makes
   ``X theta = s F`` exact, the same change added to every filter:

   - ``correction="activation"`` (default): the change ``delta`` minimising
     ``delta^T (A + 0.1 tr(A)/w I) delta`` subject to ``X delta = r``, where ``A`` is the second
     moment of the layer's input patches on the vendor's data (2,000 images), restricted to the
     directions those inputs excite (:func:`~nnmark.fingerprint.carrier.activation_metric`). Adding
     ``delta`` to a filter changes its output by ``delta . patch``, so this is the exact change the
     layer's outputs feel least -- and, because fine-tuning gradients of a conv weight are sums of
     ``grad_out x patch``, also the change fine-tuning pushes on least;
   - ``correction="min-norm"``: ``X^+ r`` (the smallest weight change).

   The correction map is linear and depends only on the base model and the data, so the
   weight average of copies carries the average of their fingerprints exactly -- and any combination of
   copies with weights summing to 1 carries the same combination of their codes (a frame of an innocent);
3. the customer's own secret component (:mod:`nnmark.fingerprint.own`, given as ``own_component``) is added
   last: a keyed random direction in the carrier layers that the code read-out does not see (zero filter
   mean), so the code stays exact and the tracer can ask for evidence of that customer's own copy.

Measured on the mnist5k CNN, (121,11,1) code (``experiments/results/securemark/README.md``):
the activation correction alone leaves every copy's test accuracy at the base's (16 of 16
copies at 0.9750 = base), while the minimum-norm correction after the 45-step fine-tune
(the previous default) cost 0.3 points on average and up to 0.7; after averaging 8-10 copies
and fine-tuning the average, the fingerprint's coefficient noise was about half (0.017 vs
0.035 relative to the +-1 levels). Issuing costs well under a second per copy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.fingerprint.carrier import FingerprintCarrier, FingerprintError, activation_metric
from nnmark.schemes.layers import get_layer
from nnmark.train import TrainConfig, train

TRAIN_MODES = ("none", "carrier", "all")
CORRECTIONS = ("activation", "min-norm")


@dataclass
class IssueConfig:
    """How a copy is issued (see the module doc).

    ``train``: ``"none"`` (default: correction only), ``"carrier"`` or ``"all"``.
    ``finetune_steps``: optimiser steps of the fine-tune (default 45, the issue's trial).
    ``lr``: Adam learning rate of the fine-tune (default 3e-2 for ``"carrier"``; use ~1e-4 for ``"all"``).
    ``batch_size``: default 64. ``correct``: apply the closed-form correction last (default True).
    ``seed``: shuffling seed of the fine-tune (default 0).
    ``correction``: ``"activation"`` (default) or ``"min-norm"`` (module doc).
    ``metric_images``: training images used to measure the activation metric (default 2,000).
    """

    train: str = "none"
    finetune_steps: int = 45
    lr: float = 3e-2
    batch_size: int = 64
    correct: bool = True
    seed: int = 0
    correction: str = "activation"
    metric_images: int = 2000

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise FingerprintError(f"issue train mode must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.train == "none" and not self.correct:
            raise FingerprintError("issuing with neither a fine-tune nor the correction would embed nothing")
        if self.finetune_steps < 0 or not self.lr > 0:
            raise FingerprintError("finetune_steps must be >= 0 and lr positive")
        if self.correction not in CORRECTIONS:
            raise FingerprintError(f"correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IssueConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class IssueRecord:
    """What issuing one copy did: seconds, fine-tune steps, the correction's size, the residual
    ``max |X theta / s - F|`` after issuing (0 up to float error with the correction), and the norm of the
    customer's own component added (0 without one)."""

    seconds: float
    steps: int
    correction_norm: float
    residual: float
    config: dict[str, Any] = field(default_factory=dict)
    own_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def correction_metrics(base: nn.Module, carrier: FingerprintCarrier, data: ImageDataset | None,
                       config: IssueConfig | None = None) -> dict[str, torch.Tensor] | None:
    """The per-layer metrics of the ``"activation"`` correction (:func:`~nnmark.fingerprint.carrier.activation_metric`),
    measured on the base model and the first ``config.metric_images`` training images; ``None`` for the
    ``"min-norm"`` correction or without data. Depends only on the base and the data, so every copy of a
    product gets the same linear correction map (averages of copies stay averages of fingerprints)."""
    cfg = config or IssueConfig()
    if cfg.correction != "activation" or data is None or len(data) == 0:
        return None
    images = data.x[: cfg.metric_images]
    out = {}
    for name, _a, _b in carrier.chunks:
        m = activation_metric(base, name, images)
        if m is not None:
            out[name] = m
    return out


def issue_copy(base: nn.Module, fingerprint: np.ndarray, carrier: FingerprintCarrier,
               data: ImageDataset | None = None, config: IssueConfig | None = None,
               metrics: dict[str, torch.Tensor] | None = None,
               own_component: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, IssueRecord]:
    """A fingerprinted copy of ``base`` carrying ``fingerprint`` (``(carrier.dim,)``, the customer's ``F``).

    ``base`` is left untouched. ``data``: the vendor's training data, needed when
    ``config.train != "none"`` and for the ``"activation"`` correction (without data that correction
    falls back to the minimum-norm one). ``metrics``: precomputed :func:`correction_metrics` (computed
    here when not given). ``own_component``: ``{layer: D}`` added to those layers' weights after the correction
    (:meth:`nnmark.fingerprint.own.OwnComponents.component`; it leaves the code read-out unchanged). Returns
    ``(copy in eval mode, record)``.
    """
    cfg = config or IssueConfig()
    if cfg.correct and metrics is None:
        metrics = correction_metrics(base, carrier, data, cfg)
    f = np.asarray(fingerprint, dtype=np.float64).ravel()
    start = time.perf_counter()
    model = copy.deepcopy(base)
    carrier.check_model(model)
    steps = 0
    if cfg.train != "none" and cfg.finetune_steps > 0:
        if data is None or len(data) == 0:
            raise FingerprintError("issuing with a fine-tune needs the vendor's training data")
        regs = carrier.regularisers(f, model)
        params: Sequence[torch.nn.Parameter]
        if cfg.train == "carrier":
            params = [get_layer(model, r.layer).weight for r in regs]
        else:
            params = list(model.parameters())
        tc = TrainConfig(epochs=10**6, batch_size=cfg.batch_size, lr=cfg.lr, max_steps=cfg.finetune_steps,
                         seed=cfg.seed, progress=False)
        rec = train(model, data, tc, hooks=[r.training_hook() for r in regs], params=params,
                    description="issue fingerprint")
        steps = rec.steps
    norm = carrier.correct(model, f, metrics) if cfg.correct else 0.0
    own_norm = 0.0
    if own_component:
        with torch.no_grad():
            for name, d in own_component.items():
                w = get_layer(model, name).weight
                w.add_(d.to(w.dtype).view(w.shape))
                own_norm += float(d.double().pow(2).sum())
    model.eval()
    residual = float(np.max(np.abs(carrier.extract(model) - f)))
    return model, IssueRecord(time.perf_counter() - start, steps, norm, residual, cfg.to_dict(), own_norm ** 0.5)
