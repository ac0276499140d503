"""nnmark: watermarks, fingerprints and ownership verification for PyTorch models.

The pieces (see the README for a tour):

- :mod:`nnmark.keys` -- the 256-bit owner secret and the derivation of every random choice;
- :mod:`nnmark.stats` -- :class:`~nnmark.stats.Verdict` and the statistical tests behind it;
- :mod:`nnmark.data` -- bundled real datasets and loaders for standard on-disk formats;
- :mod:`nnmark.models` -- the host networks of the papers, built from a small spec;
- :mod:`nnmark.train` -- one training loop used for plain training, embedding and attacks;
- :mod:`nnmark.io` -- safe model files (safetensors + JSON metadata, never unpickled);
- :mod:`nnmark.schemes` -- watermark / fingerprint schemes on one protocol;
- :mod:`nnmark.attacks` -- removal attacks (fine-tuning, pruning, ...);
- :mod:`nnmark.serving` -- an HTTP prediction server and a budgeted client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnmark.errors import NNMarkError

if TYPE_CHECKING:
    from nnmark.keys import Key
    from nnmark.stats import Verdict

__all__ = ["Key", "NNMarkError", "Verdict"]
__version__ = "0.1.0"

# ``Key`` and ``Verdict`` pull in torch and scipy (about 2 s); they are imported on first use so
# that ``nnmark --help`` and light tools that only need ``nnmark.errors`` start at once.
_LAZY = {"Key": "nnmark.keys", "Verdict": "nnmark.stats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nnmark' has no attribute {name!r}")
