"""SNAP edge-list loader on small files written in SNAP's format."""

import gzip

import pytest

from nnmark.data.snap import load_adjacency, load_communities, load_edge_list, read_edges
from nnmark.errors import DataError

TEXT = """# Undirected graph: facebook_combined.txt
# Nodes: 5 Edges: 5
0 1
0\t2
1 2

3 4
7 7
"""


def test_plain_and_gzip(tmp_path):
    plain = tmp_path / "g.txt"
    plain.write_text(TEXT)
    gz = tmp_path / "g.txt.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(TEXT)
    for path in (plain, gz):
        assert read_edges(path).tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [7, 7]]
        g = load_edge_list(path)
        assert g.number_of_edges() == 4 and set(g.nodes) == {0, 1, 2, 3, 4, 7}
        a, ids = load_adjacency(path)
        assert ids.tolist() == [0, 1, 2, 3, 4, 7]
        assert a.shape == (6, 6) and a.nnz == 8 and (a != a.T).nnz == 0
        assert a.diagonal().sum() == 0
    assert load_edge_list(plain, directed=True).is_directed()


@pytest.mark.parametrize("bad", ["0 1\n2\n", "0 1\na b\n", "0 1\n0 1 2\n"])
def test_malformed_lines(tmp_path, bad):
    p = tmp_path / "bad.txt"
    p.write_text(bad)
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        load_edge_list(p)


def test_missing_empty_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_edge_list(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(DataError, match="no edges"):
        load_edge_list(empty)
    corrupt = tmp_path / "c.txt.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_edge_list(corrupt)


def test_communities(tmp_path):
    p = tmp_path / "cmty.txt"
    p.write_text("1 2 3\n# c\n4\t5\n")
    assert load_communities(p) == [[1, 2, 3], [4, 5]]
    p.write_text("1 x\n")
    with pytest.raises(DataError):
        load_communities(p)
