"""AND anti-collusion codes (AND-ACC) from (v, k, 1)-BIBDs, and their tracing.

Construction (Trappe, Wu, Wang and Liu 2003; SecureMark-DL section IV-B)
-----------------------------------------------------------------------
Take a (v, k, 1)-BIBD with incidence matrix ``N`` (``v x b``). Customer ``j``'s
code is the complement of column ``j``: ``c_j = 1 - N[:, j]`` (``v`` bits, zero
exactly on the ``k`` points of block ``j``). The code is modulated on ``v``
orthonormal vectors ``f_1 .. f_v`` (the columns of a key-derived ``dim x v``
basis ``Fb``, ``dim >= v``): ``w_j = sum_i e_ij f_i = Fb @ e_j`` with
``e = 2c - 1`` in {-1, +1}. ``w_j`` (length ``dim``, norm ``sqrt(v)``) is the
real vector a carrier (e.g. the projection regulariser) embeds.

Averaging the fingerprints of a coalition ``S`` gives demodulated coefficients
``Fb.T @ w_avg = mean_{j in S} e_j``: exactly 1 on the points no colluder's
block contains, and at most ``1 - 2/|S|`` elsewhere. With the hard threshold
``tau`` (0.85 by default, as in the paper) the *zero set* ``Z = {i: coef_i <= tau}``
is the union of the colluders' blocks for ``|S| <= 13`` (``1 - 2/13 < 0.85``).

Exact decoding without a subset search
--------------------------------------
In a (v, k, 1)-BIBD two blocks share at most one point, so a block outside the
coalition meets each colluder's block in at most one point and is covered by
``|S| <= k - 1`` colluders in at most ``k - 1 < k`` of its points. Hence, for
``|S| <= k - 1`` and an error-free threshold, the customers whose block lies
inside ``Z`` are *exactly* the colluders: one matrix-vector product
(``Z @ N == k``). An unmarked model demodulates to about 0, which puts every
point in ``Z`` and would name every customer; the guard therefore accepts only
when between 1 and ``k - 1`` customers are named *and* ``Z`` equals the union of
their blocks. With an error-free threshold and an *average* of copies (non-negative
weights) the guard can never accept an innocent customer, whatever the coalition size:
the named set always contains every colluder, so such a coalition of ``k`` or more is
rejected rather than mis-traced. Errors can only come from coefficients landing on the
wrong side of ``tau`` (noise, attacks, coalitions of 14 or more); the experiments in
``experiments/securemark`` measure them.

Not for weights of both signs: the fingerprint is linear in the code, so copies combined
with weights summing to 1, some negative, carry any code their weights add up to -- in
AG(2, q) the lines of a parallel class sum to the same vector, so one class at +1 and the
next class minus a line at -1 carry exactly that line's code, and every decoder here names
that (innocent) line's holder. No decoder can tell such a frame from a copy; a product
therefore names a customer only on evidence of that customer's own secret component
(:mod:`nnmark.fingerprint.own`), and this module's decoders only say which codes the
coefficients look like.

Structural decoder (the default): no threshold, no gain estimate
----------------------------------------------------------------
The hard threshold fixes where the zero set ends, but the level of a covered
position, ``g (1 - 2 n_i / K)`` for a gain ``g`` and ``n_i`` colluders' blocks
through point ``i``, depends on the unknown ``K``: at ``K = k - 1 = 10`` covered
positions sit at ``0.8 g``, 0.05 below ``tau = 0.85`` (2.5 sigma of noise at
sigma = 0.02 is enough to lose the trace). The structural decoder uses what
the code fixes instead. A coalition ``S`` of ``m`` customers *explains* the
coefficients ``c`` when a weighted average of its codes fits them: the
least-squares fit ``c ~ sum_{j in S} u_j e_j`` (``u_j = g w_j``, gain ``g``, weights
``w_j``; a plain average has ``u_j = g / m``, a product code's half or colluders who
weight their copies have others) has

- every weight ``u_j > 0``;
- every coefficient on the right side of the split half a step below the top
  level: a colluder's block lowers a coefficient by ``2 u_j``, so points no block
  of ``S`` covers must stay above ``fit_i - min_j u_j`` and covered points below
  ``fit_i + min_j u_j`` (for a plain average: the self-consistent threshold
  ``g (1 - 1/m)``, midway between the uncovered level ``g`` and the first covered
  level ``g (1 - 2/m)`` -- 0.9 g at ``m = 10`` instead of 0.85, 0.5 g at ``m = 2``);
- a lack-of-fit p-value above ``FIT_ALPHA = 1e-3``: the classical F test of the
  model against free means per cell (points with the same blocks of ``S``
  through them), exact under i.i.d. Gaussian noise, so a true coalition is
  refused by it with probability 1e-3. It is what refuses a coalition of ``k``
  or more that contains a whole parallel class: the class lowers every
  coefficient by the same amount, which no weighted average of ``<= k - 1``
  codes reproduces (below), although its remaining lines alone pass the split.

Nothing here is fitted to data: half a step is the nearest-level boundary and
1e-3 a stated refusal rate. The decoder names the customers in *every*
coalition of 1..k-1 members that explains ``c`` (as the two-codebook decoder
does), and nobody when none does or when they share nobody.

Finding every explaining coalition is exact and fast (no subset search): if
``S`` explains ``c``, the union of its blocks is exactly the set of coefficients
below the split -- a *prefix* of the sorted coefficients -- and ``S`` is
exactly the set of blocks inside that prefix (an outside block meets each of
``m <= k - 1`` blocks in at most one point, so it keeps a point outside the
union). So the decoder sorts ``c`` once and walks the ``v - 1`` prefixes: with
each block's entry time (the largest rank of its points) and each point's
(the earliest entry among its blocks), a prefix is a union of blocks iff no
point in it enters later than the prefix ends -- one running maximum. Only the
prefixes that are exact unions of 1..k-1 blocks (rare: see below) get the
``O(v)`` level check. Runtime ``O(v log v + b k)``, tens of microseconds for (121,11,1).

Why it never names an innocent, noise-free, whatever the size of an averaging coalition (positive
weights; not a combination with negative weights, see above): for a
(v, k, 1) design from AG(2,q), ``q >= 3``, ``sum_{T} w_j e_j = sum_{S} u_j e_j`` with
positive weights and ``1 <= |S| <= k - 1`` forces ``T = S`` (and ``w = u``). (With
``e_j = 1 - 2 N_j``: ``N x = ((sum w - sum u) / 2) 1`` for ``x = w_T - u_S``; the solutions
are constant on each of the ``q + 1`` parallel classes, ``x = sum_a beta_a 1_{P_a}``, and
summing over all lines gives ``(q - 2) sum_a beta_a = 0``. A class with ``beta_a < 0`` would
lie wholly in ``S`` (``|S| >= q = k``); so every ``beta_a = 0``, ``x = 0``, ``T = S``. For
PG(2,q) ``N`` is invertible and the same holds unless ``T`` and ``S`` cover every line.)
So a weighted average of ``K >= k`` codewords is not one of ``<= k - 1``, and with no
noise only the true coalition of ``<= k - 1`` explains it exactly (the lack-of-fit
test turns "not exactly" into a refusal); with noise, the tests and
``experiments/securemark/collusion_codes.py`` measure the refusals and check that
coalitions of ``k`` or more, random and structured, are refused. Under H0 the
ranks of ``c`` are a uniformly random permutation (spherical symmetry), so the
probability that *any* prefix is exactly a union of 1..k-1 blocks is at most
``sum_S 1 / C(v, |union S|)`` (:meth:`AndAccCode.null_union_bound`: below 1e-5
for (49,7,1) and (121,11,1)) -- before the level check and the p-value gate.

The hard-threshold decoder of the paper stays available (``tau=0.85``).

p-value per named customer
--------------------------
The basis is Haar-distributed (QR of a Gaussian matrix with the sign of R's
diagonal fixed), and derived from the key under its own purpose. Under
H0 "the model carries no fingerprint of this key" the extracted vector is
independent of the basis, so the coefficient vector ``c = Fb.T @ y`` is
spherically symmetric in R^v whatever the model: ``c / |c|`` is uniform on the
sphere. The statistic for customer ``j`` is the cosine
``rho_j = <c, e_j> / (|c| sqrt(v))`` between the coefficients and its ±1 code, and
under H0 ``(rho_j + 1) / 2 ~ Beta((v-1)/2, (v-1)/2)`` exactly, so
``p_j = P[Beta >= (rho_j + 1)/2]`` (scale-free: no noise level is assumed). For two
codebooks side by side the halves' p-values are independent under H0 and are
combined with Fisher's method (exact). The p-value measures the evidence that
this key's fingerprint, aligned with ``j``'s code, is present; it does not by
itself separate a colluder from an innocent customer of the same codebook
(codewords are strongly correlated: they share most ``+1`` positions) -- that
separation is the decoder's combinatorial guarantee above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from nnmark.codes.bibd import Design, design
from nnmark.keys import Key

DEFAULT_TAU = 0.85

FIT_ALPHA = 1e-3
"""Level of the structural decoder's lack-of-fit test: under i.i.d. Gaussian noise a true coalition's
average is refused by that test with probability 1e-3 (a design choice, not fitted to any data)."""

NULL_HYPOTHESIS = (
    "the model carries no fingerprint of this key: the demodulated coefficients are spherically symmetric "
    "(Haar-random key-derived basis independent of the model), so the cosine rho between them and the "
    "customer's +-1 code satisfies (rho+1)/2 ~ Beta((v-1)/2, (v-1)/2)"
)


def cosine_p_value(coef: np.ndarray, signs: np.ndarray) -> float:
    """Exact p-value of the cosine between ``coef`` (``(v,)``) and a fixed ``signs`` vector under
    spherical symmetry of ``coef`` (see the module doc); 1.0 for an all-zero ``coef``."""
    coef = np.asarray(coef, dtype=np.float64).ravel()
    signs = np.asarray(signs, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(coef)) * float(np.linalg.norm(signs))
    if norm == 0.0 or coef.size < 2:
        return 1.0
    rho = float(np.clip(coef @ signs / norm, -1.0, 1.0))
    a = (coef.size - 1) / 2.0
    logp = float(sps.beta.logsf((rho + 1) / 2, a, a))
    return max(math.exp(logp), _TINY) if logp > -745 else _TINY


def fisher_combine(pvalues) -> float:
    """Fisher's method for independent p-values: ``P[chi2(2n) >= -2 sum log p]``."""
    ps = np.maximum(np.asarray(list(pvalues), dtype=np.float64), _TINY)
    stat = -2.0 * float(np.log(ps).sum())
    logp = float(sps.chi2.logsf(stat, 2 * ps.size))
    return max(math.exp(logp), _TINY) if logp > -745 else _TINY


