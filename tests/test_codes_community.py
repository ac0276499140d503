"""Community relationship codes on planted-partition graphs."""

import networkx as nx
import numpy as np
import pytest

from nnmark.codes.community import (
    adjacency_matrix,
    community_codes,
    hamming_matrix,
    lle_weights,
    neighbourhood_accuracy,
    pair_accuracy,
)


def planted(l=8, size=30, p_in=0.3, p_out=0.01, seed=0):
    g = nx.planted_partition_graph(l, size, p_in, p_out, seed=seed)
    return g, np.repeat(np.arange(l), size)


@pytest.mark.parametrize("n_bits", [15, 30, 60])
def test_codes_keep_communities_together(n_bits):
    g, y = planted(seed=n_bits)
    cc = community_codes(g, n_bits, seed=1)
    assert cc.bits.shape == (len(y), n_bits) and set(np.unique(cc.bits)) <= {0, 1}
    h = hamming_matrix(cc.bits)
    same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    intra, inter = h[same].mean(), h[y[:, None] != y[None, :]].mean()
    assert intra < 0.5 * inter
    chance = (30 - 1) / (len(y) - 1)
    assert neighbourhood_accuracy(cc.bits, y) > 5 * chance
    # the projected-gradient objective never increases (up to rounding)
    obj = np.array(cc.objective)
    assert (np.diff(obj) <= 1e-9).all() and obj[-1] < obj[0]


def test_harder_graph_still_beats_chance_and_is_deterministic():
    g, y = planted(l=10, size=40, p_in=0.15, p_out=0.02, seed=3)
    a = community_codes(g, 30, seed=2)
    b = community_codes(g, 30, seed=2)
    assert np.array_equal(a.bits, b.bits)
    acc = neighbourhood_accuracy(a.bits, y)
    assert acc > 3 * (39 / 399)
    pa = pair_accuracy(a.bits, y, radius=3)
    assert 0.0 <= pa["precision"] <= 1.0 and pa["accuracy"] > 0.5


def test_unstructured_graph_gives_chance_accuracy():
    """An Erdos-Renyi graph has no communities: random labels are not recovered (the metric can fail)."""
    g = nx.gnp_random_graph(240, 0.1, seed=5)
    y = np.random.default_rng(0).integers(0, 8, 240)
    cc = community_codes(g, 30, seed=0)
    assert neighbourhood_accuracy(cc.bits, y) < 0.25


def test_inputs_and_lle_weights():
    g, _ = planted(l=3, size=10, seed=1)
    dense = nx.to_numpy_array(g)
    a = adjacency_matrix(dense)
    assert (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    directed = np.triu(dense)  # one direction only: symmetrised as in Eq. (4)
    assert (adjacency_matrix(directed) != a).nnz == 0
    w = lle_weights(a @ a + np.eye(30))
    rows = np.asarray(w.sum(axis=1)).ravel()
    isolated = np.asarray(a.sum(axis=1)).ravel() == 0
    assert isolated.any() and np.allclose(rows[~isolated], 1.0) and (rows[isolated] == 0).all()
    with pytest.raises(ValueError):
        adjacency_matrix(np.zeros((3, 4)))
    cc = community_codes(g, 12, seed=0)
    near = cc.nearest(cc.bits[0], radius=0)
    assert 0 in near
