"""Verdicts and the statistical tests behind them.

Every ownership decision in nnmark is a :class:`Verdict` that states its null
hypothesis in one sentence and the p-value of the observed statistic under that
null. ``owned`` is simply ``p_value < alpha``.

Tests provided
--------------
- :func:`binomial_tail` -- ``P[Binomial(n, p) >= k]``, computed in log space so
  that tiny p-values (1e-100) are exact rather than 0.
- :func:`bit_match_verdict` -- extracted bits vs. the owner's message; under H0
  each bit matches with probability 1/2.
- :func:`hit_rate_verdict` -- trigger-set hits; under H0 each trigger is a hit
  with probability at most ``p0`` (1/C for keyed uniform labels, or an upper
  confidence bound measured on reference clean models for a fixed target label).
- :func:`clopper_pearson_upper` -- one-sided exact upper confidence bound of a
  binomial rate, used to turn reference-model measurements into a conservative
  null rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Verdict:
    """An ownership verdict.

    Attributes
    ----------
    scheme: name of the scheme that produced it (e.g. ``"trigger-noise"``).
    owned: ``p_value < alpha``.
    p_value: probability, under ``null_hypothesis``, of a statistic at least as
        extreme as the observed one.
    alpha: significance level (the tolerated false-accusation rate).
    statistic: the observed statistic (matched bits, trigger hits, ...).
    n: number of bits or queries the statistic is computed from.
    null_hypothesis: one sentence stating H0 and the per-item rate under it.
    details: anything else worth reporting (queries used, BER, timings, ...).
    """

    scheme: str
    owned: bool
    p_value: float
    alpha: float
    statistic: float
    n: int
    null_hypothesis: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable)."""
        d = asdict(self)
        d["details"] = _jsonable(d["details"])
        return d

    def to_json(self, indent: int | None = None) -> str:
        """The verdict as a JSON object."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**d)

    def summary(self) -> str:
        """A one-line human summary."""
        word = "OWNED" if self.owned else "not owned"
        return (
            f"{self.scheme}: {word} (statistic {self.statistic:g}/{self.n}, "
            f"p = {self.p_value:.3g}, alpha = {self.alpha:g})"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P[X >= k]`` for ``X ~ Binomial(n, p)``.

    Uses scipy's log survival function so that results far below 1e-300 underflow
    gracefully to the smallest positive double instead of a misleading 0.
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError("need n >= 0 and 0 <= p <= 1")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logp = float(sps.binom.logsf(k - 1, n, p))
    return max(math.exp(logp), np.nextafter(0.0, 1.0)) if logp > -745 else 5e-324


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.999) -> float:
    """One-sided exact upper confidence bound for a binomial rate (``k`` of ``n``)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(sps.beta.ppf(confidence, k + 1, n - k))


def bit_match_verdict(
    extracted: np.ndarray,
    message: np.ndarray,
    *,
    scheme: str,
    alpha: float = 1e-6,
    details: dict[str, Any] | None = None,
) -> Verdict:
    """Verdict for an extracted bit string against the owner's message.

    ``extracted`` and ``message``: 1-D arrays of 0/1 of equal length ``n``.
    H0: the model was not marked with this key, so each extracted bit equals the
    key-derived message bit with probability 1/2 independently.
    """
    extracted = np.asarray(extracted).astype(np.int64).ravel()
    message = np.asarray(message).astype(np.int64).ravel()
    if extracted.shape != message.shape:
        raise ValueError("extracted bits and message differ in length")
    n = int(message.size)
    matches = int((extracted == message).sum())
    p = binomial_tail(matches, n, 0.5)
    det = {"ber": 1.0 - matches / n if n else float("nan")}
    det.update(details or {})
    return Verdict(
        scheme=scheme,
        owned=bool(p < alpha),
        p_value=p,
        alpha=alpha,
        statistic=matches,
        n=n,
        null_hypothesis=(
            "the model was not marked with this key: each of the n extracted bits "
            "matches the key's message with probability 1/2, independently"
        ),
        details=det,
    )


