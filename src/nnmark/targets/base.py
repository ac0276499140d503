"""What a verification reads: the target protocol and its error.

A :class:`Target` is the suspect model in whatever form it arrives (an in-memory
``nn.Module``, an nnmark model file, a bare state dict, an ONNX export, an int8
copy). Verification asks it for one of three views:

- :meth:`Target.weights` -- the white-box read-out: float32 tensors by name, in
  PyTorch state-dict naming (``conv4.weight``), dequantised when the suspect is
  quantised. Nothing is executed to produce it.
- :meth:`Target.module` -- a runnable torch module in eval mode, when one can be
  built; otherwise a :class:`TargetError` that says what is missing.
- :meth:`Target.oracle` -- black-box answers: a callable ``x (N, C, H, W) ->
  outputs`` with a ``queries_used`` counter and an optional query budget, like
  :class:`nnmark.oracle.LocalOracle`.

Suspect files come from adversaries: every problem with one is a
:class:`TargetError` with a one-line message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from nnmark.errors import NNMarkError
from nnmark.oracle import LocalOracle, Oracle


class TargetError(NNMarkError):
    """A suspect cannot be read in the requested way (message: one line)."""


def one_line(text: object) -> str:
    """The first non-empty line of ``str(text)`` (error messages stay on one line)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


class Target(ABC):
    """A suspect model in one of its forms (see the module docstring)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the suspect: ``kind``, its source, and notes on how
        names and values were recovered (e.g. dequantised or renamed tensors)."""

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """Float32 CPU tensors by PyTorch state-dict name (dequantised when quantised).

        Integer buffers (e.g. ``num_batches_tracked``) are left out.
        """

    def module(self) -> nn.Module:
        """A runnable torch module in eval mode; :class:`TargetError` when none can be built."""
        raise TargetError(f"{self.describe().get('kind', 'this target')} cannot be run as a torch module")

    def oracle(self, budget: int | None = None) -> Oracle:
        """Black-box answers (labels for a classifier) with ``queries_used``; ``budget``: most images."""
        return LocalOracle(self.module(), budget=budget)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor of :meth:`weights` by name; a :class:`TargetError` lists close names otherwise."""
        weights = self.weights()
        if name in weights:
            return weights[name]
        close = [k for k in weights if name.split(".")[0] in k][:5] or list(weights)[:5]
        raise TargetError(f"no tensor {name!r} in {self.describe().get('kind', 'target')}; has {', '.join(close)}")


def float_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The floating-point (or quantised) entries of ``state`` as float32 CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_quantized:
            value = value.dequantize()
        if value.is_floating_point():
            out[name] = value.detach().to("cpu", torch.float32, copy=True).contiguous()
    return out
