"""The exact null distribution of a customer's Tardos score, and its p-value.

Under ``H0_u`` -- "customer u's copy was not used to make the suspect" -- the suspect's answers ``y`` depend on
``u`` only through ``u``'s copy, so given the biases ``p`` and the answers ``y`` the bits ``X_ui`` of ``u``'s
codeword are still independent ``Bernoulli(p_i)`` (they were drawn from the key, independently of every other
customer's). The score ``S_u = sum_i g(X_ui, y_i, p_i)`` (:mod:`nnmark.codes.tardos`) is then a sum of
independent two-point terms: for every scored symbol, ``+A_i`` with probability ``q_i`` and ``-B_i`` otherwise
(``y_i = 1``: ``q = p``, ``A = sqrt((1-p)/p)``, ``B = sqrt(p/(1-p))``; ``y_i = 0``: ``q = 1 - p`` and ``A``,
``B`` swapped). Unscored symbols (``y_i = -1``) contribute 0. Soft answers (real weights ``w_i`` in
``[-1, 1]``, :mod:`nnmark.blackbox.answers`) scale both values by ``|w_i|`` (and swap them where ``w_i < 0``):
the score is still a sum of independent two-point terms, so everything below holds unchanged.

:class:`ScoreNull` computes that distribution by dynamic programming on a grid of step ``delta``, rounding
every term's two values *up* to the grid, so that the grid sum ``S'`` dominates ``S`` term by term and
``P[S' >= s] >= P[S >= s]``: the p-value ``P[S' >= s_u]`` is valid (never too small) and exceeds the exact
one by at most the shift ``sum_i delta`` (default ``delta = 0.05 sqrt(sum w_i^2) / n`` for ``n`` scored symbols
-- ``0.05 / sqrt(n)`` for hard answers -- a shift of at most 0.05 of the null's standard deviation). The DP adds
only non-negative numbers, so tails far below 1e-100 keep their relative precision; bins that fall below 1e-300
are dropped from the computation and their total mass is added to every p-value (so it stays an upper bound). One
distribution serves every customer of a trace (it depends on ``p`` and the answers only).

The DP costs at most (scored symbols) x (grid bins), about ``n^2.5`` (the trimmed window makes it less: 0.6 s
for 512 soft answers, a nominal 4.7e8): beyond ``max_work`` (default 2e9, about 800 hard answers) it is
skipped and the p-value is the Chernoff bound ``min_lambda exp(K(lambda) - lambda s)`` with the exact
cumulant generating function ``K(lambda) = sum_i log(q_i e^{lambda A_i} + (1 - q_i) e^{-lambda B_i})`` over a
grid of ``lambda`` (each ``lambda`` gives a valid bound; about ``2.5 z`` times the exact tail at ``z`` standard
deviations). When both are computed the smaller is reported: both bound the same exact tail from above.
"""

from __future__ import annotations

import numpy as np

from nnmark.codes.tardos import hard_weights

NULL_HYPOTHESIS = (
    "H0_u: customer u's copy was not used to make the suspect (u's Tardos codeword, drawn from the key "
    "independently of every other copy, is independent of the suspect's answers given the biases)")
MAX_BINS = 20_000_000
MAX_WORK = 2e9
LAMBDAS = np.geomspace(1e-4, 20.0, 600)