_TINY = 5e-324


def haar_basis(key: Key, purpose: str, dim: int, v: int) -> np.ndarray:
    """A ``(dim, v)`` matrix with orthonormal columns, Haar-distributed, derived from ``key`` and ``purpose``.

    QR of a standard Gaussian ``(dim, v)`` matrix with the columns' signs fixed so
    that ``R`` has a positive diagonal (this makes the result exactly Haar).
    """
    if dim < v:
        raise ValueError(f"the basis needs dim >= v ({dim} < {v})")
    g = key.numpy_rng(purpose).standard_normal((dim, v))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


@dataclass(frozen=True)
class AndAccDecoding:
    """The result of tracing one extracted vector against one AND-ACC codebook.

    Attributes
    ----------
    coefficients: ``(v,)`` demodulated coefficients (divided by ``scale``).
    zero_set: ``(v,)`` bool, ``coefficients <= tau``.
    candidates: codeword indices whose block lies inside the zero set (before the guard).
    accused: the named codeword indices -- ``candidates`` if the guard accepted, else empty.
    status: ``"accused"``, or why nothing is named: ``"empty-zero-set"``, ``"no-candidate"``,
        ``"too-many"`` (more than ``k - 1`` candidates, e.g. an unmarked model),
        ``"unexplained"`` (the zero set is not the union of the candidates' blocks).
    p_values: for each accused codeword, the exact p-value under :data:`NULL_HYPOTHESIS`.
    tau, k: the threshold and block size used (structural decoder: ``tau`` is the decision level
        ``g (1 - 1/m)`` of the accepted coalition in coefficient units, ``None`` when nobody is named).
    method: ``"threshold"`` (hard threshold ``tau``) or ``"structural"`` (see the module doc).
    gain: structural decoder: the least-squares gain of the accepted coalition's levels (``None`` otherwise).
    explanations: structural decoder: every coalition of 1..k-1 codewords that explains the coefficients.

    Structural statuses: ``"no-candidate"`` (no prefix of the sorted coefficients is exactly a union
    of 1..k-1 blocks: e.g. an unmarked model), ``"unexplained"`` (such unions exist but no coalition's
    levels fit), ``"ambiguous"`` (several coalitions explain it and no codeword is in all of them).
    """

    coefficients: np.ndarray
    zero_set: np.ndarray
    candidates: tuple[int, ...]
    accused: tuple[int, ...]
    status: str
    p_values: dict[int, float] = field(default_factory=dict)
    tau: float | None = DEFAULT_TAU
    k: int = 0
    method: str = "threshold"
    gain: float | None = None
    explanations: tuple[tuple[int, ...], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.status == "accused"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "status": self.status,
            "accused": list(self.accused),
            "candidates": list(self.candidates),
            "p_values": {str(j): p for j, p in self.p_values.items()},
            "zero_set_size": int(self.zero_set.sum()),
            "tau": self.tau,
            "k": self.k,
            "method": self.method,
            "gain": self.gain,
            "explanations": [list(e) for e in self.explanations],
            "null_hypothesis": NULL_HYPOTHESIS,
        }


