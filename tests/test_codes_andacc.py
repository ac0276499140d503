"""AND-ACC codes: exact tracing of random coalitions, no accusation without this key's fingerprint."""

import time
import tracemalloc

import numpy as np
import pytest

from nnmark.codes.andacc import AndAccCode, ProductAndAccCode, haar_basis, sidon_shifts
from nnmark.keys import Key

KEY = Key.from_seed("andacc-test")


def test_basis_is_orthonormal_and_keyed():
    b = haar_basis(KEY, "p", 60, 49)
    assert b.shape == (60, 49)
    assert np.allclose(b.T @ b, np.eye(49), atol=1e-10)
    assert np.array_equal(b, haar_basis(KEY, "p", 60, 49))
    assert not np.allclose(b, haar_basis(Key.from_seed("other"), "p", 60, 49))
    with pytest.raises(ValueError):
        haar_basis(KEY, "p", 10, 49)


def test_codewords_are_complements_of_blocks():
    c = AndAccCode.from_key(KEY, "ag", 7)
    assert (c.v, c.k, c.n_codewords) == (49, 7, 56)
    for j in (0, 13, 55):
        assert (c.codeword(j) == 1 - c.incidence[:, j]).all()
        assert c.codeword(j).sum() == 49 - 7
        w = c.fingerprint(j)
        assert np.isclose(np.linalg.norm(w), 7.0)
        assert np.allclose(c.demodulate(w), c.signs(j))
    with pytest.raises(IndexError):
        c.fingerprint(56)


@pytest.mark.parametrize("q,sigma", [(7, 0.03), (11, 0.01)])
def test_random_coalitions_are_traced_exactly(q, sigma):
    """Coalitions of 1..k-1 average their fingerprints (plus Gaussian noise of std sigma per coordinate):
    every colluder is named and no innocent, for every trial."""
    c = AndAccCode.from_key(KEY, "ag", q, dim=c_dim(q))
    rng = np.random.default_rng(q)
    for size in range(1, c.k):
        for _ in range(40):
            coalition = rng.choice(c.n_codewords, size, replace=False)
            y = c.fingerprints(coalition).mean(axis=0) + rng.normal(0, sigma, c.dim)
            d = c.decode(y)
            assert d.status == "accused", (size, d.status)
            assert set(d.accused) == set(coalition.tolist())
            assert all(p < 1e-6 for p in d.p_values.values())


def c_dim(q):
    return q * q + 5  # fingerprint longer than v: a basis of orthonormal columns


@pytest.mark.parametrize("tau", [None, 0.85])
def test_batch_decoder_agrees_with_single(tau):
    c = AndAccCode.from_key(KEY, "ag", 7)
    rng = np.random.default_rng(1)
    coal = [rng.choice(56, rng.integers(1, 9), replace=False) for _ in range(50)]
    ys = np.stack([c.fingerprints(s).mean(0) + rng.normal(0, 0.05, c.dim) for s in coal])
    out = c.decode_coefficients_batch(c.demodulate(ys), tau=tau)
    for i, y in enumerate(ys):
        d = c.decode(y, tau=tau)
        assert d.accepted == bool(out["accepted"][i])
        assert set(d.candidates) == set(np.flatnonzero(out["candidates"][i]).tolist())
        assert set(d.accused) == set(np.flatnonzero(out["accused"][i]).tolist())


@pytest.mark.parametrize("q,sigma", [(7, 0.035), (11, 0.02)])
def test_structural_decoder_traces_up_to_k_minus_1_in_noise(q, sigma):
    """The structural decoder (default) at noise where the hard threshold tau = 0.85 loses coalitions of
    k - 1 (AG(2,11), K = 10: covered positions at 0.8, 2 sigma from tau): every coalition of 1..k-1 is
    named exactly, nobody else -- up to the lack-of-fit test's designed refusal rate (1e-3 a trial: at
    most 2 of the 180-300 trials here) -- and the threshold decoder does measurably worse."""
    c = AndAccCode.from_key(KEY, "ag", q)
    rng = np.random.default_rng(1000 + q)
    threshold_exact = refused = 0
    for size in range(1, c.k):
        for _ in range(30):
            coalition = rng.choice(c.n_codewords, size, replace=False)
            coef = c.demodulate(c.fingerprints(coalition).mean(0) + rng.normal(0, sigma, c.dim))
            d = c.decode_coefficients(coef * 0.9)  # a gain below 1 (pruning): the decoder is scale-free
            if d.status != "accused":
                refused += 1
                assert d.accused == () and d.status == "unexplained"
                continue
            assert set(d.accused) == set(coalition.tolist()), (size, d.status)
            assert 0.85 < d.gain < 0.95
            threshold_exact += set(c.decode_coefficients(coef, tau=0.85).accused) == set(coalition.tolist())
    assert refused <= 2
    if q == 11:
        assert threshold_exact < 30 * (c.k - 1)


