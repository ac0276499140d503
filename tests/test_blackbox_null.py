"""The Tardos code and the exact null of its score: no model needed, all fast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from nnmark import Key
from nnmark.blackbox.answers import answer_weights
from nnmark.blackbox.null import ScoreNull
from nnmark.codes.tardos import TardosCode, hard_weights, recommended_cutoff, symbol_scores
from nnmark.components import get_component
from nnmark.errors import NNMarkError


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


def test_soft_null_is_valid_and_tight_against_exact_enumeration() -> None:
    """Real answer weights (an API that shows probabilities): the grid p-value never undercuts the exact tail."""
    code = _code(m=12, n=10)
    w = np.random.default_rng(4).uniform(-1, 1, size=12)
    w[[2, 7]] = 0.0  # unscored
    null = ScoreNull(code.biases, weights=w)
    assert null.n_scored == 10 and null.scale == pytest.approx(float(np.sqrt((w * w).sum())))
    up, down = np.sqrt((1 - code.biases) / code.biases), np.sqrt(code.biases / (1 - code.biases))
    values, probs = [], []
    for bits in itertools.product((0, 1), repeat=12):
        x = np.array(bits, dtype=bool)
        values.append(float((w * np.where(x, up, -down)).sum()))
        probs.append(float(np.prod(np.where(x, code.biases, 1 - code.biases))))
    values, probs = np.array(values), np.array(probs)
    for s in np.linspace(values.min() - 1, values.max() + 1, 60):
        exact = probs[values >= s - 1e-12].sum()
        grid = float(null.p_value(s))
        assert grid >= exact - 1e-12
        assert grid <= probs[values >= s - null.delta * null.n_scored - 1e-9].sum() + 1e-12
    # the code's weighted score is the same sum, and hard answers are the weights +-1 / 0
    x = code.codewords(range(10))
    assert np.allclose(code.scores(weights=w, codes=range(10)), (w * np.where(x, up, -down)).sum(1))
    y = np.array([1, 0, -1, 1, 1, 0, 0, -1, 1, 0, 1, 1])
    assert np.allclose(code.scores(y, codes=range(10)), code.scores(weights=hard_weights(y), codes=range(10)))
    assert np.allclose(ScoreNull(code.biases, y).p_value([0.0, 3.0]),
                       ScoreNull(code.biases, weights=hard_weights(y)).p_value([0.0, 3.0]))


def test_soft_answers_of_an_averaged_coalition_keep_innocents_uniform_and_name_the_colluders() -> None:
    """A coalition of 3 whose API shows the fraction of colluders holding each bit (as an averaged model's
    probabilities do) : innocents' p-values are uniform, the colluders' far below the hard majority vote's."""
    code = _code(m=256, n=4000, c=3)
    rng = np.random.default_rng(8)
    frac = code.codewords([0, 1, 2]).mean(0)
    w = np.tanh(2.0 * (2 * frac - 1) + rng.normal(0, 0.5, size=code.m))
    null = ScoreNull(code.biases, weights=w)
    p = null.p_value(code.scores(weights=w))
    assert stats.kstest(p[3:], "uniform", alternative="greater").pvalue > 1e-3
    assert p[3:].min() > 1e-6
    hard = (frac > 0.5).astype(int)
    p_hard = ScoreNull(code.biases, hard).p_value(code.scores(hard, codes=[0, 1, 2]))
    assert np.all(p[:3] < p_hard)


@pytest.mark.parametrize("lie", ["all-b", "one-hot-random", "logits-huge", "nan-and-negative", "rounded"])
def test_an_api_that_returns_crafted_probabilities_cannot_frame_an_innocent(lie: str) -> None:
    """Whatever numbers the API returns, they are read as weights in [-1, 1] that cannot depend on an innocent's
    codeword: innocents' p-values stay valid (one-sided KS) and none reaches the registry-wide level."""
    code = _code(m=256, n=4000, c=5)
    rng = np.random.default_rng(21)
    a = rng.integers(0, 5, size=code.m)
    b = a + 5
    rows = np.full((code.m, 10), 1e-6)
    if lie == "all-b":
        rows[np.arange(code.m), b] = 1.0
    elif lie == "one-hot-random":
        rows[np.arange(code.m), rng.integers(0, 10, size=code.m)] = 1.0
    elif lie == "logits-huge":
        rows = rng.normal(0, 1e30, size=(code.m, 10))
    elif lie == "nan-and-negative":
        rows = rng.uniform(-5, 5, size=(code.m, 10))
        rows[::3, 4] = np.nan
    else:  # probabilities of colluders' fraction, rounded to 2 decimals (many exact zeros and ties)
        frac = code.codewords(range(5)).mean(0)
        rows = np.zeros((code.m, 10))
        rows[np.arange(code.m), b] = np.round(frac, 2)
        rows[np.arange(code.m), a] = np.round(1 - frac, 2)
    w, kind = answer_weights(rows, a, b)
    assert kind in ("probabilities", "logits", "mixed") and np.all(np.abs(w) <= 1) and np.all(np.isfinite(w))
    p = ScoreNull(code.biases, weights=w).p_value(code.scores(weights=w))
    innocents = p[5:]
    assert innocents.min() > 1e-6 / 4000
    if (w != 0).sum() > 30:
        assert stats.kstest(innocents, "uniform", alternative="greater").pvalue > 1e-3


def test_answer_weights_read_probabilities_logits_and_labels_alike() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(50, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    a = rng.integers(0, 10, size=50)
    b = (a + rng.integers(1, 10, size=50)) % 10
    w_l, k_l = answer_weights(logits, a, b)
    w_p, k_p = answer_weights(probs, a, b)
    assert (k_l, k_p) == ("logits", "probabilities") and np.allclose(w_l, w_p)
    assert np.allclose(w_l, np.tanh((logits[np.arange(50), b] - logits[np.arange(50), a]) / 4))
    w_h, k_h = answer_weights(probs, a, b, mode="labels")
    top = probs.argmax(1)
    assert k_h == "labels" and np.array_equal(w_h, np.where(top == b, 1.0, np.where(top == a, -1.0, 0.0)))
    assert np.array_equal(answer_weights(top, a, b)[0], w_h)
    with pytest.raises(NNMarkError):
        answer_weights(probs[:, :3], a, b)  # score rows too short for the keyed labels
