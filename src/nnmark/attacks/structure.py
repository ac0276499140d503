"""Structural obfuscation: function-preserving edits that change a model's layers, not only their order.

Beyond permuting and rescaling units (:mod:`nnmark.attacks.obfuscate`), a thief can rebuild the network
so that its weights no longer sit where a white-box mark reads them (the "neural structural obfuscation"
family) while every output stays the same (eval mode; up to float round-off):

- :class:`FoldBatchNorm` (``"fold-bn"``): each batch norm folded into the conv before it (the conv's
  weight and bias absorb the norm; the norm becomes the identity). A model without batch norm is
  returned unchanged (``cost["folded"]`` 0);
- :class:`SplitUnits` (``"split"``): ``units`` randomly chosen units of every hidden layer each split in
  two (random positive scales on the copies' inputs, random shares of the outgoing weights), the layer
  then permuted -- every hidden layer is wider;
- :class:`DummyUnits` (``"dummy"``): ``units`` extra units a layer whose contributions cancel (pairs of
  proportional units with opposite outgoing weights, ``kind="cancel"``, or units with zero outgoing
  weights, ``kind="zero"``), then permuted;
- :class:`MergeDuplicates` (``"merge"``): positively proportional units merged into one (the inverse of
  splitting; a model without duplicates is unchanged).

The widths in the model's ``spec`` follow (:func:`nnmark.unit_surgery.respec`), so the result saves and
loads. The width defence is :func:`nnmark.unit_surgery.restore_widths`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from nnmark.alignment import BATCHNORMS, transform_units, unit_chain, unwrap
from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.attacks.obfuscate import random_permutations
from nnmark.data.dataset import ImageDataset
from nnmark.keys import Key
from nnmark.params import Param, Params
from nnmark.unit_surgery import merge_duplicates, remap_units, respec

_LAYERS = Param("layers", list, None, "hidden layers to edit (default: every hidden layer)", optional=True,
                item=str)


def _check_layers(model: nn.Module, layers: list[str] | None) -> list[str]:
    names = unit_chain(model).names
    if layers is None:
        return names
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise AttackError(f"not hidden layers of the model: {', '.join(unknown)} (hidden: {', '.join(names)})")
    return list(layers)


def _permute_all(model: nn.Module, seed: int, layers: list[str]) -> nn.Module:
    chain = unit_chain(model)
    return transform_units(model, chain, perms=random_permutations(chain, seed, layers))


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a conv / linear layer into it, **in place**: the layer's
    weight row ``* g / sqrt(var + eps)``, its bias ``(b - mean) * g / sqrt(var + eps) + beta``; the norm is
    left as the identity (weight 1, bias 0, mean 0, variance ``1 - eps``). Returns the norms folded (eval-mode
    function unchanged)."""
    net = unwrap(model)
    mods = dict(net.named_modules())
    graph = torch.fx.symbolic_trace(net).graph
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), BATCHNORMS):
            continue
        prev = node.args[0] if node.args else None
        lay = mods.get(str(prev.target)) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if not isinstance(lay, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or len(prev.users) != 1:
            continue
        bn = mods[str(node.target)]
        if bn.running_mean is None or bn.running_var is None:
            continue
        std = (bn.running_var.double() + bn.eps).sqrt()
        g = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        factor = g / std
        shape = (-1,) + (1,) * (lay.weight.dim() - 1)
        bias = lay.bias.double() if lay.bias is not None else torch.zeros_like(std)
        lay.weight.copy_((lay.weight.double() * factor.view(shape)).to(lay.weight.dtype))
        new_bias = ((bias - bn.running_mean.double()) * factor + beta).to(lay.weight.dtype)
        if lay.bias is None:
            lay.bias = nn.Parameter(new_bias)
        else:
            lay.bias.copy_(new_bias)
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        folded += 1
    return folded


class FoldBatchNorm(Attack):
    """Fold every batch norm into the conv / linear layer before it (the norm becomes the identity); the
    function is unchanged. ``cost["folded"]``: how many norms were folded (0: the model has none)."""

    name = "fold-bn"
    PARAMS = Params(SEED)

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(models[0])
        self.cost["folded"] = fold_batch_norms(stolen)
        return stolen.eval()


class SplitUnits(Attack):
    """Split ``units`` random units of every hidden layer (or of ``layers``) in two, then permute each layer:
    copy ``j`` of unit ``u`` gets incoming weights times ``s_j`` (log-uniform in ``[low, high]``) and outgoing
    weights times ``a_j / s_j`` (shares ``a`` uniform, summing to 1). The function is unchanged; each edited
    layer is ``units`` wider."""

    name = "split"
    PARAMS = Params(
        Param("units", int, 8, "units split in two per hidden layer (capped at the layer's width)", low=1),
        Param("low", float, 0.5, "smallest scale of a copy's incoming weights (log-uniform)", low=1e-6),
        Param("high", float, 2.0, "largest scale of a copy's incoming weights (log-uniform)", low=1e-6),
        SEED, _LAYERS,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        if self.low > self.high:
            raise AttackError(f"split needs low <= high, got [{self.low}, {self.high}]")
        stolen = copy.deepcopy(unwrap(models[0]))
        names = _check_layers(stolen, self.layers)
        rng = np.random.default_rng([self.seed, 0x5B117])
        added = {}
        for name in names:
            link = next(lk for lk in unit_chain(stolen).links if lk.name == name)
            k = min(self.units, link.units)
            chosen = rng.choice(link.units, size=k, replace=False)
            share = rng.uniform(0.2, 0.8, size=k)
            if link.scale_safe:
                s1 = np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=k))
                s2 = np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=k))
            else:
                s1 = s2 = np.ones(k)
            src = np.concatenate([np.arange(link.units), chosen])
            scale = np.ones(len(src))
            coef = np.ones(len(src))
            scale[chosen], coef[chosen] = s1, share / s1
            scale[link.units:], coef[link.units:] = s2, (1 - share) / s2
            remap_units(stolen, link, src, scale, coef)
            added[name] = k
        respec(stolen)
        self.cost["units_added"] = added
        return _permute_all(stolen, self.seed, names).eval()


