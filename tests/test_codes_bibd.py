"""Finite fields and BIBDs: the field axioms and the design property are checked, not looked up."""

import itertools

import numpy as np
import pytest

from nnmark.codes.bibd import Design, affine_plane, design, projective_plane
from nnmark.codes.galois import GF, find_irreducible, is_irreducible, prime_power

ORDERS = [2, 3, 4, 5, 7, 8, 9, 11, 16, 25, 27]


@pytest.mark.parametrize("q", ORDERS)
def test_field_axioms(q):
    F = GF(q)
    el = F.elements()
    add, mul = F.add_table, F.mul_table
    # closure, identities, commutativity
    assert add.min() >= 0 and add.max() < q and mul.min() >= 0 and mul.max() < q
    assert (add[0] == el).all() and (mul[1] == el).all() and (mul[0] == 0).all()
    assert (add == add.T).all() and (mul == mul.T).all()
    # every row of + is a permutation; every non-zero row of * is a permutation (inverses exist)
    assert all(len(set(add[a])) == q for a in range(q))
    assert all(len(set(mul[a])) == q for a in range(1, q))
    assert (mul[el[1:], F.inv[1:]] == 1).all()
    # associativity and distributivity on all triples
    a, b, c = np.meshgrid(el, el, el, indexing="ij")
    assert (add[add[a, b], c] == add[a, add[b, c]]).all()
    assert (mul[mul[a, b], c] == mul[a, mul[b, c]]).all()
    assert (mul[a, add[b, c]] == add[mul[a, b], mul[a, c]]).all()
    # characteristic p: p * 1 = 0
    x = 0
    for _ in range(F.p):
        x = F.add(x, 1)
    assert x == 0


def test_prime_power_parsing_and_irreducibility():
    assert prime_power(8) == (2, 3) and prime_power(9) == (3, 2) and prime_power(121) == (11, 2)
    for bad in (1, 6, 12, 100):
        with pytest.raises(ValueError):
            prime_power(bad)
    # x^2 + 1 is reducible over GF(2) ((x+1)^2) but irreducible over GF(3)
    assert not is_irreducible([1, 0, 1], 2) and is_irreducible([1, 0, 1], 3)
    poly = find_irreducible(2, 4)
    assert len(poly) == 5 and poly[-1] == 1
    # irreducible of degree 4 over GF(2): no root and no quadratic factor x^2+x+1
    assert is_irreducible(poly, 2)


def _check_design_by_pairs(d: Design, v: int, k: int, b: int) -> None:
    """Independent of Design.verify: enumerate the point pairs."""
    assert d.incidence.shape == (v, b)
    blocks = [set(np.flatnonzero(d.incidence[:, j]).tolist()) for j in range(b)]
    assert all(len(B) == k for B in blocks)
    r = (v - 1) // (k - 1)
    assert (d.incidence.sum(axis=1) == r).all()
    count = {}
    for B in blocks:
        for pair in itertools.combinations(sorted(B), 2):
            count[pair] = count.get(pair, 0) + 1
    assert len(count) == v * (v - 1) // 2 and set(count.values()) == {1}


@pytest.mark.parametrize("q", [2, 3, 4, 5, 7, 8, 9])
def test_affine_plane_is_a_bibd(q):
    d = affine_plane(q)
    d.verify()
    _check_design_by_pairs(d, q * q, q, q * q + q)


@pytest.mark.parametrize("q", [2, 3, 4, 5, 7, 8, 9])
def test_projective_plane_is_a_bibd(q):
    d = projective_plane(q)
    d.verify()
    n = q * q + q + 1
    _check_design_by_pairs(d, n, q + 1, n)
    # symmetric design: any two blocks meet in exactly one point
    meet = d.incidence.astype(int).T @ d.incidence.astype(int)
    assert (meet[~np.eye(n, dtype=bool)] == 1).all()


def test_large_planes_verify():
    for q in (11, 13, 16):
        design("ag", q).verify()
        design("pg", q).verify()


def test_verify_rejects_a_broken_design():
    inc = affine_plane(3).incidence.copy()
    inc[0, 0], inc[1, 0] = 1 - inc[0, 0], 1 - inc[1, 0]
    with pytest.raises(ValueError):
        Design("broken", inc).verify()
    with pytest.raises(ValueError):
        design("xx", 3)
