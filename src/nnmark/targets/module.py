"""An in-memory ``nn.Module`` as a target, including PyTorch's int8 modules.

Any user module works: :meth:`ModuleTarget.weights` is its state dict's float
tensors. Quantised modules are read back to float under the float model's names:

- dynamic quantisation (``torch.ao.quantization.quantize_dynamic``): a
  ``DynamicQuantizedLinear`` keeps its weight in packed parameters
  (``fc1._packed_params._packed_params``); the read-out is
  ``fc1.weight = module.weight().dequantize()`` and ``fc1.bias``.
- eager static quantisation (``prepare`` / ``convert``, usually inside a
  ``QuantWrapper``): ``QuantizedConv2d`` / ``QuantizedLinear`` hold qint8 weights
  (per-tensor or per-channel); the read-out dequantises them, drops the
  activation scales and zero points, and strips the wrapper's ``module.`` prefix,
  so ``module.conv4.weight`` (qint8) reads as ``conv4.weight`` (float32).

A dequantised weight differs from the float original by at most half a
quantisation step per element (``scale / 2``, per channel where per-channel).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QuantWrapper

from nnmark.oracle import LocalOracle, Oracle
from nnmark.targets.base import Target, float_tensors

_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                       "torch.nn.quantized", "torch.nn.intrinsic.quantized")


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_QUANTIZED_PACKAGES)


def unwrap(model: nn.Module) -> nn.Module:
    """The float model's root: ``model.module`` for a ``QuantWrapper``, else ``model``."""
    return model.module if isinstance(model, QuantWrapper) else model


def module_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 weights of ``model`` by the float model's state-dict names (see module docstring)."""
    raw: dict[str, Any] = {}
    for prefix, mod in unwrap(model).named_modules():
        dot = f"{prefix}." if prefix else ""
        if _is_quantized(mod):
            if callable(getattr(mod, "weight", None)):
                raw[f"{dot}weight"] = mod.weight()
                bias = mod.bias() if callable(getattr(mod, "bias", None)) else None
                if bias is not None:
                    raw[f"{dot}bias"] = bias
                continue
            if type(mod).__name__ in ("Quantize", "DeQuantize"):
                continue  # activation scale / zero point, not weights of the float model
        for name, value in mod.named_parameters(recurse=False):
            raw[f"{dot}{name}"] = value
        for name, value in mod.named_buffers(recurse=False):
            raw[f"{dot}{name}"] = value
    return float_tensors(raw)


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a PyTorch quantised module."""
    return any(_is_quantized(m) for m in model.modules())


class ModuleTarget(Target):
    """A target around an in-memory module (any architecture; float or PyTorch int8).

    ``model``: the suspect; it is put in eval mode when run. ``source``: an optional
    description of where it came from (shown by :meth:`describe`).
    """

    def __init__(self, model: nn.Module, source: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModuleTarget needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.source = source

    def describe(self) -> dict[str, Any]:
        cls = type(unwrap(self.model))
        out: dict[str, Any] = {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}",
                               "quantized": is_quantized_model(self.model)}
        if self.source:
            out["source"] = self.source
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return module_weights(self.model)

    def module(self) -> nn.Module:
        return self.model.eval()

    def oracle(self, budget: int | None = None) -> Oracle:
        return LocalOracle(self.model, budget=budget)
