"""Reed-Solomon chained AND-ACC codebooks: exact tracing of up to L - 1 colluders among
p**2 customers, where two codebooks side by side trace only one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nnmark.codes.concatenated import ReedSolomonAndAccCode, largest_prime_at_most
from nnmark.keys import Key


@pytest.fixture(scope="module")
def rs4():
    return ReedSolomonAndAccCode.from_key(Key.from_seed("rs"), "ag", 11, parts=4)


def test_parameters(rs4):
    assert rs4.p == 131 and rs4.n_customers == 17_161 and rs4.dim == 4 * 121
    assert rs4.max_colluders == 3
    assert largest_prime_at_most(132) == 131 and largest_prime_at_most(56) == 53


def test_two_customers_share_at_most_one_codeword():
    code = ReedSolomonAndAccCode.from_key(Key.from_seed("rs5"), "ag", 5, parts=4)  # p = 29: 841 customers
    s = code.symbols(np.arange(code.n_customers))
    for i, j in itertools.combinations(range(code.L), 2):
        pairs = s[:, i] * code.p + s[:, j]
        assert len(np.unique(pairs)) == code.n_customers  # two symbols fix the customer


@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_random_coalitions_up_to_L_minus_1_named_exactly(rs4, sigma):
    """Noise-free: every coalition of 1..3 named exactly. With noise (std 0.02 on every
    coordinate, coefficients +-1) a codebook may refuse, and then the whole trace refuses:
    nobody innocent is ever named, and at least 95% of the traces are exact."""
    rng = np.random.default_rng(1)
    exact = total = 0
    for K in (1, 2, 3):
        for _ in range(60):
            coalition = sorted(int(c) for c in rng.choice(rs4.n_customers, size=K, replace=False))
            y = rs4.fingerprints(coalition).mean(0) + rng.normal(0, sigma, rs4.dim)
            dec = rs4.decode(y)
            assert set(dec.accused) <= set(coalition)
            total += 1
            if dec.status == "accused":
                assert sorted(dec.accused) == coalition and max(dec.p_values.values()) < 1e-6
                exact += 1
    assert exact == total if sigma == 0 else exact >= 0.95 * total


def test_larger_coalitions_never_name_an_innocent(rs4):
    rng = np.random.default_rng(2)
    refused = 0
    for K in (4, 6, 10, 12):
        for _ in range(40):
            coalition = rng.choice(rs4.n_customers, size=K, replace=False)
            dec = rs4.decode(rs4.fingerprints(coalition).mean(0))
            assert set(dec.accused) <= set(int(c) for c in coalition)
            refused += not dec.accused
    assert refused == 160  # beyond L - 1 colluders the decoder refuses


def test_two_codebooks_cannot_separate_two_colluders():
    """L = 2 is the paper's product of two codebooks: one colluder is traced, two are refused."""
    code = ReedSolomonAndAccCode.from_key(Key.from_seed("rs2"), "ag", 11, parts=2)
    rng = np.random.default_rng(3)
    one = int(rng.integers(code.n_customers))
    assert code.decode(code.fingerprint(one)).accused == (one,)
    pair = rng.choice(code.n_customers, size=2, replace=False)
    dec = code.decode(code.fingerprints(pair).mean(0))
    assert dec.status == "too-many" and not dec.accused and len(dec.candidates) == 4


def test_no_fingerprint_and_other_key_name_nobody(rs4):
    rng = np.random.default_rng(4)
    other = ReedSolomonAndAccCode.from_key(Key.from_seed("rs-other"), "ag", 11, parts=4)
    vectors = [np.zeros(rs4.dim), *rng.normal(0, 1, (50, rs4.dim)), *rng.normal(0, 0.05, (50, rs4.dim))]
    vectors += [other.fingerprints(rng.choice(other.n_customers, size=k, replace=False)).mean(0)
                for k in (1, 2, 3) for _ in range(20)]
    for y in vectors:
        assert not rs4.decode(y).accused


def test_unissued_customer_is_not_accused(rs4):
    coalition = [5, 900]
    y = rs4.fingerprints(coalition).mean(0)
    dec = rs4.decode(y, issued=np.array([5, 17]))
    assert dec.status == "not-issued" and not dec.accused
    assert rs4.decode(y, issued=np.array([5, 900, 17])).accused == (5, 900)


def test_every_code_family_has_the_identity_code_interface():
    from nnmark import Key
    from nnmark.codes import AndAccCode, ProductAndAccCode, ReedSolomonAndAccCode
    from nnmark.codes.base import IdentityCode

    key = Key.from_seed("iface")
    families = ((AndAccCode.from_key(key, "ag", 7), 56, 1), (ProductAndAccCode.from_key(key, "ag", 5), 900, 2),
                (ReedSolomonAndAccCode.from_key(key, "ag", 5, parts=3), 29 * 29, 3))
    for code, n, parts in families:
        assert isinstance(code, IdentityCode)
        assert code.n_codes == n and len(code.parts) == parts
        assert code.fingerprints([0, 1]).shape == (2, code.dim)
        assert tuple(code.decode(code.fingerprint(1), issued=np.array([1])).accused) == (1,)
