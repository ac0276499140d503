"""A customer's full fingerprint ``F = CRC || CIC`` (SecureMark-DL section IV-C) and its tracing.

``F`` is the real vector a carrier (the projection regulariser) embeds:

- the community relationship code (CRC, ``crc_bits`` bits) as ``±1`` values ``2 p - 1``;
- the customer identity code (CIC): the AND-ACC fingerprint ``w_j`` of one codebook
  (:class:`~nnmark.codes.andacc.AndAccCode`), of two side by side
  (:class:`~nnmark.codes.andacc.ProductAndAccCode`), or of several chained by a
  Reed-Solomon outer code (:class:`~nnmark.codes.concatenated.ReedSolomonAndAccCode`).

Tracing takes the extracted real vector of the same length: the CRC part is read
by sign (for an average of copies: the colluders' majority bits, which points at
their community -- a shortlist, never an accusation) and the CIC part is decoded
exactly with the guarded AND-ACC decoder, which says whose codes the coefficients carry.
Because the fingerprint is linear in the code, a combination of other copies can carry an
innocent's code (a frame); a product names a customer only on evidence of that customer's
own secret component (:mod:`nnmark.fingerprint.own`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nnmark.codes.andacc import AndAccCode, AndAccDecoding, ProductAndAccCode, ProductDecoding
from nnmark.codes.concatenated import ConcatenatedDecoding, ReedSolomonAndAccCode


@dataclass(frozen=True)
class FingerprintTrace:
    """Result of :meth:`FingerprintLayout.trace`.

    crc_bits: ``(crc_bits,)`` uint8 signs of the extracted CRC part (empty if none).
    crc_strength: ``(crc_bits,)`` absolute extracted CRC values (about 1 where all colluders agree).
    cic: the identity-code decoding (accused code indices and p-values live there).
    """

    crc_bits: np.ndarray
    crc_strength: np.ndarray
    cic: AndAccDecoding | ProductDecoding | ConcatenatedDecoding

    @property
    def accused_codes(self) -> tuple[int, ...]:
        """Accused code indices (codeword index for one codebook, customer code for a product code)."""
        return self.cic.accused

    def to_dict(self) -> dict[str, Any]:
        return {
            "crc_bits": "".join(str(int(b)) for b in self.crc_bits),
            "cic": self.cic.to_dict(),
        }


class FingerprintLayout:
    """How ``F = CRC || CIC`` is laid out.

    Parameters
    ----------
    cic: the identity code (one AND-ACC codebook or a product of two).
    crc_bits: length of the community code part (0 to leave it out).
    """

    def __init__(self, cic: AndAccCode | ProductAndAccCode | ReedSolomonAndAccCode, crc_bits: int = 0) -> None:
        if crc_bits < 0:
            raise ValueError("crc_bits must be >= 0")
        self.cic = cic
        self.crc_bits = int(crc_bits)

    @property
    def dim(self) -> int:
        """Length of ``F``."""
        return self.crc_bits + self.cic.dim

    @property
    def n_codes(self) -> int:
        """Number of distinct identity codes (customers the layout can serve)."""
        return self.cic.n_codes

    def compose(self, code_index: int, crc: np.ndarray | None = None) -> np.ndarray:
        """``F`` (``(dim,)`` float64) for identity code ``code_index`` and the ``(crc_bits,)`` 0/1 community code."""
        cic = self.cic.fingerprint(code_index)
        if self.crc_bits == 0:
            return cic
        if crc is None:
            raise ValueError(f"this layout needs a {self.crc_bits}-bit community code")
        crc = np.asarray(crc).ravel()
        if crc.size != self.crc_bits or not np.isin(crc, (0, 1)).all():
            raise ValueError(f"the community code must be {self.crc_bits} bits of 0/1")
        return np.concatenate([2.0 * crc - 1.0, cic])

    def split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(crc part, cic part)`` of an extracted vector."""
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.size != self.dim:
            raise ValueError(f"extracted vector has length {y.size}, the fingerprint layout {self.dim}")
        return y[: self.crc_bits], y[self.crc_bits :]

    def trace(
        self, y: np.ndarray, issued: np.ndarray | None = None, tau: float | None = None, scale: float = 1.0
    ) -> FingerprintTrace:
        """Trace an extracted vector: CRC signs plus the exact guarded CIC decoding.

        ``issued`` (product codes only): customer codes actually handed out (see
        :meth:`ProductAndAccCode.decode`). ``tau``: ``None`` (default) for the structural decoder, or
        the paper's hard threshold. ``scale``: the carrier's calibrated gain.
        """
        crc, cic = self.split(y)
        dec = self.cic.decode(cic, issued=issued, tau=tau, scale=scale)
        return FingerprintTrace((crc > 0).astype(np.uint8), np.abs(crc) / float(scale), dec)
