"""Fingerprint codes: finite fields, BIBDs, AND anti-collusion codes and community codes.

- :mod:`nnmark.codes.galois` -- GF(q) for q a prime or prime power.
- :mod:`nnmark.codes.bibd` -- (v, k, 1)-BIBDs from AG(2, q) and PG(2, q).
- :mod:`nnmark.codes.andacc` -- AND-ACC codebooks, modulation on a keyed orthonormal
  basis, the exact guarded colluder decoder, two codebooks side by side.
- :mod:`nnmark.codes.concatenated` -- L codebooks chained by a Reed-Solomon outer code:
  up to L - 1 colluders traced exactly among p**2 customers.
- :mod:`nnmark.codes.community` -- community relationship codes (NMF + LLE hashing).
- :mod:`nnmark.codes.fingerprint` -- the layout ``F = CRC || CIC`` and tracing of an extracted vector.
- :mod:`nnmark.codes.order` -- the secret, key-derived order in which a product hands out its codes.
"""

from nnmark.codes.andacc import (
    DEFAULT_TAU,
    NULL_HYPOTHESIS,
    AndAccCode,
    AndAccDecoding,
    ProductAndAccCode,
    ProductDecoding,
    haar_basis,
)
from nnmark.codes.bibd import Design, affine_plane, design, projective_plane
from nnmark.codes.community import (
    CommunityCodes,
    community_codes,
    hamming_matrix,
    neighbourhood_accuracy,
    pair_accuracy,
)
from nnmark.codes.concatenated import ConcatenatedDecoding, ReedSolomonAndAccCode
from nnmark.codes.fingerprint import FingerprintLayout, FingerprintTrace
from nnmark.codes.galois import GF
from nnmark.codes.order import secret_issue_order

__all__ = [
    "DEFAULT_TAU",
    "GF",
    "ReedSolomonAndAccCode",
    "NULL_HYPOTHESIS",
    "AndAccCode",
    "AndAccDecoding",
    "CommunityCodes",
    "ConcatenatedDecoding",
    "Design",
    "FingerprintLayout",
    "FingerprintTrace",
    "ProductAndAccCode",
    "ProductDecoding",
    "affine_plane",
    "community_codes",
    "design",
    "hamming_matrix",
    "haar_basis",
    "neighbourhood_accuracy",
    "pair_accuracy",
    "projective_plane",
    "secret_issue_order",
]
