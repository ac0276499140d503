"""(v, k, 1) balanced incomplete block designs from finite planes.

A (v, k, 1)-BIBD is a set of ``v`` points and ``b`` blocks (subsets of ``k``
points) such that every pair of distinct points lies in exactly one block; then
every point lies in ``r = (v - 1) / (k - 1)`` blocks and ``b = v r / k``. Two
families, both over a finite field GF(q) (q a prime or prime power,
:mod:`nnmark.codes.galois`):

- the affine plane AG(2, q): points ``(x, y)`` in GF(q)^2 (index ``x*q + y``),
  blocks the lines ``y = m x + c`` and ``x = c``: a (q^2, q, 1) design with
  ``q^2 + q`` blocks, ``r = q + 1``;
- the projective plane PG(2, q): points and lines the 1- and 2-dimensional
  subspaces of GF(q)^3 (each named by its normalised homogeneous coordinates:
  first non-zero coordinate 1), a point on a line iff their dot product is 0:
  a (q^2+q+1, q+1, 1) design with as many blocks as points.

The design is returned as its ``v x b`` incidence matrix (points x blocks,
``uint8``), built by field arithmetic -- not from a table -- and checked by
:meth:`Design.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnmark.codes.galois import GF


@dataclass(frozen=True)
class Design:
    """A block design given by its incidence matrix.

    Attributes
    ----------
    name: e.g. ``"AG(2,7)"``.
    incidence: ``(v, b)`` uint8, ``incidence[i, j] = 1`` iff point ``i`` lies in block ``j``.
    """

    name: str
    incidence: np.ndarray

    @property
    def v(self) -> int:
        """Number of points."""
        return int(self.incidence.shape[0])

    @property
    def b(self) -> int:
        """Number of blocks."""
        return int(self.incidence.shape[1])

    @property
    def k(self) -> int:
        """Block size (the largest, for a design that is not yet verified)."""
        return int(self.incidence.sum(axis=0).max())

    @property
    def r(self) -> int:
        """Replication: blocks through a point (the largest)."""
        return int(self.incidence.sum(axis=1).max())

    def blocks(self) -> list[np.ndarray]:
        """The point indices of each block."""
        return [np.flatnonzero(self.incidence[:, j]) for j in range(self.b)]

    def verify(self, lam: int = 1) -> None:
        """Check the (v, k, lam)-BIBD property from the incidence matrix alone:
        all blocks have the same size ``k`` (``1 < k < v``), every point lies in the
        same number ``r`` of blocks, and every pair of distinct points lies in
        exactly ``lam`` blocks. Raises ``ValueError`` naming the first violation."""
        n = self.incidence.astype(np.int64)
        sizes = n.sum(axis=0)
        if sizes.min() != sizes.max():
            raise ValueError(f"{self.name}: block sizes range over {sizes.min()}..{sizes.max()}")
        k = int(sizes[0])
        if not 1 < k < self.v:
            raise ValueError(f"{self.name}: block size {k} is not between 2 and v-1")
        reps = n.sum(axis=1)
        if reps.min() != reps.max():
            raise ValueError(f"{self.name}: points lie in {reps.min()}..{reps.max()} blocks")
        pairs = n @ n.T  # pairs[i, j] = number of blocks containing both i and j
        off = pairs[~np.eye(self.v, dtype=bool)]
        if off.min() != lam or off.max() != lam:
            bad = np.argwhere((pairs != lam) & ~np.eye(self.v, dtype=bool))[0]
            raise ValueError(
                f"{self.name}: points {bad[0]} and {bad[1]} share {pairs[bad[0], bad[1]]} blocks, not {lam}"
            )


def affine_plane(q: int) -> Design:
    """AG(2, q) as a (q^2, q, 1)-BIBD with ``q^2 + q`` blocks.

    Point ``(x, y)`` has index ``x*q + y``. Blocks ``0 .. q^2-1`` are the lines
    ``y = m x + c`` with block index ``m*q + c``; blocks ``q^2 .. q^2+q-1`` the
    vertical lines ``x = c``.
    """
    F = GF(q)
    el = F.elements()
    inc = np.zeros((q * q, q * q + q), dtype=np.uint8)
    x = el[:, None]  # (q, 1)
    for m in range(q):
        mx = F.mul(m, x)  # (q, 1)
        for c in range(q):
            y = F.add(mx, c)[:, 0]  # the line's y for each x
            inc[el * q + y, m * q + c] = 1
    for c in range(q):
        inc[c * q + el, q * q + c] = 1
    return Design(f"AG(2,{q})", inc)


def _normalised_triples(q: int) -> np.ndarray:
    """The q^2+q+1 normalised homogeneous coordinates of PG(2, q): (1, a, b), (0, 1, a), (0, 0, 1)."""
    el = np.arange(q, dtype=np.int32)
    a, b = np.meshgrid(el, el, indexing="ij")
    first = np.stack([np.ones(q * q, np.int32), a.ravel(), b.ravel()], axis=1)
    second = np.stack([np.zeros(q, np.int32), np.ones(q, np.int32), el], axis=1)
    third = np.array([[0, 0, 1]], dtype=np.int32)
    return np.concatenate([first, second, third])


def projective_plane(q: int) -> Design:
    """PG(2, q) as a (q^2+q+1, q+1, 1)-BIBD (a symmetric design: b = v).

    Points and lines are both indexed by the normalised triples
    ``(1, a, b)`` (index ``a*q + b``), ``(0, 1, a)`` (``q^2 + a``), ``(0, 0, 1)``
    (``q^2 + q``); point ``P`` is on line ``L`` iff ``P . L = 0`` in GF(q).
    """
    F = GF(q)
    t = _normalised_triples(q)  # (n, 3)
    p_, l_ = t[:, None, :], t[None, :, :]
    dot = F.add(F.add(F.mul(p_[..., 0], l_[..., 0]), F.mul(p_[..., 1], l_[..., 1])), F.mul(p_[..., 2], l_[..., 2]))
    return Design(f"PG(2,{q})", (dot == 0).astype(np.uint8))


def design(family: str, q: int) -> Design:
    """``design("ag", q)`` or ``design("pg", q)``."""
    fam = family.lower()
    if fam in ("ag", "affine"):
        return affine_plane(q)
    if fam in ("pg", "projective"):
        return projective_plane(q)
    raise ValueError(f"unknown design family {family!r} (use 'ag' or 'pg')")