class AndAccCode:
    """One AND-ACC codebook: a (v, k, 1)-BIBD plus an orthonormal modulation basis.

    Parameters
    ----------
    design: a verified (v, k, 1) design (:func:`nnmark.codes.bibd.design`).
    basis: ``(dim, v)`` matrix with orthonormal columns, ``dim >= v``
        (use :meth:`from_key`).

    Codeword ``j`` (``0 <= j < b``) belongs to one customer; ``b = n_codewords``.
    """

    def __init__(self, design: Design, basis: np.ndarray) -> None:
        inc = np.asarray(design.incidence, dtype=np.uint8)
        basis = np.asarray(basis, dtype=np.float64)
        if basis.ndim != 2 or basis.shape[1] != inc.shape[0]:
            raise ValueError(f"basis must be (dim, v={inc.shape[0]}), got {basis.shape}")
        self.design = design
        self.incidence = inc  # (v, b)
        self.codes = (1 - inc).astype(np.uint8)  # (v, b): customer j's code is column j
        self.basis = basis
        self.v, self.n_codewords = inc.shape
        self.k = int(inc[:, 0].sum())
        self._inc_f = inc.astype(np.float32)
        # point indices of each block (b, k) and block indices through each point (v, r): a BIBD's are regular
        self._block_points = np.stack([np.flatnonzero(inc[:, j]) for j in range(self.n_codewords)])
        self._point_blocks = np.stack([np.flatnonzero(inc[i]) for i in range(self.v)])

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_key(
        cls, key: Key, family: str = "ag", q: int = 7, dim: int | None = None, purpose: str = "and-acc"
    ) -> AndAccCode:
        """The codebook of ``design(family, q)`` with a basis derived from ``key``.

        ``dim`` (default ``v``) is the fingerprint length. ``purpose`` names the basis
        (two codebooks under one key need two purposes).
        """
        d = design(family, q)
        d.verify()
        dim = d.v if dim is None else int(dim)
        basis = haar_basis(key, f"{purpose}:{d.name}:basis:{dim}", dim, d.v)
        return cls(d, basis)

    @property
    def dim(self) -> int:
        """Fingerprint length."""
        return int(self.basis.shape[0])

    @property
    def n_codes(self) -> int:
        """Number of identity codes (customers) the code serves: ``b`` (the :class:`IdentityCode` size)."""
        return int(self.n_codewords)

    @property
    def parts(self) -> list[AndAccCode]:
        """The codebooks the fingerprint is made of: this one."""
        return [self]

    def params(self) -> dict[str, Any]:
        """Plain description (for a registry / key file): design name, v, k, b, dim."""
        return {"design": self.design.name, "v": self.v, "k": self.k, "b": self.n_codewords, "dim": self.dim}

    # -- codes and fingerprints ---------------------------------------------------
    def codeword(self, j: int) -> np.ndarray:
        """``(v,)`` uint8 code bits of codeword ``j``."""
        return self.codes[:, self._check(j)].copy()

    def signs(self, j: int) -> np.ndarray:
        """``(v,)`` float ``e_j = 2 c_j - 1`` in {-1, +1}."""
        return 2.0 * self.codes[:, self._check(j)] - 1.0

    def fingerprint(self, j: int) -> np.ndarray:
        """``(dim,)`` float64 modulated fingerprint ``w_j = basis @ e_j`` (norm ``sqrt(v)``)."""
        return self.basis @ self.signs(j)

    def fingerprints(self, js) -> np.ndarray:
        """``(len(js), dim)`` fingerprints of several codewords."""
        js = np.asarray(js, dtype=np.int64)
        e = 2.0 * self.codes[:, js] - 1.0  # (v, n)
        return (self.basis @ e).T

    def _check(self, j: int) -> int:
        j = int(j)
        if not 0 <= j < self.n_codewords:
            raise IndexError(f"codeword {j} out of range 0..{self.n_codewords - 1}")
        return j

    # -- tracing ------------------------------------------------------------------
    def demodulate(self, y: np.ndarray) -> np.ndarray:
        """Coefficients ``basis.T @ y``: ``(v,)`` for ``y`` of shape ``(dim,)``, ``(n, v)`` for ``(n, dim)``."""
        y = np.asarray(y, dtype=np.float64)
        if y.shape[-1] != self.dim:
            raise ValueError(f"extracted vector has length {y.shape[-1]}, the codebook's fingerprints {self.dim}")
        return y @ self.basis

    def decode_coefficients_batch(self, coef: np.ndarray, tau: float | None = DEFAULT_TAU) -> dict[str, np.ndarray]:
        """Decoder for ``(n, v)`` coefficients (vectorised for a hard threshold ``tau``; ``tau=None``: the
        structural decoder, row by row).

        Returns arrays: ``zero`` (n, v) bool, ``candidates`` (n, b) bool, ``accused`` (n, b) bool,
        ``accepted`` (n,) bool (the guard), ``status`` (n,) int codes 0 accused, 1 empty-zero-set,
        2 no-candidate, 3 too-many, 4 unexplained, 5 ambiguous.
        """
        coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        if tau is None:
            codes = {name: i for i, name in _STATUS.items()}
            n = coef.shape[0]
            out = {"zero": np.zeros((n, self.v), bool), "candidates": np.zeros((n, self.n_codewords), bool),
                   "accused": np.zeros((n, self.n_codewords), bool), "status": np.zeros(n, np.int8)}
            for i, row in enumerate(coef):
                d = self._decode_structural(row)
                out["zero"][i] = d.zero_set
                out["candidates"][i, list(d.candidates)] = True
                out["accused"][i, list(d.accused)] = True
                out["status"][i] = codes[d.status]
            out["accepted"] = out["status"] == 0
            return out
        zero = coef <= tau  # (n, v)
        inside = zero.astype(np.float32) @ self._inc_f  # (n, b): block points inside Z
        cand = inside >= self.k - 0.5
        ncand = cand.sum(axis=1)
        union = (cand.astype(np.float32) @ self._inc_f.T) > 0.5  # (n, v)
        explained = (union == zero).all(axis=1)
        status = np.full(coef.shape[0], 4, dtype=np.int8)
        status[explained & (ncand >= 1) & (ncand <= self.k - 1)] = 0
        status[ncand > self.k - 1] = 3
        status[ncand == 0] = 2
        status[~zero.any(axis=1)] = 1
        accepted = status == 0
        return {"zero": zero, "candidates": cand, "accused": cand & accepted[:, None], "accepted": accepted,
                "status": status}

    def decode(self, y: np.ndarray, issued: np.ndarray | None = None, tau: float | None = None,
               scale: float = 1.0) -> AndAccDecoding:
        """Trace one extracted vector ``y`` (``(dim,)``). ``issued`` is accepted for the common
        interface and not needed: one codebook's decoding does not depend on which codes were issued.

        ``tau``: ``None`` (default) for the structural decoder (module doc: no threshold, scale-free),
        or a hard threshold (the paper's rule, 0.85). ``scale``: the coefficient level of a ``+1``
        position in a single issued copy (1.0 for an exact embedding; a carrier whose extraction
        shrinks the fingerprint can pass its calibrated gain); coefficients are divided by it (the
        structural decoder's decision does not depend on it).
        """
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        coef = self.demodulate(y) / float(scale)
        return self.decode_coefficients(coef, tau=tau)

    def decode_coefficients(self, coef: np.ndarray, tau: float | None = None) -> AndAccDecoding:
        """Trace from demodulated coefficients ``(v,)`` (see :meth:`decode`)."""
        coef = np.asarray(coef, dtype=np.float64).ravel()
        if tau is None:
            return self._decode_structural(coef)
        out = self.decode_coefficients_batch(coef[None, :], tau=tau)
        cand = tuple(int(j) for j in np.flatnonzero(out["candidates"][0]))
        status = _STATUS[int(out["status"][0])]
        accused = cand if status == "accused" else ()
        pvals = {j: self.p_value(coef, j) for j in accused}
        return AndAccDecoding(coef, out["zero"][0], cand, accused, status, pvals, float(tau), self.k)

    # -- the structural decoder -------------------------------------------------------
    def union_prefixes(self, coef: np.ndarray) -> list[np.ndarray]:
        """The coalitions whose blocks' union is exactly a prefix of the sorted ``coef`` (``(v,)``)
        with a strict gap after it, for 1..k-1 blocks: ``[array of codeword indices, ...]``, smallest
        prefix first. Exact, ``O(v log v + b k)`` (module doc)."""
        c = np.asarray(coef, dtype=np.float64).ravel()
        if c.size != self.v:
            raise ValueError(f"expected {self.v} coefficients, got {c.size}")
        if not np.isfinite(c).all():
            return []
        order = np.argsort(c, kind="stable")
        rank = np.empty(self.v, dtype=np.int64)
        rank[order] = np.arange(self.v)
        block_enter = rank[self._block_points].max(axis=1) + 1  # prefix length from which block j is inside
        point_enter = block_enter[self._point_blocks].min(axis=1)  # earliest a block covers point i
        running = np.maximum.accumulate(point_enter[order])  # running[t-1]: latest entry among the t smallest
        t = np.arange(1, self.v)
        cs = c[order]
        n_inside = np.cumsum(np.bincount(block_enter, minlength=self.v + 1))[t]
        ok = (running[:-1] <= t) & (cs[1:] > cs[:-1]) & (n_inside >= 1) & (n_inside <= self.k - 1)
        return [np.flatnonzero(block_enter <= tt) for tt in t[ok]]

    def fit(self, coef: np.ndarray, coalition) -> tuple[np.ndarray, float, float]:
        """Least-squares fit of ``coef`` (``(v,)``) by ``sum_{j in coalition} u_j e_j`` -- a weighted average of
        the coalition's ``+-1`` codes times a gain (``g = sum u``; equal weights ``u_j = g / m`` for a plain
        average; a product code's half holds repeated codewords, colluders may weight their copies).

        Returns ``(u, worst, lack_of_fit_p)``: the weights (maximum likelihood under i.i.d. Gaussian
        noise); ``worst``, the largest move of a coefficient towards the wrong side of the split -- an
        uncovered one below its fit, a covered one above -- in units of ``min_j u_j``, half the smallest
        step by which a colluder's block lowers a coefficient (``2 u_j``; ``g / m`` for a plain average;
        ``inf`` when a weight is ``<= 0``); and the p-value of the classical lack-of-fit F test of
        the model against free means per cell (points with the same set of the coalition's blocks
        through them; ``L`` cells): ``F = ((RSS - RSS_L) / (L - m)) / (RSS_L / (v - L))``, exactly
        ``F(L - m, v - L)`` under the model. It rejects coefficients that are an affine, not linear, image
        of the pattern -- what a larger coalition containing whole parallel classes leaves (module doc)."""
        c = np.asarray(coef, dtype=np.float64).ravel()
        js = np.asarray(coalition, dtype=np.int64)
        m = int(js.size)
        if m == 0:
            raise ValueError("empty coalition")
        inc = self.incidence[:, js]
        e = 1.0 - 2.0 * inc
        u, *_ = np.linalg.lstsq(e, c, rcond=None)
        if not (u > 0).all():
            return u, math.inf, 0.0
        resid = c - e @ u
        _cells, inverse = np.unique(inc, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        n_cells = int(inverse.max()) + 1
        means = np.bincount(inverse, weights=c, minlength=n_cells) / np.bincount(inverse, minlength=n_cells)
        rss = float(resid @ resid)
        rss_cells = float(((c - means[inverse]) ** 2).sum())
        scale = float(c @ c)
        df1, df2 = n_cells - m, c.size - n_cells
        if rss <= 1e-20 * scale or df1 <= 0:
            lof = 1.0
        elif rss_cells <= 1e-24 * scale or df2 <= 0:
            lof = 0.0
        else:
            lof = float(sps.f.sf(max(rss - rss_cells, 0.0) / df1 / (rss_cells / df2), df1, df2))
        covered = inc.any(axis=1)
        # one-sided: an uncovered coefficient may not fall, a covered one may not rise, past half a step
        worst = max(float((-resid[~covered]).max(initial=-math.inf)), float(resid[covered].max(initial=-math.inf)))
        return u, worst / float(u.min()), lof

    def explains(self, coef: np.ndarray, coalition) -> bool:
        """Whether ``coalition`` explains ``coef`` (see :meth:`fit` and the module doc): positive least-squares
        weights, every coefficient on its side of the split half the smallest step ``min_j u_j`` below the top
        level, and a lack-of-fit p-value above :data:`FIT_ALPHA`."""
        _u, worst, lof = self.fit(coef, coalition)
        return worst < 1.0 and lof > FIT_ALPHA

    def _decode_structural(self, coef: np.ndarray) -> AndAccDecoding:
        unions = self.union_prefixes(coef)
        expl = [tuple(int(j) for j in s) for s in unions if self.explains(coef, s)]
        zero = np.zeros(self.v, dtype=bool)
        for s in expl:
            zero |= self.incidence[:, list(s)].any(axis=1).astype(bool)
        cand = tuple(sorted({j for s in expl for j in s}))
        if not unions:
            status, accused = "no-candidate", ()
        elif not expl:
            status, accused = "unexplained", ()
        else:
            common = set(expl[0]).intersection(*expl[1:])
            accused = tuple(sorted(common))
            status = "accused" if accused else "ambiguous"
        gain = level = None
        if accused:
            u = self.fit(coef, accused)[0]
            gain = float(u.sum())
            level = gain - float(u.min())
        pvals = {j: self.p_value(coef, j) for j in accused}
        return AndAccDecoding(coef, zero, cand, accused, status, pvals, level, self.k, "structural", gain,
                              tuple(expl))

    def null_union_bound(self) -> float:
        """Under H0 (ranks of the coefficients uniformly random) an upper bound on the probability that
        any prefix of the sorted coefficients is exactly the union of 1..k-1 blocks:
        ``sum_{m=1}^{k-1} C(b, m) / C(v, m k - C(m, 2))`` (``m`` blocks, two sharing at most one point,
        cover at least ``m k - C(m, 2)`` points; a given set of ``u`` points is the bottom ``u`` with
        probability ``1 / C(v, u)``, which falls with ``u`` while ``u <= v / 2``)."""
        total = 0.0
        for m in range(1, self.k):
            u = m * self.k - m * (m - 1) // 2
            u = min(u, self.v - u) if u > self.v // 2 else u  # C(v, u) is smallest at the ends
            total += math.comb(self.n_codewords, m) / math.comb(self.v, u)
        return total

    def p_value(self, coef: np.ndarray, j: int) -> float:
        """Exact p-value of the cosine between ``coef`` and codeword ``j``'s ±1 code under
        :data:`NULL_HYPOTHESIS`."""
        return cosine_p_value(coef, self.signs(j))


_STATUS = {0: "accused", 1: "empty-zero-set", 2: "no-candidate", 3: "too-many", 4: "unexplained", 5: "ambiguous"}
STATUS_NAMES = dict(_STATUS)


# ---------------------------------------------------------------------------------------------
# Two codebooks side by side
# ---------------------------------------------------------------------------------------------


def sidon_shifts(n: int) -> list[int]:
    """A greedy modular Sidon set in Z_n: differences ``s - t`` (``s != t``) all distinct mod n (0, 1, 3, 7, ...)."""
    shifts: list[int] = []
    diffs: set[int] = set()
    for s in range(n):
        new = {(s - t) % n for t in shifts} | {(t - s) % n for t in shifts}
        if len(new) == 2 * len(shifts) and not (new & diffs):
            shifts.append(s)
            diffs |= new
    return shifts


@dataclass(frozen=True)
class ProductDecoding:
    """Tracing result for a :class:`ProductAndAccCode`.

    Attributes
    ----------
    half_a, half_b: the two codebooks' decodings.
    accused: customer ids that every coalition explaining both halves must contain
        (see :meth:`ProductAndAccCode.decode`); their p-values in ``p_values``.
    ambiguous: customers in the shortlist whose guilt the halves cannot establish
        (named as suspects only, never accused).
    status: ``"accused"``, ``"ambiguous"`` (shortlist but nobody provable), or a half's
        failure (``"a:too-many"``, ...), or ``"not-issued"`` (a decoded codeword no issued
        customer explains).
    """

    half_a: AndAccDecoding
    half_b: AndAccDecoding
    accused: tuple[int, ...]
    ambiguous: tuple[int, ...]
    status: str
    p_values: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "accused": list(self.accused),
            "ambiguous": list(self.ambiguous),
            "p_values": {str(j): p for j, p in self.p_values.items()},
            "half_a": self.half_a.to_dict(),
            "half_b": self.half_b.to_dict(),
            "null_hypothesis": NULL_HYPOTHESIS,
        }


