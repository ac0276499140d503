"""The scheme protocol shared by every watermark and fingerprint scheme.

A scheme is constructed from a :class:`~nnmark.keys.Key` and plain parameters;
everything random is derived from the key. It offers:

- :meth:`Scheme.training_hook` -- a :class:`~nnmark.train.TrainingHook` that embeds
  the mark while training (from scratch: "train-to-embed"; from a finished model:
  "fine-tune-to-embed"); :meth:`Scheme.embed` runs nnmark's own loop with it;
- white-box schemes: :meth:`extract` (model -> evidence); black-box schemes:
  :meth:`query` (oracle -> evidence);
- :meth:`Scheme.verify` -- model or oracle -> :class:`~nnmark.stats.Verdict`;
- :meth:`Scheme.save` / :func:`load_scheme` -- a key file (mode 0600) from which
  the scheme is rebuilt exactly.

Schemes register themselves by name in :data:`SCHEMES` so the CLI and configs can
build them from a string.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.errors import KeyFileError
from nnmark.keyfile import KeyFile, load_key_file, save_key_file
from nnmark.keys import Key
from nnmark.stats import Verdict
from nnmark.train import TrainConfig, TrainingHook, TrainRecord, train

SCHEMES: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    SCHEMES[cls.name] = cls
    return cls


class Scheme(ABC):
    """Base class of all schemes. Subclasses set ``name`` and ``access``
    (``"black-box"``: verified through predictions; ``"white-box"``: from weights)."""

    name: ClassVar[str] = ""
    access: ClassVar[str] = "black-box"

    def __init__(self, key: Key) -> None:
        self.key = key
        # The architecture spec the scheme was embedded into (set by embed / load),
        # so that a key used on another architecture is reported clearly.
        self.model_spec: dict[str, Any] | None = None

    @classmethod
    def create(cls, key: Key, model: nn.Module, data: Any = None, **params: Any) -> Scheme:
        """Build the scheme for host ``model`` (and the owner's ``data``, a
        :class:`~nnmark.data.Splits`, for schemes that cut triggers from it).
        ``params`` are the scheme's plain parameters (as given on the command line).
        Default: ``cls(key, **params)``."""
        return cls(key, **params)

    # -- training -------------------------------------------------------------
    @abstractmethod
    def training_hook(self) -> TrainingHook:
        """The hook that embeds this scheme while training."""

    def embed(self, model: nn.Module, data: ImageDataset, config: TrainConfig | None = None, *,
              val: ImageDataset | None = None, description: str = "embedding") -> TrainRecord:
        """Train ``model`` on ``data`` with this scheme's hook (in place)."""
        self.model_spec = dict(getattr(model, "spec", {}) or {}) or None
        return train(model, data, config, val=val, hooks=[self.training_hook()],
                     description=description)

    # -- verification ---------------------------------------------------------
    @abstractmethod
    def verify(self, target: Any, *, alpha: float = 1e-6, **kwargs: Any) -> Verdict:
        """Test ``target`` (a model, or an oracle for black-box schemes)."""

    # -- persistence ----------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Plain JSON-able parameters (no secrets beyond what the key derives)."""

    def material(self) -> dict[str, torch.Tensor]:
        """Secret tensors that cannot be re-derived from the key (default: none)."""
        return {}

    @classmethod
    @abstractmethod
    def from_params(cls, key: Key, params: dict[str, Any],
                    material: dict[str, torch.Tensor]) -> Scheme:
        """Rebuild from a key file's contents."""

    def save(self, path: str | Path) -> None:
        """Write the key file (mode 0600) that rebuilds this scheme."""
        params = dict(self.params())
        if self.model_spec is not None:
            params["model_spec"] = self.model_spec
        save_key_file(path, KeyFile(self.key, self.name, params, self.material()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r})"


def load_scheme(path: str | Path, expect: str | None = None) -> Scheme:
    """Rebuild a scheme from its key file. ``expect``: the scheme family the caller
    needs (e.g. ``"trigger"``); a key file for another scheme is a clear error."""
    kf = load_key_file(path, expect_scheme=expect)
    cls = SCHEMES.get(kf.scheme)
    if cls is None:
        raise KeyFileError(f"{path}: unknown scheme {kf.scheme!r} (known: {', '.join(SCHEMES)})")
    params = dict(kf.params)
    spec = params.pop("model_spec", None)
    try:
        scheme = cls.from_params(kf.key, params, kf.material)
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{path}: invalid parameters for {kf.scheme!r}: {exc}") from None
    scheme.model_spec = spec
    return scheme
