"""Loaders for SNAP graph files (https://snap.stanford.edu/data/), read from a user's local copy.

Edge lists (e.g. ``facebook_combined.txt.gz``, ``twitter_combined.txt.gz``): one
edge a line, two whitespace-separated integer node ids; lines starting with
``#`` are comments; blank lines are skipped; a trailing ``.gz`` means gzip.
Community files (e.g. ``com-amazon.all.cmty.txt.gz``): one community a line, its
member node ids separated by whitespace.

Every problem is a :class:`~nnmark.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp

from nnmark.errors import DataError


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SNAP file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                text = line.strip()
                if text and not text.startswith("#"):
                    yield lineno, text
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from exc


def read_edges(path: str | Path) -> np.ndarray:
    """The ``(E, 2)`` int64 array of edges in file order."""
    edges: list[tuple[int, int]] = []
    for lineno, text in _lines(path):
        parts = text.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected two node ids, got {len(parts)} fields: {text[:60]!r}")
        try:
            edges.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise DataError(f"{path}:{lineno}: node ids must be integers: {text[:60]!r}") from None
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2)


def load_edge_list(path: str | Path, *, directed: bool = False) -> nx.Graph:
    """A SNAP edge list as a networkx ``Graph`` (``DiGraph`` if ``directed``); nodes are the integer ids,
    in order of first appearance; self-loops are dropped. An empty file is a ``DataError``."""
    edges = read_edges(path)
    if len(edges) == 0:
        raise DataError(f"{path}: no edges")
    g = nx.DiGraph() if directed else nx.Graph()
    g.add_edges_from(edges.tolist())
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    return g


def load_adjacency(path: str | Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """A SNAP edge list as a symmetric 0/1 CSR adjacency (undirected, no self-loops) plus the ``(M,)`` node ids
    (sorted) that index its rows."""
    edges = read_edges(path)
    if len(edges) == 0:
        raise DataError(f"{path}: no edges")
    ids, inv = np.unique(edges, return_inverse=True)
    inv = inv.reshape(-1, 2)
    keep = inv[:, 0] != inv[:, 1]
    r, c = inv[keep, 0], inv[keep, 1]
    m = len(ids)
    a = sp.coo_matrix((np.ones(2 * len(r)), (np.r_[r, c], np.r_[c, r])), shape=(m, m)).tocsr()
    a.data[:] = 1.0
    return a, ids


def load_communities(path: str | Path) -> list[list[int]]:
    """A SNAP community file: one list of member node ids per line."""
    out: list[list[int]] = []
    for lineno, text in _lines(path):
        try:
            out.append([int(t) for t in text.split()])
        except ValueError:
            raise DataError(f"{path}:{lineno}: member ids must be integers: {text[:60]!r}") from None
    return out
