"""A weights-only stand-in module: white-box read-out from tensors alone, no architecture needed.

A bare state dict or an ONNX export gives weights but (without a factory) no runnable
module. A white-box scheme only reads one layer's weight, so :func:`weights_view`
builds a module that holds exactly the named layers -- a ``Conv1d/2d/3d`` or a
``Linear`` per tensor, shaped from the tensor (on the ``meta`` device first, so
nothing is initialised), with the suspect's tensor as its weight and no bias. The
schemes' carrier read-out (:mod:`nnmark.schemes.layers`) then works unchanged. The
view cannot be run (``forward`` raises): alignment, which needs activations, is not
available for it, and verdicts say so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nnmark.targets.base import Target, TargetError

_CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class WeightsView(nn.Module):
    """Holds layers named like the scheme's carrier layers; not runnable (see the module docs)."""

    runnable = False

    def forward(self, *args: object) -> torch.Tensor:  # pragma: no cover - guard
        raise TargetError("a weights-only view of a suspect cannot be run (give an architecture to run it)")


def _layer_for(weight: torch.Tensor) -> nn.Module:
    w = weight.detach().float()
    if w.ndim == 2:
        mod: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    elif w.ndim in _CONVS:
        mod = _CONVS[w.ndim](w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, device="meta")
    else:
        raise TargetError(f"a {w.ndim}-d tensor of shape {tuple(w.shape)} is not a conv or linear weight")
    mod.weight = nn.Parameter(w.clone(), requires_grad=False)
    return mod


def weights_view(layers: Mapping[str, torch.Tensor]) -> WeightsView:
    """A :class:`WeightsView` with one conv/linear layer per ``{layer name: weight tensor}`` (dotted names
    become nested modules, so ``features.3`` stays ``features.3``)."""
    view = WeightsView()
    for name, weight in layers.items():
        parent: nn.Module = view
        parts = name.split(".")
        for part in parts[:-1]:
            child = getattr(parent, part, None)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], _layer_for(weight))
    return view.eval()


class PinnedTarget(Target):
    """A target whose carrier tensors are named by the verifier: ``pins`` maps a scheme's layer to the suspect's
    tensor name (``"*"``: whatever layer the scheme reads), e.g. ``{"conv4": "backbone.block4.conv.weight"}``."""

    def __init__(self, inner: Target, pins: Mapping[str, str]) -> None:
        self.inner, self.pins = inner, dict(pins)

    def describe(self) -> dict:
        return {**self.inner.describe(), "pinned_tensors": dict(self.pins)}

    def weights(self) -> dict[str, torch.Tensor]:
        return self.inner.weights()

    def module(self) -> nn.Module:
        return self.inner.module()

    def oracle(self, budget: int | None = None):  # noqa: ANN201 - the inner target's oracle
        return self.inner.oracle(budget)


def carrier_module(target: Target | nn.Module, layers: list[str], tensors: Mapping[str, str] | None = None
                   ) -> tuple[nn.Module, bool]:
    """The module a white-box scheme reads its ``layers`` from, and whether it can be run.

    An ``nn.Module`` is used as it is; a :class:`Target` gives its runnable module when it has one,
    otherwise a :func:`weights_view` of the tensors ``tensors[layer]`` (default ``"<layer>.weight"``).
    A missing tensor is a :class:`TargetError` that names the closest available ones."""
    if isinstance(target, nn.Module):
        from nnmark.schemes.layers import weighted_layers

        if isinstance(target, WeightsView) or all(layer in weighted_layers(target) for layer in layers):
            return target, not isinstance(target, WeightsView)
        # e.g. a PyTorch int8 module: its quantised layers are no float conv/linear -- read its dequantised weights
        from nnmark.targets.module import ModuleTarget

        target = ModuleTarget(target)
        tensors = dict(tensors or {}) or {layer: f"{layer}.weight" for layer in layers}
    tensors = dict(tensors or {})
    if isinstance(target, PinnedTarget):
        pins = target.pins
        tensors = {layer: pins[layer] if layer in pins else pins["*"] for layer in layers
                   if layer in pins or "*" in pins} | tensors
    if not tensors:
        try:
            return target.module(), True
        except TargetError:
            pass
    weights = target.weights()
    picked = {}
    for layer in layers:
        name = tensors.get(layer, f"{layer}.weight")
        if name not in weights:
            stem = name.rsplit(".", 1)[0].split(".")[-1]
            near = [k for k in weights if stem in k][:5] or list(weights)[:5]
            raise TargetError(f"the suspect has no tensor {name!r} for layer {layer!r} (e.g. {', '.join(near)}); "
                              f"name it with --tensor {layer}=NAME")
        picked[layer] = weights[name]
    return weights_view(picked), False