def rademacher_tail(weights: np.ndarray, s: float, grid: int = 8192) -> float:
    """An upper bound on ``P[sum_i eps_i w_i >= s]`` for independent fair signs ``eps_i`` and the fixed weights
    ``w_i >= 0`` (1-D), tight to ``n * max(w) / grid``-ish: the weights are rounded to a grid of step
    ``d = sum(w) / grid``, the exact distribution of the rounded sum is built by convolution (``grid`` + n
    points), and ``s`` is lowered by the largest rounding error ``n d / 2`` first, so the result is never
    below the true tail (a valid p-value). Equal weights give the binomial tail."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be a non-empty array of finite numbers >= 0")
    total = float(w.sum())
    if total <= 0.0:
        return 1.0 if s <= 0 else 0.0
    d = total / int(grid)
    q = np.rint(w / d).astype(np.int64)
    off = int(q.sum())
    dist = np.zeros(2 * off + 1)
    dist[off] = 1.0
    for qi in q[q > 0]:
        dist = 0.5 * (np.concatenate([np.zeros(qi), dist[:-qi]]) + np.concatenate([dist[qi:], np.zeros(qi)]))
    k = math.ceil((float(s) - 0.5 * w.size * d) / d - 1e-9)
    if k <= -off:
        return 1.0
    if k > off:
        return 0.0
    return float(min(1.0, dist[k + off:].sum()))


def soft_bit_verdict(
    readout: np.ndarray,
    message: np.ndarray,
    *,
    scheme: str,
    alpha: float = 1e-6,
    clip: float = 3.0,
    details: dict[str, Any] | None = None,
) -> Verdict:
    """Verdict from soft read-outs: bit ``i`` is read as ``readout[i] > 0`` with confidence
    ``w_i = min(|readout[i]|, clip)``; the statistic is ``S = sum_i (+w_i if bit i matches the message else -w_i)``
    and ``p = P[S' >= S]`` for ``S' = sum_i eps_i w_i`` with fair independent signs (:func:`rademacher_tail`).

    H0 is the binomial test's: the message is uniform and independent of the read-outs, so each bit matches with
    probability 1/2 independently *whatever its confidence* -- then ``S`` given the ``w`` is exactly ``S'``. The
    gain: a bit read with a large margin counts more than one read near zero (sign-counting throws the margins
    away). ``clip`` (default 3, in the read-out's null standard deviations) bounds what one bit can weigh, so a
    bit that a kind of innocent image pushes far from zero cannot dominate a fixed key's statistic."""
    r = np.asarray(readout, dtype=np.float64).ravel()
    message = np.asarray(message).astype(np.int64).ravel()
    if r.shape != message.shape:
        raise ValueError("read-outs and message differ in length")
    if not np.all(np.isfinite(r)):
        raise ValueError("read-outs must be finite")
    w = np.minimum(np.abs(r), float(clip))
    agree = np.where((r > 0).astype(np.int64) == message, 1.0, -1.0)
    stat = float((agree * w).sum())
    p = rademacher_tail(w, stat)
    matches = int(((r > 0).astype(np.int64) == message).sum())
    det = {"ber": 1.0 - matches / r.size, "matches": matches, "clip": float(clip),
           "binomial_p": binomial_tail(matches, int(r.size), 0.5)}
    det.update(details or {})
    return Verdict(
        scheme=scheme,
        owned=bool(p < alpha),
        p_value=p,
        alpha=alpha,
        statistic=stat,
        n=int(r.size),
        null_hypothesis=(
            "the images were not made with this key: each read-out's sign matches the key's message with "
            "probability 1/2 independently of its confidence (soft sign test, weights clipped at "
            f"{float(clip):g})"
        ),
        details=det,
    )


def hit_rate_verdict(
    hits: int,
    n: int,
    p0: float,
    *,
    scheme: str,
    null_hypothesis: str,
    alpha: float = 1e-6,
    details: dict[str, Any] | None = None,
) -> Verdict:
    """Verdict for ``hits`` of ``n`` trigger queries answered with the owner's label,
    under H0 "each query is a hit with probability at most ``p0``, independently"."""
    p = binomial_tail(int(hits), int(n), float(p0))
    det = {"hit_rate": hits / n if n else float("nan"), "null_hit_rate": p0}
    det.update(details or {})
    return Verdict(
        scheme=scheme,
        owned=bool(p < alpha),
        p_value=p,
        alpha=alpha,
        statistic=int(hits),
        n=int(n),
        null_hypothesis=null_hypothesis,
        details=det,
    )


def queries_to_significance(hit_sequence: np.ndarray, p0: float, alpha: float) -> int | None:
    """Smallest ``m`` such that the first ``m`` queries alone give ``p < alpha``.

    Descriptive (for benchmarks): a verification run fixes its number of queries
    in advance and tests once, so no sequential-testing correction is needed there.
    Returns ``None`` if even all queries do not reach ``alpha``.
    """
    hits = np.cumsum(np.asarray(hit_sequence, dtype=np.int64))
    for m, k in enumerate(hits, start=1):
        if binomial_tail(int(k), m, p0) < alpha:
            return m
    return None
