"""Tardos probabilistic fingerprinting codes with the symmetric accusation score (Skoric et al.).

A code of length ``m`` for up to ``n_codes`` customers:

- biases ``p_i`` (``i < m``) drawn once from the key from the arcsine density ``1 / (pi sqrt(p (1 - p)))``
  restricted to ``[t, 1 - t]`` (the *cutoff* ``t``): ``p = sin^2(r)`` with ``r`` uniform on
  ``[arcsin(sqrt t), pi/2 - arcsin(sqrt t)]``;
- customer ``u``'s codeword ``X_u`` in ``{0, 1}^m``: independent ``X_ui ~ Bernoulli(p_i)``, drawn from the key
  (block ``u // 1024`` of the code has its own generator, so one codeword costs a block, not the whole code);
- a suspect's answers ``y`` in ``{0, 1, -1}^m`` (``-1``: no usable answer, e.g. refused or an unexpected
  label) -- or, from an API that shows class probabilities, real answer weights ``w`` in ``[-1, 1]^m``
  (:mod:`nnmark.blackbox.answers`; a hard answer is ``w = +1``, ``-1`` or ``0``) -- and the symmetric score
  ``S_u = sum_i g(X_ui, y_i, p_i)`` with
  ``g(1, 1, p) = sqrt((1-p)/p)``, ``g(0, 1, p) = -sqrt(p/(1-p))``, ``g(0, 0, p) = sqrt(p/(1-p))``,
  ``g(1, 0, p) = -sqrt((1-p)/p)`` and ``g(., -1, p) = 0``; with weights, ``S_u = sum_i w_i U_i(X_ui)``,
  ``U(1) = sqrt((1-p)/p)``, ``U(0) = -sqrt(p/(1-p))`` (the same score when ``w`` is hard).

When ``X_u`` is independent of ``y`` given the biases (customer ``u`` took no part in making the suspect), each
scored term has mean 0 and variance 1 and the null distribution of ``S_u`` is known exactly
(:mod:`nnmark.blackbox.null`). Tardos' bound: length ``m ~ c^2 log(n / eps)`` traces ``c`` colluders among
``n`` customers; the recommended cutoff is ``t ~ 1 / (300 c)``.

The class follows the :class:`~nnmark.codes.base.IdentityCode` surface where it applies: ``n_codes``, ``dim``
(= ``m``), ``k`` (= ``c + 1``: up to ``c`` colluders are the design target, not a hard limit), ``fingerprint``,
``fingerprints``, ``decode`` (the scores), ``params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nnmark.keys import Key
from nnmark.params import Param, Params

PURPOSE = "tardos"
BLOCK = 1024  # codewords per key-derived generator
MAX_SYMBOLS = 1 << 16
MAX_CODES = 1 << 24


def recommended_cutoff(colluders: int) -> float:
    """Tardos' cutoff ``t = 1 / (300 c)`` for ``c`` colluders (``c >= 1``)."""
    return 1.0 / (300.0 * max(1, int(colluders)))


def arcsine_biases(m: int, cutoff: float, rng: np.random.Generator) -> np.ndarray:
    """``(m,)`` float64 biases from the arcsine density cut to ``[cutoff, 1 - cutoff]`` (module doc)."""
    if not 0.0 < cutoff < 0.5:
        raise ValueError(f"the cutoff must lie in (0, 0.5), got {cutoff}")
    lo = float(np.arcsin(np.sqrt(cutoff)))
    r = rng.uniform(lo, np.pi / 2 - lo, size=int(m))
    return np.sin(r) ** 2


def hard_weights(y: np.ndarray) -> np.ndarray:
    """Hard symbols ``y`` ``(m,)`` in {1, 0, -1} as answer weights ``(m,)`` float64: ``+1`` for an answer
    ``b`` (symbol 1), ``-1`` for ``a`` (symbol 0), ``0`` for an unusable answer."""
    y = np.asarray(y).ravel()
    return np.where(y == 1, 1.0, np.where(y == 0, -1.0, 0.0))


