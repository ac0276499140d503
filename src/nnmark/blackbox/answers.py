"""Read a suspect's answers to the trigger queries as answer weights ``w`` in ``[-1, 1]`` (one per trigger).

An API that shows only labels gives *hard* answers: ``w = +1`` when it answers the trigger's keyed label ``b``,
``-1`` for ``a`` and ``0`` for anything else (:func:`nnmark.codes.tardos.hard_weights`). An API that shows class
probabilities or logits gives *soft* answers: with ``d = log P(b) - log P(a)`` (the logit difference of ``b``
over ``a``, whatever the other classes get),

    ``w = tanh(d / (2 T))``   (``T`` = :data:`DEFAULT_TEMPERATURE` = 2; ``T = 1``: ``(P(b) - P(a)) / (P(b) + P(a))``).

A weight average of ``c`` copies answers with a logit difference near the mean of its members' (the short
fine-tunes stay close to the base), so ``d`` carries the *fraction* of the coalition whose codeword bit is 1 --
which the arg-max label throws away. Measured on mnist5k copies at m = 256: averages of two reach colluder
p-values of 1e-8 to 1e-14 soft against 1e-4 to 1e-9 hard (experiments/results/blackbox/README.md).

Validity does not depend on how the weights are read: under ``H0_u`` customer ``u``'s codeword is independent
of *everything* the suspect answered, so any function of the answers (these weights, the choice between
probabilities and logits, ``T``) leaves the null law of :mod:`nnmark.blackbox.null` exact. A lying API that
returns crafted numbers can make the evidence against its own colluders weaker, never the evidence against an
innocent stronger. Rows that are not finite score 0.

:class:`ProbabilityOracle` wraps a local model as an API that shows its softmax probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.codes.tardos import hard_weights
from nnmark.errors import NNMarkError
from nnmark.oracle import QueryBudgetExceeded

DEFAULT_TEMPERATURE = 2.0
ANSWER_MODES = ("auto", "labels")
TINY = 1e-300


def is_scores(out: Any) -> bool:
    """Whether an oracle's output holds one score row per image (``(N, K)``, ``K >= 2``, floating point)."""
    arr = out if isinstance(out, np.ndarray | torch.Tensor) else np.asarray(out)
    return arr.ndim == 2 and arr.shape[1] >= 2 and (arr.dtype.is_floating_point if isinstance(arr, torch.Tensor)
                                                    else arr.dtype.kind == "f")


def log_odds(scores: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d, is_probability)`` for score rows ``scores`` ``(N, K)``: ``d = log P(b) - log P(a)`` ``(N,)`` (rows
    in [0, 1] summing to 1 within 1e-3 are probabilities, others logits), and which rows read as probabilities.
    Non-finite rows give ``d = 0``."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(a):
        raise NNMarkError(f"{s.shape[0] if s.ndim else 0} score rows for {len(a)} triggers")
    if s.shape[1] <= max(int(np.max(a, initial=0)), int(np.max(b, initial=0))):
        raise NNMarkError(f"score rows of {s.shape[1]} classes cannot hold the keyed labels")
    finite = np.isfinite(s).all(1)
    s = np.where(finite[:, None], s, 0.0)
    rows = np.arange(len(a))
    sa, sb = s[rows, a], s[rows, b]
    prob = (s.min(1) >= 0) & (s.max(1) <= 1) & (np.abs(s.sum(1) - 1) <= 1e-3)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(prob, np.log(np.maximum(sb, TINY)) - np.log(np.maximum(sa, TINY)), sb - sa)
    return np.where(finite & np.isfinite(d), d, 0.0), prob & finite


def answer_weights(out: Any, a: np.ndarray, b: np.ndarray, mode: str = "auto",
                   temperature: float = DEFAULT_TEMPERATURE, reference: np.ndarray | None = None
                   ) -> tuple[np.ndarray, str]:
    """Weights ``(N,)`` float64 in [-1, 1] of an oracle's output for triggers with keyed labels ``a``, ``b``
    ``(N,)``, and how they were read: ``"labels"`` (hard: labels given, or ``mode="labels"``), ``"probabilities"``
    or ``"logits"`` (soft, module doc; ``"mixed"`` if rows of both kinds came). ``reference`` ``(N,)``: logit
    differences subtracted before the ``tanh`` (soft answers only; e.g. the base's own, which a tilted copy moves
    by ``+- delta``: :mod:`nnmark.blackbox.tilt`); a constant of the key and the base, so the null is unchanged."""
    if mode not in ANSWER_MODES:
        raise NNMarkError(f"answers must be one of {', '.join(ANSWER_MODES)}, got {mode!r}")
    if not temperature > 0:
        raise NNMarkError("the temperature must be positive")
    arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if is_scores(arr):
        if mode == "labels":
            arr = np.where(np.isfinite(arr).all(1), np.nan_to_num(arr).argmax(1), -1)
        else:
            d, prob = log_odds(arr, a, b)
            kind = "probabilities" if prob.all() else ("logits" if not prob.any() else "mixed")
            if reference is not None:
                ref = np.asarray(reference, dtype=np.float64).ravel()
                if ref.shape != d.shape:
                    raise NNMarkError(f"{ref.size} reference values for {d.size} answers")
                d = np.where(d != 0.0, d - ref, 0.0)  # unusable rows (scored 0) stay unusable
            return np.tanh(d / (2.0 * temperature)), kind
    labels = np.asarray(arr).reshape(-1)
    if labels.shape != a.shape:
        raise NNMarkError(f"{labels.size} answers for {a.size} triggers")
    labels = labels.astype(np.int64)
    return hard_weights(np.where(labels == b, 1, np.where(labels == a, 0, -1))), "labels"


def base_reference(model: nn.Module, triggers: Any, batch: int = 512) -> np.ndarray:
    """A model's own logit differences ``d = z_b - z_a`` ``(m,)`` float64 on ``triggers`` (a
    :class:`~nnmark.blackbox.triggers.TriggerSet`), in eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        z = torch.cat([model(triggers.x[i:i + batch]).double() for i in range(0, triggers.m, batch)]).numpy()
    model.train(was)
    rows = np.arange(len(z))
    return z[rows, np.asarray(triggers.b)] - z[rows, np.asarray(triggers.a)]


class ProbabilityOracle:
    """A local model as an API that shows its class probabilities: images ``(N, C, H, W)`` -> softmax
    ``(N, K)`` float32; counts ``queries_used`` and refuses to exceed ``budget`` (images)."""

    def __init__(self, model: nn.Module, budget: int | None = None) -> None:
        self.model = model.eval()
        self.budget = budget
        self.queries_used = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.budget is not None and self.queries_used + len(x) > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} images exceeded ({self.queries_used} used)")
        self.queries_used += len(x)
        return torch.softmax(self.model(x).float(), 1)