def test_structural_decoder_refuses_k_or_more_colluders():
    """Coalitions of k or more -- random, a whole parallel class plus a few lines (uniform coverage plus a
    pattern that a small coalition would leave), and all lines through a point -- are never traced to an
    innocent; random ones and the structured ones here are refused outright."""
    c = AndAccCode.from_key(KEY, "ag", 7)
    rng = np.random.default_rng(77)
    inc = c.incidence.astype(int)
    # AG(2,q)'s parallel classes: maximal sets of pairwise disjoint lines
    classes, left = [], set(range(c.n_codewords))
    while left:
        j = min(left)
        cls = [i for i in left if not (inc[:, i] & inc[:, j]).any() or i == j]
        classes.append(cls)
        left -= set(cls)
    assert len(classes) == 8 and all(len(cl) == 7 for cl in classes)
    structured = [classes[0] + classes[1][:s] for s in range(1, 7)]
    structured += [classes[0] + classes[1]]
    structured += [list(np.flatnonzero(inc[0]))]  # the 8 lines through point 0
    for sigma in (0.0, 0.01, 0.03):
        for coalition in structured + [list(rng.choice(56, s, replace=False)) for s in (7, 8, 10, 13, 20) * 20]:
            coef = c.demodulate(c.fingerprints(coalition).mean(0) + rng.normal(0, sigma, c.dim))
            d = c.decode_coefficients(coef)
            assert d.accused == (), (len(coalition), sigma, d.status, d.accused)


def test_structural_decoder_without_fingerprint_names_nobody():
    """Under H0 the ranks of the coefficients are uniformly random: a prefix that is exactly a union of 1..k-1
    blocks (the decoder's first condition) has probability below the exact bound, here < 1e-5."""
    rng = np.random.default_rng(5)
    for q in (7, 11):
        c = AndAccCode.from_key(KEY, "ag", q)
        assert c.null_union_bound() < 1e-5
        coef = rng.normal(0, 1, (3000, c.v))
        assert not any(c.union_prefixes(row) for row in coef)
        assert c.decode_coefficients(np.zeros(c.v)).status == "no-candidate"
        assert c.decode_coefficients(np.full(c.v, np.nan)).accused == ()


@pytest.mark.parametrize("q", [7, 11])
def test_no_fingerprint_names_nobody(q):
    c = AndAccCode.from_key(KEY, "ag", q)
    rng = np.random.default_rng(100 + q)
    other = AndAccCode.from_key(Key.from_seed("someone else"), "ag", q)
    cases = [np.zeros(c.dim)]
    cases += [rng.normal(0, s, c.dim) for s in (0.01, 0.1, 1.0, 10.0) for _ in range(50)]
    cases += [other.fingerprint(j) for j in range(other.n_codewords)]
    cases += [other.fingerprints(rng.choice(other.n_codewords, 3, replace=False)).mean(0) for _ in range(50)]
    for y in cases:
        d = c.decode(y)
        assert d.accused == (), d.status


def test_coalitions_larger_than_k_minus_1_are_not_mistraced():
    """With k or more colluders the named set would exceed k-1: the guard refuses rather than accuse."""
    c = AndAccCode.from_key(KEY, "ag", 7)
    rng = np.random.default_rng(7)
    for size in (7, 8, 10, 13):
        for _ in range(30):
            coalition = rng.choice(c.n_codewords, size, replace=False)
            d = c.decode(c.fingerprints(coalition).mean(0))
            assert set(d.accused) <= set(coalition.tolist())
            assert d.accused == ()