def symbol_scores(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-symbol scores ``(s1, s0)`` (each ``(m,)``): the term a codeword bit 1 / bit 0 earns given answers
    ``y`` (``1``, ``0`` or ``-1`` = unusable, which scores 0 either way)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    up, down = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
    s1 = np.where(y == 1, up, np.where(y == 0, -up, 0.0))
    s0 = np.where(y == 1, -down, np.where(y == 0, down, 0.0))
    return s1, s0


@dataclass
class TardosCode:
    """A keyed Tardos code (see the module doc). Build with :meth:`from_key`.

    ``m``: code length (symbols = trigger queries); ``n_codes``: capacity; ``cutoff``: ``t``;
    ``colluders``: the design coalition size ``c`` (only documents the cutoff choice).
    """

    PARAMS = Params(
        Param("m", int, 512, "code length: trigger queries per customer", low=8, high=MAX_SYMBOLS),
        Param("n_codes", int, 10000, "capacity: customers the code serves", low=1, high=MAX_CODES),
        Param("cutoff", float, None, "bias cutoff t (default 1/(300 c))", low=0.0, high=0.5, optional=True),
        Param("colluders", int, 5, "design coalition size c", low=1, high=1000),
    )

    key: Key
    m: int
    n_codes: int
    cutoff: float
    colluders: int = 5

    def __post_init__(self) -> None:
        if not 8 <= int(self.m) <= MAX_SYMBOLS:
            raise ValueError(f"code length m must be in [8, {MAX_SYMBOLS}], got {self.m}")
        if not 1 <= int(self.n_codes) <= MAX_CODES:
            raise ValueError(f"n_codes must be in [1, {MAX_CODES}], got {self.n_codes}")
        self.m, self.n_codes = int(self.m), int(self.n_codes)
        self.biases = arcsine_biases(self.m, float(self.cutoff), self.key.numpy_rng(f"{PURPOSE}/biases:{self.m}"))
        self._blocks: dict[int, np.ndarray] = {}

    @classmethod
    def from_key(cls, key: Key, m: int = 512, n_codes: int = 10000, cutoff: float | None = None,
                 colluders: int = 5) -> TardosCode:
        """The code of ``key`` (use a child key of the product key)."""
        t = recommended_cutoff(colluders) if cutoff is None else float(cutoff)
        return cls(key, int(m), int(n_codes), t, int(colluders))

    # -- IdentityCode surface ------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.m

    @property
    def k(self) -> int:
        return self.colluders + 1

    @property
    def parts(self) -> list[Any]:
        return [self]

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rows = min(BLOCK, self.n_codes - b * BLOCK)
            rng = self.key.numpy_rng(f"{PURPOSE}/codewords:{self.m}:{b}")
            self._blocks[b] = rng.random((rows, self.m)) < self.biases
            if len(self._blocks) > 64:  # bound the cache (64 blocks x 1024 x m bits)
                self._blocks.pop(next(iter(self._blocks)))
        return self._blocks[b]

    def codeword(self, code: int) -> np.ndarray:
        """Customer code ``code``'s bits ``(m,)`` bool."""
        code = int(code)
        if not 0 <= code < self.n_codes:
            raise ValueError(f"code index {code} outside [0, {self.n_codes})")
        return self._block(code // BLOCK)[code % BLOCK].copy()

    def codewords(self, codes: Any = None) -> np.ndarray:
        """Bits ``(len(codes), m)`` bool of several codes (default: all ``n_codes``)."""
        idx = np.arange(self.n_codes) if codes is None else np.asarray(codes, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_codes):
            raise ValueError(f"code indices must lie in [0, {self.n_codes})")
        out = np.empty((idx.size, self.m), dtype=bool)
        for b in np.unique(idx // BLOCK):
            sel = np.nonzero(idx // BLOCK == b)[0]
            out[sel] = self._block(int(b))[idx[sel] % BLOCK]
        return out

    def fingerprint(self, code: int) -> np.ndarray:
        """The codeword as ``(m,)`` float64 in ``{-1, +1}``."""
        return self.codeword(code).astype(np.float64) * 2 - 1

    def fingerprints(self, codes: Any) -> np.ndarray:
        return self.codewords(codes).astype(np.float64) * 2 - 1

    def scores(self, y: np.ndarray | None = None, codes: Any = None, symbols: np.ndarray | None = None, *,
               weights: np.ndarray | None = None) -> np.ndarray:
        """Symmetric accusation scores ``(len(codes),)`` of hard answers ``y`` (``(m,)`` in {1, 0, -1}) or of
        real answer weights ``weights`` (``(m,)`` in [-1, 1]; :func:`hard_weights` maps ``y`` to them):
        ``S_u = sum_i w_i U_i(X_ui)`` with ``U = sqrt((1-p)/p)`` for a bit 1, ``-sqrt(p/(1-p))`` for a bit 0.

        ``symbols``: restrict to these symbol positions (``y``/``weights`` then have their length); default
        all. Give exactly one of ``y`` and ``weights``."""
        if (y is None) == (weights is None):
            raise ValueError("give exactly one of the hard symbols y or the answer weights")
        w = hard_weights(y) if y is not None else np.asarray(weights, dtype=np.float64).ravel()
        p = self.biases if symbols is None else self.biases[np.asarray(symbols)]
        if w.shape != p.shape:
            raise ValueError(f"{w.size} answers for {p.size} symbols")
        up, down = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
        idx = np.arange(self.n_codes) if codes is None else np.asarray(codes, dtype=np.int64).ravel()
        out = np.empty(idx.size, dtype=np.float64)
        base = float(-(w * down).sum())  # every bit 0
        diff = w * (up + down)  # what a bit 1 adds
        for start in range(0, idx.size, BLOCK):
            x = self.codewords(idx[start:start + BLOCK])
            if symbols is not None:
                x = x[:, np.asarray(symbols)]
            out[start:start + BLOCK] = base + x @ diff
        return out

    def decode(self, y: np.ndarray, issued: np.ndarray | None = None, tau: float | None = None,
               scale: float = 1.0) -> np.ndarray:
        """The scores of ``issued`` codes (default all): tracing with p-values is in :mod:`nnmark.blackbox`."""
        return self.scores(y, issued)

    def params(self) -> dict[str, Any]:
        return {"family": "tardos", "m": self.m, "n_codes": self.n_codes, "cutoff": self.cutoff,
                "colluders": self.colluders}
