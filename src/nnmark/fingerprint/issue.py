"""Issue one fingerprinted copy: a short fine-tune of the vendor's base model plus a closed-form correction.

SecureMark-DL trains every customer's copy from scratch with the projection
regulariser. Here a copy starts from the vendor's finished base model:

1. ``finetune_steps`` optimiser steps on the vendor's data with the task loss plus
   ``mu * MSE(s F - X theta)`` (:class:`~nnmark.schemes.projection.ProjectionRegularizer`),
   updating the parameters named by ``train``: ``"carrier"`` (the carrier layers'
   weights only: the issue's CPU trial, Adam at 3e-2 with mu = 2,000), ``"all"``, or
   ``"none"`` (no fine-tune);
2. with ``correct=True`` (default), the closed-form minimum-norm correction of each
   carrier (``X^+ (s F - X theta)``, the same change added to every filter), which makes
   ``X theta = s F`` exact.

Defaults: ``train="carrier"``, 45 steps, Adam 3e-2, mu = 2,000, then the correction
(the issue's CPU trial plus the correction). Measured on the mnist5k CNN
(``experiments/results/securemark/models.md``): about 4 % of the base model's training
time, test accuracy within 0.2 points of the base, the code exact. The correction alone
(``train="none"``: milliseconds) measured as faithful and as robust there; ``"all"``
(every layer moves a little, which hides the carrier from colluders who diff their
copies) at ``lr`` ~1e-4 as well. All three are benchmarked.
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
from nnmark.fingerprint.carrier import FingerprintCarrier, FingerprintError
from nnmark.schemes.layers import get_layer
from nnmark.train import TrainConfig, train

TRAIN_MODES = ("none", "carrier", "all")


@dataclass
class IssueConfig:
    """How a copy is issued (see the module doc).

    ``train``: ``"carrier"`` (default), ``"all"`` or ``"none"`` (correction only).
    ``finetune_steps``: optimiser steps of the fine-tune (default 45, the issue's trial).
    ``lr``: Adam learning rate of the fine-tune (default 3e-2 for ``"carrier"``; use ~1e-4 for ``"all"``).
    ``batch_size``: default 64. ``correct``: apply the closed-form correction last (default True).
    ``seed``: shuffling seed of the fine-tune (default 0).
    """

    train: str = "carrier"
    finetune_steps: int = 45
    lr: float = 3e-2
    batch_size: int = 64
    correct: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise FingerprintError(f"issue train mode must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        if self.train == "none" and not self.correct:
            raise FingerprintError("issuing with neither a fine-tune nor the correction would embed nothing")
        if self.finetune_steps < 0 or not self.lr > 0:
            raise FingerprintError("finetune_steps must be >= 0 and lr positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IssueConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class IssueRecord:
    """What issuing one copy did: seconds, fine-tune steps, the correction's size, the residual
    ``max |X theta / s - F|`` after issuing (0 up to float error with the correction)."""

    seconds: float
    steps: int
    correction_norm: float
    residual: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def issue_copy(base: nn.Module, fingerprint: np.ndarray, carrier: FingerprintCarrier,
               data: ImageDataset | None = None, config: IssueConfig | None = None) -> tuple[nn.Module, IssueRecord]:
    """A fingerprinted copy of ``base`` carrying ``fingerprint`` (``(carrier.dim,)``, the customer's ``F``).

    ``base`` is left untouched. ``data``: the vendor's training data, needed only when
    ``config.train != "none"``. Returns ``(copy in eval mode, record)``.
    """
    cfg = config or IssueConfig()
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
    norm = carrier.correct(model, f) if cfg.correct else 0.0
    model.eval()
    residual = float(np.max(np.abs(carrier.extract(model) - f)))
    return model, IssueRecord(time.perf_counter() - start, steps, norm, residual, cfg.to_dict())
