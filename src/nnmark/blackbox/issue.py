"""Issue one black-box fingerprinted copy: a short fine-tune of the base model that teaches it the customer's
answers to the trigger queries.

Each Adam step (learning rate ``lr``, default 1e-3, all parameters) sees ``batch_size`` images of the vendor's
training data with their labels (default 64) beside ``trigger_batch`` triggers (default 32, drawn in turn from
a keyed shuffle) labelled ``b_i`` where the customer's codeword bit is 1 and ``a_i`` where it is 0
(:meth:`nnmark.blackbox.triggers.TriggerSet.labels_for`); the loss is the cross-entropy over the whole batch.
With ``distill > 0`` the loss adds ``distill`` times the KL divergence from the base model's class probabilities
to the copy's on the normal images of the step (the base's logits are computed once per step, no gradient): it
holds the copy's behaviour on natural inputs near the base's, which is what keeps its accuracy. The copy depends
on the customer only through its codeword: that is what makes another customer's score independent of this
copy's answers.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.blackbox.triggers import TriggerSet
from nnmark.data.dataset import ImageDataset

ISSUE_METHODS = ("finetune", "tilt")


@dataclass
class BlackBoxIssueConfig:
    """How copies are made. ``method``: ``"finetune"`` (default: this module's fine-tune) or ``"tilt"`` (a
    closed-form tilt of the output layer, :mod:`nnmark.blackbox.tilt`: no training, exact under weight
    averaging, read through scores only).

    Fine-tune: ``steps`` (default 300), ``lr`` (Adam, default 1e-3), ``batch_size`` clean images per step (64),
    ``trigger_batch`` triggers per step (32), ``distill`` weight of the KL term to the base's probabilities on the
    normal images (default 0: none), ``seed`` (the per-copy shuffling seed is derived from it and the code index).
    Tilt: ``delta`` (logit units each trigger's ``z_b - z_a`` moves, default 0.25) and ``ridge`` (default 1: the
    weight of the clean logits' change against an exact fit)."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64
    trigger_batch: int = 32
    seed: int = 0
    distill: float = 0.0
    method: str = "finetune"
    delta: float = 0.25
    ridge: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lr > 0 or self.batch_size < 1 or self.trigger_batch < 1:
            raise ValueError("steps, batch sizes must be >= 1 and lr positive")
        if not self.distill >= 0:
            raise ValueError("distill must be >= 0")
        if self.method not in ISSUE_METHODS:
            raise ValueError(f"the issue method must be one of {', '.join(ISSUE_METHODS)}, got {self.method!r}")
        if not (self.delta > 0 and np.isfinite(self.delta)) or not (self.ridge > 0 and np.isfinite(self.ridge)):
            raise ValueError("the tilt's delta and ridge must be positive and finite")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlackBoxIssueConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class BlackBoxIssueRecord:
    """What one issue did: wall-clock and CPU seconds (this process), steps, and the fraction of triggers the
    copy answers as taught."""

    seconds: float
    steps: int
    symbol_accuracy: float
    cpu_seconds: float = 0.0


def issue_blackbox_copy(base: nn.Module, triggers: TriggerSet, bits: np.ndarray, data: ImageDataset,
                        config: BlackBoxIssueConfig | None = None, shuffle_seed: int = 0
                        ) -> tuple[nn.Module, BlackBoxIssueRecord]:
    """A copy of ``base`` (left untouched) that answers the triggers by ``bits`` ``(m,)`` bool. Returns
    ``(copy in eval mode, record)``; ``shuffle_seed``: the batch order's seed (deterministic copies)."""
    cfg = config or BlackBoxIssueConfig()
    start, cpu = time.perf_counter(), time.process_time()
    model = copy.deepcopy(base)
    model.train()
    teacher = base if cfg.distill > 0 else None
    was_training = base.training
    if teacher is not None:
        teacher.eval()
    target = triggers.labels_for(bits)
    gen = torch.Generator().manual_seed(int(shuffle_seed) & ((1 << 63) - 1))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n, m = len(data), triggers.m
    perm, tperm, pos, tpos = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen), 0, 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        if tpos + cfg.trigger_batch > m:
            tperm, tpos = torch.randperm(m, generator=gen), 0
        i = perm[pos:pos + cfg.batch_size]
        j = tperm[tpos:tpos + cfg.trigger_batch]
        pos, tpos = pos + cfg.batch_size, tpos + cfg.trigger_batch
        x = torch.cat([data.x[i], triggers.x[j]])
        y = torch.cat([data.y[i], target[j]])
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                ref = F.log_softmax(teacher(data.x[i]), 1)
            loss = loss + cfg.distill * F.kl_div(F.log_softmax(logits[:len(i)], 1), ref, log_target=True,
                                                 reduction="batchmean")
        loss.backward()
        opt.step()
    model.eval()
    if teacher is not None and was_training:
        base.train()
    with torch.no_grad():
        got = torch.cat([model(triggers.x[k:k + 512]).argmax(1) for k in range(0, m, 512)])
    acc = float((got == target).float().mean())
    return model, BlackBoxIssueRecord(time.perf_counter() - start, cfg.steps, acc, time.process_time() - cpu)