class ProductAndAccCode:
    """Two AND-ACC codebooks side by side (SecureMark-DL uses two AG(2,11) codes: 132 x 132 = 17,424 customers).

    Customer ``n`` holds codeword ``a = n // b_B`` of codebook A and ``b = n % b_B`` of
    codebook B; its fingerprint is ``concat(w^A_a, w^B_b)`` (length ``dim_A + dim_B``).

    Limit (inherent, not of this decoder): averaging is done coordinate-wise, so
    the averaged fingerprint of a coalition depends only on the *sets* of A- and
    B-codewords it holds, not on how they are paired. Each half names its
    codewords exactly (up to ``k - 1`` colluders), but when every pair of the grid
    is issued, colluders ``(a1, b1), (a2, b2)`` and innocents ``(a1, b2), (a2, b1)``
    are indistinguishable. :meth:`decode` therefore accuses only customers that
    *every* coalition consistent with both halves contains, and lists the rest as
    ``ambiguous``. Issuing in :meth:`issue_order` (diagonals ``b = a + s`` for a
    modular Sidon set of shifts ``s`` first) keeps the issued set free of such
    rectangles for the first ``|S| * b`` customers, so that two colluders are
    always both accused.
    """

    def __init__(self, code_a: AndAccCode, code_b: AndAccCode) -> None:
        self.a, self.b = code_a, code_b
        self.parts = [code_a, code_b]
        self.n_customers = self.n_codes = code_a.n_codewords * code_b.n_codewords
        self.dim = code_a.dim + code_b.dim
        self.k = min(code_a.k, code_b.k)

    @classmethod
    def from_key(
        cls, key: Key, family: str = "ag", q: int = 11, dim: int | None = None, purpose: str = "and-acc"
    ) -> ProductAndAccCode:
        """Two independent codebooks of ``design(family, q)`` (bases under purposes ``purpose:A`` / ``purpose:B``);
        ``dim`` is the length of each half (default ``v``)."""
        return cls(
            AndAccCode.from_key(key, family, q, dim, purpose + ":A"),
            AndAccCode.from_key(key, family, q, dim, purpose + ":B"),
        )

    def params(self) -> dict[str, Any]:
        return {"a": self.a.params(), "b": self.b.params(), "customers": self.n_customers, "dim": self.dim}

    def pair(self, customer: int) -> tuple[int, int]:
        """``(codeword in A, codeword in B)`` of a customer id."""
        c = int(customer)
        if not 0 <= c < self.n_customers:
            raise IndexError(f"customer code {c} out of range 0..{self.n_customers - 1}")
        return c // self.b.n_codewords, c % self.b.n_codewords

    def customer(self, a: int, b: int) -> int:
        """Customer id of the pair ``(a, b)``."""
        return int(a) * self.b.n_codewords + int(b)

    def fingerprint(self, customer: int) -> np.ndarray:
        """``(dim_A + dim_B,)`` concatenated fingerprint."""
        a, b = self.pair(customer)
        return np.concatenate([self.a.fingerprint(a), self.b.fingerprint(b)])

    def fingerprints(self, customers) -> np.ndarray:
        """``(n, dim)`` fingerprints."""
        c = np.asarray(customers, dtype=np.int64)
        return np.concatenate(
            [self.a.fingerprints(c // self.b.n_codewords), self.b.fingerprints(c % self.b.n_codewords)], axis=1
        )

    def issue_order(self) -> np.ndarray:
        """All customer ids, in the order to hand them out: diagonals ``b = a + s mod n`` for a modular
        Sidon set of shifts first (rectangle-free: see the class doc), then the remaining pairs."""
        na, nb = self.a.n_codewords, self.b.n_codewords
        n = min(na, nb)
        order: list[int] = []
        seen = np.zeros(self.n_customers, dtype=bool)
        for s in sidon_shifts(n) + list(range(n)):
            for a in range(n):
                c = self.customer(a, (a + s) % n)
                if not seen[c]:
                    seen[c] = True
                    order.append(c)
        order.extend(np.flatnonzero(~seen).tolist())
        return np.asarray(order, dtype=np.int64)

    def decode(
        self,
        y: np.ndarray,
        issued: np.ndarray | None = None,
        tau: float | None = None,
        scale: float = 1.0,
    ) -> ProductDecoding:
        """Trace an extracted vector ``y`` (``(dim_A + dim_B,)``).

        ``issued``: customer ids actually handed out (default: all). ``tau``: as in
        :meth:`AndAccCode.decode` (``None``: structural decoder). Each half is
        decoded exactly (:meth:`AndAccCode.decode`); the shortlist is the issued
        customers in ``S_A x S_B``. A shortlisted customer is accused iff it is the
        only shortlisted customer holding its A-codeword or the only one holding
        its B-codeword -- i.e. iff every sub-coalition of the shortlist that
        reproduces both halves contains it. Runs in ``O(|issued|)``.
        """
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.size != self.dim:
            raise ValueError(f"extracted vector has length {y.size}, the product code's fingerprints {self.dim}")
        da = self.a.decode(y[: self.a.dim], tau=tau, scale=scale)
        db = self.b.decode(y[self.a.dim :], tau=tau, scale=scale)
        if not da.accepted or not db.accepted:
            bad = f"a:{da.status}" if not da.accepted else f"b:{db.status}"
            return ProductDecoding(da, db, (), (), bad)
        nb = self.b.n_codewords
        pool = np.arange(self.n_customers) if issued is None else np.unique(np.asarray(issued, dtype=np.int64))
        in_a = np.isin(pool // nb, da.accused)
        in_b = np.isin(pool % nb, db.accused)
        short = pool[in_a & in_b]
        sa, sb = short // nb, short % nb
        if set(sa.tolist()) != set(da.accused) or set(sb.tolist()) != set(db.accused):
            return ProductDecoding(da, db, (), tuple(int(c) for c in short), "not-issued")
        count_a = {a: int((sa == a).sum()) for a in da.accused}
        count_b = {b: int((sb == b).sum()) for b in db.accused}
        necessary = np.array([count_a[a] == 1 or count_b[b] == 1 for a, b in zip(sa, sb, strict=True)], dtype=bool)
        accused = tuple(int(c) for c in short[necessary])
        ambiguous = tuple(int(c) for c in short[~necessary])
        pvals = {}
        for c in accused:
            a, b = self.pair(c)
            pvals[c] = fisher_combine([self.a.p_value(da.coefficients, a), self.b.p_value(db.coefficients, b)])
        status = "accused" if accused else "ambiguous"
        return ProductDecoding(da, db, accused, ambiguous, status, pvals)
