"""Alignment: undo hidden-unit permutations and positive rescalings before a weight mark is read.

The symmetries
--------------
A network that is a *chain* of conv / linear layers with ReLU-like activations, pooling,
dropout, flatten and batch norm in between computes the same function after

- a **permutation** of any hidden layer's units (a conv's output channels, a linear layer's
  outputs) -- its weight rows, bias, the batch norm right after it (affine parameters and
  running statistics) and the next layer's input columns permuted alike (across a flatten
  from a conv to a linear layer, each channel is ``h * w`` consecutive inputs);
- a **positive rescaling** of any hidden unit across its ReLU: the unit's pre-activation
  times ``s > 0`` (its weight row and bias; with a batch norm after it, the norm's weight and
  bias), the next layer's inputs from that unit divided by ``s`` (``relu(s z) = s relu(z)``;
  max / average pooling commute with both). With a batch norm, the conv itself can also be
  scaled by ``t > 0`` (weight and bias), the norm's running mean times ``t`` and its running
  variance set to ``t^2 (var + eps) - eps``: the normalised output is unchanged exactly.

A read-out in a fixed weight order (Uchida's and the projection's filter means, Wang's
secret network, the fingerprint carrier) is scrambled by these transforms although the
model is the same model. :mod:`nnmark.attacks.obfuscate` applies them as attacks.

Alignment
---------
:func:`unit_signature` records, on ``P`` (default 128) probe inputs derived from a key (so
they need not be stored: uniform noise in [0, 1]), the *pre-activation* of every hidden unit
of the reference model (the conv output averaged over space, or the linear output; after the
batch norm when there is one) -- a ``(P, units)`` pattern per hidden layer, stored in float16
centred to unit-norm columns plus each unit's standard deviation (float32), and for conv +
batch-norm layers the standard deviation of the conv's own output as well (128 probes and the
mnist CNN's 704 hidden units: 180 KB).
At verification :func:`align_model` computes the suspect's signature on the same probes and,
layer by layer (each layer on its own: a permutation or scaling of other layers does not
change a unit's pre-activation as a function of the input), matches units by the correlation
of their patterns (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`),
estimates each matched unit's positive scale as the ratio of the patterns' standard deviations
(centred: a fine-tuned bias does not bias the scale -- after FTAL the ratio of RMS values was off
by a factor 1.4-1.9 on average on the mnist5k CNN, of standard deviations 1.1-1.3), and applies the
inverse permutation and scales to a copy of the suspect (:func:`transform_units`). For an
exactly permuted and rescaled copy every matched correlation is 1 and the reference's
weights come back to float precision; after fine-tuning the match degrades gracefully.

Probes: uniform noise matched units of fine-tuned copies best among the families tried
(smooth noise, mid-grey noise with fixed contrast, uniform noise; mnist5k CNN after FTAL on
the attacker's 500 images: every unit of conv1-conv3 recovered, 80% of conv4's), so it is used.

The gate -- and what it does to the nulls
-----------------------------------------
Only the hidden layers that move the carrier are aligned (:func:`relevant_layers`: for conv4's
filter mean, conv3 -- the units conv4 reads -- and conv4 itself), and only when the suspect's
units *match* the reference's: the mean matched correlation of every one of those layers must
reach ``min_correlation`` (default :data:`MIN_CORRELATION` = 0.85). Otherwise the suspect is read
in its own order, exactly as without alignment. The gate is what keeps the nulls honest.
Alignment makes the read-out depend on the marked model: it pulls an independently trained
model's units into the places of the marked model's most similar units, and a read-out keyed
to the marked model then sees part of it. Measured with the alignment forced on every clean
model (20 seeds x 2 keys per scheme and host, ``experiments/results/obfuscation``): on the digits-28 MLP
(256 bits in the head) Uchida's p-values fell below 0.05 for 80% of the clean models (smallest
2e-5), Wang-AUTO claimed one at p = 4e-7 with 28% of its block p-values below 0.05; on the
mnist5k CNN Wang-MANU's block p-values were skewed (KS p 7e-6). Independently trained models
match the reference far below the gate (mnist5k CNN: at most 0.82, MLP: at most 0.45;
permuted / rescaled copies 1.0, fine-tuned or pruned and then permuted copies 0.93-0.99), so
with the gate none of them was aligned and every null measured as before (0 claims; fraction of
p < 0.05 at most 0.1, Wang's block p-values uniform: KS p 0.18-0.89). The threshold was set
between the clean (<= 0.77) and fine-tuned (>= 0.87) digits CNNs of the tests and checked on
those held-out hosts. What this guarantees for a model trained without the key: P(claim) <=
alpha + P(its units match the marked model's at >= 0.85) -- the first term exact (the scheme's
own test on the model's own order), the second measured (0 of 120 clean verdicts per scheme:
60 clean models, 2 keys).
``min_correlation=0`` forces the alignment (for measurement only).

Chains are found by tracing the forward pass (:func:`torch.fx.symbolic_trace`); models whose
hidden layers do not form such a chain (skip connections, branches, grouped convolutions,
attention, batch norm not right after its layer) get an :class:`AlignmentError` naming the
reason, and verification reads them without alignment, saying why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key

DEFAULT_PROBES = 128
MIN_CORRELATION = 0.85
PREFIX = "align."
VERSION = 1

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# positively homogeneous and channel-wise: commute with permutations and positive scales
SCALE_SAFE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                      nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
# element-wise but not homogeneous: commute with permutations only
ORDER_ONLY_MODULES = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.ReLU6, nn.Softplus, nn.Hardswish)
SCALE_SAFE_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d,
                        F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool2d,
                        F.adaptive_max_pool2d}
ORDER_ONLY_FUNCTIONS = {torch.tanh, torch.sigmoid, F.gelu, F.silu, F.elu, F.relu6}
SCALE_SAFE_METHODS = {"relu", "relu_"}
ORDER_ONLY_METHODS = {"tanh", "sigmoid"}


class AlignmentError(SchemeError):
    """The model's hidden units cannot be aligned (no chain of layers, no reference, ...)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
        model = model.module
    return model


