import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from nnmark.stats import (
    Verdict,
    binomial_tail,
    bit_match_verdict,
    clopper_pearson_upper,
    hit_rate_verdict,
    queries_to_significance,
)


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 10, 0.1), (10, 10, 0.5), (40, 100, 0.1), (7, 5, 0.3)])
def test_binomial_tail_matches_direct_sum(k, n, p):
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1))
    assert binomial_tail(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)


def test_binomial_tail_tiny_values_are_positive():
    p = binomial_tail(1000, 1000, 0.5)
    assert 0 < p < 1e-300


def test_clopper_pearson_covers():
    # the bound must be above the observed rate and contain the true rate with high confidence
    rng = np.random.default_rng(0)
    true = 0.05
    covered = sum(clopper_pearson_upper(int(rng.binomial(200, true)), 200, 0.99) >= true for _ in range(500))
    assert covered / 500 >= 0.98
    assert clopper_pearson_upper(0, 1000, 0.999) == pytest.approx(1 - 0.001 ** (1 / 1000), rel=1e-6)


def test_bit_verdict_and_json_roundtrip():
    m = np.random.default_rng(1).integers(0, 2, 256)
    v = bit_match_verdict(m, m, scheme="x")
    assert v.owned and v.statistic == 256 and v.p_value < 1e-70 and v.details["ber"] == 0
    d = json.loads(v.to_json())
    assert {"scheme", "owned", "p_value", "alpha", "statistic", "n", "null_hypothesis"} <= set(d)
    assert Verdict.from_dict(d) == v
    flipped = bit_match_verdict(1 - m, m, scheme="x")
    assert not flipped.owned and flipped.p_value == 1.0


def test_hit_rate_verdict_uniform_null_is_calibrated():
    # under H0 the false-positive rate at alpha must not exceed alpha (binomial test is conservative)
    rng = np.random.default_rng(2)
    alpha, n, p0 = 0.05, 30, 0.1
    fp = sum(hit_rate_verdict(int(rng.binomial(n, p0)), n, p0, scheme="t", null_hypothesis="h",
                              alpha=alpha).owned for _ in range(4000))
    assert fp / 4000 <= alpha
    # the verdict's p-value is the exact tail P[Bin(n, p0) >= k] for every k ...
    ks = np.arange(n + 1)
    tails = np.array([hit_rate_verdict(int(k), n, p0, scheme="t", null_hypothesis="h", alpha=alpha).p_value
                      for k in ks])
    assert np.allclose(tails, sps.binom.sf(ks - 1, n, p0), rtol=1e-9)
    # ... so the test's exact size is the null mass of the rejected counts, and the simulated
    # false-positive rate agrees with it (4 standard errors)
    size = float(sps.binom.pmf(ks[tails < alpha], n, p0).sum())
    assert size <= alpha
    assert abs(fp / 4000 - size) <= 4 * math.sqrt(size * (1 - size) / 4000)


def test_queries_to_significance():
    assert queries_to_significance(np.ones(20), 0.1, 1e-6) == 7
    assert queries_to_significance(np.zeros(20), 0.1, 1e-6) is None


def test_rademacher_tail_is_exact_for_equal_weights_and_never_below_the_true_tail():
    """Equal weights give the binomial tail; random weights: the bound sits at or above the tail counted over
    all 2**12 sign patterns, and close to it."""
    import itertools

    from nnmark.stats import binomial_tail, rademacher_tail

    for k in (24, 30, 41, 48):
        assert rademacher_tail(np.ones(48), 2 * k - 48) == pytest.approx(binomial_tail(k, 48, 0.5), rel=1e-9)
    rng = np.random.default_rng(0)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=12)))
    for _ in range(3):
        w = rng.uniform(0.0, 3.0, 12)
        sums = signs @ w
        for s in (0.0, 2.0, 6.0, 12.0, float(w.sum())):
            exact = float((sums >= s - 1e-12).mean())
            assert exact <= rademacher_tail(w, s) <= exact + 0.01
    assert rademacher_tail(np.zeros(5), 0.0) == 1.0
    with pytest.raises(ValueError):
        rademacher_tail(np.array([1.0, -1.0]), 0.0)


def test_soft_bit_verdict_holds_its_level_over_random_messages():
    """Under H0 (a uniform message independent of the read-outs) the soft test's p is valid: over 4,000 draws,
    heavy-tailed read-outs included, P[p <= a] <= a (within sampling error) at a = 0.05 and 0.01."""
    from nnmark.stats import soft_bit_verdict

    rng = np.random.default_rng(1)
    ps = []
    for i in range(4000):
        r = rng.standard_t(2, 48) * (1 + (i % 3))  # any read-outs: the message is what is random
        m = rng.integers(0, 2, 48)
        ps.append(soft_bit_verdict(r, m, scheme="t").p_value)
    ps = np.array(ps)
    assert (ps <= 0.05).mean() <= 0.05 + 0.01 and (ps <= 0.01).mean() <= 0.01 + 0.005
    assert (ps <= 0.05).mean() >= 0.03  # and not uselessly conservative
    with pytest.raises(ValueError):
        soft_bit_verdict(np.array([np.nan, 1.0]), np.array([0, 1]), scheme="t")