class ScoreNull:
    """The null distribution of a score given biases ``p`` ``(m,)`` and the answers: hard symbols ``y`` ``(m,)``
    in {1, 0, -1}, or real answer weights ``weights`` ``(m,)`` in [-1, 1] (give exactly one).

    The score is ``S = sum_i w_i U_i`` with ``U_i = sqrt((1-p_i)/p_i)`` for a codeword bit 1 and
    ``-sqrt(p_i/(1-p_i))`` for a bit 0 (hard symbols: ``w = +1`` for ``b``, ``-1`` for ``a``, ``0`` unusable;
    :mod:`nnmark.codes.tardos`). Symbols with ``w_i = 0`` are not scored.

    ``delta``: grid step (default ``0.05 sqrt(sum w^2) / n``, ``n`` scored symbols: the rounding shifts the
    score by at most 0.05 null standard deviations); ``max_work``: largest DP (bins x symbols) before falling back
    to the Chernoff bound alone (``method`` says which was used). ``p_value(s)``: a valid upper bound of the exact
    ``P[S >= s]`` (array in, array out; module doc).
    """

    def __init__(self, p: np.ndarray, y: np.ndarray | None = None, delta: float | None = None,
                 max_work: float = MAX_WORK, *, weights: np.ndarray | None = None) -> None:
        p = np.asarray(p, dtype=np.float64).ravel()
        if (y is None) == (weights is None):
            raise ValueError("give exactly one of the hard symbols y or the answer weights")
        w = hard_weights(y) if y is not None else np.asarray(weights, dtype=np.float64).ravel()
        if p.shape != w.shape:
            raise ValueError(f"biases {p.shape} and answers {w.shape} differ in length")
        if not np.all(np.isfinite(w)) or np.abs(w).max(initial=0.0) > 1.0:
            raise ValueError("answer weights must be finite and lie in [-1, 1]")
        scored = w != 0
        self.n_scored = int(scored.sum())
        p, w = p[scored], w[scored]
        mag = np.abs(w)
        q = np.where(w > 0, p, 1 - p)  # the probability that the bit agrees with the answer's sign
        up, down = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
        a = mag * np.where(w > 0, up, down)  # the gain when the bit agrees with the answer
        b = mag * np.where(w > 0, down, up)  # the loss when it does not
        self.scale = float(np.sqrt(np.sum(w * w)))  # the null standard deviation of S
        self.delta = (float(delta) if delta is not None
                      else 0.05 * max(self.scale, 1e-12) / max(1, self.n_scored))
        if not self.delta > 0:
            raise ValueError("delta must be positive")
        # term values on the grid, rounded up: +A -> ceil(A / delta), -B -> ceil(-B / delta)
        ia = np.ceil(a / self.delta).astype(np.int64)
        ib = np.ceil(-b / self.delta).astype(np.int64)
        lo, hi = int(ib.sum()), int(ia.sum())
        # cumulant generating function on the lambda grid (Chernoff bound)
        lam = LAMBDAS[:, None]
        with np.errstate(divide="ignore"):
            self._cgf = np.logaddexp(np.log(q)[None, :] + lam * a[None, :],
                                     np.log1p(-q)[None, :] - lam * b[None, :]).sum(1)
        self.pmf: np.ndarray | None = None
        self.sf: np.ndarray | None = None
        self.method = "chernoff"
        if hi - lo + 1 > MAX_BINS or float(hi - lo + 1) * self.n_scored > max_work:
            return
        self.method = "grid"
        self.offset = lo  # index 0 of the pmf is the value lo * delta
        pmf = np.zeros(hi - lo + 1, dtype=np.float64)
        pmf[0] = 1.0
        left, right = 0, 1  # the window [left, right) outside which the pmf is 0
        self.dropped = 0.0  # mass set to 0 when trimming (below 1e-300 a bin): added back to every p-value
        for t, (qi, ai, bi) in enumerate(zip(q, ia, ib, strict=True)):
            # value + ai with probability qi, value + bi otherwise; indices are relative to lo = sum(bi)
            step = int(ai - bi)
            seg = pmf[left:right].copy()
            pmf[left:right] *= 1 - qi
            pmf[left + step:right + step] += qi * seg
            right += step
            if t % 8 == 7:
                left, right = self._trim(pmf, left, right)
        self.pmf = pmf
        self.sf = np.cumsum(pmf[::-1])[::-1] + self.dropped  # sf[k] >= P[S' >= (lo + k) delta]
        self.mean = float(np.sum(q * a - (1 - q) * b))  # exactly 0 up to float error

    def _trim(self, pmf: np.ndarray, left: int, right: int, tiny: float = 1e-300) -> tuple[int, int]:
        """Shrink the window past bins below ``tiny`` at both ends, counting the mass dropped."""
        window = pmf[left:right]
        big = np.flatnonzero(window > tiny)
        if big.size == 0:
            return left, right
        lo_k, hi_k = left + int(big[0]), left + int(big[-1]) + 1
        self.dropped += float(pmf[left:lo_k].sum() + pmf[hi_k:right].sum())
        pmf[left:lo_k] = 0.0
        pmf[hi_k:right] = 0.0
        return lo_k, hi_k

    def chernoff(self, s: np.ndarray | float) -> np.ndarray:
        """The Chernoff bound ``min_lambda exp(K(lambda) - lambda s)`` (capped at 1) for scores ``s``."""
        s = np.asarray(s, dtype=np.float64)
        flat = s.ravel()
        out = np.empty(flat.size)
        for start in range(0, flat.size, 4096):
            chunk = flat[start:start + 4096]
            out[start:start + 4096] = np.min(self._cgf[:, None] - LAMBDAS[:, None] * chunk[None, :], axis=0)
        return np.minimum(1.0, np.exp(out)).reshape(s.shape)

    def p_value(self, s: np.ndarray | float) -> np.ndarray:
        """An upper bound of ``P[S >= s]`` under H0 for observed scores ``s`` (same shape): the grid's
        ``P[S' >= s]`` and the Chernoff bound, the smaller of those computed (module doc)."""
        s = np.asarray(s, dtype=np.float64)
        bound = self.chernoff(s)
        if self.sf is None:
            return bound
        return np.minimum(bound, self._grid_p(s))

    def _grid_p(self, s: np.ndarray) -> np.ndarray:
        assert self.sf is not None
        k = np.ceil(s / self.delta - 1e-9).astype(np.int64) - self.offset
        out = np.where(k <= 0, 1.0, 0.0)
        inside = (k > 0) & (k < self.sf.size)
        out = np.where(inside, self.sf[np.clip(k, 0, self.sf.size - 1)], out)
        return np.minimum(out, 1.0)