# -- the chain of layers ---------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One hidden layer of a chain: module ``name`` with ``units`` outputs, the batch norm
    ``bn`` right after it (or ``None``), the ``next`` weighted layer, which reads each unit
    through ``spatial`` consecutive inputs (``h * w`` across a flatten, else 1), and whether
    every operation up to ``next`` is positively homogeneous (``scale_safe``)."""

    name: str
    units: int
    bn: str | None
    next: str
    spatial: int
    scale_safe: bool


@dataclass(frozen=True)
class Chain:
    """The hidden layers of a model in forward order (``links``) and its output layer
    (``last``, whose units are the model's outputs and are never permuted)."""

    links: tuple[Link, ...]
    last: str

    @property
    def names(self) -> list[str]:
        return [link.name for link in self.links]


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r}"


def _node_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _flatten_start(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """``start_dim`` of a flatten node (``None``: not a flatten)."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Flatten):
        mod = modules[str(node.target)]
        return int(mod.start_dim) if mod.end_dim == -1 else -99
    if (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return int(start) if end == -1 else -99
    return None


def _kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"bn"``, ``"flatten"``, ``"scale"`` (homogeneous), ``"order"`` (permutation only) or ``None``."""
    if _flatten_start(node, modules) is not None:
        return "flatten" if _flatten_start(node, modules) == 1 else None
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, BATCHNORMS):
            return "bn"
        if isinstance(mod, SCALE_SAFE_MODULES):
            return "scale"
        if isinstance(mod, ORDER_ONLY_MODULES):
            return "order"
        return None
    if node.op == "call_function":
        if node.target in SCALE_SAFE_FUNCTIONS:
            return "scale"
        return "order" if node.target in ORDER_ONLY_FUNCTIONS else None
    if node.op == "call_method":
        if node.target in SCALE_SAFE_METHODS:
            return "scale"
        return "order" if node.target in ORDER_ONLY_METHODS else None
    return None


