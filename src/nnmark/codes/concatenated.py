"""Several AND-ACC codebooks chained by a Reed-Solomon outer code: tracing colluders
among ~17,000 customers, which two codebooks side by side cannot do.

Why: averaging is coordinate-wise, so an averaged fingerprint made of ``L`` AND-ACC
codebooks side by side tells, for each codebook ``i``, only the *set* ``S_i`` of
codewords the coalition holds there (each codebook decodes it exactly for up to
``k - 1`` colluders), not how the symbols are paired. With two codebooks and every
pair issued (:class:`~nnmark.codes.andacc.ProductAndAccCode`, the paper's 132 x 132
customers) two colluders ``(a1, b1), (a2, b2)`` and two innocents ``(a1, b2), (a2, b1)``
explain the average equally well.

Construction: the ``p**2`` customers (``p`` the largest prime with ``p <= b``, the
codebook's size: 131 for AG(2, 11)) are the lines ``f(x) = alpha + beta x`` over
GF(p); customer ``f`` holds codeword ``f(x_i)`` of codebook ``i`` at ``L`` distinct
points ``x_i = i``. Two distinct lines meet in at most one point, so an innocent
customer agrees with each of ``K`` colluders in at most one codebook and holds a
codeword of ``S_i`` in at most ``K`` of the ``L`` codebooks. With ``K <= L - 1`` it
cannot hold one in all ``L``: the customers whose every symbol lies in ``S_i`` are
exactly the colluders. Conversely every colluder is such a customer, so when at most
``L - 1`` customers qualify, the coalition has at most ``L - 1`` members and the
qualifying set *is* the coalition; with ``L`` or more the decoder refuses (beyond
``L - 1`` colluders the outer code gives no guarantee). ``L = 2`` is exactly the
two-codebook product (resilient to one customer); ``L = K + 1`` traces ``K``.

Cost: ``L`` codebooks of ``v`` values each (AG(2, 11): 121; four of them, 484 values,
fit the CNN's 576 conv4 filter means and trace up to 3 colluders among 17,161
customers). Decoding is ``O(|S_0| |S_1| L)``: two symbols fix a line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnmark.codes.andacc import NULL_HYPOTHESIS, AndAccCode, AndAccDecoding, fisher_combine
from nnmark.keys import Key


def largest_prime_at_most(n: int) -> int:
    """The largest prime ``p <= n`` (``n >= 2``)."""
    for p in range(int(n), 1, -1):
        if all(p % d for d in range(2, int(p**0.5) + 1)):
            return p
    raise ValueError(f"no prime <= {n}")


@dataclass(frozen=True)
class ConcatenatedDecoding:
    """Tracing result for a :class:`ReedSolomonAndAccCode`.

    ``parts``: each codebook's decoding; ``accused``: customer ids (see the class doc of
    :class:`ReedSolomonAndAccCode`), with ``p_values`` (Fisher's combination of the
    codebooks' exact per-codeword p-values); ``status``: ``"accused"``, ``"too-many"``
    (``L`` or more customers qualify: more colluders than the outer code can separate),
    ``"no-candidate"``, ``"unexplained"`` (the accused do not reproduce every ``S_i``),
    ``"not-issued"`` (a qualifying customer was never issued), or a part's failure
    (``"part2:too-many"``, ...)."""

    parts: tuple[AndAccDecoding, ...]
    accused: tuple[int, ...]
    status: str
    candidates: tuple[int, ...] = ()
    p_values: dict[int, float] = field(default_factory=dict)

    @property
    def ambiguous(self) -> tuple[int, ...]:
        """Customers that qualified but could not be accused (a shortlist, never an accusation)."""
        return () if self.status == "accused" else self.candidates

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "accused": list(self.accused), "candidates": list(self.candidates),
                "p_values": {str(j): p for j, p in self.p_values.items()},
                "parts": [d.to_dict() for d in self.parts], "null_hypothesis": NULL_HYPOTHESIS}


class ReedSolomonAndAccCode:
    """``L`` AND-ACC codebooks chained by a Reed-Solomon outer code of dimension 2 (see the module doc).

    Parameters
    ----------
    parts: ``L >= 2`` codebooks of one design (use :meth:`from_key`).
    """

    def __init__(self, parts: list[AndAccCode]) -> None:
        if len(parts) < 2:
            raise ValueError("the outer code needs at least 2 codebooks")
        sizes = {c.n_codewords for c in parts}
        if len(sizes) != 1:
            raise ValueError("all codebooks must have the same number of codewords")
        self.parts = list(parts)
        self.L = len(parts)
        self.p = largest_prime_at_most(sizes.pop())
        if self.L > self.p:
            raise ValueError(f"at most {self.p} codebooks (distinct points of GF({self.p}))")
        self.n_customers = self.n_codes = self.p * self.p
        self.dim = sum(c.dim for c in parts)
        self.k = min(c.k for c in parts)
        self.max_colluders = min(self.L - 1, self.k - 1)
        self._offsets = np.cumsum([0] + [c.dim for c in parts])
        self._points = np.arange(self.L, dtype=np.int64)

    @classmethod
    def from_key(cls, key: Key, family: str = "ag", q: int = 11, parts: int = 4, dim: int | None = None,
                 purpose: str = "and-acc-rs") -> ReedSolomonAndAccCode:
        """``parts`` independent codebooks of ``design(family, q)``, bases under ``purpose:i``."""
        return cls([AndAccCode.from_key(key, family, q, dim, f"{purpose}:{i}") for i in range(int(parts))])

    def params(self) -> dict[str, Any]:
        return {"outer": f"RS[{self.L}, 2] over GF({self.p})", "parts": [c.params() for c in self.parts],
                "customers": self.n_customers, "dim": self.dim, "max_colluders": self.max_colluders}

    # -- customers and fingerprints -----------------------------------------------------
    def symbols(self, customers) -> np.ndarray:
        """``(n, L)`` codeword index of each customer in each codebook: ``alpha + beta * i mod p``."""
        c = np.asarray(customers, dtype=np.int64).reshape(-1)
        if c.size and (c.min() < 0 or c.max() >= self.n_customers):
            raise IndexError(f"customer code out of range 0..{self.n_customers - 1}")
        alpha, beta = c // self.p, c % self.p
        return (alpha[:, None] + beta[:, None] * self._points[None, :]) % self.p

    def customer_of_line(self, alpha: int, beta: int) -> int:
        return int(alpha) * self.p + int(beta)

    def fingerprint(self, customer: int) -> np.ndarray:
        """``(dim,)`` concatenated fingerprint of one customer."""
        s = self.symbols([customer])[0]
        return np.concatenate([code.fingerprint(int(j)) for code, j in zip(self.parts, s, strict=True)])

    def fingerprints(self, customers) -> np.ndarray:
        """``(n, dim)`` fingerprints."""
        s = self.symbols(customers)
        return np.concatenate([code.fingerprints(s[:, i]) for i, code in enumerate(self.parts)], axis=1)

    # -- tracing --------------------------------------------------------------------------
    def decode(self, y: np.ndarray, issued: np.ndarray | None = None, tau: float | None = None,
               scale: float = 1.0) -> ConcatenatedDecoding:
        """Trace an extracted vector ``y`` (``(dim,)``): decode every codebook, then keep the
        customers all of whose symbols were decoded (two symbols fix a line: ``O(|S_0| |S_1| L)``).
        ``issued``: customer ids handed out (default: all); ``tau``/``scale``: as in
        :meth:`AndAccCode.decode`."""
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.size != self.dim:
            raise ValueError(f"extracted vector has length {y.size}, the code's fingerprints {self.dim}")
        decs = tuple(code.decode(y[self._offsets[i]: self._offsets[i + 1]], tau=tau, scale=scale)
                     for i, code in enumerate(self.parts))
        for i, d in enumerate(decs):
            if not d.accepted:
                return ConcatenatedDecoding(decs, (), f"part{i}:{d.status}")
        sets = [set(int(j) for j in d.accused) for d in decs]
        if any(max(s) >= self.p for s in sets):  # a codeword no customer holds (index >= p) was decoded
            return ConcatenatedDecoding(decs, (), "unexplained")
        p = self.p
        cands = []
        for s0 in sets[0]:
            for s1 in sets[1]:
                beta = (s1 - s0) % p  # points x0 = 0, x1 = 1
                alpha = s0
                line = (alpha + beta * self._points) % p
                if all(int(line[i]) in sets[i] for i in range(self.L)):
                    cands.append(self.customer_of_line(alpha, beta))
        cands.sort()
        cand_t = tuple(cands)
        if not cands:
            return ConcatenatedDecoding(decs, (), "no-candidate")
        if len(cands) > self.max_colluders:
            return ConcatenatedDecoding(decs, (), "too-many", cand_t)
        sym = self.symbols(cands)
        if any(set(sym[:, i].tolist()) != sets[i] for i in range(self.L)):
            return ConcatenatedDecoding(decs, (), "unexplained", cand_t)
        if issued is not None and not np.isin(cands, np.asarray(issued, dtype=np.int64)).all():
            return ConcatenatedDecoding(decs, (), "not-issued", cand_t)
        pvals = {c: fisher_combine([self.parts[i].p_value(decs[i].coefficients, int(sym[r, i]))
                                    for i in range(self.L)]) for r, c in enumerate(cands)}
        return ConcatenatedDecoding(decs, cand_t, "accused", cand_t, pvals)
