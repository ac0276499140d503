"""The interface every identity-code family implements (one AND-ACC codebook, two side by side, L chained).

A fingerprint product, its layout and the tracer use only this surface, never the concrete class:

- ``n_codes``: how many customers (identity codes) the code serves -- one name for the size;
- ``dim``: the fingerprint length; ``k``: the block size (up to ``k - 1`` colluders are traced exactly);
- ``parts``: the AND-ACC codebooks the fingerprint is the concatenation of (one, two, or ``L``);
- ``fingerprint(code)`` / ``fingerprints(codes)``: the real fingerprint ``(dim,)`` / ``(n, dim)`` of codes;
- ``decode(y, issued=None, tau=None, scale=1.0)``: trace an extracted vector; ``issued`` (the codes handed out)
  matters only when there are several parts;
- ``params()``: plain description.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class IdentityCode(Protocol):
    """See the module docs."""

    n_codes: int
    dim: int
    k: int

    @property
    def parts(self) -> list[Any]: ...

    def fingerprint(self, code: int) -> np.ndarray: ...

    def fingerprints(self, codes: Any) -> np.ndarray: ...

    def decode(self, y: np.ndarray, issued: np.ndarray | None = None, tau: float | None = None,
               scale: float = 1.0) -> Any: ...

    def params(self) -> dict[str, Any]: ...
