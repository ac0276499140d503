"""The secret, key-derived order in which a product hands out its identity codes.

Handed out in their natural order, AND-ACC codes from AG(2, q) give the first ``q`` customers one parallel
class, the next ``q`` the next class, and so on: a coalition that knows its place in the issue order knows its
codes and can weight its copies to cancel itself out and leave an innocent's code (see
:mod:`nnmark.fingerprint.own`, which is what makes such a frame harmless). A keyed order hides that place:

- one codebook (:class:`~nnmark.codes.andacc.AndAccCode`) and the Reed-Solomon chained codes
  (:class:`~nnmark.codes.concatenated.ReedSolomonAndAccCode`: any issued set decodes): a uniformly random
  permutation of all code indices, drawn from the key;
- two codebooks side by side (:class:`~nnmark.codes.andacc.ProductAndAccCode`): the order must keep its
  structure (the Sidon diagonals first, so that the issued pairs stay free of rectangles -- two colluders and
  two innocents holding the same two A- and B-codewords), so the key relabels the codewords of each half by a
  random permutation (a relabelling maps rectangles to rectangles, so the diagonals stay rectangle-free) and
  shuffles the order inside the rectangle-free prefix and inside the rest (any prefix of a shuffled
  rectangle-free set is a subset of it, hence rectangle-free).

The order is drawn once, when the registry is created, and stored there (the ``rank`` of each code); the key
reproduces it (:func:`secret_issue_order`).
"""

from __future__ import annotations

import numpy as np

from nnmark.codes.andacc import AndAccCode, ProductAndAccCode, sidon_shifts
from nnmark.codes.concatenated import ReedSolomonAndAccCode
from nnmark.keys import Key

PURPOSE = "fingerprint/code-order"


def secret_issue_order(key: Key, code: AndAccCode | ProductAndAccCode | ReedSolomonAndAccCode) -> np.ndarray:
    """All identity code indices of ``code`` (``(n_codes,)`` int64, a permutation) in a key-derived order.

    ``key``: the product key (the order derives from it under its own purpose). See the module doc for the
    structure kept for two codebooks side by side.
    """
    if isinstance(code, ProductAndAccCode):
        return _product_order(key, code)
    n = code.n_codes
    rng = key.numpy_rng(f"{PURPOSE}:{type(code).__name__}:{n}")
    return rng.permutation(n).astype(np.int64)


def _product_order(key: Key, code: ProductAndAccCode) -> np.ndarray:
    na, nb = code.a.n_codewords, code.b.n_codewords
    rng = key.numpy_rng(f"{PURPOSE}:ProductAndAccCode:{na}x{nb}")
    pa, pb = rng.permutation(na), rng.permutation(nb)
    natural = code.issue_order()
    relabelled = pa[natural // nb] * nb + pb[natural % nb]
    head = len(sidon_shifts(min(na, nb))) * min(na, nb)  # the rectangle-free diagonals
    first, rest = relabelled[:head].copy(), relabelled[head:].copy()
    rng.shuffle(first)
    rng.shuffle(rest)
    return np.concatenate([first, rest]).astype(np.int64)