class DummyUnits(Attack):
    """Add ``units`` dummy units to every hidden layer (or to ``layers``), then permute each layer. ``kind``
    ``"cancel"``: pairs of copies of random existing units' inputs (scaled by ``t`` and ``t'``) whose
    outgoing weights ``c / t`` and ``-c / t'`` (``c`` random, like real weights) cancel; ``"zero"``: copies
    with zero outgoing weights. The function is unchanged (up to float round-off)."""

    name = "dummy"
    PARAMS = Params(
        Param("units", int, 8, "dummy units added per hidden layer (cancel: rounded up to an even number)", low=1),
        Param("kind", str, "cancel", "cancelling pairs or zero-output units", choices=("cancel", "zero")),
        SEED, _LAYERS,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(unwrap(models[0]))
        names = _check_layers(stolen, self.layers)
        rng = np.random.default_rng([self.seed, 0xD0111])
        gen = torch.Generator().manual_seed(self.seed)
        added = {}
        for name in names:
            link = next(lk for lk in unit_chain(stolen).links if lk.name == name)
            pairs = -(-self.units // 2) if self.kind == "cancel" else self.units
            base = rng.choice(link.units, size=pairs, replace=pairs > link.units)
            t = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=(pairs, 2))) if link.scale_safe else np.ones(
                (pairs, 2))
            if self.kind == "cancel":
                src = np.concatenate([np.arange(link.units), base, base])
                scale = np.concatenate([np.ones(link.units), t[:, 0], t[:, 1]])
            else:
                src = np.concatenate([np.arange(link.units), base])
                scale = np.concatenate([np.ones(link.units), t[:, 0]])
            remap_units(stolen, link, src, scale, np.ones(len(src)))
            mods = dict(stolen.named_modules())
            wn = mods[link.next].weight
            n = len(src)
            with torch.no_grad():
                view = wn.view(wn.shape[0], n, -1)
                rms = float(view[:, : link.units].pow(2).mean().sqrt())
                if self.kind == "cancel":
                    c = torch.randn((view.shape[0], pairs, view.shape[2]), generator=gen, dtype=torch.float64) * rms
                    ta = torch.as_tensor(t[:, 0]).view(1, -1, 1)
                    tb = torch.as_tensor(t[:, 1]).view(1, -1, 1)
                    view[:, link.units: link.units + pairs] = (c / ta).to(view.dtype)
                    view[:, link.units + pairs:] = (-c / tb).to(view.dtype)
                else:
                    view[:, link.units:] = 0
            added[name] = n - link.units
        respec(stolen)
        self.cost["units_added"] = added
        return _permute_all(stolen, self.seed, names).eval()


class MergeDuplicates(Attack):
    """Merge units whose pre-activations are positively proportional (on 64 seeded noise probes) into one
    unit; the function is unchanged. A model without duplicate units is returned unchanged."""

    name = "merge"
    PARAMS = Params(SEED, _LAYERS)

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(unwrap(models[0]))
        names = _check_layers(stolen, self.layers)
        spec = getattr(stolen, "spec", None) or {}
        shape = spec.get("in_shape") or (tuple(data.image_shape) if data is not None else None)
        if shape is None:
            raise AttackError("merge needs the model's input shape (a spec) or attacker data")
        from nnmark.alignment import probe_inputs

        probes = probe_inputs(Key.from_seed(f"merge-{self.seed}"), shape, 64)
        self.cost["units_removed"] = merge_duplicates(stolen, probes, layers=names)
        return stolen.eval()