def unit_chain(model: nn.Module) -> Chain:
    """The chain of hidden layers of ``model`` (see the module docs), found by tracing its
    forward pass. :class:`AlignmentError` (one line, naming the reason) when the conv /
    linear layers do not form such a chain."""
    net = unwrap(model)
    modules = dict(net.named_modules())
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no chain can be established
        raise AlignmentError(f"cannot trace the model's forward pass ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    weighted = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), WEIGHTED)]
    names = [str(n.target) for n in weighted]
    every = [n for n, m in modules.items() if isinstance(m, WEIGHTED) and n]
    if len(set(names)) != len(names):
        raise AlignmentError("a conv / linear layer is used more than once in the forward pass (shared weights)")
    if sorted(names) != sorted(every):
        missing = sorted(set(every) - set(names))
        raise AlignmentError(f"layer(s) {', '.join(missing)} are not called in the forward pass")
    if len(weighted) < 2:
        raise AlignmentError("the model has fewer than two conv / linear layers: no hidden units to align")
    links: list[Link] = []
    for i, node in enumerate(weighted[:-1]):
        mod = modules[str(node.target)]
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups != 1:
            raise AlignmentError(f"layer {node.target!r} is a grouped convolution (groups={mod.groups})")
        units = int(mod.weight.shape[0])
        cur, bn, flat, safe = node, None, False, True
        while True:
            users = list(cur.users)
            if len(users) != 1:
                raise AlignmentError(f"the output of {_describe(cur)} after layer {node.target!r} is used "
                                     f"{len(users)} times (branch or skip connection)")
            nxt = users[0]
            if nxt is weighted[i + 1]:
                break
            if nxt.op == "output" or nxt in weighted:
                raise AlignmentError(f"layer {node.target!r} does not feed layer {weighted[i + 1].target!r}")
            if _node_args(nxt) != [cur]:
                raise AlignmentError(f"{_describe(nxt)} after layer {node.target!r} combines several tensors")
            kind = _kind(nxt, modules)
            if kind is None:
                raise AlignmentError(f"{_describe(nxt)} between layers {node.target!r} and {weighted[i + 1].target!r} "
                                     "is not known to commute with unit permutations")
            if kind == "bn":
                norm = modules[str(nxt.target)]
                if cur is not node or bn is not None or int(norm.num_features) != units:
                    raise AlignmentError(f"batch norm {nxt.target!r} does not directly follow layer {node.target!r}")
                bn = str(nxt.target)
            elif kind == "flatten":
                flat = True
            elif kind == "order":
                safe = False
            cur = nxt
        nmod = modules[str(weighted[i + 1].target)]
        if isinstance(nmod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and nmod.groups != 1:
            raise AlignmentError(f"layer {weighted[i + 1].target!r} is a grouped convolution")
        fan_in = int(nmod.weight.shape[1])
        if isinstance(nmod, nn.Linear) and not isinstance(mod, nn.Linear):
            if not flat or fan_in % units:
                raise AlignmentError(f"layer {weighted[i + 1].target!r} does not read layer {node.target!r}'s "
                                     "channels through a flatten")
            spatial = fan_in // units
        else:
            if fan_in != units or isinstance(nmod, nn.Linear) != isinstance(mod, nn.Linear):
                raise AlignmentError(f"layer {weighted[i + 1].target!r} does not read layer {node.target!r}'s "
                                     f"{units} units one to one")
            spatial = 1
        links.append(Link(str(node.target), units, bn, str(weighted[i + 1].target), spatial, safe))
    return Chain(tuple(links), str(weighted[-1].target))


# -- the transforms ----------------------------------------------------------------------------
@torch.no_grad()
def transform_units(model: nn.Module, chain: Chain, perms: dict[str, Any] | None = None,
                    post: dict[str, Any] | None = None, pre: dict[str, Any] | None = None) -> nn.Module:
    """Apply hidden-unit permutations and positive scales to ``model`` **in place** (returns it).

    For each hidden layer named in the dicts: ``perms[name]`` (``(units,)`` long) makes new
    unit ``c`` the old unit ``perms[name][c]``; then ``pre[name]`` (``(units,)`` > 0, batch-norm
    layers only) scales the conv itself and adjusts the norm's running statistics so that its
    output is unchanged; then ``post[name]`` (``(units,)`` > 0) scales the unit's pre-activation
    (the norm's affine parameters when there is a norm, else the layer's weight row and bias)
    and divides the next layer's inputs from the unit by it. Every such transform leaves the
    model's function unchanged (eval mode; up to float round-off)."""
    net = unwrap(model)
    mods = dict(net.named_modules())
    perms, post, pre = perms or {}, post or {}, pre or {}
    known = set(chain.names)
    for name in (*perms, *post, *pre):
        if name not in known:
            raise AlignmentError(f"{name!r} is not a hidden layer of the chain ({', '.join(chain.names)})")
    for link in chain.links:
        lay, nxt = mods[link.name], mods[link.next]
        bn = mods[link.bn] if link.bn else None
        w_next = nxt.weight.view(nxt.weight.shape[0], link.units, -1)  # (out, units, spatial * kernel)
        if link.name in perms:
            p = torch.as_tensor(np.asarray(perms[link.name]), dtype=torch.long)
            if p.shape != (link.units,) or not torch.equal(p.sort().values, torch.arange(link.units)):
                raise AlignmentError(f"perms[{link.name!r}] is not a permutation of {link.units} units")
            _gather(lay.weight, p)
            if lay.bias is not None:
                _gather(lay.bias, p)
            if bn is not None:
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    if t is not None:
                        _gather(t, p)
            w_next.copy_(w_next[:, p.to(w_next.device)].clone())
        if link.name in pre:
            t = _positive(pre[link.name], link)
            if bn is None:  # without a norm the conv's own scale is the unit's scale
                post = {**post, link.name: _positive(post.get(link.name, torch.ones(link.units)), link) * t}
            else:
                if bn.running_mean is None or bn.running_var is None:
                    raise AlignmentError(f"batch norm {link.bn!r} keeps no running statistics")
                shape = (-1,) + (1,) * (lay.weight.dim() - 1)
                lay.weight.mul_(_like(t.view(shape), lay.weight))
                if lay.bias is not None:
                    lay.bias.mul_(_like(t, lay.bias))
                bn.running_mean.mul_(_like(t, bn.running_mean))
                var = bn.running_var.double()
                bn.running_var.copy_(_like(_like(t, var) ** 2 * (var + bn.eps) - bn.eps, bn.running_var))
        if link.name in post:
            s = _positive(post[link.name], link)
            if not link.scale_safe and not torch.allclose(s, torch.ones_like(s)):
                raise AlignmentError(f"an activation after layer {link.name!r} is not positively homogeneous: "
                                     "its units cannot be rescaled")
            if bn is not None:
                if bn.weight is None or bn.bias is None:
                    raise AlignmentError(f"batch norm {link.bn!r} has no affine parameters to scale")
                bn.weight.mul_(_like(s, bn.weight))
                bn.bias.mul_(_like(s, bn.bias))
            else:
                shape = (-1,) + (1,) * (lay.weight.dim() - 1)
                lay.weight.mul_(_like(s.view(shape), lay.weight))
                if lay.bias is not None:
                    lay.bias.mul_(_like(s, lay.bias))
            w_next.div_(_like(s.view(1, -1, 1), w_next))
    return model


def _gather(t: torch.Tensor, p: torch.Tensor) -> None:
    t.copy_(t[p.to(t.device)].clone())


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


def _positive(values: Any, link: Link) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(values, dtype=np.float64)).flatten()
    if s.shape != (link.units,) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise AlignmentError(f"scales for layer {link.name!r} must be {link.units} finite positive numbers")
    return s


# -- probes and signatures ---------------------------------------------------------------------------
def probe_inputs(key: Key, in_shape: tuple[int, ...] | list[int], n: int = DEFAULT_PROBES) -> torch.Tensor:
    """``n`` keyed probe inputs ``(n, *in_shape)``: i.i.d. uniform noise in [0, 1], reproducible
    from ``key`` alone (purpose ``"alignment/probes"``)."""
    gen = key.torch_generator("alignment/probes")
    return torch.rand((int(n), *(int(d) for d in in_shape)), generator=gen)


@dataclass
class LayerSignature:
    """Pre-activations of one hidden layer's units on the probes: ``pattern`` ``(P, units)``
    float16, each unit's pattern centred over the probes and scaled to unit norm (a constant unit:
    a zero column); each unit's standard deviation over the probes ``std`` ``(units,)`` float32;
    for a conv with a batch norm the standard deviation of the conv's own output ``pre_std``
    (else ``None``). Stored exactly as held, so that a key file's material (and its commitment
    digest) survives a load / save round trip unchanged."""

    pattern: torch.Tensor
    std: torch.Tensor
    pre_std: torch.Tensor | None = None

    @classmethod
    def of(cls, z: torch.Tensor, pre: torch.Tensor | None = None) -> LayerSignature:
        """From raw pre-activations ``z`` ``(P, units)`` (and the conv's own output ``pre``)."""
        c = _standardise(z)
        return cls(c.to(torch.float16), _std(z).float(), None if pre is None else _std(pre).float())


@dataclass
class UnitSignature:
    """The signature of a model's hidden units on ``probes`` keyed inputs of shape ``in_shape``."""

    in_shape: tuple[int, ...]
    probes: int
    layers: dict[str, LayerSignature] = field(default_factory=dict)

    def to_material(self) -> dict[str, torch.Tensor]:
        """Key-file tensors (names start with ``"align."``). Size: about ``2 * P * units`` bytes
        (128 probes, the mnist CNN's 704 hidden units: 180 KB)."""
        out = {f"{PREFIX}meta": torch.tensor([VERSION, self.probes], dtype=torch.int64),
               f"{PREFIX}in_shape": torch.tensor(list(self.in_shape), dtype=torch.int64)}
        for i, (name, sig) in enumerate(self.layers.items()):
            out[f"{PREFIX}{name}.pattern"] = sig.pattern
            out[f"{PREFIX}{name}.std"] = sig.std
            out[f"{PREFIX}{name}.order"] = torch.tensor([i], dtype=torch.int64)
            if sig.pre_std is not None:
                out[f"{PREFIX}{name}.pre_std"] = sig.pre_std
        return out

    @classmethod
    def from_material(cls, material: dict[str, torch.Tensor]) -> UnitSignature | None:
        """The signature stored in key material (``None`` when there is none: an older key
        file). :class:`AlignmentError` when it is malformed."""
        if f"{PREFIX}meta" not in material:
            return None
        try:
            version, probes = (int(v) for v in material[f"{PREFIX}meta"].tolist())
            if version != VERSION:
                raise AlignmentError(f"unit signature version {version} is not supported")
            sig = cls(tuple(int(v) for v in material[f"{PREFIX}in_shape"].tolist()), probes)
            names = sorted((k[len(PREFIX):-len(".pattern")] for k in material
                            if k.startswith(PREFIX) and k.endswith(".pattern")),
                           key=lambda n: int(material[f"{PREFIX}{n}.order"][0]))
            for name in names:
                pattern, std = material[f"{PREFIX}{name}.pattern"], material[f"{PREFIX}{name}.std"]
                pre = material.get(f"{PREFIX}{name}.pre_std")
                units = pattern.shape[1] if pattern.dim() == 2 else -1
                if (pattern.dim() != 2 or pattern.shape[0] != probes or std.shape != (units,)
                        or (pre is not None and pre.shape != (units,))):
                    raise AlignmentError(f"the unit signature of layer {name!r} is malformed")
                sig.layers[name] = LayerSignature(pattern, std, pre)
        except (KeyError, ValueError, TypeError, IndexError):
            raise AlignmentError("the unit signature in the key material is malformed") from None
        return sig

    @staticmethod
    def strip(material: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``material`` without the signature's tensors."""
        return {k: v for k, v in material.items() if not k.startswith(PREFIX)}


def _in_shape(model: nn.Module, in_shape: tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    if in_shape is None:
        in_shape = (getattr(unwrap(model), "spec", None) or {}).get("in_shape")
    if in_shape is None:
        raise AlignmentError("the model's input shape is unknown (no spec); give in_shape")
    return tuple(int(d) for d in in_shape)


@torch.no_grad()
def unit_signature(model: nn.Module, key: Key, *, in_shape: tuple[int, ...] | list[int] | None = None,
                   probes: int = DEFAULT_PROBES, chain: Chain | None = None) -> UnitSignature:
    """The pre-activations of every hidden unit of ``model`` on ``probes`` inputs derived from
    ``key`` (see the module docs), in eval mode. ``in_shape``: the input shape without the batch
    dimension (default: the model spec's). :class:`AlignmentError` if there is no chain."""
    net = unwrap(model)
    chain = chain or unit_chain(net)
    shape = _in_shape(net, in_shape)
    mods = dict(net.named_modules())
    grabbed: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(_m, _i, out):
            z = out.detach().float()
            grabbed[name] = z.flatten(2).mean(2) if z.dim() > 2 else z  # (P, units)
        return hook

    handles = []
    for link in chain.links:
        handles.append(mods[link.name].register_forward_hook(grab(link.name)))
        if link.bn:
            handles.append(mods[link.bn].register_forward_hook(grab(f"{link.name}#bn")))
    was = net.training
    net.eval()
    try:
        param = next(net.parameters())
        net(probe_inputs(key, shape, probes).to(param.device, param.dtype))
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    sig = UnitSignature(shape, int(probes))
    for link in chain.links:
        raw = grabbed[link.name].cpu()
        sig.layers[link.name] = LayerSignature.of(grabbed[f"{link.name}#bn"].cpu() if link.bn else raw,
                                                  raw if link.bn else None)
    return sig


def _std(z: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each column over the probes (population, float64)."""
    z = z.double()
    return (z - z.mean(0)).pow(2).mean(0).sqrt()


def _standardise(z: torch.Tensor) -> torch.Tensor:
    c = z.double() - z.double().mean(0)
    n = c.norm(dim=0)
    return torch.where(n > 1e-12 * (1 + z.double().abs().max()), c / n.clamp(min=1e-300), torch.zeros_like(c))


# -- alignment ------------------------------------------------------------------------------------
@dataclass
class AlignmentReport:
    """What :func:`align_model` did. ``applied``: the suspect was brought to the reference's
    unit order and scales; ``reason``: why not, or ``"aligned"``; ``layers``: per aligned hidden
    layer ``mean_correlation`` (of matched units' probe patterns), ``min_correlation``, ``moved``
    (units not at their own index), ``scale_min`` / ``scale_max`` (the suspect's scales relative to
    the reference, before undoing them); ``gate``: the mean matched correlation every layer needs."""

    applied: bool
    reason: str
    gate: float = MIN_CORRELATION
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"alignment": "on" if self.applied else "off", "reason": self.reason, "gate": self.gate,
                "layers": self.layers}


def match_units(reference: torch.Tensor, suspect: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of ``reference`` units to ``suspect`` units by the correlation of
    their patterns (both ``(P, units)``). Returns ``perm`` (reference unit ``c`` is suspect unit
    ``perm[c]``) and the matched correlations ``(units,)`` (0 for a constant pattern)."""
    corr = (_standardise(reference.float()).T @ _standardise(suspect.float())).numpy()
    rows, cols = linear_sum_assignment(-corr)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm, corr[np.arange(len(perm)), perm]


def relevant_layers(chain: Chain, carriers: list[str] | tuple[str, ...] | None) -> list[str]:
    """The hidden layers whose permutation or scaling changes the weights of the ``carriers``
    (layer names; ``None``: every hidden layer): for each carrier, the layer whose units it reads
    (its input order and scales) and the carrier itself when it is hidden (its own units' order
    and scales). Other layers' transforms leave a carrier's weights untouched."""
    if carriers is None:
        return chain.names
    wanted = set(carriers)
    return [link.name for link in chain.links if link.next in wanted or link.name in wanted]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = (num > 1e-12) & (den > 1e-12)
    return torch.where(ok, num.double() / den.double().clamp(min=1e-300), torch.ones_like(num, dtype=torch.float64))


def align_model(suspect: nn.Module, reference: UnitSignature, key: Key, *, carriers: list[str] | None = None,
                min_correlation: float = MIN_CORRELATION) -> tuple[nn.Module, AlignmentReport]:
    """A copy of ``suspect`` brought to the reference's unit order and scales in the hidden layers
    that affect ``carriers`` (:func:`relevant_layers`; default: all), and the report. The suspect
    itself is never modified. It is returned as it is, with ``applied=False`` and the reason, when
    it cannot be aligned (no chain, other layers than the reference's) or when some of those layers'
    mean matched correlation is below ``min_correlation`` (the gate, see the module docs; 0: align
    whatever the match)."""
    try:
        chain = unit_chain(suspect)
    except AlignmentError as exc:
        return suspect, AlignmentReport(False, f"not aligned: {exc}", min_correlation)
    if chain.names != list(reference.layers):
        return suspect, AlignmentReport(False, "not aligned: the suspect's hidden layers "
                                        f"({', '.join(chain.names)}) are not the reference's "
                                        f"({', '.join(reference.layers)})", min_correlation)
    names = relevant_layers(chain, carriers)
    if not names:
        return suspect, AlignmentReport(False, "not aligned: no hidden layer affects the carrier", min_correlation)
    sig = unit_signature(suspect, key, in_shape=reference.in_shape, probes=reference.probes, chain=chain)
    perms: dict[str, np.ndarray] = {}
    post: dict[str, torch.Tensor] = {}
    pre: dict[str, torch.Tensor] = {}
    report = AlignmentReport(False, "", min_correlation)
    for link in chain.links:
        if link.name not in names:
            continue
        ref, sus = reference.layers[link.name], sig.layers[link.name]
        if ref.pattern.shape != sus.pattern.shape:
            return suspect, AlignmentReport(False, f"not aligned: layer {link.name!r} has {sus.pattern.shape[1]} "
                                            f"units, the reference {ref.pattern.shape[1]}", min_correlation)
        perm, corr = match_units(ref.pattern, sus.pattern)
        scale = _ratio(sus.std[perm], ref.std)
        perms[link.name] = perm
        if link.scale_safe:
            post[link.name] = 1.0 / scale
        if link.bn and ref.pre_std is not None and sus.pre_std is not None:
            pre[link.name] = 1.0 / _ratio(sus.pre_std[perm], ref.pre_std)
        report.layers[link.name] = {"units": link.units, "mean_correlation": float(np.mean(corr)),
                                    "min_correlation": float(np.min(corr)),
                                    "moved": int((perm != np.arange(len(perm))).sum()),
                                    "scale_min": float(scale.min()), "scale_max": float(scale.max())}
    worst = min(report.layers, key=lambda n: report.layers[n]["mean_correlation"])
    q = report.layers[worst]["mean_correlation"]
    if q < min_correlation:
        report.reason = (f"not aligned: the suspect's units do not match the reference's (layer {worst!r}: mean "
                         f"matched correlation {q:.3f} < {min_correlation}): read in its own order")
        return suspect, report
    aligned = copy.deepcopy(unwrap(suspect))
    transform_units(aligned, chain, perms, post, pre)
    report.applied = True
    report.reason = "aligned"
    return aligned, report


def align_to_model(suspect: nn.Module, reference: nn.Module, key: Key, *, carriers: list[str] | None = None,
                   enabled: bool = True, min_correlation: float = MIN_CORRELATION
                   ) -> tuple[nn.Module, AlignmentReport]:
    """:func:`align_model` with the signature of ``reference`` computed on the spot (e.g. a
    fingerprinted product's base model). ``enabled=False``: the suspect itself, report "off"."""
    if not enabled:
        return suspect, AlignmentReport(False, "alignment turned off", min_correlation)
    try:
        ref = unit_signature(reference, key)
    except AlignmentError as exc:
        return suspect, AlignmentReport(False, f"not aligned: {exc}", min_correlation)
    return align_model(suspect, ref, key, carriers=carriers, min_correlation=min_correlation)


ALIGNED_NULL = (
    "The suspect was read after aligning its hidden units to the marked model's order and scales, which nnmark "
    "does only for a suspect whose units match the marked model's (mean matched correlation of their "
    f"pre-activations on keyed noise probes >= {MIN_CORRELATION} in every layer that moves the carrier; "
    "independently trained models match far less, see experiments/results/obfuscation): for a model trained "
    "without this key, P(claim) <= alpha + P(it matches that well), and the test above is exact whenever the "
    "model is read in its own order"
)
