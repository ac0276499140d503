"""An nnmark model file (safetensors + architecture spec) as a target.

The file is read by :func:`nnmark.io.load_model` (its checks: no pickles,
bounded header, spec validated, tensors matched to the spec), so the target can
always be run: :meth:`NNMarkFileTarget.module` is the rebuilt zoo network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnmark.errors import ModelFileError
from nnmark.targets.base import Target, TargetError
from nnmark.targets.module import module_weights


class NNMarkFileTarget(Target):
    """A model file written by :func:`nnmark.io.save_model`.

    ``expect_spec``: when given (e.g. from a key file), the file's architecture must match it.
    The file is loaded once, on first use.
    """

    def __init__(self, path: str | Path, expect_spec: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.expect_spec = expect_spec
        self._model: nn.Module | None = None
        self._meta: dict[str, Any] = {}

    def _load(self) -> nn.Module:
        if self._model is None:
            from nnmark.io import load_model

            try:
                self._model, self._meta = load_model(self.path, expect_spec=self.expect_spec)
            except ModelFileError as exc:
                raise TargetError(str(exc)) from None
        return self._model

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's nnmark metadata (spec, data, training record, ...)."""
        self._load()
        return self._meta

    def describe(self) -> dict[str, Any]:
        return {"kind": "nnmark-file", "path": str(self.path), "spec": self.metadata.get("spec")}

    def weights(self) -> dict[str, torch.Tensor]:
        return module_weights(self._load())

    def module(self) -> nn.Module:
        return self._load().eval()
