"""The owner's secret key and the deterministic derivation of every random choice.

A :class:`Key` is a 256-bit secret. Every random object a scheme needs (trigger
images, their labels, projection matrices, extractor initialisation, query order)
is derived from it with HMAC-SHA256 under a *purpose* string, so that the key (plus
the scheme's plain parameters) reproduces the scheme exactly, and two purposes
never share randomness.

The secret is never part of ``repr``/``str`` output; only :attr:`Key.key_id`, a
one-way public identifier, is shown.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import numpy as np
import torch

SECRET_BYTES = 32


class Key:
    """A 256-bit owner secret.

    Parameters
    ----------
    secret:
        Exactly 32 bytes. Use :meth:`generate` for a fresh random key or
        :meth:`from_seed` for a reproducible (test / demo only) key.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
            raise ValueError(f"a key secret must be exactly {SECRET_BYTES} bytes")
        self._secret = bytes(secret)

    # -- construction -------------------------------------------------------------
    @classmethod
    def generate(cls) -> Key:
        """A fresh key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_seed(cls, seed: int | str) -> Key:
        """A reproducible key from a public seed. For tests and demos only: anyone
        who knows the seed knows the key."""
        return cls(hashlib.sha256(f"nnmark-demo-key:{seed}".encode()).digest())

    @classmethod
    def from_hex(cls, text: str) -> Key:
        """Parse a 64-character hex string (as stored in key files)."""
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise ValueError("key secret is not valid hex") from exc
        return cls(raw)

    def to_hex(self) -> str:
        """The secret as hex -- for writing key files only; never log it."""
        return self._secret.hex()

    # -- derivation -------------------------------------------------------------
    def derive(self, purpose: str, nbytes: int = 32) -> bytes:
        """``nbytes`` pseudo-random bytes for ``purpose`` (HMAC-SHA256 in counter mode)."""
        out = b""
        counter = 0
        while len(out) < nbytes:
            msg = counter.to_bytes(4, "big") + purpose.encode()
            out += hmac.new(self._secret, msg, hashlib.sha256).digest()
            counter += 1
        return out[:nbytes]

    def seed(self, purpose: str) -> int:
        """A 63-bit integer seed for ``purpose`` (usable by torch and numpy)."""
        return int.from_bytes(self.derive(purpose, 8), "big") >> 1

    def numpy_rng(self, purpose: str) -> np.random.Generator:
        """A numpy Generator seeded from ``purpose``."""
        return np.random.default_rng(np.frombuffer(self.derive(purpose, 32), dtype=np.uint32))

    def torch_generator(self, purpose: str) -> torch.Generator:
        """A CPU torch Generator seeded from ``purpose``."""
        gen = torch.Generator()
        gen.manual_seed(self.seed(purpose))
        return gen

    def child(self, purpose: str) -> Key:
        """An independent sub-key (e.g. one per customer)."""
        return Key(self.derive("child:" + purpose, SECRET_BYTES))

    @property
    def key_id(self) -> str:
        """A public 16-hex-digit identifier: names the key without revealing it."""
        return hashlib.sha256(b"nnmark-key-id:" + self._secret).hexdigest()[:16]

    # -- safety -----------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Key(id={self.key_id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __reduce__(self):  # pragma: no cover - keys are not meant to be pickled
        raise TypeError("Key objects are not picklable; write a key file instead")
