"""The Tardos code and the exact null of its score: no model needed, all fast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from nnmark import Key
from nnmark.blackbox.null import ScoreNull
from nnmark.codes.tardos import TardosCode, recommended_cutoff, symbol_scores
from nnmark.components import get_component


def _code(seed: str = "tardos-test", m: int = 256, n: int = 4000, c: int = 3) -> TardosCode:
    return TardosCode.from_key(Key.from_seed(seed), m=m, n_codes=n, colluders=c)


def test_code_is_keyed_and_biases_respect_the_cutoff() -> None:
    a, b, other = _code(), _code(), _code("another-vendor")
    assert np.array_equal(a.codewords(range(50)), b.codewords(range(50)))
    assert np.array_equal(a.codeword(1500), a.codewords([1500])[0])  # block derivation is consistent
    assert not np.array_equal(a.codewords(range(50)), other.codewords(range(50)))
    t = recommended_cutoff(3)
    assert a.cutoff == t and a.biases.min() >= t and a.biases.max() <= 1 - t
    # arcsine density: as many biases below 0.1 as above 0.9, far more than a uniform law would give
    assert abs((a.biases < 0.1).mean() - (a.biases > 0.9).mean()) < 0.08
    assert (a.biases < 0.1).mean() > 0.12
    bits = a.codewords()
    assert abs(bits.mean(0) - a.biases).max() < 0.05  # Bernoulli(p_i) columns over 4,000 codewords
    with pytest.raises(ValueError):
        a.codeword(4000)


def test_registered_as_a_code_component() -> None:
    comp = get_component("code", "tardos")
    assert comp.load() is TardosCode
    assert comp.resolve({"m": 64})["m"] == 64


def test_symbol_scores_have_mean_zero_and_unit_variance_under_h0() -> None:
    p = np.array([0.02, 0.3, 0.5, 0.9])
    for y in (0, 1):
        s1, s0 = symbol_scores(p, np.full(4, y))
        mean = p * s1 + (1 - p) * s0
        var = p * s1 ** 2 + (1 - p) * s0 ** 2
        assert np.allclose(mean, 0) and np.allclose(var, 1)
    s1, s0 = symbol_scores(p, np.full(4, -1))
    assert not s1.any() and not s0.any()


def test_null_is_valid_and_tight_against_exact_enumeration() -> None:
    code = _code(m=12, n=10)
    rng = np.random.default_rng(3)
    y = rng.integers(-1, 2, size=12)
    y[:3] = (0, 1, 1)
    null = ScoreNull(code.biases, y)
    s1, s0 = symbol_scores(code.biases, y)
    values, probs = [], []
    for bits in itertools.product((0, 1), repeat=12):
        x = np.array(bits, dtype=bool)
        values.append(float(np.where(x, s1, s0).sum()))
        probs.append(float(np.prod(np.where(x, code.biases, 1 - code.biases))))
    values, probs = np.array(values), np.array(probs)
    for s in np.linspace(values.min() - 1, values.max() + 1, 60):
        exact = probs[values >= s - 1e-12].sum()
        grid = float(null.p_value(s))
        assert grid >= exact - 1e-12  # never smaller than the exact tail
        # and larger only through scores within the stated shift (sum of delta over scored symbols)
        assert grid <= probs[values >= s - null.delta * null.n_scored - 1e-9].sum() + 1e-12


@pytest.mark.parametrize("attack", ["random", "majority-of-3", "interleave-of-5", "all-refused"])
def test_innocent_p_values_are_uniform_whatever_the_answers(attack: str) -> None:
    code = _code(m=256, n=4000, c=5)
    rng = np.random.default_rng(11)
    colluders = [0, 1, 2, 3, 4]
    x = code.codewords(colluders)
    if attack == "random":
        y = rng.integers(-1, 2, size=code.m)
    elif attack == "majority-of-3":
        y = (x[:3].sum(0) >= 2).astype(int)
    elif attack == "interleave-of-5":
        y = x[rng.integers(0, 5, size=code.m), np.arange(code.m)].astype(int)
    else:
        y = np.full(code.m, -1)
    p = ScoreNull(code.biases, y).p_value(code.scores(y))
    innocents = p[5:]
    if attack == "all-refused":
        assert np.all(innocents == 1.0)
        return
    # the reported p-values are never too small (one-sided KS: P[p <= x] <= x); rounding every term up to the
    # default grid makes them conservative by up to 0.05 null standard deviations (about 0.01 at the median)
    assert stats.kstest(innocents, "uniform", alternative="greater").pvalue > 1e-3
    assert innocents.min() > 1e-6
    # on a 10x finer grid the same innocents' p-values are uniform (two-sided KS): the null law itself is right
    fine = ScoreNull(code.biases[:128], y[:128], delta=0.005 / np.sqrt(max(1, int((y[:128] >= 0).sum()))))
    p_fine = fine.p_value(code.scores(y[:128], codes=range(5, code.n_codes), symbols=np.arange(128)))
    if attack != "all-refused":
        assert stats.kstest(p_fine, "uniform").pvalue > 1e-3


def test_chernoff_bound_is_valid_and_names_a_majority_coalition() -> None:
    """Beyond the DP's budget the Chernoff bound is used; it never undercuts the grid's tail, and at m = 1,024
    a majority vote of 3 codewords names every colluder at the registry-wide level 1e-6 / 4,000."""
    code = _code(m=1024, n=4000, c=3)
    x = code.codewords([0, 1, 2])
    y = (x.sum(0) >= 2).astype(int)
    null = ScoreNull(code.biases, y)
    assert null.method == "chernoff"
    p = null.p_value(code.scores(y))
    assert p[:3].max() < 1e-6 / 4000 and p[3:].min() > 1e-6 / 4000
    small = ScoreNull(code.biases[:128], y[:128])
    s = np.linspace(0, 60, 31)
    assert small.method == "grid" and np.all(small.chernoff(s) >= small._grid_p(s) - 1e-15)


def test_innocent_p_values_are_uniform_over_keys() -> None:

    y = np.random.default_rng(5).integers(0, 2, size=128)
    ps = []
    for i in range(300):
        code = TardosCode.from_key(Key.from_seed(f"vendor-{i}"), m=128, n_codes=1, colluders=2)
        ps.append(float(ScoreNull(code.biases, y).p_value(code.scores(y))[0]))
    assert stats.kstest(ps, "uniform").pvalue > 1e-3
