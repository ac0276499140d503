"""A bare state dict as a target: weights by name, no architecture.

A state dict published without nnmark metadata (a safetensors file, or a ``.pt``
read with ``weights_only=True``) is enough for white-box verification: the
verifier names the tensor (``conv4.weight``), and no architecture is needed.
Running it (black-box checks, serving, attacks) needs the architecture, named by
the verifier as ``package.module:callable`` (see :mod:`nnmark.targets.factory`).

State dicts of PyTorch int8 models are read back to float under the float
model's names: quantised tensors are dequantised, the packed ``(weight, bias)``
of a quantised Linear (``fc1._packed_params._packed_params``) becomes
``fc1.weight`` / ``fc1.bias``, activation scales and zero points of quantised
layers are dropped, and a ``QuantWrapper``'s ``module.`` prefix is stripped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnmark.targets.base import Target, TargetError, float_tensors
from nnmark.targets.factory import build_from_factory, load_into
from nnmark.targets.readers import PACKED_DTYPE_SUFFIX, PACKED_SUFFIX


def normalise_state(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of ``raw`` under the float model's names (see the module docstring); values unchanged."""
    out: dict[str, torch.Tensor] = {}
    quant_layers: set[str] = set()
    for key, value in raw.items():
        if key.endswith(PACKED_SUFFIX):
            layer = key[: -len(PACKED_SUFFIX)]
            weight, bias = value
            out[f"{layer}.weight"] = weight
            if bias is not None:
                out[f"{layer}.bias"] = bias
            quant_layers.add(layer)
        elif key.endswith(PACKED_DTYPE_SUFFIX):
            continue
        elif isinstance(value, torch.Tensor):
            if value.is_quantized and key.endswith(".weight"):
                quant_layers.add(key[: -len(".weight")])
            out[key] = value
    for layer in quant_layers:  # output activation scale / zero point of a quantised layer
        out.pop(f"{layer}.scale", None)
        out.pop(f"{layer}.zero_point", None)
    if quant_layers and "quant.scale" in out and "quant.zero_point" in out:  # a QuantWrapper's layout
        rest = [k for k in out if not k.startswith(("quant.", "dequant."))]
        if rest and all(k.startswith("module.") for k in rest):
            out = {k[len("module."):]: v for k, v in out.items() if k.startswith("module.")}
    return out


class StateDictTarget(Target):
    """A state dict read from a file.

    ``tensors``: the raw mapping read from the file (see :mod:`nnmark.targets.readers`).
    ``source``: the file's path, for messages. ``kind``: ``"safetensors-state-dict"`` or
    ``"torch-state-dict"``. ``factory`` / ``factory_kwargs``: the verifier's
    architecture (``"package.module:callable"``), needed only by :meth:`module`.
    """

    def __init__(self, tensors: dict[str, Any], source: str, kind: str, *, factory: str | None = None,
                 factory_kwargs: dict[str, Any] | str | None = None) -> None:
        self.state = normalise_state(tensors)
        self.quantized = any(v.is_quantized for v in self.state.values()) or any(
            k.endswith(PACKED_SUFFIX) for k in tensors)
        self.source = source
        self.kind = kind
        self.factory = factory
        self.factory_kwargs = factory_kwargs

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.source, "tensors": len(self.state),
                               "quantized": self.quantized}
        if self.factory:
            out["architecture"] = self.factory
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return float_tensors(self.state)

    def module(self) -> nn.Module:
        if not self.factory:
            raise TargetError(f"{self.source} is a bare state dict with no architecture: "
                              "give --arch package.module:factory to run it")
        state = {k: (v.dequantize() if v.is_quantized else v) for k, v in self.state.items()}
        return load_into(build_from_factory(self.factory, self.factory_kwargs), state, self.factory, self.source)
