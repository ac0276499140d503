"""Finite fields GF(q) for q a prime or a prime power.

Elements are the integers ``0 .. q-1``. For ``q = p**m`` an element ``x`` stands
for the polynomial ``sum_i d_i t**i`` whose coefficients ``d_i`` are the base-``p``
digits of ``x``; arithmetic is polynomial arithmetic over GF(p) modulo a monic
irreducible polynomial of degree ``m`` that is *found* at construction (the
lexicographically smallest one, checked by trial division by every monic
polynomial of degree ``<= m/2``). For prime ``q`` this reduces to integers mod p.

The field is small (it indexes the points of a finite plane), so addition and
multiplication are precomputed as ``q x q`` tables; :meth:`GF.add` / :meth:`GF.mul`
accept numpy arrays and are vectorised table look-ups.
"""

from __future__ import annotations

import numpy as np

MAX_ORDER = 1024  # tables are q*q int32 (4 MiB at this size); planes of larger order are impractical codes


def prime_power(q: int) -> tuple[int, int]:
    """``(p, m)`` with ``q == p**m`` and ``p`` prime; ``ValueError`` if ``q`` is not a prime power."""
    if not isinstance(q, (int, np.integer)) or q < 2:
        raise ValueError(f"a field order must be an integer >= 2, got {q!r}")
    q = int(q)
    p = next((d for d in range(2, int(q**0.5) + 1) if q % d == 0), q)
    m, r = 0, q
    while r % p == 0:
        r //= p
        m += 1
    if r != 1:
        raise ValueError(f"{q} is not a prime power, so there is no field of that order")
    return p, m


def _poly_mod(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of ``a`` by monic ``b`` over GF(p); polynomials as coefficient lists, lowest degree first."""
    a = list(a)
    db = len(b) - 1
    while len(a) - 1 >= db and any(a):
        while a and a[-1] == 0:
            a.pop()
        if len(a) - 1 < db:
            break
        coef = a[-1]
        shift = len(a) - 1 - db
        for i, bi in enumerate(b):
            a[shift + i] = (a[shift + i] - coef * bi) % p
        a.pop()
    while a and a[-1] == 0:
        a.pop()
    return a


def _monic_polys(degree: int, p: int):
    """All monic polynomials of ``degree`` over GF(p) (coefficient lists, lowest first)."""
    for low in range(p**degree):
        coeffs = [(low // p**i) % p for i in range(degree)]
        yield coeffs + [1]


def is_irreducible(poly: list[int], p: int) -> bool:
    """Whether monic ``poly`` (coefficients lowest first) is irreducible over GF(p), by trial division."""
    m = len(poly) - 1
    if m <= 0:
        return False
    for d in range(1, m // 2 + 1):
        for divisor in _monic_polys(d, p):
            if not _poly_mod(poly, divisor, p):
                return False
    return True


def find_irreducible(p: int, m: int) -> list[int]:
    """The lexicographically smallest monic irreducible polynomial of degree ``m`` over GF(p)."""
    for poly in _monic_polys(m, p):
        if poly[0] != 0 and is_irreducible(poly, p):  # constant term 0 means t divides it
            return poly
        if m == 1:
            return poly  # t + c is always irreducible (including t itself)
    raise ValueError(f"no irreducible polynomial of degree {m} over GF({p})")  # pragma: no cover


class GF:
    """The finite field with ``q`` elements.

    Attributes
    ----------
    q, p, m: order, characteristic and degree (``q == p**m``).
    modulus: the irreducible polynomial used (coefficients lowest degree first;
        ``[0, 1]`` i.e. ``t`` for prime fields).
    add_table, mul_table: ``(q, q)`` int32 arrays.
    neg, inv: ``(q,)`` additive inverses and multiplicative inverses (``inv[0] = -1``).
    """

    def __init__(self, q: int) -> None:
        p, m = prime_power(q)
        if q > MAX_ORDER:
            raise ValueError(f"GF({q}) is larger than the supported {MAX_ORDER}")
        self.q, self.p, self.m = int(q), p, m
        self.modulus = find_irreducible(p, m) if m > 1 else [0, 1]
        digits = np.array([[(x // p**i) % p for i in range(m)] for x in range(q)], dtype=np.int64)  # (q, m)
        weights = p ** np.arange(m, dtype=np.int64)
        # addition: digit-wise mod p
        add_digits = (digits[:, None, :] + digits[None, :, :]) % p
        self.add_table = (add_digits @ weights).astype(np.int32)
        # multiplication: polynomial product then reduction modulo the irreducible polynomial
        mul = np.zeros((q, q), dtype=np.int32)
        if m == 1:
            el = np.arange(q, dtype=np.int64)
            mul[:] = np.outer(el, el) % p
        for a in range(q if m > 1 else 0):
            for b in range(a, q):
                prod = [0] * (2 * m - 1)
                for i in range(m):
                    if digits[a, i]:
                        for j in range(m):
                            prod[i + j] = (prod[i + j] + int(digits[a, i]) * int(digits[b, j])) % p
                rem = _poly_mod(prod, self.modulus, p) if m > 1 else [prod[0] % p]
                val = sum(int(c) * p**i for i, c in enumerate(rem))
                mul[a, b] = mul[b, a] = val
        self.mul_table = mul
        self.neg = np.argmax(self.add_table == 0, axis=1).astype(np.int32)
        inv = np.full(q, -1, dtype=np.int32)
        inv[1:] = np.argmax(mul[1:] == 1, axis=1)
        self.inv = inv

    def add(self, a, b):
        """Field sum (numpy broadcasting)."""
        return self.add_table[a, b]

    def sub(self, a, b):
        """Field difference ``a - b``."""
        return self.add_table[a, self.neg[b]]

    def mul(self, a, b):
        """Field product (numpy broadcasting)."""
        return self.mul_table[a, b]

    def elements(self) -> np.ndarray:
        """``arange(q)``."""
        return np.arange(self.q, dtype=np.int32)

    def __repr__(self) -> str:
        return f"GF({self.q})"
