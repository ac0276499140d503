"""Trace a suspect through its prediction API alone: ask the keyed trigger queries, score every codeword, name
the customers whose exact p-value passes a Bonferroni gate, with sequential looks.

Procedure (:func:`trace_oracle`): the triggers are asked in the key's order (:attr:`TriggerSet.order`), in
*looks* at ``n_1 < n_2 < ... < n_K`` queries (default: 32, 64, 128, ... doubling, and the budget). At look
``k`` every code ``u`` of the code's capacity ``N`` gets its score over the ``n_k`` answers so far and the exact
p-value ``p_u(n_k)`` of :mod:`nnmark.blackbox.null` (valid given the biases and those answers whatever the
suspect did, when ``u``'s copy was not used). Answers are read by :mod:`nnmark.blackbox.answers`: an oracle that
returns score rows ``(N, K)`` (probabilities or logits) gives soft answer weights, one that returns labels hard
ones; the report says which (``answers_read``). A customer is named at the first look where
``p_u(n_k) <= alpha / (K N)``.

Guarantee (alpha spending by Bonferroni over looks and codes): for each innocent ``u``,
``P[named] <= sum_k P[p_u(n_k) <= alpha / (K N)] <= alpha / N``, and over the whole registry
``P[any innocent named] <= alpha``. The bound holds for *any* stopping rule that only reads these p-values,
so the tracer may stop at the first look that names someone (``stop="first"``, the default) or use the whole
budget (``stop="budget"``). Each verdict reports ``p_value = min_k K p_u(n_k)`` (capped at 1), itself a valid
p-value, so ``named`` is ``p_value <= alpha / N``. A suspect that refuses, randomises or answers anything but
the two keyed labels gets those symbols scored 0 (unusable), which can only weaken the evidence.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from nnmark.blackbox.answers import DEFAULT_TEMPERATURE, answer_weights
from nnmark.blackbox.null import NULL_HYPOTHESIS, ScoreNull
from nnmark.blackbox.triggers import TriggerSet
from nnmark.codes.tardos import TardosCode
from nnmark.errors import NNMarkError

DEFAULT_ALPHA = 1e-6
FIRST_LOOK = 32
STOPS = ("first", "budget")

DECISION_RULE = (
    "the triggers are asked in the key's order in K looks; a customer u is named at the first look k whose exact "
    "p-value p_u(n_k) (its Tardos score's null distribution given the biases and the answers so far) is "
    "<= alpha / (K N), N the code's capacity: the probability of naming any customer whose copy was not used is "
    "at most alpha (Bonferroni over the K looks and the N codes), whatever the suspect answered and whenever the "
    "tracer stopped; p_value = min_k K p_u(n_k)")


def look_schedule(budget: int, first: int = FIRST_LOOK) -> list[int]:
    """Query counts of the looks: ``first, 2 first, 4 first, ...`` below ``budget``, then ``budget``."""
    if budget < 1:
        raise NNMarkError("the query budget must be >= 1")
    out, n = [], max(1, int(first))
    while n < budget:
        out.append(n)
        n *= 2
    return [*out, int(budget)]


@dataclass
class CustomerVerdict:
    """One customer's verdict: ``named``, its ``p_value`` (valid under ``H0_u``, adjusted for the looks), the
    final ``score``, and ``queries`` (how many had been asked at the look that named it; ``None``: not named)."""

    customer: str | None
    code: int
    named: bool
    p_value: float
    score: float
    queries: int | None = None


@dataclass
class BlackBoxTraceReport:
    """The result of tracing a suspect through its API (JSON-able via :meth:`to_dict`).

    ``status``: ``"accused"`` (customers named), ``"unissued-code"`` (only codes no customer holds pass the
    gate: reported, nobody named), or ``"not-named"``. ``named``: the named customers' verdicts.
    ``suspects``: the ``top`` other lowest p-values (never accusations). ``queries_used``: queries asked.
    ``answers``: counts of answers leaning to ``b`` (weight > 0), to ``a`` (< 0) and unusable (0).
    ``answers_read``: ``"labels"`` (hard), ``"probabilities"``, ``"logits"`` or ``"mixed"`` (soft; several kinds
    over the batches: joined by ``+``). ``level``: ``alpha / (K N)``.
    ``min_p_not_named``: the smallest p-value among the codes not named (how close the next one came).
    """

    status: str
    named: list[CustomerVerdict]
    suspects: list[CustomerVerdict]
    queries_used: int
    looks: list[int]
    alpha: float
    level: float
    n_codes: int
    answers: dict[str, int]
    seconds: float
    min_p_not_named: float = 1.0
    answers_read: str = "labels"
    null_hypothesis: str = NULL_HYPOTHESIS
    decision_rule: str = DECISION_RULE
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def named_customers(self) -> list[str]:
        return [v.customer for v in self.named if v.customer is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trace_oracle(oracle: Any, code: TardosCode, triggers: TriggerSet, *, holders: Mapping[int, str] | None = None,
                 alpha: float = DEFAULT_ALPHA, budget: int | None = None, looks: Sequence[int] | None = None,
                 stop: str = "first", top: int = 5, batch: int = 64, answers: str = "auto",
                 temperature: float = DEFAULT_TEMPERATURE, reference: np.ndarray | None = None
                 ) -> BlackBoxTraceReport:
    """Trace the suspect behind ``oracle`` (images ``(N, C, H, W)`` -> labels ``(N,)`` or score rows ``(N, K)``;
    e.g. :class:`~nnmark.oracle.LocalOracle`, :class:`~nnmark.blackbox.answers.ProbabilityOracle` or
    :class:`~nnmark.serving.client.HTTPOracle`).

    ``holders``: ``{code index: customer}`` (default: none: codes are reported by index only and nobody is
    named). ``budget``: most trigger queries (default: all ``m``). ``looks``: query counts of the looks
    (default :func:`look_schedule`); ``stop``: ``"first"`` or ``"budget"`` (module doc). ``batch``: images
    per request. ``answers``: ``"auto"`` (soft when the oracle gives score rows, else hard) or ``"labels"``
    (always the arg-max); ``temperature``: of the soft weights (:mod:`nnmark.blackbox.answers`); ``reference``
    ``(m,)``: logit differences subtracted from soft answers (tilted products: the base's). Returns a
    :class:`BlackBoxTraceReport`.
    """
    if stop not in STOPS:
        raise NNMarkError(f"stop must be one of {', '.join(STOPS)}, got {stop!r}")
    if not 0 < alpha < 1:
        raise NNMarkError(f"alpha must lie in (0, 1), got {alpha}")
    if triggers.m != code.m:
        raise NNMarkError(f"{triggers.m} triggers for a code of length {code.m}")
    if reference is not None and np.shape(reference) != (code.m,):
        raise NNMarkError(f"a reference of shape {np.shape(reference)} for {code.m} triggers")
    holders = dict(holders or {})
    budget = code.m if budget is None else min(int(budget), code.m)
    schedule = sorted({int(n) for n in (looks if looks is not None else look_schedule(budget))})
    if not schedule or schedule[0] < 1 or schedule[-1] > budget:
        raise NNMarkError(f"looks must lie in [1, {budget}]")
    n_looks, n_codes = len(schedule), code.n_codes
    level = alpha / (n_looks * n_codes)
    start = time.perf_counter()
    weights = np.zeros(code.m)  # answer weights in [-1, 1] of the triggers asked so far
    kinds: list[str] = []
    asked = 0
    best = np.ones(n_codes)  # min over looks of K p_u(n_k)
    named_at: dict[int, int] = {}
    scores = np.zeros(n_codes)
    for n in schedule:
        while asked < n:
            pos = triggers.order[asked:min(n, asked + batch)]
            out = oracle(triggers.x[torch.from_numpy(pos)])
            weights[pos], kind = answer_weights(out, triggers.a[pos], triggers.b[pos], answers, temperature,
                                                None if reference is None else np.asarray(reference)[pos])
            if kind not in kinds:
                kinds.append(kind)
            asked += len(pos)
        pos = triggers.order[:n]
        w = weights[pos]
        scores = code.scores(weights=w, symbols=pos)
        p = ScoreNull(code.biases[pos], weights=w).p_value(scores)
        best = np.minimum(best, np.minimum(1.0, n_looks * p))
        for u in np.nonzero(p <= level)[0]:
            named_at.setdefault(int(u), n)
        if stop == "first" and any(u in holders for u in named_at):
            break
    w_all = weights[triggers.order[:asked]]
    counts = {"b": int((w_all > 0).sum()), "a": int((w_all < 0).sum()), "unusable": int((w_all == 0).sum())}

    def verdict(u: int) -> CustomerVerdict:
        return CustomerVerdict(holders.get(u), u, u in named_at and u in holders, float(best[u]), float(scores[u]),
                               named_at.get(u))

    named = sorted((verdict(u) for u in named_at if u in holders), key=lambda v: v.p_value)
    unissued = [u for u in named_at if u not in holders]
    rest = [int(u) for u in np.argsort(best) if int(u) not in named_at][:top]
    status = "accused" if named else ("unissued-code" if unissued else "not-named")
    not_named = np.ones(n_codes, dtype=bool)
    not_named[list(named_at)] = False
    used_looks = [n for n in schedule if n < asked] + [asked]
    return BlackBoxTraceReport(
        status, named, [verdict(u) for u in rest], asked, used_looks, alpha, level, n_codes, counts,
        time.perf_counter() - start, float(best[not_named].min()) if not_named.any() else 1.0,
        "+".join(kinds) or "labels",
        evidence={"unissued_codes_passing": unissued, "code": code.params(), "noise": triggers.noise,
                  "schedule": schedule, "temperature": temperature if kinds != ["labels"] else None,
                  "reference": "base logit differences subtracted" if reference is not None else None})