def test_p_value_is_uniform_under_h0():
    """Under H0 (model independent of the key) the cosine p-value is exactly Uniform(0, 1) over keys,
    whatever the model's vector (here a fixed, very non-Gaussian one)."""
    from scipy import stats as sps

    d = AndAccCode.from_key(KEY, "ag", 7).design
    y = np.r_[np.full(30, 3.0), np.zeros(19)]  # one fixed 'model'
    ps = []
    for s in range(600):
        c = AndAccCode(d, haar_basis(Key.from_seed(s), "b", 49, 49))
        ps.append(c.p_value(c.demodulate(y), 0))
    ps = np.array(ps)
    assert np.mean(ps <= 0.05) <= 0.08 and np.mean(ps <= 0.5) <= 0.58
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    assert c.p_value(np.zeros(49), 0) == 1.0


def test_projective_plane_codes_trace_too():
    c = AndAccCode.from_key(KEY, "pg", 5)  # (31, 6, 1): up to 5 colluders
    rng = np.random.default_rng(5)
    for size in range(1, 6):
        s = rng.choice(c.n_codewords, size, replace=False)
        assert set(c.decode(c.fingerprints(s).mean(0)).accused) == set(s.tolist())


def test_product_code_capacity_and_tracing_speed():
    p = ProductAndAccCode.from_key(KEY, "ag", 11)
    assert p.n_customers == 132 * 132 == 17424 and p.dim == 242
    rng = np.random.default_rng(11)
    single = int(rng.integers(p.n_customers))
    tracemalloc.start()
    t0 = time.perf_counter()
    d = p.decode(p.fingerprint(single) + rng.normal(0, 0.01, p.dim))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert d.accused == (single,) and d.ambiguous == ()
    assert d.p_values[single] < 1e-30
    assert elapsed < 1.0 and peak < 500e6


def test_product_code_never_accuses_innocents():
    """Averaging loses how A- and B-codewords are paired; the decoder accuses only provable colluders."""
    p = ProductAndAccCode.from_key(KEY, "ag", 7)
    rng = np.random.default_rng(12)
    order = p.issue_order()
    assert sorted(order.tolist()) == list(range(p.n_customers))
    for issued in (order[: 56 * 4], order):  # Sidon diagonals only, then every pair issued
        found = 0
        for _ in range(60):
            size = int(rng.integers(1, 7))
            s = rng.choice(issued, size, replace=False)
            d = p.decode(p.fingerprints(s).mean(0) + rng.normal(0, 0.01, p.dim), issued=issued)
            assert set(d.accused) <= set(s.tolist())
            assert set(d.accused) | set(d.ambiguous) >= set(s.tolist())
            found += len(d.accused)
        assert found > 0
    # two colluders on a rectangle-free issue order are always both accused
    issued = order[:56]
    for _ in range(30):
        s = rng.choice(issued, 2, replace=False)
        assert set(p.decode(p.fingerprints(s).mean(0), issued=issued).accused) == set(s.tolist())
    # unmarked and foreign vectors: nobody
    assert p.decode(np.zeros(p.dim)).accused == ()
    other = ProductAndAccCode.from_key(Key.from_seed("x"), "ag", 7)
    assert p.decode(other.fingerprint(5)).accused == ()


def test_sidon_shifts_have_distinct_differences():
    s = sidon_shifts(132)
    diffs = [(a - b) % 132 for a in s for b in s if a != b]
    assert len(diffs) == len(set(diffs)) and len(s) >= 8


def test_fingerprint_layout_crc_and_cic():
    from nnmark.codes import FingerprintLayout

    code = AndAccCode.from_key(KEY, "ag", 7)
    lay = FingerprintLayout(code, crc_bits=10)
    assert lay.dim == 59 and lay.n_codes == 56
    crc_a = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 1])
    crc_b = crc_a.copy()
    crc_b[0] = 0
    f = (lay.compose(3, crc_a) + lay.compose(40, crc_b)) / 2
    t = lay.trace(f)
    assert set(t.accused_codes) == {3, 40}
    assert (t.crc_bits[1:] == crc_a[1:]).all() and t.crc_strength[0] == 0.0
    assert t.to_dict()["cic"]["status"] == "accused"
    with pytest.raises(ValueError):
        lay.compose(3)
    with pytest.raises(ValueError):
        lay.trace(np.zeros(10))
    assert lay.trace(np.zeros(59)).accused_codes == ()
    prod = FingerprintLayout(ProductAndAccCode.from_key(KEY, "ag", 7))
    assert prod.n_codes == 56 * 56 and prod.trace(prod.compose(77)).accused_codes == (77,)
